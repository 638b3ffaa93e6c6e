"""Tests of fast_experts.py: each fast path equals the plain loop of model.Experts."""

import os

import pytest
import torch

import fast_experts
from fast_experts import ExpertLoop, grouped_mm, openmp_threads_sleep_soon, resolve_impl, share_out
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


def test_openmp_threads_sleep_soon_reads_libgomp_settings():
    assert not openmp_threads_sleep_soon({})  # libgomp's default: 300,000 polls
    assert openmp_threads_sleep_soon({'GOMP_SPINCOUNT': '10000'})
    assert openmp_threads_sleep_soon({'GOMP_SPINCOUNT': '30k'})  # 30,000: the largest that counts
    assert not openmp_threads_sleep_soon({'GOMP_SPINCOUNT': '30001'})
    assert not openmp_threads_sleep_soon({'GOMP_SPINCOUNT': '1M'})
    assert not openmp_threads_sleep_soon({'GOMP_SPINCOUNT': 'INFINITE'})
    assert openmp_threads_sleep_soon({'OMP_WAIT_POLICY': 'PASSIVE'})
    assert not openmp_threads_sleep_soon({'OMP_WAIT_POLICY': 'active'})


def test_share_out_gives_the_largest_expert_to_the_least_loaded_worker():
    # sizes 5, 0, 9, 1; by hand, largest first: 9 -> worker 0; 5 -> worker 1; 1 -> worker 1
    # (5 < 9); 0 -> worker 1 (6 < 9). Rows per worker: 9 and 6.
    assert share_out([5, 0, 9, 1], 2) == [[2], [0, 3, 1]]
    assert share_out([5, 0, 9, 1], 3) == [[2], [0], [3, 1]]  # 0 rows joins the worker with 1
    assert share_out([4, 4], 4) == [[0], [1]]  # more workers than experts: no empty shares


def loop_step(x, w_fc, w_proj, counts, threads):
    """ExpertLoop's output and gradients with torch on `threads` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, w_fc, w_proj = (t.detach().clone().requires_grad_() for t in (x, w_fc, w_proj))
        y = ExpertLoop.apply(x, w_fc, w_proj, counts)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return [y.detach(), x.grad, w_fc.grad, w_proj.grad]
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def side_by_side(monkeypatch):
    monkeypatch.setattr(fast_experts, 'SIDE_BY_SIDE', True)


def test_experts_side_by_side_equal_one_thread(side_by_side, monkeypatch):
    """With 2 threads the experts' matmuls run on 2 one-core workers: every matmul still runs
    on one thread, so the numbers are bit for bit those of a one-thread run, including the
    zero gradient of the expert without rows. The workers must really be used."""
    torch.manual_seed(3)
    counts = torch.tensor([70, 0, 130, 3, 64, 1, 90, 40])  # 49.75 rows an expert: < SMALL_EXPERT_ROWS
    x = torch.randn(int(counts.sum()), 48)
    w_fc, w_proj = torch.randn(8, 48, 96) * 0.1, torch.randn(8, 96, 48) * 0.1
    one = loop_step(x, w_fc, w_proj, counts, threads=1)
    shares = []
    share_out = fast_experts.share_out
    monkeypatch.setattr(fast_experts, 'share_out', lambda sizes, n: shares.append(n) or share_out(sizes, n))
    workers = loop_step(x, w_fc, w_proj, counts, threads=2)
    assert shares == [2] * 6  # 2 matmuls forward, 4 backward, each shared out to 2 workers
    for got, expected in zip(workers, one):
        assert torch.equal(got, expected)
    assert torch.all(workers[2][1] == 0) and torch.all(workers[3][1] == 0)


def test_large_experts_split_each_matmul_instead(side_by_side, monkeypatch):
    shares = []
    monkeypatch.setattr(fast_experts, 'share_out', lambda sizes, n: shares.append(n) or [])
    counts = torch.tensor([300, 212])  # 256 rows an expert on average: not fewer than SMALL_EXPERT_ROWS
    loop_step(torch.randn(512, 8), torch.randn(2, 8, 12), torch.randn(2, 12, 8), counts, threads=2)
    assert shares == []


@pytest.mark.skipif(not hasattr(os, 'fork'), reason="needs os.fork")
def test_a_forked_child_does_not_inherit_the_workers(side_by_side):
    """The worker threads do not survive a fork, so a child must make its own pool rather
    than wait forever on the parent's. (The child cannot run the experts to show it: after
    its parent has used OpenMP, a child's next parallel op hangs in libgomp, with or
    without these workers.)"""
    counts = torch.tensor([5, 7, 0, 4])
    x, w_fc, w_proj = torch.randn(16, 8), torch.randn(4, 8, 12), torch.randn(4, 12, 8)
    loop_step(x, w_fc, w_proj, counts, threads=2)
    assert fast_experts.one_core_workers.cache_info().currsize == 1  # the parent has its pool
    pid = os.fork()
    if pid == 0:
        os._exit(0 if fast_experts.one_core_workers.cache_info().currsize == 0 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
