"""
What train.py, sample.py and bench.py share about the machine and the data: which device
and precision to run in, the GPU's peak for MFU, a CPU memory setting, a counter of the
host syncs a piece of code makes, the dataset's meta.pkl (read without running code) and
the checks of its .bin files.
"""

import ctypes
import os
import pickle
import sys
from contextlib import nullcontext

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakTensorKeyDictionary

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
    knows its name, else an A100's, and the text says so."""
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


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, tuples, strings and numbers (which need no lookup) and
    nothing else: every class or function a pickle names is refused before it is looked
    up, so no code from the file runs."""

    def find_class(self, module, name):
        raise _Refused(f"{module}.{name}")


class _Refused(pickle.UnpicklingError):
    pass


def load_meta(data_dir):
    """The dataset's meta.pkl (nanoGPT's format: vocab_size, and stoi/itos for characters or
    the name of a tiktoken encoding), or None when the folder has none. Only plain values
    load (_PlainUnpickler); a file that names a class or function, that cannot be read,
    or that has no integer vocab_size raises ValueError with a one-line message."""
    path = os.path.join(data_dir, 'meta.pkl')
    if not os.path.exists(path):
        return None
    try:
        with open(path, 'rb') as f:
            meta = _PlainUnpickler(f).load()
    except _Refused as e:
        raise ValueError(f"{path} was refused: it names {e}, and meta.pkl may hold only dicts, lists, "
                         f"strings and numbers (nothing in it was run)") from None
    except Exception as e:  # truncated, not a pickle, ...
        detail = str(e).splitlines()[0] if str(e) else 'the file ends early'
        raise ValueError(f"{path} cannot be read: {type(e).__name__}: {detail}") from None
    if not isinstance(meta, dict) or type(meta.get('vocab_size')) is not int or meta['vocab_size'] < 1:
        raise ValueError(f"{path} is not a dataset meta.pkl: it needs a dict with a positive integer vocab_size")
    return meta


def check_tokens(path, vocab_size, vocab_source):
    """Number of token ids in a .bin file (uint16), after checking that it holds whole ids
    (an even number of bytes) and that every id fits the vocabulary. One pass over the
    file through a memmap. Raises ValueError with a one-line message."""
    size = os.path.getsize(path)
    if size % 2:
        raise ValueError(f"{path} has {size} bytes, an odd number: not a whole number of uint16 token ids "
                         f"(a truncated or foreign file)")
    if size == 0:
        return 0
    max_id = int(np.memmap(path, dtype=np.uint16, mode='r').max())
    if max_id >= vocab_size:
        raise ValueError(f"{path} holds token id {max_id}, but the vocabulary has {vocab_size} ids ({vocab_source}); "
                         f"the .bin files and meta.pkl do not belong together")
    return size // 2


# -----------------------------------------------------------------------------
# Host syncs: where the CPU waits for the device. On a CPU run nothing waits, so the
# counter tracks which tensors would live on the device and counts every read of one.

# ops whose output size depends on the data, or that return a Python value: each waits
# for the device (bincount: to size its output). Also, in _DispatchCounter._waits:
# repeat_interleave without output_size, and indexing with a boolean mask.
DATA_DEPENDENT_OPS = {'aten._local_scalar_dense', 'aten.nonzero', 'aten.masked_select', 'aten.unique_dim',
                      'aten._unique', 'aten._unique2', 'aten.unique_consecutive', 'aten.equal', 'aten.bincount'}
HOST_READS = {'tolist', 'cpu', 'numpy'}  # Tensor methods that hand the host the data


class HostSyncCounter:
    """Counts the host syncs of the code run inside it: reads of a device tensor's values
    (.item(), float(), bool(), .tolist(), .cpu(), ...), ops whose output shape depends on
    the data (nonzero, boolean-mask indexing, unique, ...), and copies to the host.

    On a GPU, the tensors on the GPU. On a CPU run, where every tensor is on the host, a
    tensor counts as on the device when it was moved there (.to(device)), marked
    (mark(*tensors or modules): weights made before the counter started), or computed from
    one, and a read of it counts: this is how a CPU run tells apart what a GPU run would
    hold on the GPU (weights, activations, losses) from what it keeps on the host (a
    batch's random offsets, a copy read back). Not seen on a CPU run: a tensor made on
    the device by a factory (torch.zeros(..., device=device)) and read back before any
    op combines it with a device tensor. Backward counts too.

        with HostSyncCounter('cpu') as counter:
            ...
        counter.events  # [(what, [(file, line, function), ...] innermost first)], one per sync
    """

    def __init__(self, device, keep_frames_of=None):
        self.device_type = torch.device(device).type
        self.events = []
        self.on_device = WeakTensorKeyDictionary()
        self.reading = 0  # inside a counted read (.tolist(), .cpu()): its own copy is not a second sync
        here = os.path.dirname(os.path.abspath(__file__))
        self.keep_frames_of = keep_frames_of or here  # frames from files under this folder are recorded
        self._modes = (_FunctionCounter(self), _DispatchCounter(self))

    def mark(self, *items):
        for item in items:
            for t in [*item.parameters(), *item.buffers()] if isinstance(item, torch.nn.Module) else [item]:
                self.on_device[t] = True
        return self

    def __enter__(self):
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def count(self, what=None):
        return sum(1 for event in self.events if what is None or what in event[0])

    def is_on_device(self, t):
        return torch.is_tensor(t) and (t.device.type != 'cpu' or (self.device_type == 'cpu' and t in self.on_device))

    def record(self, what):
        frames, frame = [], sys._getframe(2)
        while frame is not None:
            path = frame.f_code.co_filename
            if path.startswith(self.keep_frames_of) and os.path.basename(path) != 'system.py':
                frames.append((os.path.basename(path), frame.f_lineno, frame.f_code.co_name))
            frame = frame.f_back
        self.events.append((what, frames))


class _FunctionCounter(TorchFunctionMode):
    """The Python-level half: host reads that never reach the dispatcher (.tolist()), and
    where tensors are put on the device (.to(device))."""

    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, '__name__', '')
        source = args[0] if args else None
        counted = name in HOST_READS and self.counter.is_on_device(source)
        if counted:
            self.counter.record(f"Tensor.{name}")
        self.counter.reading += counted
        try:
            result = func(*args, **kwargs)
        finally:
            self.counter.reading -= counted
        if name == 'cpu' and result is source:
            result = result.view_as(result)  # a CPU run's .cpu() returns the same tensor: a new one, on the host
            self.counter.on_device.pop(result, None)
        elif torch.is_tensor(result) and self._to_device(name, args, kwargs):
            self.counter.on_device[result] = True
        return result

    def _to_device(self, name, args, kwargs):
        if name != 'to':
            return name == 'cuda'
        target = kwargs.get('device', next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
        return target is not None and torch.device(target).type == self.counter.device_type


class _DispatchCounter(TorchDispatchMode):
    """The op-level half: data-dependent ops on device tensors, copies from a GPU to the
    host, and every output computed from a device tensor is on the device too."""

    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_leaves((args, kwargs)) if torch.is_tensor(t)]
        from_device = any(self.counter.is_on_device(t) for t in inputs)
        op = str(func.overloadpacket)
        if from_device and not self.counter.reading and self._waits(op, args, kwargs):
            self.counter.record(op)
        result = func(*args, **kwargs)
        outputs = [t for t in tree_leaves(result) if torch.is_tensor(t)]
        if op in ('aten._to_copy', 'aten.copy_') and not self.counter.reading \
                and any(t.device.type != 'cpu' for t in inputs) and any(t.device.type == 'cpu' for t in outputs):
            self.counter.record(f"{op} to the host")
        if from_device:
            for t in outputs:
                self.counter.on_device[t] = True
        return result

    @staticmethod
    def _waits(op, args, kwargs):
        if op == 'aten.repeat_interleave':
            return kwargs.get('output_size') is None
        if op in ('aten.index', 'aten.index_put', 'aten.index_put_'):  # indexing with a boolean mask
            return any(t is not None and t.dtype == torch.bool for t in args[1])
        return op in DATA_DEPENDENT_OPS
