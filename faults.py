"""
What ends a run early without losing the last good checkpoint, for train.py.

Interrupt         Ctrl-C: finish the step, save, exit; a second Ctrl-C ends at once
NonFiniteGuard    a step whose loss (or gradient) is not finite, on any rank, never reaches
                  the weights: the run stops with one line and keeps the checkpoint on disk,
                  or (skip_nonfinite=True) skips that step and counts it
nonfinite_report  the line that says which loss part and which router went non-finite
"""

import math
import os
import signal
import sys

import torch
import torch.distributed as dist


class Interrupt:
    """Ctrl-C (SIGINT) while training. The first one only sets `requested`: the training
    loop finishes its step, saves a checkpoint and exits. It also restores the default
    action, so a second Ctrl-C ends the process at once, even inside a long operation
    (the checkpoint on disk stays whole: saves are atomic)."""

    def __init__(self):
        self.requested = False

    def install(self):
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        # os.write, not print: a print here could re-enter a print the loop was in the middle of
        os.write(1, b"\ninterrupt: saving a checkpoint after this step (Ctrl-C again to quit without saving)\n")


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

    def is_finite(self, step_loss, grad_norm, scaler):
        """Is the step's summed loss (and, without fp16's loss scaling, which finds non-finite
        gradients itself, its gradient norm) finite on every rank?"""
        check = step_loss if grad_norm is None or scaler.is_enabled() else step_loss + grad_norm
        if self.ddp:
            check = check.clone()
            dist.all_reduce(check)
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
