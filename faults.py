"""
What ends a run early without losing the last good checkpoint, for train.py.

Interrupt         Ctrl-C (SIGINT) or SIGTERM (what a scheduler sends before SIGKILL):
                  finish the step, save, exit with 130 or 143; a second signal ends at once.
                  Under DDP every rank stops at the same iteration
NonFiniteGuard    a step whose loss (or gradient) is not finite, on any rank, never reaches
                  the weights: the run stops with one line and keeps the checkpoint on disk,
                  or (skip_nonfinite=True) skips that step and counts it
nonfinite_report  the line that says which loss part and which router went non-finite
hold_out_dir      one live run per out_dir: a second one is refused, not mixed into the first
"""

import math
import os
import signal
import sys

import torch
import torch.distributed as dist

try:
    import fcntl  # a lock that the OS releases when its process ends, however it ends
except ImportError:  # Windows: no lock, out_dir is not guarded against a second run
    fcntl = None


class Interrupt:
    """Ctrl-C (SIGINT) or SIGTERM while training. SLURM, Kubernetes and spot instances stop a
    job with SIGTERM and a grace period before SIGKILL, so it saves like Ctrl-C. The first
    signal only sets `received`: the training loop finishes its step, saves a checkpoint at
    the top of the next iteration and exits with exit_code, 128 + the signal's number as a
    shell reports it: 130 for SIGINT, 143 for SIGTERM (a job script can test for 143 and
    requeue with --init_from=resume). It also restores the default actions, so a second
    signal ends the process at once, even inside a long operation (the checkpoint on disk
    stays whole: saves are atomic).

    Under DDP the ranks must stop at the same iteration, or one would wait forever in a
    collective the others left: `requested` is then what every rank agreed at the end of
    the last step (agree(), folded into the step's one all_reduce by NonFiniteGuard)."""

    def __init__(self, ddp=False):
        self.ddp = ddp
        self.received = None  # the signal that arrived here, if any
        self.agreed = False  # DDP: some rank received one, as of the last step's all_reduce
        self.signals = ()

    def install(self, signals=(signal.SIGINT, signal.SIGTERM)):
        self.signals = tuple(signals)
        for signum in self.signals:
            signal.signal(signum, self._handle)

    @property
    def requested(self):
        return self.agreed if self.ddp else self.received is not None

    def agree(self, any_rank):
        self.agreed = self.agreed or any_rank

    @property
    def exit_code(self):
        return 128 + int(self.received or signal.SIGTERM)  # a rank told by another: as if SIGTERM

    @property
    def name(self):
        return signal.Signals(self.received).name if self.received else 'a signal on another rank'

    def _handle(self, signum, frame):
        self.received = signum
        for installed in self.signals:
            signal.signal(installed, signal.SIG_DFL)
        # os.write, not print: a print here could re-enter a print the loop was in the middle of
        what = 'interrupt' if signum == signal.SIGINT else signal.Signals(signum).name
        again = 'Ctrl-C' if signum == signal.SIGINT else 'a second signal'
        os.write(1, f"\n{what}: saving a checkpoint after this step ({again} to quit without saving)\n".encode())


def hold_out_dir(out_dir, create=True):
    """Lock out_dir/.train.lock for this process's lifetime (the OS drops the lock when the
    process ends, even by SIGKILL) and return the open file, which the caller keeps.
    create=False only looks, writing nothing: returns None when out_dir is free. Raises
    ValueError (one line) when another live run holds it."""
    if fcntl is None:
        return None
    path = os.path.join(out_dir, '.train.lock')
    if not create and not os.path.exists(path):
        return None
    f = open(path, 'a+' if create else 'r')
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or '?'
        f.close()
        raise ValueError(f"out_dir={out_dir} is in use by another training run (pid {pid}); wait for it to end, "
                         f"or set another --out_dir") from None
    if not create:
        f.close()  # only looking: let go at once
        return None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


class NonFiniteGuard:
    """The non-finite check of train.py's step. watch() sees each micro-step's routing (which
    router's logits went non-finite, kept on the device); is_finite() is the step's one
    host sync (under DDP after an all_reduce, so every rank decides alike); skip_or_stop()
    acts on a bad step. skipped_steps counts the steps skipped over the whole run (it is
    checkpointed)."""

    def __init__(self, skip, ddp, master_process, ckpt_path, skipped_steps=0):
        self.skip, self.ddp, self.master_process, self.ckpt_path = skip, ddp, master_process, ckpt_path
        self.skipped_steps = skipped_steps
        self.bad_layers = {}  # MoE layer -> its router's logits were not finite in some micro-step

    def watch(self, routings):
        for layer, routing in routings.items():
            bad = ~torch.isfinite(routing.logits).all()
            self.bad_layers[layer] = bad if layer not in self.bad_layers else self.bad_layers[layer] | bad

    def is_finite(self, step_loss, grad_norm, scaler, interrupt=None):
        """Is the step's summed loss (and, without fp16's loss scaling, which finds non-finite
        gradients itself, its gradient norm) finite on every rank? Under DDP the same
        all_reduce also tells every rank whether any was asked to stop (interrupt.agree):
        the stop costs no wait of its own."""
        check = step_loss if grad_norm is None or scaler.is_enabled() else step_loss + grad_norm
        if self.ddp:
            asked = float(interrupt is not None and interrupt.received is not None)
            both = torch.stack([check.detach().float(), torch.tensor(asked, device=check.device)])
            dist.all_reduce(both)
            total, any_asked = both.tolist()  # the step's one host sync
            finite = math.isfinite(total)
            if interrupt is not None:
                interrupt.agree(any_asked > 0)
        else:
            finite = bool(torch.isfinite(check))
        if finite:
            self.bad_layers = {}
        return finite

    def skip_or_stop(self, iter_num, lm_loss, stats, grad_norm, saved_iter):
        """A bad step: stop with one line on stderr and exit code 1 (rank 0 says why, the other
        ranks exit quietly), or with skip, count it and print the same line. lm_loss: the
        step's language-model loss (a 0-d tensor), stats: its RoutingStats, saved_iter: the
        iteration of the checkpoint on disk (None: none was written), for the message."""
        if not self.master_process and not self.skip:
            sys.exit(1)
        self.skipped_steps += 1
        if self.master_process:
            report = nonfinite_report(iter_num, lm_loss.item(), stats.loss_summary(),
                                      [layer for layer in sorted(self.bad_layers) if self.bad_layers[layer]],
                                      None if grad_norm is None else grad_norm.item())
            if not self.skip:  # nothing is saved: the checkpoint on disk is the last good one
                kept = (f"{self.ckpt_path} (iter {saved_iter}) is kept" if saved_iter is not None
                        else "no checkpoint was written")
                print(f"error: {report}; training stopped, {kept}; --skip_nonfinite=True skips such steps",
                      file=sys.stderr)
                sys.exit(1)
            print(f"{report}; step skipped ({self.skipped_steps} so far)")
        self.bad_layers = {}


def nonfinite_report(iter_num, lm_loss, router_losses, bad_layers, grad_norm=None):
    """One line on a step whose loss (or gradient) is not finite: every loss part, and the
    first MoE layer whose router produced non-finite logits.
    lm_loss: float; router_losses: {name: float}; bad_layers: [layer index] whose router
    logits were not finite this step, in layer order; grad_norm: float or None."""
    losses = {'loss': lm_loss, **router_losses}
    parts = [f"{name} {value:.4g}" for name, value in losses.items()]
    gradient_only = grad_norm is not None and not math.isfinite(grad_norm) and all(map(math.isfinite, losses.values()))
    if grad_norm is not None and not math.isfinite(grad_norm):
        parts.append(f"gradient norm {grad_norm:.4g}")
    where = (f"first non-finite router logits in layer {bad_layers[0]}" if bad_layers
             else "router logits finite in every layer")
    return f"non-finite {'gradient' if gradient_only else 'loss'} at iter {iter_num}: {', '.join(parts)}; {where}"
