"""
What train.py needs under DDP beyond torch's DistributedDataParallel: the logged routing
metrics and losses of a step summed over every rank (so they describe the global batch,
as the routers' step_finished counts do), and a check at the end of a run that every rank
holds the same weights and router state.
"""

import hashlib

import torch
import torch.distributed as dist



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
