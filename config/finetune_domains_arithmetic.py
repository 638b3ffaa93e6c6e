# Fine-tune an MoE pretrained on all five domains of the default dataset on arithmetic
# alone, and watch the exact-match accuracy of its answers ('37+85=' -> '122') move.
# First:  python train.py   (the default run: an MoE on 'domains', saved in out/)
#         python data/domains/prepare.py --only=arithmetic --out_dir=data/domains_arithmetic
# Then:   python train.py config/finetune_domains_arithmetic.py
# The vocabulary and the domain ids are the full dataset's, so the checkpoint loads as is;
# the MoE layout and the router (and its settings) are the checkpoint's unless set here.
# About half the default run's time on a 2-core CPU: the same model, 300 steps of its 600.

init_from = 'out'  # a new run from out/ckpt.pt: iteration 0, a fresh optimizer
out_dir = 'out-finetune-arithmetic'
dataset = 'domains_arithmetic'

max_iters = 300
lr_decay_iters = 300
eval_interval = 50
eval_iters = 20
eval_answers = 64  # arithmetic prompts of the val split answered greedily at each eval
learning_rate = 5e-4
min_lr = 5e-5
warmup_iters = 10
