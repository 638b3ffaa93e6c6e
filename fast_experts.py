"""
Fast implementations of the experts' computation, each equal to the plain loop in
model.Experts (tests/test_fast_experts.py checks it). A reader learning MoE can skip this file:
it holds what measurement showed was worth the code, not new ideas.

  loop:    one matmul per expert with a backward written by hand (ExpertLoop); any device
           and dtype. On a CPU with torch on n > 1 threads, small experts and OpenMP's idle
           threads set to sleep soon (GOMP_SPINCOUNT=10000 in the environment, an opt-in:
           PERFORMANCE.md), the experts' matmuls run side by side on n one-core worker
           threads instead of one after another, each split over n threads (mm_per_expert).
           Reads the group sizes on the host, so on CUDA it waits for the GPU once per layer.
  grouped: one grouped GEMM for all experts (torch's grouped_mm), in bf16, no host sync.
  auto:    grouped on a CUDA GPU of compute capability 9.x or 10.x (H100, H200, B200: where
           torch's grouped GEMM has native kernels) when the experts run in bf16, torch has
           grouped_mm and n_embd and expert_hidden are multiples of 8 (the kernel wants
           16-byte rows); loop everywhere else (choose_impl says why, train.py prints it).

Every function takes x [P, d], the rows already sorted by expert, counts [E] (how many rows
belong to each expert), and the stacked weights w_fc [E, d, h], w_proj [E, h, d]; it
returns gelu(x_e @ w_fc[e]) @ w_proj[e] for every expert's block of rows, [P, d]. Rows past
the last group (sum(counts) <= P: pairs dropped by capacity, kept in place so that no shape
depends on the routing) get an output of 0 and a gradient of 0.
"""

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# torch's grouped GEMM: one kernel runs every expert on its own rows (bf16; native on sm90/sm100).
# Public as F.grouped_mm in recent torch, private torch._grouped_mm before; absent in old versions.
grouped_mm = getattr(F, 'grouped_mm', None) or getattr(torch, '_grouped_mm', None)
GROUP_ALIGN = 8  # rows: 16 bytes of bf16. The weight gradient contracts over each group's rows,
                 # so every group must start on a 16-byte boundary (torchtitan pads to 8 for bf16)


def openmp_threads_sleep_soon(environ):
    """True when libgomp (torch's OpenMP on Linux) was told to put idle threads to sleep soon:
    OMP_WAIT_POLICY=passive, or GOMP_SPINCOUNT at most 30k polls (the values tried went up to
    that). Its default, 300,000 polls, keeps the idle thread of the main thread's team
    spinning on a core after every parallel op; worker threads running the experts would
    then share the cores with it, which measured slower than splitting each matmul."""
    if environ.get('OMP_WAIT_POLICY', '').strip().lower() == 'passive':
        return True
    spin = environ.get('GOMP_SPINCOUNT', '').strip().lower()
    scale = {'k': 10**3, 'm': 10**6, 'g': 10**9, 't': 10**12}.get(spin[-1:], 1)
    number = spin[:-1] if scale > 1 else spin
    return number.isdigit() and int(number) * scale <= 30_000


# Read once: libgomp reads these when torch loads it, so later changes do nothing. Not set by
# default: on the 2-core VM, two of eight default `python train.py` runs with the short spin
# were slower (PERFORMANCE.md).
SIDE_BY_SIDE = openmp_threads_sleep_soon(os.environ)
# Measured on 2 cores (bench.py): at 64 rows an expert the workers beat splitting each matmul
# over the threads by far; at 512 they were no faster. Sizes in between were not measured.
SMALL_EXPERT_ROWS = 256


def share_out(sizes, n_workers):
    """The experts of each worker, [[e, ...], ...]: the largest expert first, each to the worker
    with the fewest rows so far (longest-processing-time scheduling), so that the workers get
    about the same number of rows. Experts without rows go along too: their weight gradient
    is a zero-row matmul, which writes the zeros."""
    rows, shares = [0] * n_workers, [[] for _ in range(n_workers)]
    for e in sorted(range(len(sizes)), key=lambda e: -sizes[e]):
        worker = rows.index(min(rows))
        shares[worker].append(e)
        rows[worker] += sizes[e]
    return [share for share in shares if share]


def _one_core():
    torch.set_num_threads(1)
    torch.get_num_threads()  # torch sets up a thread's thread count on first use: make it 1 now


@functools.lru_cache(maxsize=None)
def one_core_workers(n):
    """n threads whose torch ops run on one core each (their OpenMP and MKL thread count is 1),
    made once per process. torch.set_num_threads is per thread for those libraries but also
    moves torch's default for new threads, which is put back here."""
    caller = torch.get_num_threads()
    pool = ThreadPoolExecutor(n, thread_name_prefix='experts', initializer=_one_core)
    ready = threading.Barrier(n + 1)
    for _ in range(n):  # start all n now, so that none calls _one_core later
        pool.submit(ready.wait)
    ready.wait()
    torch.set_num_threads(caller)
    return pool


# a forked child has none of its parent's threads: a pool inherited from it would never run
os.register_at_fork(after_in_child=one_core_workers.cache_clear)


def _mm_share(lhs, rhs, out, share):
    with torch.no_grad():  # grad mode is per thread; out= matmuls must not record autograd
        for e in share:
            torch.mm(lhs[e], rhs[e], out=out[e])


def mm_per_expert(lhs, rhs, out, sizes):
    """out[e] = lhs[e] @ rhs[e] for sequences of per-expert matrices; out holds views to write
    into, sizes the experts' row counts. On a CPU with n > 1 torch threads, SIDE_BY_SIDE and
    fewer than SMALL_EXPERT_ROWS rows an expert on average, the experts are shared out to n
    one-core workers (torch releases the GIL in a matmul): with ~64 rows an expert,
    splitting each matmul over n threads costs more than it saves. On the workers each
    matmul runs on one thread, so the result is bit for bit that of a one-thread run."""
    small = sum(sizes) < SMALL_EXPERT_ROWS * len(sizes)
    n = torch.get_num_threads() if SIDE_BY_SIDE and small and out[0].device.type == 'cpu' else 1
    if n == 1 or len(sizes) == 1:
        for a, b, o in zip(lhs, rhs, out):
            torch.mm(a, b, out=o)
        return
    pool = one_core_workers(n)
    for future in [pool.submit(_mm_share, lhs, rhs, out, share) for share in share_out(sizes, n)]:
        future.result()


class ExpertLoop(torch.autograd.Function):
    """gelu(x_e @ w_fc[e]) @ w_proj[e] for each expert's contiguous rows x_e of x: one matmul
    per expert, in forward and in a backward written out by hand.

    Why not plain autograd over the loop: its backward makes one [d, h] gradient per expert
    and then stacks them into [E, d, h], a second copy of every expert weight each step.
    Here each expert's weight gradient is written straight into its slice of one [E, d, h]
    tensor, the GELU runs once over all rows, and nothing is concatenated."""

    @staticmethod
    def forward(ctx, x, w_fc, w_proj, counts):
        # the group sizes on the host (a list, or a tensor read back: a sync, fine on CPU)
        sizes = counts.tolist() if torch.is_tensor(counts) else list(counts)
        pre = x.new_empty(x.size(0), w_fc.size(2))
        mm_per_expert(x.split(sizes), w_fc.unbind(0), pre.split(sizes), sizes)
        act = F.gelu(pre)
        y = x.new_empty(x.size(0), w_proj.size(2))
        mm_per_expert(act.split(sizes), w_proj.unbind(0), y.split(sizes), sizes)
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
        mm_per_expert(rows_t(act), rows(grad_y), grad_w_proj.unbind(0), ctx.sizes)  # act_e^T @ dy_e
        mm_per_expert(rows(grad_y), w_proj.transpose(1, 2).unbind(0), rows(grad_act), ctx.sizes)  # dy_e @ w_proj[e]^T
        grad_pre = torch.ops.aten.gelu_backward(grad_act, pre)
        grad_w_fc, grad_x = torch.empty_like(w_fc), torch.empty_like(x)
        mm_per_expert(rows_t(x), rows(grad_pre), grad_w_fc.unbind(0), ctx.sizes)  # x_e^T @ dpre_e
        mm_per_expert(rows(grad_pre), w_fc.transpose(1, 2).unbind(0), rows(grad_x), ctx.sizes)  # dpre_e @ w_fc[e]^T
        return grad_x, grad_w_fc, grad_w_proj, None  # an expert with no rows gets a zero gradient


@torch.compiler.disable  # a host-side loop: torch.compile runs it as it is, outside the graph
def loop_experts(x, w_fc, w_proj, counts):
    if torch.is_autocast_enabled(x.device.type):
        # ExpertLoop's matmuls write into preallocated outputs, which autocast skips: cast here
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w_fc, w_proj = x.to(dtype), w_fc.to(dtype), w_proj.to(dtype)
    sizes = counts.tolist()  # the one host sync of this path: the reason CUDA runs the grouped GEMM
    routed = sum(sizes)  # rows past the experts' groups are dropped pairs: output 0, gradient 0
    y = ExpertLoop.apply(x[:routed], w_fc, w_proj, sizes)
    return y if routed == x.size(0) else F.pad(y, (0, 0, 0, x.size(0) - routed))


def grouped_experts(x, w_fc, w_proj, counts):
    """One grouped GEMM per projection, in bf16, without reading anything back to the host.

    The kernel wants every group to start on a 16-byte boundary, so the rows are copied
    into a zeroed buffer in which each expert's group is padded to a multiple of
    GROUP_ALIGN rows, and to at least GROUP_ALIGN: an expert without rows then computes
    on zero rows, so its weight gradient is exactly zero, and no group is empty (torch's
    tracker reports empty groups giving wrong weight gradients on some GPUs, and
    torchtitan pads the same way). The buffer's size is fixed by the shapes alone; the
    last group runs to its end, so every row of the GEMM's output is computed (past the
    last offset the kernel leaves memory uninitialised). Rows past the experts' groups
    (dropped pairs) are not copied in: they get an output of 0 and a gradient of 0."""
    if grouped_mm is None:
        raise RuntimeError(f"expert_impl='grouped' needs torch.nn.functional.grouped_mm "
                           f"(torch {torch.__version__} has none); use expert_impl='loop'")
    E, P = counts.numel(), x.size(0)
    rows = -(-P // GROUP_ALIGN) * GROUP_ALIGN + E * GROUP_ALIGN  # >= sum of the padded groups
    padded = torch.clamp((counts + GROUP_ALIGN - 1) // GROUP_ALIGN * GROUP_ALIGN, min=GROUP_ALIGN)
    expert = torch.arange(E, device=x.device)
    offs = torch.where(expert == E - 1, rows, torch.cumsum(padded, 0))  # group e ends at offs[e]
    # row r of expert e moves from start[e] + i to padded_start[e] + i
    ends = torch.cumsum(counts, 0)
    row = torch.arange(P, device=x.device)
    expert_of_row = torch.searchsorted(ends, row, right=True).clamp(max=E - 1)
    routed = row < ends[-1]
    dest = row - (ends - counts)[expert_of_row] + (offs - padded)[expert_of_row]
    # dropped rows: copied into one extra row that the GEMM never sees, read back from the
    # buffer's last row, which is padding (zero in, zero out) whenever a row was dropped
    x_pad = x.new_zeros(rows + 1, x.size(1), dtype=torch.bfloat16).index_copy(
        0, torch.where(routed, dest, rows), x.bfloat16())[:rows]
    offs = offs.to(torch.int32)
    act = F.gelu(grouped_mm(x_pad, w_fc.bfloat16(), offs=offs))
    y = grouped_mm(act, w_proj.bfloat16(), offs=offs)
    # a gather: its backward hands the GEMM a dense gradient, never a broadcast one (y.sum())
    return y[torch.where(routed, dest, rows - 1)]


GROUPED_NATIVE_MAJORS = (9, 10)  # Hopper (H100, H200) and datacenter Blackwell (B200, GB200, B300)


def choose_impl(capability, bf16, has_grouped_mm, aligned):
    """'auto' on a CUDA GPU of compute capability (major, minor): ('grouped' or 'loop', why).
    A pure function of what the choice depends on, so the tests can fake any GPU.

    torch's bf16 grouped GEMM has native kernels only for compute capability 9.x and 10.x.
    On the others (A100 and A10 at 8.0/8.6, L4 and RTX 4090 at 8.9, RTX 5090 at 12.0) torch
    2.8 raises an error and newer versions loop over the groups after copying the offsets
    to the host, several times a layer: the loop here reads the group sizes once."""
    name = f"compute capability {capability[0]}.{capability[1]}"
    if capability[0] not in GROUPED_NATIVE_MAJORS:
        return 'loop', f"{name}: torch's grouped GEMM is native only on 9.x and 10.x (H100, H200, B200)"
    if not has_grouped_mm:
        return 'loop', f"{name}, but torch {torch.__version__} has no grouped_mm"
    if not bf16:
        return 'loop', f"{name}, but the experts do not run in bf16 (the grouped GEMM's dtype)"
    if not aligned:
        return 'loop', f"{name}, but n_embd or expert_hidden is not a multiple of 8 (the kernel wants 16-byte rows)"
    return 'grouped', f"{name}, bf16: torch's native grouped GEMM, no host sync"


def describe_impl(impl, device_type, capability, compute_dtype, n_embd, expert_hidden):
    """(the implementation that runs, one line saying why): what train.py prints at start-up
    and what every forward runs. capability: the CUDA device's (major, minor), None on
    other devices; compute_dtype: the dtype the experts run in (autocast's, if on)."""
    if impl != 'auto':
        native = device_type != 'cuda' or impl != 'grouped' or capability[0] in GROUPED_NATIVE_MAJORS
        return impl, f"expert_impl={impl!r}, as set" + ('' if native else
                                                     ": this GPU has no native grouped GEMM, torch loops over the groups")
    if device_type != 'cuda':
        return 'loop', f"{device_type}: the grouped GEMM is for CUDA GPUs"
    aligned = n_embd % 8 == 0 and expert_hidden % 8 == 0
    return choose_impl(capability, compute_dtype == torch.bfloat16, grouped_mm is not None, aligned)


def resolve_impl(impl, x, w_fc):
    """The implementation to run for this input and these weights (describe_impl)."""
    if impl != 'auto' or not x.is_cuda:
        return impl if impl != 'auto' else 'loop'
    dtype = torch.get_autocast_dtype('cuda') if torch.is_autocast_enabled('cuda') else x.dtype
    return describe_impl(impl, 'cuda', torch.cuda.get_device_capability(x.device), dtype,
                         w_fc.size(1), w_fc.size(2))[0]


def run_experts(impl, x, w_fc, w_proj, counts):
    """impl: 'auto', 'loop' or 'grouped'."""
    if resolve_impl(impl, x, w_fc) == 'grouped':
        return grouped_experts(x, w_fc, w_proj, counts)
    return loop_experts(x, w_fc, w_proj, counts)
