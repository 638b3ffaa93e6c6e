# GatePro hot-swap (Zhang et al., arXiv 2510.13079, ask when the competition helps): on for
# the first 25 / 50 / 75% of training and then off, against always on and never (plain
# top-k), in the dead-experts setting of results_dead_experts.py: 32 experts, top-2, no
# balance loss, lambda = 1e4.
#   python compare.py config/results_gatepro_hotswap.py --jobs=2
# writes out-results-gatepro-hotswap/results.md and curves.png (RESULTS.md has them).
import os

exec(open(os.path.join(os.path.dirname(__file__), 'results_dead_experts.py')).read())

routers = ['never', 'first-25pct', 'first-50pct', 'first-75pct', 'always']
variants = {
    'never': dict(router='topk', aux_loss_coef=0.0),
    **{f"first-{pct}pct": dict(router='gatepro', aux_loss_coef=0.0, gatepro_end_iter=train['max_iters'] * pct // 100)
       for pct in (25, 50, 75)},
    'always': dict(router='gatepro', aux_loss_coef=0.0),
}
compare_dir = 'out-results-gatepro-hotswap'
