"""
Routing metrics, computed from what the routers returned (routers.Routing). No training
logic here. All are per MoE layer; the README's metrics table defines each one.

RoutingStats accumulates over several forward passes (gradient-accumulation micro-steps,
evaluation batches) with tensor ops only; summary() turns the totals into Python numbers
(one device sync), so train.py calls it only on logging steps.
"""

import torch
import torch.nn.functional as F

from routers import expert_counts, gate_similarity, gatepro_partners


def load_metrics(counts):
    """From assignment counts per expert [E]:
    load: fraction of assignments per expert (sums to 1),
    zero_token_experts: experts that received nothing (GatePro, arXiv 2510.13079, Fig. 4-7),
    max_vio: (max_i count_i - mean) / mean (Loss-Free Balancing, arXiv 2408.15664, eq. 8),
    load_cv: std / mean of the counts (population std)."""
    counts = counts.float()
    mean = counts.mean().clamp(min=1e-9)
    return {
        'load': (counts / counts.sum().clamp(min=1)).tolist(),
        'zero_token_experts': int((counts == 0).sum()),
        'max_vio': float((counts.max() - mean) / mean),
        'load_cv': float(counts.std(unbiased=False) / mean),
    }


def router_entropy(logits):
    """Per-token entropy (nats) of softmax(logits) over the experts, [N]."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1)


def routing_variance(logits):
    """Per-token population variance of softmax(logits) across experts, [N]: the quantity
    the variance loss of Guo et al. (arXiv 2505.22323) maximises."""
    return F.softmax(logits.float(), dim=-1).var(dim=-1, unbiased=False)


def gate_cos_sim(gate_weight):
    """Mean |S_ij| over the expert pairs i < j, S the cosine similarity of the rows of the
    router weight W_g [E, d] (GatePro, arXiv 2510.13079, App. C): how alike the experts'
    gate vectors are."""
    similarity = gate_similarity(gate_weight)
    n_exp = similarity.size(0)
    i, j = torch.triu_indices(n_exp, n_exp, offset=1, device=similarity.device)
    return similarity[i, j].abs().mean()


def pair_coactivation(token_idx, expert_idx, partner, n_tokens):
    """Fraction of the tokens that select both expert i and its most similar expert
    j*(i) (partner [E], routers.gatepro_partners), averaged over i: exactly what GatePro
    suppresses (arXiv 2510.13079)."""
    selected = torch.zeros(n_tokens, partner.numel(), dtype=torch.bool, device=token_idx.device)
    selected[token_idx, expert_idx] = True
    return (selected & selected[:, partner]).float().mean()


class RoutingStats:
    """Running totals per MoE layer over the forward passes given to add()."""

    def __init__(self):
        self.layers = {}   # layer index -> dict of tensor totals
        self.losses = {}   # router loss name -> total over layers and passes
        self.n_passes = 0

    def add(self, routings, router_losses=None, full=True):
        """routings: {layer: Routing} and router_losses: {name: scalar summed over layers}
        from one forward. full=False counts only the assignments (what the routers'
        step_finished needs), skipping entropies and the gate metrics."""
        self.n_passes += 1
        for name, value in (router_losses or {}).items():
            self.losses[name] = self.losses.get(name, 0.0) + value.detach()
        for layer, routing in routings.items():
            n_exp = routing.logits.size(-1)
            totals = self.layers.setdefault(layer, {'counts': 0, 'n_requested': 0, 'n_pairs': 0,
                                                    'entropy_sum': 0.0, 'variance_sum': 0.0, 'n_tokens': 0})
            totals['counts'] = totals['counts'] + expert_counts(routing.expert_idx, n_exp)
            totals['n_requested'] += routing.n_requested
            totals['n_pairs'] += routing.n_pairs
            if full:
                totals['entropy_sum'] = totals['entropy_sum'] + router_entropy(routing.logits).sum()
                totals['variance_sum'] = totals['variance_sum'] + routing_variance(routing.logits).sum()
                totals['n_tokens'] += routing.logits.size(0)
            if full and routing.gate_weight is not None:
                weight = routing.gate_weight
                n_tokens = routing.logits.size(0)
                totals['coactivation_sum'] = totals.get('coactivation_sum', 0.0) + n_tokens * pair_coactivation(
                    routing.token_idx, routing.expert_idx, gatepro_partners(weight), n_tokens)
                totals['gate_cos_sim'] = gate_cos_sim(weight)  # the latest weights

    def load_counts(self):
        """{layer: [E] assignment counts} summed over the passes added so far."""
        return {layer: totals['counts'] for layer, totals in self.layers.items()}

    def loss_summary(self):
        """Mean per forward pass of each router loss, summed over layers."""
        return {name: float(total) / self.n_passes for name, total in self.losses.items()}

    def summary(self):
        """One dict per layer, in layer order, with Python numbers (for logs and JSON)."""
        rows = []
        for layer in sorted(self.layers):
            totals = self.layers[layer]
            row = {'layer': layer, **load_metrics(totals['counts'])}
            if totals['n_tokens'] > 0:
                row['router_entropy'] = float(totals['entropy_sum']) / totals['n_tokens']
                row['routing_variance'] = float(totals['variance_sum']) / totals['n_tokens']
            if 'coactivation_sum' in totals:
                row['pair_coactivation'] = float(totals['coactivation_sum']) / totals['n_tokens']
                row['gate_cos_sim'] = float(totals['gate_cos_sim'])
            row['dropped_frac'] = 1.0 - totals['n_pairs'] / max(totals['n_requested'], 1)
            rows.append(row)
        return rows


def format_routing_table(rows):
    """A compact per-layer table for the console."""
    lines = ['layer | load min   max | zero-token | max_vio | entropy | dropped']
    for row in rows:
        lines.append(f"{row['layer']:5d} | {min(row['load']):8.3f} {max(row['load']):5.3f} | "
                     f"{row['zero_token_experts']:10d} | {row['max_vio']:7.3f} | "
                     f"{row.get('router_entropy', float('nan')):7.3f} | {row['dropped_frac']:7.3f}")
    return '\n'.join(lines)
