# GPT-2 small with 64 fine-grained experts, top-8, in every layer (the granularity of
# DeepSeekMoE and OLMoE: OLMoE-1B-7B routes 8 of 64): everything as train_gpt2_dense.py
# (the data, batch, schedule and the memory formulas are there), except the MLP, which
# becomes 64 experts of width 4*768/8 = 384 (expert_hidden's default): a token visits 8, so
# it computes what the dense MLP computes (top_k * expert_hidden = 4 * n_embd), with 4.2x
# the parameters and C(64, 8) = 4.4e9 combinations of experts where top-2 of 8 has 28.
#   python data/fineweb_edu/prepare.py                      # once
#   python train.py config/train_gpt2_moe64.py
#
# Routers worth comparing at this size, one run each on the same batches:
#   topk, the recipe: the Switch balance loss and the z-loss (OLMoE's)
#   python train.py config/train_gpt2_moe64.py
#   DeepSeek-V3's bias instead of a balance loss (made for many fine experts)
#   python train.py config/train_gpt2_moe64.py --router=aux_free --out_dir=out-gpt2-moe64-aux_free
#   GatePro: more experts, more look-alikes to separate
#   python train.py config/train_gpt2_moe64.py --router=gatepro --out_dir=out-gpt2-moe64-gatepro
#   the orthogonality and variance losses, over 28 pairs of expert outputs a token
#   python train.py config/train_gpt2_moe64.py --router=ortho_var --out_dir=out-gpt2-moe64-ortho_var
#   DeepSeekMoE: 7 routed experts and 1 always on, still 8 x 384 a token
#   python train.py config/train_gpt2_moe64.py --top_k=7 --n_shared_exp=1 --out_dir=out-gpt2-moe64-shared
#
# Memory (train_gpt2_dense.py's formulas, E = 64, k = 8, h = 384, N = 32,768):
#   P = 521,289,216 parameters, 124,927,488 of them active per token
#   weights, gradients, AdamW moments: 16 P = 8.34 GB; bf16 copies of the weights 2 P = 1.04 GB
#   activations: (14d + 8d + 6kd + 4kh) = 86d bytes per token and layer, 86d * N * L = 25.97 GB
#                (on logging steps the metrics keep each layer's expert outputs too: 2kd * N * L = 4.83 GB)
#   loss head 12 N V = 19.76 GB; at most 55.1 GB in all (59.9 GB on a logging step)
#
# Speed: tokens/s not measured yet. Estimate, not a measurement: 858.1M FLOPs a token, as the
# dense twin (+0.4% for the gates), 8.49e18 FLOPs in all; the 8 token-expert pairs a token
# to gather, sort and add back, and 64 smaller GEMMs, cost time the FLOPs do not count:
# about 11.9 h on one H100 SXM at an assumed 20% MFU.
import os

exec(open(os.path.join(os.path.dirname(__file__), 'train_gpt2_dense.py')).read())

out_dir = 'out-gpt2-moe64'
wandb_run_name = 'gpt2-moe64'
n_exp = 64
top_k = 8
router = 'topk'  # its loss coefficients: the router's defaults (aux 0.01, z 0.001)
