# The pretrained model of results_ortho_var_posttrain.py: an MoE on all five domains of the
# default dataset, in the layout of Guo et al.'s (arXiv 2505.22323) released configs scaled
# down: routed experts plus an always-on shared one (64 routed, 2 shared, top-6 there; 16
# routed, 1 shared, top-4 here), top-k with the Switch balance loss (0.01) and the z-loss.
#   python train.py config/posttrain_pretrain.py        (about 2 minutes on a 2-core CPU)
# writes out-posttrain-pretrain/ckpt.pt, which every fine-tuning run starts from.
out_dir = 'out-posttrain-pretrain'
dataset = 'domains'
n_exp = 16
top_k = 4
n_shared_exp = 1
router = 'topk'
max_iters = 600
lr_decay_iters = 600
eval_interval = 100
eval_answers = 64
always_save_checkpoint = True  # the last step, whatever its val loss
