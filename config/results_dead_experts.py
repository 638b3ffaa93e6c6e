# Where experts die: 32 experts, top-2, on the default 'domains' dataset. Without a balance
# loss top-k leaves most experts of the upper layers without tokens for the whole run; does
# GatePro (Zheng et al., arXiv 2510.13079) bring them back, with its penalty lambda = 1e4
# (this project's default) and with the paper's literal 1e-4? Each with and without the
# Switch balance loss (aux_loss_coef 0.01, the routers' default).
#   python compare.py config/results_dead_experts.py --jobs=2
# writes out-results-dead-experts/results.md and curves.png; RESULTS.md has the numbers and
# how long it took. On a GPU, the same question at a larger size: results_dead_experts_gpu.py.

routers = ['topk-noaux', 'gatepro-noaux', 'gatepro-1e-4-noaux', 'topk', 'gatepro', 'gatepro-1e-4']
variants = {
    'topk-noaux': dict(router='topk', aux_loss_coef=0.0),
    'gatepro-noaux': dict(router='gatepro', aux_loss_coef=0.0),
    'gatepro-1e-4-noaux': dict(router='gatepro', gatepro_penalty=1e-4, aux_loss_coef=0.0),
    'gatepro-1e-4': dict(router='gatepro', gatepro_penalty=1e-4),
}
seeds = [1337, 1338, 1339]
compare_dir = 'out-results-dead-experts'

train = dict(
    dataset='domains',
    n_layer=4,
    n_head=4,
    n_embd=64,
    n_exp=32,  # enough that without a balance loss most of them die (RESULTS.md)
    batch_size=16,
    block_size=64,
    max_iters=1000,
    lr_decay_iters=1000,
    warmup_iters=30,
    eval_interval=100,
    eval_iters=10,
    log_interval=10,  # zero-token experts are counted on logged steps only
)
