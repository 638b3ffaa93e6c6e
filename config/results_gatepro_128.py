# GatePro in the shape its paper (Zheng et al., arXiv 2510.13079) trains: fine-grained
# experts, 128 of them, top-8, each 1/8 as wide as the dense MLP (expert_hidden = 4 *
# n_embd / top_k = 32, so a token's active FFN compute is the dense twin's), 8 layers. Top-k
# against GatePro with lambda = 1e4 (this project's default) and the paper's literal 1e-4,
# each without a balance loss ('-noaux') and with the Switch balance loss (0.01, the
# routers' default). The picture to look at is zero_token_layers.png: experts without a
# token per training step, one panel per layer, as the paper draws it.
#   python compare.py config/results_gatepro_128.py --jobs=2
# writes out-results-gatepro-128/results.md and its pictures (RESULTS.md has them). About
# 15 minutes on a 2-core CPU. On a GPU, the same at a larger size: results_gatepro_128_gpu.py.
import os

exec(open(os.path.join(os.path.dirname(__file__), 'results_dead_experts.py')).read())

train = {**train, 'n_layer': 8, 'n_exp': 128, 'top_k': 8, 'max_iters': 600, 'lr_decay_iters': 600,
         'eval_interval': 100, 'eval_iters': 5, 'eval_answers': 0}
# lambda on the softmax scores instead of the logits (gatepro_penalty_on='probs'): the other
# reading of the paper's Algorithm 1; it differs from the logits only at the literal 1e-4
routers = routers + ['gatepro-1e-4-probs-noaux']
variants = {**variants, 'gatepro-1e-4-probs-noaux': dict(router='gatepro', gatepro_penalty=1e-4,
                                                         gatepro_penalty_on='probs', aux_loss_coef=0.0)}
compare_dir = 'out-results-gatepro-128'
