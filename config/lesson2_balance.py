# Lesson 2 (lessons/2-balance.md): top-k with and without the Switch balance loss, 16 experts.
#   python compare.py config/lesson2_balance.py
import os
exec(open(os.path.join(os.path.dirname(__file__), 'lesson_base.py')).read())
train['n_exp'] = 16  # more experts than the lessons' default: more of them can die
routers = ['topk-noaux', 'topk']
variants = {'topk-noaux': dict(router='topk', aux_loss_coef=0.0)}
compare_dir = 'out-lesson2'
