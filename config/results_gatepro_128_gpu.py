# results_gatepro_128.py at a larger size, for a CUDA GPU (not run yet: the machines this
# project was measured on have none): 128 experts, top-8, 8 layers x 256 wide, block 256,
# batch 32, 3000 iterations, bf16 autocast (train.py's default on CUDA).
#   python compare.py config/results_gatepro_128_gpu.py
import os

exec(open(os.path.join(os.path.dirname(__file__), 'results_gatepro_128.py')).read())

train = {**train, 'device': 'cuda', 'n_head': 8, 'n_embd': 256, 'block_size': 256, 'batch_size': 32,
         'max_iters': 3000, 'lr_decay_iters': 3000, 'warmup_iters': 100, 'eval_interval': 250, 'eval_iters': 20}
compare_dir = 'out-results-gatepro-128-gpu'
