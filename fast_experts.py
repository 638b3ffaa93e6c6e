"""
Fast implementations of the experts' computation, each equal to the plain loop in
model.Experts (test_fast_experts.py checks it). A reader learning MoE can skip this file:
it holds what measurement showed was worth the code, not new ideas.

  loop:    one matmul per expert with a backward written by hand (ExpertLoop); any device
           and dtype. Reads the group sizes on the host, so on CUDA it waits for the GPU
           once per layer.
  grouped: one grouped GEMM for all experts (torch's grouped_mm), in bf16, no host sync.
  auto:    grouped on a CUDA GPU of compute capability 8.0 or more when the experts run in
           bf16, torch has grouped_mm and n_embd and expert_hidden are multiples of 8 (the
           kernel wants 16-byte rows); loop everywhere else.

Every function takes x [P, d], the rows already sorted by expert, counts [E] (how many rows
belong to each expert), and the stacked weights w_fc [E, d, h], w_proj [E, h, d]; it
returns gelu(x_e @ w_fc[e]) @ w_proj[e] for every expert's block of rows, [P, d].
"""

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# torch's grouped GEMM: one kernel runs every expert on its own rows (CUDA, bf16, sm80+).
# Public as F.grouped_mm in recent torch, private torch._grouped_mm before; absent in old versions.
grouped_mm = getattr(F, 'grouped_mm', None) or getattr(torch, '_grouped_mm', None)
GROUP_ALIGN = 8  # rows: 16 bytes of bf16. The weight gradient contracts over each group's rows,
                 # so every group must start on a 16-byte boundary (torchtitan pads to 8 for bf16)


def mm_per_expert(lhs, rhs, out):
    """out[e] = lhs[e] @ rhs[e] for sequences of per-expert matrices; out holds views to write into."""
    for a, b, o in zip(lhs, rhs, out):
        torch.mm(a, b, out=o)


class ExpertLoop(torch.autograd.Function):
    """gelu(x_e @ w_fc[e]) @ w_proj[e] for each expert's contiguous rows x_e of x: one matmul
    per expert, in forward and in a backward written out by hand.

    Why not plain autograd over the loop: its backward makes one [d, h] gradient per expert
    and then stacks them into [E, d, h], a second copy of every expert weight each step.
    Here each expert's weight gradient is written straight into its slice of one [E, d, h]
    tensor, the GELU runs once over all rows, and nothing is concatenated."""

    @staticmethod
    def forward(ctx, x, w_fc, w_proj, counts):
        sizes = counts.tolist()  # a host sync: fine on CPU, the reason CUDA runs the grouped GEMM
        pre = x.new_empty(x.size(0), w_fc.size(2))
        mm_per_expert(x.split(sizes), w_fc.unbind(0), pre.split(sizes))
        act = F.gelu(pre)
        y = x.new_empty(x.size(0), w_proj.size(2))
        mm_per_expert(act.split(sizes), w_proj.unbind(0), y.split(sizes))
        ctx.save_for_backward(x, w_fc, w_proj, pre, act)
        ctx.sizes = sizes
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, w_fc, w_proj, pre, act = ctx.saved_tensors
        rows = lambda t: t.split(ctx.sizes)  # each expert's block of rows
        rows_t = lambda t: t.t().split(ctx.sizes, 1)  # the same blocks, transposed (views)
        grad_y = grad_y.contiguous()
        grad_w_proj, grad_act = torch.empty_like(w_proj), torch.empty_like(act)
        mm_per_expert(rows_t(act), rows(grad_y), grad_w_proj.unbind(0))  # act_e^T @ dy_e
        mm_per_expert(rows(grad_y), w_proj.transpose(1, 2).unbind(0), rows(grad_act))  # dy_e @ w_proj[e]^T
        grad_pre = torch.ops.aten.gelu_backward(grad_act, pre)
        grad_w_fc, grad_x = torch.empty_like(w_fc), torch.empty_like(x)
        mm_per_expert(rows_t(x), rows(grad_pre), grad_w_fc.unbind(0))  # x_e^T @ dpre_e
        mm_per_expert(rows(grad_pre), w_fc.transpose(1, 2).unbind(0), rows(grad_x))  # dpre_e @ w_fc[e]^T
        return grad_x, grad_w_fc, grad_w_proj, None  # an expert with no rows gets a zero gradient


def loop_experts(x, w_fc, w_proj, counts):
    if torch.is_autocast_enabled(x.device.type):
        # ExpertLoop's matmuls write into preallocated outputs, which autocast skips: cast here
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w_fc, w_proj = x.to(dtype), w_fc.to(dtype), w_proj.to(dtype)
    return ExpertLoop.apply(x, w_fc, w_proj, counts)


def grouped_experts(x, w_fc, w_proj, counts):
    if grouped_mm is None:
        raise RuntimeError(f"expert_impl='grouped' needs torch.nn.functional.grouped_mm "
                           f"(torch {torch.__version__} has none); use expert_impl='loop'")
    E, P = counts.numel(), x.size(0)
    # pad every group to a multiple of GROUP_ALIGN rows, all on the device (no host sync):
    # row r of expert e moves from start[e] + i to padded_start[e] + i; padding rows are zero
    padded = (counts + GROUP_ALIGN - 1) // GROUP_ALIGN * GROUP_ALIGN
    padded_end = torch.cumsum(padded, 0)
    shift = (padded_end - padded) - (torch.cumsum(counts, 0) - counts)  # padded_start - start
    expert_of_row = torch.repeat_interleave(torch.arange(E, device=x.device), counts, output_size=P)
    dest = torch.arange(P, device=x.device) + shift[expert_of_row]
    x_pad = x.new_zeros(P + E * GROUP_ALIGN, x.size(1), dtype=torch.bfloat16).index_copy(0, dest, x.bfloat16())
    offs = padded_end.to(torch.int32)
    act = F.gelu(grouped_mm(x_pad, w_fc.bfloat16(), offs=offs))
    y = grouped_mm(act, w_proj.bfloat16(), offs=offs)
    if y.requires_grad:
        # the grouped GEMM's backward rejects a broadcast gradient (e.g. from y.sum())
        y.register_hook(lambda grad: grad.contiguous())
    return y[dest]


def resolve_impl(impl, x, w_fc):
    """'auto' -> 'grouped' or 'loop' for this input (see the module docstring)."""
    if impl != 'auto':
        return impl
    bf16 = x.dtype == torch.bfloat16 or (torch.is_autocast_enabled(x.device.type)
                                         and torch.get_autocast_dtype(x.device.type) == torch.bfloat16)
    sm80 = x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 0)
    aligned = w_fc.size(1) % 8 == 0 and w_fc.size(2) % 8 == 0  # rows of 16 bytes in bf16
    return 'grouped' if grouped_mm is not None and bf16 and sm80 and aligned else 'loop'


def run_experts(impl, x, w_fc, w_proj, counts):
    """impl: 'auto', 'loop' or 'grouped'."""
    if resolve_impl(impl, x, w_fc) == 'grouped':
        return grouped_experts(x, w_fc, w_proj, counts)
    return loop_experts(x, w_fc, w_proj, counts)
