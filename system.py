"""
The machine a run uses, shared by train.py, sample.py and bench.py: which device and
precision to run in, the GPU's peak for MFU, a CPU memory setting, and what keeps the
processes of a DDP run on one model beyond torch's DistributedDataParallel (DDPSync).
"""

import ctypes
import hashlib
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist

PTDTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def pick_device(device):
    """'auto' -> 'cuda' > 'mps' > 'cpu', whichever this machine has. Raises ValueError for a
    CUDA device on a machine without CUDA."""
    if device == 'auto':
        if torch.cuda.is_available():
            return 'cuda'
        return 'mps' if torch.backends.mps.is_available() else 'cpu'
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available; use --device=cpu (or --device=auto)")
    return device


def device_type_of(device):
    return 'cuda' if 'cuda' in device else ('mps' if 'mps' in device else 'cpu')


def pick_dtype(dtype, device_type):
    """'auto' -> bfloat16 on a CUDA GPU that supports it, float16 on older ones, float32
    elsewhere. Raises ValueError for a name that is not a dtype we run in."""
    if dtype not in ('auto', *PTDTYPES):
        raise ValueError(f"dtype={dtype!r} must be one of auto, {', '.join(PTDTYPES)}")
    if dtype != 'auto':
        return dtype
    if device_type == 'cuda':
        return 'bfloat16' if cuda_bf16_native() else 'float16'
    return 'float32'


def cuda_bf16_native():
    """True when the CUDA GPU computes in bf16 natively (compute capability 8.0 and up).
    torch.cuda.is_bf16_supported() alone also says True where bf16 is only emulated (V100,
    T4), which runs slower than float16 with a GradScaler."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # a torch without the argument (before 2.3) counted no emulation
        return torch.cuda.is_bf16_supported()


# Dense (no sparsity) peak tensor-core TFLOPS in bf16 (fp16 for GPUs without bf16), from
# NVIDIA's datasheets: A100 (312), A10 (125), H100 SXM and H200 (989), H100 PCIe (756),
# H100 NVL and H200 NVL (835), B200 (2250), L4 (121), L40S (362); the Ada and Blackwell
# GeForce whitepapers' figure with fp32 accumulation, as torch runs: RTX 4090 (165),
# RTX 5090 (209); fp16: V100 (125), T4 (65). Matched in this order against the device name.
PEAK_TFLOPS = [('H100 PCIe', 756), ('H100 NVL', 835), ('H200 NVL', 835), ('H100', 989), ('H200', 989),
               ('B200', 2250), ('A100', 312), ('A10', 125), ('L40S', 362), ('L4', 121), ('RTX 4090', 165),
               ('RTX 5090', 209), ('V100', 125), ('T4', 65)]
A100_PEAK = 312e12


def peak_flops(device_name):
    """(peak FLOP/s, what it is) for MFU: the GPU's own dense bf16 peak where PEAK_TFLOPS
    knows its name, else an A100's, and the text says so. (None, why) on a CPU or a Mac's
    GPU: a percentage of a datacenter GPU's peak says nothing about them."""
    if device_name in ('cpu', 'mps'):
        return None, f"not shown on {device_name} (MFU is measured against an NVIDIA GPU's peak FLOP/s)"
    for key, tflops in PEAK_TFLOPS:
        if key in device_name:
            return tflops * 1e12, f"{device_name}'s peak, {tflops} TFLOPS"
    return A100_PEAK, f"an A100's 312 TFLOPS ({device_name or 'this device'}'s peak is not in system.PEAK_TFLOPS)"


def autocast_context(device_type, dtype):
    """Mixed precision on CUDA (the router still computes in fp32 inside it); nothing elsewhere
    unless a lower precision is asked for on the CPU."""
    if dtype == 'float32':
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=PTDTYPES[dtype])


def keep_freed_memory_on_cpu():
    """Make glibc keep large freed blocks for reuse instead of returning them to the OS.

    By default glibc hands every block of 32 MiB or more back to the OS when it is freed,
    so the next allocation of that size page-faults in fresh zeroed memory: ~26 ms for
    32 MiB here, against ~1 ms to reuse a block. The stacked expert weights at E=64
    ([64, 256, 512] fp32) are exactly 32 MiB, so every step's eight expert gradients paid
    this: 140-220 ms of a ~1 s forward+backward with bench.py's shapes on one thread.
    Process-wide, Linux/glibc only (a no-op elsewhere); train.py and bench.py call it for
    CPU runs. Freed memory then stays in the process for reuse."""
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


# -----------------------------------------------------------------------------
# DDP: every rank trains a slice of one global batch; torch's DistributedDataParallel
# averages the gradients, and DDPSync does the rest, so that every rank ends with the
# same model and the log describes the global batch


class DDPSync:
    """What train.py's loop does under DDP beyond the gradient all-reduce. In one process
    (ddp=False) every method returns at once and changes nothing.

    global_batch(...)      after a step: the logged routing metrics and losses summed over the
                           ranks on a logging step, else the counts alone (what the routers'
                           step_finished learns from: DeepSeek-V3's bias, ReMoE's positive gates)
    share_router_state(m)  rank 0's calibrated loss coefficients on every rank, after the
                           first step that sets them (ortho/var loss targets)
    finish(raw_model)      at the end: check that every rank holds the same weights and
                           router state, and leave the process group together
    leave()                leave the process group together (a stop on a signal)
    """

    def __init__(self, ddp, world_size, device, master_process):
        self.ddp, self.world_size, self.device, self.master_process = ddp, world_size, device, master_process
        self.loss_scales_pending = ddp  # until every *_loss_scale buffer is calibrated and shared

    def global_batch(self, stats, lm_loss, log_step, finite):
        """Returns the step's language-model loss, averaged over the ranks on a logging step.
        A skipped step (finite=False) routed nothing: its counts are not summed."""
        if not self.ddp:
            return lm_loss
        if log_step:
            all_reduce_stats(stats, self.device)  # the metrics, losses and counts of the global batch
            dist.all_reduce(lm_loss)
            lm_loss /= self.world_size
            return lm_loss
        load_counts = stats.load_counts()
        if finite and load_counts:
            layers = sorted(load_counts)
            # ReMoE's positive gates (what its step_finished reads) travel in the same all_reduce
            gated = [layer for layer in layers if 'active_gates' in stats.layers[layer]]
            all_counts = torch.stack([load_counts[layer] for layer in layers]
                                     + [stats.layers[layer]['active_gates'] for layer in gated])
            dist.all_reduce(all_counts)  # the load of the whole global batch
            stats.set_load_counts(dict(zip(layers, all_counts[:len(layers)])))  # the log's load metrics too
            for layer, active_gates in zip(gated, all_counts[len(layers):]):
                stats.layers[layer]['active_gates'] = active_gates
        return lm_loss

    def share_router_state(self, raw_model):
        if self.loss_scales_pending:
            self.loss_scales_pending = share_loss_scales(raw_model)

    def leave(self):
        """Leave the process group with every rank (a rank that tears gloo down while another
        still talks to it can abort the process at exit)."""
        if self.ddp:
            dist.barrier()
            dist.destroy_process_group()

    def finish(self, raw_model):
        """Exits with code 1, after one line on stderr, when the ranks ended with different models."""
        if not self.ddp:
            return
        # DDP syncs gradients; the routers' own state (DeepSeek-V3's bias, GatePro's count) is
        # updated from the all-reduced counts: both must leave every rank with the same model
        differ = replicas_differ(raw_model)
        if self.master_process:
            if differ:
                print(f"error: the {self.world_size} DDP ranks ended with different values of "
                      f"{', '.join(differ[:5])}" + (f" and {len(differ) - 5} more" if len(differ) > 5 else ''),
                      file=sys.stderr)
            else:
                print(f"DDP: all {self.world_size} ranks hold the same weights and router state")
        self.leave()
        if differ:
            sys.exit(1)


def all_reduce_stats(stats, device):
    """Sum a RoutingStats over all ranks, in place, with one all_reduce: every rank ends up
    with the totals of the global batch. Every rank must call it with the same layers,
    losses and keys (the same model, the same `full` flag)."""
    slots = []  # (container, key, original value)
    for layer in sorted(stats.layers):
        totals = stats.layers[layer]
        slots += [(totals, key, totals[key]) for key in stats.SUMMED_TOTALS if key in totals]
    slots += [(stats.losses, name, stats.losses[name]) for name in sorted(stats.losses)]
    flat = [torch.as_tensor(value, dtype=torch.float64, device=device).reshape(-1) for _, _, value in slots]
    flat.append(torch.tensor([float(stats.n_passes)], dtype=torch.float64, device=device))
    sizes = [t.numel() for t in flat]
    summed = torch.cat(flat)
    dist.all_reduce(summed)
    parts = summed.split(sizes)
    for (container, key, value), part in zip(slots, parts):
        if isinstance(value, torch.Tensor):
            container[key] = part.reshape(value.shape).to(value.dtype)
        elif isinstance(value, int):
            container[key] = int(round(part.item()))
        else:
            container[key] = part.reshape(())
    stats.n_passes = int(round(parts[-1].item()))


def share_loss_scales(model):
    """Give every rank rank 0's calibrated loss coefficients (the `*_loss_scale` buffers that
    ortho_loss_target and var_loss_target set at the first training forward): each rank
    calibrated on its own first micro-batch, and the ranks must go on with one model.
    Returns True while some coefficient is still 0 (not yet calibrated: a loss of exactly 0
    sets nothing), so the caller knows to share again after the next step. A collective:
    every rank must call it. One host read of a few scalars, after the step."""
    scales = [buffer for name, buffer in model.named_buffers() if name.endswith('_loss_scale')]
    if not scales:
        return False
    packed = torch.stack(scales)
    dist.broadcast(packed, 0)
    for buffer, value in zip(scales, packed):
        buffer.copy_(value)
    return bool((packed == 0).any())


def _digest(value):
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return hashlib.sha256(str(value.dtype).encode() + str(tuple(value.shape)).encode() + data).hexdigest()
    return hashlib.sha256(repr(value).encode()).hexdigest()


def replicas_differ(model):
    """Names of the state-dict entries (parameters, buffers such as DeepSeek-V3's bias,
    extra state such as GatePro's step count) on which some rank differs from rank 0;
    [] when all ranks agree. A collective: every rank must call it."""
    digests = {name: _digest(value) for name, value in model.state_dict().items()}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, digests)
    return [name for name in gathered[0] if any(other.get(name) != gathered[0][name] for other in gathered[1:])]
