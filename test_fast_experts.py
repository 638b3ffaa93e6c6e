"""Tests of fast_experts.py: each fast path equals the plain loop of model.Experts."""

import pytest
import torch

from fast_experts import ExpertLoop, grouped_mm, resolve_impl
from model import Experts, GPTConfig


def expert_inputs(dtype=torch.float32, d=32, h=48):
    """Experts of a tiny config and sorted rows for them: groups of 5, 0, 9 and 1 rows (one
    expert without tokens, sizes that are not multiples of the grouped GEMM's alignment)."""
    torch.manual_seed(6)
    config = GPTConfig(vocab_size=37, block_size=16, n_layer=1, n_head=1, n_embd=d, n_exp=4, expert_hidden=h)
    experts = Experts(config)
    counts = torch.tensor([5, 0, 9, 1])
    x = torch.randn(int(counts.sum()), d, dtype=dtype, requires_grad=True)
    return experts, x, counts


def run(experts, impl, x, counts, autocast_dtype=None):
    """Output and gradients (x, w_fc, w_proj) of one implementation, from a broadcast
    gradient (y.sum(), which the grouped GEMM's backward must accept)."""
    experts.impl = impl
    experts.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    with torch.autocast('cpu', dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        y = experts(x, counts)
    y.float().sum().backward()
    return [y.float(), x.grad, experts.w_fc.grad, experts.w_proj.grad]


def test_expert_loop_gradients():
    """ExpertLoop's hand-written backward against finite differences, in float64."""
    experts, x, counts = expert_inputs(torch.float64, d=8, h=12)
    w_fc = experts.w_fc.detach().double().requires_grad_()
    w_proj = experts.w_proj.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, a, b: ExpertLoop.apply(x, a, b, counts), (x, w_fc, w_proj))


def test_loop_equals_plain():
    experts, x, counts = expert_inputs()
    plain = run(experts, 'plain', x, counts)
    loop = run(experts, 'loop', x, counts)
    for got, expected in zip(loop, plain):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert torch.all(loop[2][1] == 0)  # the expert without tokens gets a zero gradient


@pytest.mark.skipif(grouped_mm is None, reason=f"torch {torch.__version__} has no grouped_mm")
def test_grouped_equals_plain_in_bf16():
    """'grouped' (bf16 grouped GEMM, groups padded to 8 rows) against the plain loop run in
    bf16 too (CPU autocast), forward and gradients. torch's CPU grouped_mm is a loop of
    matmuls, so this checks the padding and the plumbing; the CUDA kernel is not run here."""
    experts, x, counts = expert_inputs()
    plain = run(experts, 'plain', x, counts, torch.bfloat16)
    grouped = run(experts, 'grouped', x, counts)
    for got, expected in zip(grouped, plain):
        torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)


def test_auto_is_loop_on_cpu():
    experts, x, _ = expert_inputs()
    assert experts.impl == 'auto' and resolve_impl('auto', x, experts.w_fc) == 'loop'
