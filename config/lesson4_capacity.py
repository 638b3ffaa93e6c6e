# Lesson 4 (lessons/4-capacity.md): Switch with its capacity factor 1.25, with a tight 1.0,
# and with room for every token (8 x N / 8 experts = N).
#   python compare.py config/lesson4_capacity.py
import os
exec(open(os.path.join(os.path.dirname(__file__), 'lesson_base.py')).read())
routers = ['switch-cf1.0', 'switch', 'switch-nodrop']
variants = {'switch-cf1.0': dict(router='switch', capacity_factor=1.0),
            'switch-nodrop': dict(router='switch', capacity_factor=8.0, eval_capacity_factor=8.0)}
compare_dir = 'out-lesson4'
