# GatePro hot-swapped onto a trained model (Zheng et al., arXiv 2510.13079: "hot-swappable
# during any training phase"). In the 128-expert, top-8 shape of results_gatepro_128.py, top-k
# trains without a balance loss for 300 iterations, by which time most experts of every layer
# get no token; then each run of the other rows resumes that run (its checkpoint, its
# optimizer, its log) for 600 iterations more, with one change:
#   topk-base        the first 300 iterations, the start of every other row
#   topk-continued   nothing changes: top-k without a balance loss
#   gatepro-on       GatePro's competition switched on (lambda = 1e4) from iteration 300
#   aux-on           the Switch balance loss (0.01, the routers' default) switched on instead
# The base rows are GatePro with the competition off (gatepro_start_iter past the end), which is
# exactly top-k: resuming keeps the router, so the one that is switched on later must be there.
#   python compare.py config/results_gatepro_hotswap_trained.py --jobs=2
# writes out-results-gatepro-hotswap-trained/results.md and its pictures (RESULTS.md has them);
# zero_token_layers.png shows how fast the idle experts come back, layer by layer.
import os

exec(open(os.path.join(os.path.dirname(__file__), 'results_gatepro_128.py')).read())

_switch_iter, _end_iter = 300, 900
_never = 10 ** 9  # gatepro_start_iter past the end: the competition never runs
train = {**train, 'max_iters': _end_iter, 'lr_decay_iters': _end_iter, 'aux_loss_coef': 0.0}
routers = ['topk-continued', 'gatepro-on', 'aux-on', 'topk-base']  # the paired column: minus topk-continued
variants = {
    'topk-base': dict(router='gatepro', gatepro_start_iter=_never, max_iters=_switch_iter,
                     always_save_checkpoint=True),
    'topk-continued': dict(router='gatepro', gatepro_start_iter=_never, resume_from='topk-base'),
    'gatepro-on': dict(router='gatepro', gatepro_start_iter=_switch_iter, resume_from='topk-base'),
    'aux-on': dict(router='gatepro', gatepro_start_iter=_never, aux_loss_coef=0.01, resume_from='topk-base'),
}
zero_token_at = [0, 100, 200, 300, 310, 350, 400, 500, 600, 900]  # results.md: how fast they come back
compare_dir = 'out-results-gatepro-hotswap-trained'
