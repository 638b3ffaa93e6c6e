# GPT-2 small with 8 experts, top-2, in every layer: everything as train_gpt2_dense.py (the
# data, batch, schedule and the memory formulas are there), except the MLP, which becomes 8
# experts of width 4*768/2 = 1536 (expert_hidden's default): a token visits 2 of them, so
# it computes what the dense MLP computes (top_k * expert_hidden = 4 * n_embd), with 2.4x
# the parameters. Compare the val loss with the dense twin's at the same step.
#   python data/fineweb_edu/prepare.py                      # once
#   python train.py config/train_gpt2_moe8.py
#
# Routers worth comparing at this size (coarse experts, as GShard, Switch, Mixtral), one
# run each on the same batches (the batches depend on the seed and the step alone):
#   topk, the recipe: the Switch balance loss and the z-loss
#   python train.py config/train_gpt2_moe8.py
#   DeepSeek-V3's bias instead of a balance loss
#   python train.py config/train_gpt2_moe8.py --router=aux_free --out_dir=out-gpt2-moe8-aux_free
#   GatePro: experts with similar gates compete
#   python train.py config/train_gpt2_moe8.py --router=gatepro --out_dir=out-gpt2-moe8-gatepro
#   the orthogonality and variance losses: distinct experts, decisive routing
#   python train.py config/train_gpt2_moe8.py --router=ortho_var --out_dir=out-gpt2-moe8-ortho_var
#   Switch: top-1 of experts 3072 wide, the same compute, 1.8x the parameters, capacity 1.25 (drops)
#   python train.py config/train_gpt2_moe8.py --router=switch --top_k=1 --out_dir=out-gpt2-moe8-switch
#
# Memory (train_gpt2_dense.py's formulas, E = 8, k = 2, h = 1536, N = 32,768):
#   P = 294,280,704 parameters, 124,411,392 of them active per token
#   weights, gradients, AdamW moments: 16 P = 4.71 GB; bf16 copies of the weights 2 P = 0.59 GB
#   activations: (14d + 8d + 6kd + 4kh) = 50d bytes per token and layer, 50d * N * L = 15.10 GB
#                (on logging steps the metrics keep each layer's expert outputs too: 2kd * N * L)
#   loss head 12 N V = 19.76 GB; at most 40.2 GB in all
# (switch: P = 520,773,120, 44d bytes per token and layer, at most 42.4 GB)
#
# Speed: tokens/s not measured yet. Estimate, not a measurement: 855.0M FLOPs a token, as the
# dense twin (+0.05% for the gates), 8.46e18 FLOPs in all; the routing, the sort by expert
# and the grouped GEMMs cost time the FLOPs do not count: about 7.9 h on one H100 SXM at an
# assumed 30% MFU.
import os

exec(open(os.path.join(os.path.dirname(__file__), 'train_gpt2_dense.py')).read())

out_dir = 'out-gpt2-moe8'
wandb_run_name = 'gpt2-moe8'
n_exp = 8
top_k = 2
router = 'topk'  # its loss coefficients: the router's defaults (aux 0.01, z 0.001)
