# Lesson 5 (lessons/5-gatepro.md): GatePro's competition against plain top-k.
#   python compare.py config/lesson5_gatepro.py
import os
exec(open(os.path.join(os.path.dirname(__file__), 'lesson_base.py')).read())
routers = ['topk', 'gatepro']
compare_dir = 'out-lesson5'
