# MoE against its dense twin with nanoGPT's CPU recipe for character-level tiny Shakespeare
# (4 layers, 4 heads, 128 wide, block 64, batch 12, 2000 iterations, lr 1e-3 -> 1e-4,
# warmup 100, dropout 0). The MoE: 8 experts, top-2 (topk and its default losses), each
# expert half as wide as the dense MLP, so both spend the same FFN compute per token.
# First, once: python data/shakespeare_char/prepare.py   (or --input=/path/to/input.txt)
#   python compare.py config/results_moe_vs_dense.py --jobs=2
# writes out-results-moe-vs-dense/results.md and curves.png; results_moe_vs_dense_domains.py
# runs the same on the default 'domains' dataset.

routers = ['dense', 'topk']
seeds = [1337, 1338, 1339]
compare_dir = 'out-results-moe-vs-dense'

train = dict(
    dataset='shakespeare_char',
    n_layer=4,
    n_head=4,
    n_embd=128,
    n_exp=8,
    block_size=64,
    batch_size=12,
    dropout=0.0,
    learning_rate=1e-3,
    min_lr=1e-4,
    max_iters=2000,
    lr_decay_iters=2000,
    warmup_iters=100,
    eval_interval=250,
    eval_iters=20,
    log_interval=25,
)
