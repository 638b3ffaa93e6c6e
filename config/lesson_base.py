# The model of the lessons (lessons/README.md): small enough that a run of 300 steps takes
# about a minute on a laptop's CPU. Each lesson's config runs this file, then picks its
# routers; a config can still change any key, e.g. train['n_exp'] = 16. Alone, it is
# lesson 1's run: top-k, one seed.
#   python compare.py config/lesson_base.py
routers = ['topk']
seeds = [1337]
compare_dir = 'out-lesson1'
jobs = 2  # two runs at once, one core each
train = dict(
    device='cpu',  # the lessons' numbers and times are a CPU's, on a GPU or a Mac too
    dataset='domains',
    n_layer=2,
    n_head=4,
    n_embd=64,
    n_exp=8,
    batch_size=16,
    block_size=64,
    max_iters=300,
    lr_decay_iters=300,
    warmup_iters=30,
    eval_interval=50,
    eval_iters=5,
    log_interval=10,  # zero-token experts are counted on logged steps only
)
