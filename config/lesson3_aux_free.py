# Lesson 3 (lessons/3-aux-free.md): DeepSeek-V3's bias against top-k, both without a balance
# loss, and the bias frozen at 0 (update rate 0: plain sigmoid top-k).
#   python compare.py config/lesson3_aux_free.py
import os
exec(open(os.path.join(os.path.dirname(__file__), 'lesson_base.py')).read())
routers = ['topk-noaux', 'aux_free-frozen', 'aux_free']
variants = {'topk-noaux': dict(router='topk', aux_loss_coef=0.0),
            'aux_free-frozen': dict(router='aux_free', aux_free_update_rate=0.0)}
compare_dir = 'out-lesson3'
