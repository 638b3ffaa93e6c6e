# A character-level MoE GPT on tiny Shakespeare, small enough for a laptop CPU.
# First: python data/shakespeare_char/prepare.py   (or --input=/path/to/input.txt offline)
# Then:  python train.py config/train_shakespeare_char_moe.py
# On a GPU, nanoGPT's "baby GPT" size works well: --n_layer=6 --n_head=6 --n_embd=384
# --block_size=256 --batch_size=64 --max_iters=5000 --lr_decay_iters=5000 --dropout=0.2

out_dir = 'out-shakespeare-char-moe'
eval_interval = 250  # the model overfits a small dataset: watch val loss often
eval_iters = 50
log_interval = 25
always_save_checkpoint = False  # save only when val improves

wandb_log = False
wandb_project = 'nanorouter'
wandb_run_name = 'shakespeare-char-moe'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 32
block_size = 128  # characters of context

n_layer = 4
n_head = 4
n_embd = 192
dropout = 0.1

# 8 experts, top-2 (topk's default), each expert half the dense MLP's width: the active
# FFN compute per token equals the dense twin's (config/train_shakespeare_char_dense.py).
# top_k and the loss coefficients are left to the router: --router=switch is then top-1.
n_exp = 8
router = 'topk'

learning_rate = 1e-3  # a small model can take a large step
max_iters = 3000
lr_decay_iters = 3000  # usually = max_iters
min_lr = 1e-4  # learning_rate / 10, Chinchilla
beta2 = 0.99  # a little larger than usual, since the batch is small
warmup_iters = 100
