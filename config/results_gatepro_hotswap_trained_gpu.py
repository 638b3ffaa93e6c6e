# results_gatepro_hotswap_trained.py at the size of results_gatepro_128_gpu.py, for a CUDA GPU
# (not run yet: the machines this project was measured on have none): 1000 iterations of
# top-k without a balance loss, then 2000 more with each change.
#   python compare.py config/results_gatepro_hotswap_trained_gpu.py
import os

exec(open(os.path.join(os.path.dirname(__file__), 'results_gatepro_hotswap_trained.py')).read())

_gpu = {'device': 'cuda', 'n_head': 8, 'n_embd': 256, 'block_size': 256, 'batch_size': 32,
        'warmup_iters': 100, 'eval_interval': 250, 'eval_iters': 20}
_switch_iter, _end_iter = 1000, 3000
train = {**train, **_gpu, 'max_iters': _end_iter, 'lr_decay_iters': _end_iter}
variants['topk-base']['max_iters'] = _switch_iter
variants['gatepro-on']['gatepro_start_iter'] = _switch_iter
zero_token_at = [0, 500, 1000, 1010, 1050, 1100, 1250, 1500, 2000, 3000]
compare_dir = 'out-results-gatepro-hotswap-trained-gpu'
