"""
A counter of host syncs: where the CPU waits for the device. The tests use it to prove the
GPU path on a CPU (a training step syncs once, a logging step reads back once), and
bench.py's GPU check counts with it on a real GPU. Not imported by the training path.
"""

import os
import sys

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakTensorKeyDictionary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# On a CPU run nothing waits, so the counter tracks which tensors would live on the device
# and counts every read of one.

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
        self.keep_frames_of = keep_frames_of or REPO  # frames from files under this folder are recorded
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
            if path.startswith(self.keep_frames_of) and os.path.abspath(path) != os.path.abspath(__file__):
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
