"""
Routers: the function that decides which experts see which token.

Every router is a small nn.Module built from the GPTConfig. Its forward takes the
hidden states of the N tokens of a batch, h [N, d], and returns a Routing: a flat
list of P (token, expert, weight) assignment pairs, the router's own losses (already
multiplied by their coefficients) and its raw scores for the metrics.

Flat pairs let token choice (P = N*k), capacity dropping (fewer pairs), expert choice
(P = E*C) and routers with a variable number of experts per token share one MoE layer.

The loss functions are pure functions of tensors so you can check them by hand.
Adding a router = one class + one line in ROUTERS + one test in test_routers.py.
"""

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# What a router returns


@dataclass
class Routing:
    token_idx: torch.Tensor   # [P] long: which token each assignment belongs to
    expert_idx: torch.Tensor  # [P] long: which expert it goes to
    weight: torch.Tensor      # [P] float: gate weight multiplying that expert's output
    logits: torch.Tensor      # [N, E] fp32 raw router scores, detached, for metrics
    losses: dict = field(default_factory=dict)  # name -> scalar, already scaled by its coefficient
    n_requested: int = 0      # assignments asked for before capacity dropping (P if nothing dropped)

    @property
    def n_pairs(self):
        return self.token_idx.numel()

    def top_expert(self, n_tokens):
        """[n_tokens] long: the expert with the largest gate weight for each token, -1
        for a token that got no expert (dropped, or unpicked under expert choice)."""
        best_weight = torch.full((n_tokens,), -float('inf'), device=self.weight.device)
        best_weight.scatter_reduce_(0, self.token_idx, self.weight.detach().float(), reduce='amax')
        is_best = self.weight.detach().float() == best_weight[self.token_idx]
        best = torch.full((n_tokens,), -1, dtype=torch.long, device=self.weight.device)
        best[self.token_idx[is_best]] = self.expert_idx[is_best]
        return best


# -----------------------------------------------------------------------------
# Pure loss functions


def switch_aux_loss(probs, expert_idx, n_exp):
    """Switch Transformer load-balancing loss, eq. (4)-(6) of Fedus et al. 2021 (arXiv 2101.03961):

        L_aux = E * sum_i f_i * P_i

    f_i: fraction of the assignments that went to expert i (counted, no gradient),
    P_i: mean over tokens of the router probability of expert i, from the FULL softmax
         over all E experts (not the top-k renormalised weights: those would hide the
         probability mass the router puts on experts it did not pick).
    Equals 1 when both are uniform; the gradient flows through P only.
    probs [N, E], expert_idx [P] (the chosen experts, any number per token).
    """
    counts = expert_counts(expert_idx, n_exp).to(probs.dtype)
    f = counts / counts.sum().clamp(min=1)
    P = probs.mean(dim=0)
    return n_exp * torch.sum(f * P)


def z_loss(logits):
    """ST-MoE router z-loss, eq. (5) of Zoph et al. 2022 (arXiv 2202.08906):

        L_z = (1/N) * sum_t (logsumexp_j logits_tj)^2

    Penalises large router logits, which keeps the softmax in a range where bf16
    round-off does not flip the routing.
    """
    return torch.logsumexp(logits, dim=-1).square().mean()


# -----------------------------------------------------------------------------
# Capacity: drop assignments past an expert's capacity (Switch Transformer, sec. 2.2)


def expert_capacity(n_tokens, n_exp, top_k, capacity_factor):
    """Switch eq. (3): capacity = capacity_factor * tokens_per_batch / num_experts, with k
    assignments per token counted as k*N tokens (GShard). At least 1."""
    return max(1, int(capacity_factor * n_tokens * top_k / n_exp))


def capacity_keep_mask(expert_idx, n_exp, capacity):
    """Boolean mask over the P pairs: True for the first `capacity` pairs of each expert,
    in the order the pairs are given. Routers list all first choices before second
    choices, so a token's first choice is dropped last (GShard's priority)."""
    order = torch.argsort(expert_idx, stable=True)
    counts = expert_counts(expert_idx, n_exp)
    group_start = torch.cumsum(counts, 0) - counts
    position_sorted = torch.arange(expert_idx.numel(), device=expert_idx.device) - group_start[expert_idx[order]]
    keep = torch.empty_like(expert_idx, dtype=torch.bool)
    keep[order] = position_sorted < capacity
    return keep


def expert_counts(expert_idx, n_exp):
    """[E] long: how many assignments each expert got. Not torch.bincount: on CUDA it reads
    the largest index back to the host to size its output, a sync on every call."""
    return torch.zeros(n_exp, dtype=torch.long, device=expert_idx.device).index_add_(
        0, expert_idx, torch.ones_like(expert_idx))


# -----------------------------------------------------------------------------
# Routers


class Router(nn.Module):
    """Base class: a linear gate W_g [E, d] without bias, and the losses every router can
    switch on by coefficient (Switch balance loss, z-loss). Routers compute in fp32 even
    under autocast: bf16 logits tie and flip the top-k choice."""

    def __init__(self, config):
        super().__init__()
        self.n_exp = config.n_exp
        self.top_k = config.top_k
        self.aux_loss_coef = config.aux_loss_coef
        self.z_loss_coef = config.z_loss_coef
        self.gate = nn.Linear(config.n_embd, config.n_exp, bias=False)

    def gate_logits(self, h):
        # fp32 matmul outside autocast: the router is tiny, its precision matters
        with torch.autocast(device_type=h.device.type, enabled=False):
            return F.linear(h.float(), self.gate.weight.float())

    def standard_losses(self, logits, probs, expert_idx):
        losses = {}
        if self.aux_loss_coef > 0:
            losses['aux'] = self.aux_loss_coef * switch_aux_loss(probs, expert_idx, self.n_exp)
        if self.z_loss_coef > 0:
            losses['z'] = self.z_loss_coef * z_loss(logits)
        return losses

    def update_after_step(self, load_counts):
        """Called by train.py after each optimizer step with this layer's assignment counts
        [E], summed over the gradient-accumulation micro-steps and over DDP ranks. Routers
        whose state is not learned by gradient (DeepSeek-V3's bias) update it here."""
        pass


def flatten_choices(topk_idx, topk_weight):
    """[N, k] choices -> flat pairs, choice-major: all first choices, then all second
    choices, ... so capacity dropping removes later choices first."""
    N, k = topk_idx.shape
    token_idx = torch.arange(N, device=topk_idx.device).repeat(k)
    return token_idx, topk_idx.t().reshape(-1), topk_weight.t().reshape(-1)


class TopKRouter(Router):
    """Top-k softmax routing (Shazeer et al. 2017, arXiv 1701.06538, without the noise;
    the form used by Mixtral and OLMoE).

        s_t = softmax(W_g h_t) over all E experts,  keep the k largest s_tj

    renormalize=True divides the kept k weights by their sum (Mixtral, arXiv 2401.04088);
    False keeps the raw softmax values (OLMoE, arXiv 2409.02060). Default True.
    Losses by coefficient: aux_loss_coef (Switch, default 0.01), z_loss_coef (ST-MoE, 0.001).
    """

    def __init__(self, config):
        super().__init__(config)
        self.renormalize = config.renormalize

    def forward(self, h, token_ids=None):
        logits = self.gate_logits(h)
        probs = F.softmax(logits, dim=-1)
        topk_weight, topk_idx = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            topk_weight = topk_weight / topk_weight.sum(dim=-1, keepdim=True)
        token_idx, expert_idx, weight = flatten_choices(topk_idx, topk_weight)
        losses = self.standard_losses(logits, probs, expert_idx)
        return Routing(token_idx, expert_idx, weight, logits.detach(), losses, n_requested=expert_idx.numel())


ROUTERS = {
    'topk': TopKRouter,
}


def build_router(config):
    if config.router not in ROUTERS:
        raise ValueError(f"unknown router {config.router!r}; available: {', '.join(sorted(ROUTERS))}")
    return ROUTERS[config.router](config)
