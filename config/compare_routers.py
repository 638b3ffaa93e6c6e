# Routers side by side: 6 routers and a Switch variant x 3 seeds = 21 runs of one small MoE
# GPT on the default 'domains' dataset (train.py generates it on first use), then
# out-compare/results.md and its plots.
#   python compare.py config/compare_routers.py --jobs=2
# RESULTS.md has the tables, the wall time on the 2-core CPU and what they say.
#
# On a GPU, a bigger model (sizes only; the --train flag updates the dict below; not run
# here, this machine has no GPU):
#   python compare.py config/compare_routers.py --compare_dir=out-compare-gpu --train="{'device': 'cuda',
#     'n_layer': 8, 'n_head': 8, 'n_embd': 512, 'block_size': 256, 'batch_size': 32,
#     'max_iters': 5000, 'lr_decay_iters': 5000, 'warmup_iters': 200, 'eval_interval': 250, 'eval_iters': 50}"

routers = ['dense', 'topk', 'gatepro', 'ortho_var', 'aux_free', 'switch', 'switch-nodrop']  # 'dense': the dense twin, n_exp=1
# Switch with room for every token (capacity 8 x N / 8 experts = N): does dropping explain its loss?
variants = {'switch-nodrop': dict(router='switch', capacity_factor=8.0, eval_capacity_factor=8.0)}
seeds = [1337, 1338, 1339]
compare_dir = 'out-compare'

# train.py keys for every run. Not top_k, aux_loss_coef or z_loss_coef: switch is top-1
# and aux_free takes no Switch balance loss, so such keys go in per_router.
train = dict(
    dataset='domains',
    n_layer=4,
    n_head=4,
    n_embd=64,
    n_exp=8,
    batch_size=16,
    block_size=64,
    max_iters=600,
    lr_decay_iters=600,
    warmup_iters=30,
    eval_interval=100,
    eval_iters=10,
    log_interval=10,
)

# train.py keys for one router's runs, e.g. {'topk': {'top_k': 1}, 'gatepro': {'gatepro_penalty': 1e-4}};
# every router here runs with its own defaults (routers.py)
per_router = {}
