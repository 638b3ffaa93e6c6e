# results_ortho_var_posttrain.py on a CUDA GPU (not run yet: the machines this project was
# measured on have none). Pretrain the larger model first:
#   python train.py config/posttrain_pretrain.py --device=cuda --n_layer=8 --n_head=8 --n_embd=256 \
#       --block_size=256 --batch_size=32 --max_iters=3000 --lr_decay_iters=3000 --learning_rate=1e-3 \
#       --min_lr=1e-4 --out_dir=out-posttrain-pretrain-gpu
#   python compare.py config/results_ortho_var_posttrain_gpu.py
import os

exec(open(os.path.join(os.path.dirname(__file__), 'results_ortho_var_posttrain.py')).read())

train = {**train, 'device': 'cuda', 'init_from': 'out-posttrain-pretrain-gpu', 'batch_size': 32,
         'block_size': 256, 'max_iters': 1000, 'lr_decay_iters': 1000, 'eval_interval': 100}
compare_dir = 'out-results-ortho-var-posttrain-gpu'
