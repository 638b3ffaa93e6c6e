# GPT-2 small (124M) on FineWeb-Edu on one GPU: the dense twin of train_gpt2_moe8.py and
# train_gpt2_moe64.py, which include this file and change only the feed-forward blocks.
#   python data/fineweb_edu/prepare.py                      # ~10B tokens, once (pip install datasets)
#   python train.py config/train_gpt2_dense.py
# --dataset=openwebtext after data/openwebtext/prepare.py trains on nanoGPT's data instead.
#
# The recipe is the published GPT-2 small one. nanoGPT's config/train_gpt2.py: ~0.5M tokens
# an iteration, lr 6e-4 with warmup (2000 iterations) and cosine decay to 6e-5, AdamW betas
# (0.9, 0.95), weight decay 0.1, clip 1.0, 600k iterations = 300B tokens (8 GPUs, days).
# llm.c's GPT-2 (124M) reproduction on FineWeb (scripts/run_gpt2_124M.sh): 524,288 tokens
# a step, lr 6e-4, warmup 700 steps, weight decay 0.1, 18,865 steps = 9.9B tokens, one
# pass over the 10B sample. Here: llm.c's batch, warm-up and token budget, which one GPU
# can finish, and nanoGPT's lr schedule (decay to lr/10; llm.c decays to 0).
#
# Memory on one GPU (bf16 autocast, the default on an H100). V = 50257 (meta.pkl), T = 1024,
# d = n_embd = 768, L = 12 layers, N = batch_size * T = 32,768 tokens a micro-step, GB = 1e9 bytes.
#   parameters        P = V*d + T*d + d + L*(4d^2 + 2d + F),  F = 8d^2 for the dense MLP
#                       (MoE: F = 2*E*d*h + E*d, E experts of width h and a gate,
#                       + 2*d*h for each shared expert)
#                     P = 124,337,664
#   weights, gradients and AdamW's two moments, fp32: 16 P = 1.99 GB; bf16 copies of the
#                       weights while a step runs: 2 P = 0.25 GB
#   activations kept for backward, bytes per token and layer: attention 14d (the fp32
#                       residual 4d, bf16 copies of the LayerNorm output 2d, q k v 6d,
#                       the attention output 2d) + MLP 22d (fp32 residual 4d, bf16 input
#                       2d, pre-GELU 8d, post-GELU 8d) = 36d; in all 36d * N * L = 10.87 GB
#                       (MoE layers, k experts a token: the fp32 residual and router
#                       input 8d; bf16 copies of the routed tokens, the experts' outputs
#                       and their weighted sums' inputs 6kd; the experts' hidden units 4kh)
#   the loss head at its peak (fp32 log-probabilities, their gradient and the logits'):
#                       12 N V = 19.76 GB
#   at most 32.9 GB in all (18 P + activations + head; the sum of everything that can be
#   alive at once), plus the CUDA context and the allocator's slack.
# tests/test_web_data.py checks P exactly at full size, the optimizer state after a step, and
# the activations (what autograd saves, in bf16 autocast on the CPU) at a reduced width.
#
# Speed: tokens/s not measured yet (no GPU run so far: python bench.py --device=cuda, or
# this recipe's log). Estimate, not a measurement: 6 * active parameters + 12*L*d*T =
# 854.6M FLOPs a token (PaLM's count, as train.py's MFU) * 9.89B tokens = 8.45e18 FLOPs,
# about 5.9 h on one H100 SXM (989 TFLOPS bf16) at an assumed 40% MFU.

out_dir = 'out-gpt2-dense'
eval_interval = 500
eval_iters = 100  # x 32 x 1024 = 3.3M tokens per split and eval
log_interval = 10
always_save_checkpoint = True  # a long run: a crash loses at most eval_interval iterations

wandb_log = False
wandb_project = 'nanorouter'
wandb_run_name = 'gpt2-dense'

dataset = 'fineweb_edu'
# 32 x 1024 tokens a micro-step x 16 = 524,288 tokens an iteration (llm.c's 2**19)
batch_size = 32
block_size = 1024
gradient_accumulation_steps = 16

# GPT-2 small
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = False
n_exp = 1  # 0 or 1 = a dense MLP of width 4*n_embd

learning_rate = 6e-4
max_iters = 18865  # x 524,288 = 9.89B tokens
lr_decay_iters = 18865
min_lr = 6e-5
warmup_iters = 700
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

compile = False  # --compile=True is faster once checked on your GPU (bench.py --gpu_check=True --device=cuda)
