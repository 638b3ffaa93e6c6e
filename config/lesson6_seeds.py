# Lesson 6 (lessons/6-ortho-var.md): top-k against the orthogonality and variance losses,
# over three seeds.
#   python compare.py config/lesson6_seeds.py
import os
exec(open(os.path.join(os.path.dirname(__file__), 'lesson_base.py')).read())
routers = ['topk', 'ortho_var']
seeds = [1337, 1338, 1339]
compare_dir = 'out-lesson6'
