# GatePro hot-swap (Zheng et al., arXiv 2510.13079, ask when the competition helps): on for
# the first 25 / 50 / 75% of training and then off, against always on and never (plain
# top-k), in the dead-experts setting of results_dead_experts.py (32 experts, top-2,
# lambda = 1e4): without a balance loss, and with the Switch balance loss (0.01, the
# routers' default; rows ending in '+aux').
#   python compare.py config/results_gatepro_hotswap.py --jobs=2
# writes out-results-gatepro-hotswap/results.md and curves.png (RESULTS.md has them).
import os

exec(open(os.path.join(os.path.dirname(__file__), 'results_dead_experts.py')).read())

_phases = {'never': None, 'first-25pct': 25, 'first-50pct': 50, 'first-75pct': 75, 'always': 100}
routers = [*_phases, *(f"{name}+aux" for name in _phases)]
variants = {}
for _name, _pct in _phases.items():
    _router = {'router': 'topk' if _pct is None else 'gatepro'}
    _end = {'gatepro_end_iter': train['max_iters'] * _pct // 100} if _pct not in (None, 100) else {}
    variants[_name] = {**_router, 'aux_loss_coef': 0.0, **_end}
    variants[f"{_name}+aux"] = {**_router, **_end}  # the router's default balance loss
compare_dir = 'out-results-gatepro-hotswap'
