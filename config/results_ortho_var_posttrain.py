# Orthogonality + variance losses where their paper (Guo et al., arXiv 2505.22323) uses them:
# post-training. One MoE pretrained on all five domains (config/posttrain_pretrain.py) is
# fine-tuned on arithmetic alone, and the question is whether the balance loss makes the
# experts alike during that fine-tuning and whether L_o and L_v prevent it. Rows (all top-k,
# all from the same checkpoint, 300 iterations):
#   aux          the balance loss only (the pretrained model's: Switch, 0.01), the baseline
#   aux+o+v      + L_o and L_v with fixed beta = 0.1, gamma = 0.3 (ortho_var's defaults)
#   aux+o        + L_o only (beta = 0.1)
#   aux+v        + L_v only (gamma = 0.3)
#   aux+o+v-target  + L_o and L_v with the authors' coefficient rule: beta and gamma set at the
#                first training step so that the terms start at 1e-4 and 1e-3 (routers.py)
#   noaux        no balance loss at all: what the balance loss itself does
#   seqaux       the balance loss of the authors' released configs instead: per sequence
#                (aux_loss_per_sequence, DeepSeekMoE's form) with their alpha = 0.001
#   seqaux+o+v   that balance loss + L_o and L_v (beta = 0.1, gamma = 0.3)
#   pretrained   no step at all (max_iters=0): the starting point, evaluated as the others are
# Each run also measures the full mixture's val split (eval_also='domains'): the loss on the
# four domains it does not train on is what it forgets. First:
#   python data/domains/prepare.py --only=arithmetic --out_dir=data/domains_arithmetic
#   python train.py config/posttrain_pretrain.py
# then:
#   python compare.py config/results_ortho_var_posttrain.py --jobs=2
# writes out-results-ortho-var-posttrain/results.md and its pictures (RESULTS.md has them).
routers = ['aux', 'aux+o+v', 'aux+o', 'aux+v', 'aux+o+v-target', 'noaux', 'seqaux', 'seqaux+o+v', 'pretrained']
variants = {
    'aux': dict(router='topk'),
    'aux+o+v': dict(router='topk', ortho_loss_coef=0.1, var_loss_coef=0.3),
    'aux+o': dict(router='topk', ortho_loss_coef=0.1),
    'aux+v': dict(router='topk', var_loss_coef=0.3),
    'aux+o+v-target': dict(router='topk', ortho_loss_target=1e-4, var_loss_target=1e-3),
    'noaux': dict(router='topk', aux_loss_coef=0.0),
    'seqaux': dict(router='topk', aux_loss_coef=0.001, aux_loss_per_sequence=True),
    'seqaux+o+v': dict(router='topk', aux_loss_coef=0.001, aux_loss_per_sequence=True,
                       ortho_loss_coef=0.1, var_loss_coef=0.3),
    'pretrained': dict(router='topk', max_iters=0),
}
seeds = [1337, 1338, 1339]
compare_dir = 'out-results-ortho-var-posttrain'

train = dict(
    init_from='out-posttrain-pretrain',  # a new run from its weights: iteration 0, a fresh optimizer
    dataset='domains_arithmetic',
    eval_also='domains',
    max_iters=300,
    lr_decay_iters=300,
    learning_rate=5e-4,
    min_lr=5e-5,
    warmup_iters=10,
    eval_interval=50,
    eval_iters=20,
    eval_answers=64,
)
