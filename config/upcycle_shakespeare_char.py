# Sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055) on tiny Shakespeare: the
# trained dense twin (config/train_shakespeare_char_dense.py) becomes an MoE of 8 experts,
# each a copy of its layer's MLP, with fresh random gates, and trains on.
# First:  python data/shakespeare_char/prepare.py
#         python train.py config/train_shakespeare_char_dense.py --max_iters=1000 --lr_decay_iters=1000
# Then:   python train.py config/upcycle_shakespeare_char.py
# Its first eval is the dense model's val loss (top-2, renormalized, no capacity: identical
# experts whose weights sum to 1); compare the curve with the dense run trained on.
# A few minutes each on a 2-core CPU: a step of the upcycled model costs about 2.3x, and
# one of the dense twin 1.4x, a step of the default `python train.py` (600 steps, ~2 min),
# timed side by side in one process on a machine shared with other jobs.
import os

exec(open(os.path.join(os.path.dirname(__file__), 'train_shakespeare_char_moe.py')).read())

init_from = 'out-shakespeare-char-dense'  # a new run from its ckpt.pt: iteration 0, a fresh optimizer
out_dir = 'out-shakespeare-char-upcycled'
wandb_run_name = 'shakespeare-char-upcycled'

# 8 experts of the MLP's full width (expert_hidden = 4 * n_embd, set from the checkpoint),
# top-2: twice the dense model's active FFN compute per token, as in the paper's top-2 MoEs
n_exp = 8
router = 'topk'
upcycle_noise = 0.0  # > 0 makes the copies differ a little
upcycle_drop_ratio = 0.0  # Drop-Upcycling (arXiv 2502.19261) re-initialises this share of each copy; paper: 0.5

max_iters = 500
lr_decay_iters = 500
eval_interval = 100
learning_rate = 5e-4  # the trained weights need smaller steps than a model from scratch
min_lr = 5e-5
warmup_iters = 20
