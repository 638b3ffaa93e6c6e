# Orthogonality + variance losses (Guo et al., arXiv 2505.22323): beta (ortho_loss_coef)
# and gamma (var_loss_coef) around the defaults 0.1 and 0.3, one at a time, plus each loss
# alone, against top-k with the same balance loss; the model and data of
# compare_routers.py (8 experts, top-2, 'domains').
#   python compare.py config/results_ortho_var_sweep.py --jobs=2
# writes out-results-ortho-var-sweep/results.md and curves.png (RESULTS.md has them).
import os

exec(open(os.path.join(os.path.dirname(__file__), 'compare_routers.py')).read())

_settings = [(0.03, 0.3), (0.3, 0.3), (0.1, 0.1), (0.1, 1.0), (0.0, 0.3), (0.1, 0.0)]
routers = ['topk', 'ortho_var', *(f"b{beta}-g{gamma}" for beta, gamma in _settings)]  # ortho_var: 0.1, 0.3
variants = {f"b{beta}-g{gamma}": dict(router='ortho_var', ortho_loss_coef=beta, var_loss_coef=gamma)
            for beta, gamma in _settings}
compare_dir = 'out-results-ortho-var-sweep'
