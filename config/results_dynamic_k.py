# A token takes as many experts as it needs: top-p routing (Huang et al. 2024, arXiv
# 2403.07652), ReLU routing (ReMoE, Wang et al. 2025, arXiv 2412.14711) and null experts
# (MoE++, arXiv 2410.07348) against top-2, at the same mean number of experts per token
# (about 2: top_p and n_null_exp were tuned on one seed; RESULTS.md says how close each
# came), with experts of the same width in every row. And the Switch balance loss counted
# over each micro-batch against over the global batch (Qiu et al. 2025, arXiv 2501.11873),
# with gradient accumulation (4 micro-batches of 4 sequences) so that the two differ.
#   python compare.py config/results_dynamic_k.py --jobs=2
# writes out-results-dynamic-k/results.md and curves.png; RESULTS.md has the numbers and
# how long it took.

routers = ['topk', 'topp-0.33', 'remoe', 'topk-null', 'topk-ga4', 'topk-ga4-global']
variants = {
    'topp-0.33': dict(router='topp', top_p=0.33),  # tuned: 0.3 gave 1.87 experts per token, 0.4 gave 2.38
    'topk-null': dict(router='topk', top_k=3, n_null_exp=3),  # tuned: 2 null experts gave 2.28, 4 gave 1.82
    # (their evals score eval_iters x 4 = 40 val sequences, the other rows 160: compare these two with each other)
    'topk-ga4': dict(router='topk', batch_size=4, gradient_accumulation_steps=4),
    'topk-ga4-global': dict(router='topk', batch_size=4, gradient_accumulation_steps=4, balance_scope='global'),
}
seeds = [1337, 1338, 1339]
compare_dir = 'out-results-dynamic-k'

train = dict(
    dataset='domains',
    device='cpu',
    n_layer=4,
    n_head=4,
    n_embd=64,
    n_exp=8,
    expert_hidden=128,  # top-2's width (4 * 64 / 2) in every row, whatever its top_k
    batch_size=16,
    block_size=64,
    max_iters=600,
    lr_decay_iters=600,
    warmup_iters=30,
    eval_interval=100,
    eval_iters=10,
    log_interval=10,
)
