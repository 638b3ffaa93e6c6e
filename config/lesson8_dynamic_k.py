# Lesson 8 (lessons/8-dynamic-k.md): a token takes as many experts as it needs. Top-2 against
# top-p routing (Huang et al. 2024) and ReLU routing (ReMoE, Wang et al. 2025), on the
# lessons' small model.
#   python compare.py config/lesson8_dynamic_k.py
import os
exec(open(os.path.join(os.path.dirname(__file__), 'lesson_base.py')).read())
routers = ['topk', 'topp', 'remoe']
compare_dir = 'out-lesson8'
