"""
What train.py, sample.py and bench.py share about the machine and the data: which device
and precision to run in, a CPU memory setting, the dataset's meta.pkl (read without
running code) and the checks of its .bin files.
"""

import ctypes
import os
import pickle
from contextlib import nullcontext

import numpy as np
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
