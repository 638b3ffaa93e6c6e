# The dense twin of train_shakespeare_char_moe.py: everything equal, one MLP of width
# 4*n_embd instead of 8 experts of width 2*n_embd with top-2 routing, so both models
# spend the same FFN compute per token. Compare their val losses.
import os

exec(open(os.path.join(os.path.dirname(__file__), 'train_shakespeare_char_moe.py')).read())

out_dir = 'out-shakespeare-char-dense'
wandb_run_name = 'shakespeare-char-dense'
n_exp = 1  # 0 or 1 = dense MLP
