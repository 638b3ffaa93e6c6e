"""
What train.py, sample.py and bench.py share about the machine and the data: which device
and precision to run in, a CPU memory setting, and the dataset's meta.pkl.
"""

import ctypes
import os
import pickle
from contextlib import nullcontext

import torch

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
        return 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    return 'float32'


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


def load_meta(data_dir):
    """The dataset's meta.pkl (nanoGPT's format: vocab_size, and stoi/itos for characters or
    the name of a tiktoken encoding), or None when the folder has none."""
    path = os.path.join(data_dir, 'meta.pkl')
    if not os.path.exists(path):
        return None
    with open(path, 'rb') as f:
        return pickle.load(f)
