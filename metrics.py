"""
Routing metrics, computed from what the routers returned (routers.Routing). No training
logic here. All are per MoE layer; the README's metrics table defines each one.

RoutingStats accumulates over several forward passes (gradient-accumulation micro-steps,
evaluation batches) with tensor ops only, nothing read back from the device; to_host()
moves every total to the host in one transfer (one sync on a GPU), after which summary()
turns them into Python numbers, so train.py reads metrics back only on logging steps.
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


def gate_angle(similarity):
    """Mean angle in degrees between different rows of W_g, arccos S_ij over i < j, from their
    cosine similarity matrix S [E, E] (GatePro, arXiv 2510.13079, App. C): 90 = orthogonal."""
    n_exp = similarity.size(0)
    i, j = torch.triu_indices(n_exp, n_exp, offset=1, device=similarity.device)
    return torch.rad2deg(torch.arccos(similarity[i, j].clamp(-1.0, 1.0))).mean()


def gate_spectral_entropy(similarity):
    """Entropy (nats) of the singular values of S [E, E], normalised to sum to 1 (GatePro,
    arXiv 2510.13079, App. C): ln E when the gate rows are orthogonal (S = I), 0 when they
    are all parallel (S of rank 1). Higher = more diverse experts."""
    singular = torch.linalg.svdvals(similarity.float())
    p = singular / singular.sum().clamp(min=1e-12)
    p = p[p > 0]
    return -(p * p.log()).sum()


def kept_pair_coactivation(routing, partner, n_tokens):
    """pair_coactivation over the pairs of a Routing that capacity kept, without selecting
    them (a selection's size would be read back from the device): a dropped pair selects
    an extra column E whose partner, column E + 1, no pair selects, so it adds nothing to
    the count of tokens with both i and j*(i); the mean over E + 2 columns is rescaled to E."""
    if routing.kept is None:
        return pair_coactivation(routing.token_idx, routing.expert_idx, partner, n_tokens)
    n_exp = partner.numel()
    expert_idx = routing.expert_idx.masked_fill(~routing.kept, n_exp)
    partner = torch.cat([partner, torch.full((2,), n_exp + 1, dtype=partner.dtype, device=partner.device)])
    return pair_coactivation(routing.token_idx, expert_idx, partner, n_tokens) * (n_exp + 2) / n_exp


def expert_overlap(token_idx, expert_out, n_tokens, kept=None):
    """How alike the outputs of a token's selected experts are: for each token, the mean
    |cos| between the raw outputs E_j(x_t) of its experts over its pairs of experts; returns
    (sum of that over the tokens, number of tokens) as tensors, or None when the shapes
    rule it out (P is not k*N for some k >= 2). Defined only when every token has the same
    k experts (token choice without drops; kept [P] bool marks the pairs capacity kept):
    otherwise both are 0, decided on the device, not read back. The orthogonality loss of
    Guo et al. 2025 (arXiv 2505.22323) pushes it towards 0. expert_out [P, d], row p for
    pair p (token_idx[p])."""
    k = token_idx.numel() // n_tokens
    if k < 2 or token_idx.numel() != k * n_tokens:
        return None
    every_token_has_k = (expert_counts(token_idx, n_tokens, kept) == k).all()  # kept pairs per token
    rows = F.normalize(expert_out[torch.argsort(token_idx, stable=True)].float(), dim=-1).view(n_tokens, k, -1)
    cos = (rows @ rows.transpose(1, 2)).abs()  # [N, k, k]
    off_diagonal = 1.0 - torch.eye(k, device=cos.device)  # a product, not a mask: a mask's selection would sync
    total = (cos * off_diagonal).sum(dim=(1, 2)).sum() / (k * (k - 1))
    return torch.where(every_token_has_k, total, 0.0), every_token_has_k.long() * n_tokens


def normalized_mutual_information(counts):
    """NMI between two labels from their joint count table [A, B] (here: a token's top-1 expert
    and its label): I(A; B) / ((H(A) + H(B)) / 2), in [0, 1]; 1 when each expert takes exactly
    one label's tokens and each label goes to one expert, 0 when they are independent."""
    joint = counts.double() / counts.sum().clamp(min=1)
    p_a, p_b = joint.sum(dim=1), joint.sum(dim=0)
    nonzero = joint > 0
    mutual = (joint[nonzero] * (joint[nonzero] / (p_a[:, None] * p_b[None, :])[nonzero]).log()).sum()
    entropy = lambda p: -(p[p > 0] * p[p > 0].log()).sum()
    denominator = entropy(p_a) + entropy(p_b)
    return float(2 * mutual / denominator) if denominator > 0 else 0.0


CHARACTER_CLASSES = ['letter', 'digit', 'space', 'punctuation', 'newline']


def character_class(ch):
    """The label of a character for datasets without domain labels: its index in CHARACTER_CLASSES."""
    if ch == '\n':
        return 4
    if ch.isalpha():
        return 0
    if ch.isdigit():
        return 1
    return 2 if ch.isspace() else 3


class RoutingStats:
    """Running totals per MoE layer over the forward passes given to add() (the micro-steps
    of a training step, or the batches of an evaluation)."""
    # the totals that are sums over tokens and passes: under DDP, system.all_reduce_stats adds them over ranks
    SUMMED_TOTALS = ('counts', 'zero_per_pass', 'n_requested', 'n_pairs', 'entropy_sum', 'variance_sum', 'n_tokens',
                     'coactivation_sum', 'overlap_sum', 'overlap_tokens', 'label_counts', 'experts_sum',
                     'experts_square_sum', 'experts_histogram', 'cap_bound_sum', 'label_experts', 'label_tokens',
                     'active_gates')

    def __init__(self, label_names=None):
        self.layers = {}   # layer index -> dict of tensor totals
        self.losses = {}   # router loss name -> total over layers and passes
        self.n_passes = 0
        self.label_names = label_names  # names of the token labels given to add(), for specialization

    def add(self, routings, router_losses=None, full=True, labels=None):
        """routings: {layer: Routing} and router_losses: {name: scalar summed over layers}
        from one forward. full=False counts only the assignments (what the routers'
        step_finished needs), skipping everything else. labels [N]: a label id per token
        (its domain, or its character class) for the expert x label table and the experts
        per token of each label."""
        self.n_passes += 1
        for name, value in (router_losses or {}).items():
            self.losses[name] = self.losses.get(name, 0.0) + value.detach()
        for layer, routing in routings.items():
            n_exp, n_tokens = routing.logits.size(-1), routing.logits.size(0)
            totals = self.layers.setdefault(layer, {'counts': 0, 'zero_per_pass': 0, 'n_requested': 0, 'n_pairs': 0,
                                                    'entropy_sum': 0.0, 'variance_sum': 0.0, 'n_tokens': 0})
            counts = routing.load()  # kept assignments only: a dropped pair is no expert's load
            totals['counts'] = totals['counts'] + counts
            totals['zero_per_pass'] = totals['zero_per_pass'] + (counts == 0).sum()
            # assignments asked for: an empty slot (past top-p's cut, a null expert) is not one
            totals['n_requested'] = totals['n_requested'] + routing.n_requested
            totals['n_pairs'] = totals['n_pairs'] + routing.n_pairs
            if routing.active_gates is not None:  # ReMoE: every positive gate, run or cut by the cap
                totals['active_gates'] = totals.get('active_gates', 0) + routing.active_gates
            if not full:
                continue
            totals['entropy_sum'] = totals['entropy_sum'] + router_entropy(routing.logits).sum()
            totals['variance_sum'] = totals['variance_sum'] + routing_variance(routing.logits).sum()
            totals['n_tokens'] += n_tokens
            # real experts that ran for each token: its kept pairs (not its empty slots, not its dropped pairs)
            per_token = routing.experts_per_token(n_tokens)
            totals['experts_sum'] = totals.get('experts_sum', 0) + per_token.sum()
            totals['experts_square_sum'] = totals.get('experts_square_sum', 0) + per_token.square().sum()
            histogram = torch.zeros(n_exp + 1, dtype=torch.long, device=per_token.device)  # tokens with 0..E experts
            histogram.index_add_(0, per_token.clamp(max=n_exp), torch.ones_like(per_token))
            totals['experts_histogram'] = totals.get('experts_histogram', 0) + histogram
            if routing.cap_bound is not None:
                totals['cap_bound_sum'] = totals.get('cap_bound_sum', 0) + routing.cap_bound.sum()
            if routing.gate_weight is not None:
                totals['coactivation_sum'] = totals.get('coactivation_sum', 0.0) + n_tokens * kept_pair_coactivation(
                    routing, gatepro_partners(routing.gate_weight), n_tokens)
                totals['gate_weight'] = routing.gate_weight  # the latest weights
            if routing.expert_out is not None:
                overlap = expert_overlap(routing.token_idx, routing.expert_out, n_tokens, routing.kept)
                if overlap is not None:
                    totals['overlap_sum'] = totals.get('overlap_sum', 0.0) + overlap[0]
                    totals['overlap_tokens'] = totals.get('overlap_tokens', 0) + overlap[1]
            if labels is not None:
                n_labels = len(self.label_names)
                top = routing.top_expert(n_tokens)
                picked = top >= 0  # a token without an expert (dropped) has no top-1: it adds 0
                cell = top.clamp(min=0) * n_labels + labels.reshape(-1)
                table = torch.zeros(n_exp * n_labels, dtype=torch.long, device=cell.device).index_add_(
                    0, cell, picked.long()).view(n_exp, n_labels)
                totals['label_counts'] = totals.get('label_counts', 0) + table
                # which kind of text gets more experts: experts per token, summed by label
                by_label = lambda values: torch.zeros(n_labels, dtype=torch.long, device=cell.device).index_add_(
                    0, labels.reshape(-1), values)
                totals['label_experts'] = totals.get('label_experts', 0) + by_label(per_token)
                totals['label_tokens'] = totals.get('label_tokens', 0) + by_label(torch.ones_like(per_token))

    def load_counts(self):
        """{layer: [E] assignment counts} summed over the passes added so far."""
        return {layer: totals['counts'] for layer, totals in self.layers.items()}

    def router_counts(self):
        """{layer: [E]} what each layer's router learns from after the step (step_finished):
        its kept assignments (load_counts), or, for a router that counts its positive gates
        (ReMoE's active_gates), those: a cap that cuts some of them must not hide them."""
        return {layer: totals.get('active_gates', totals['counts']) for layer, totals in self.layers.items()}

    def set_load_counts(self, load_counts):
        """Replace the counts by those of the whole global batch (all-reduced under DDP)."""
        for layer, counts in load_counts.items():
            self.layers[layer]['counts'] = counts

    def to_host(self, **extra):
        """(a copy of these statistics with every total on the host, {name: Python number}
        for the extra 0-d tensors), all moved in one transfer: a single sync when they are
        on a GPU. summary() and loss_summary() of the copy read nothing from the device."""
        host = RoutingStats(self.label_names)
        host.n_passes, host.on_host = self.n_passes, True
        host.layers = {layer: dict(totals) for layer, totals in self.layers.items()}
        host.losses = dict(self.losses)
        slots = [(totals, key) for totals in [*host.layers.values(), host.losses]
                 for key, value in totals.items() if torch.is_tensor(value)]
        values = read_back([totals[key] for totals, key in slots] + list(extra.values()))
        for (totals, key), value in zip(slots, values):
            totals[key] = value
        return host, {name: value.item() for name, value in zip(extra, values[len(slots):])}

    on_host = False  # True for a copy made by to_host()

    def loss_summary(self):
        """Mean per forward pass of each router loss, summed over layers."""
        if not self.on_host:
            return self.to_host()[0].loss_summary()
        return {name: float(total) / self.n_passes for name, total in self.losses.items()}

    def summary(self, tables=False):
        """One dict per layer, in layer order, with Python numbers (for logs and JSON).
        tables=True adds the E x E gate similarity matrix, the expert x label counts and the
        histogram of experts per token."""
        if not self.on_host:
            return self.to_host()[0].summary(tables)
        rows = []
        for layer in sorted(self.layers):
            totals = self.layers[layer]
            row = {'layer': layer, **load_metrics(totals['counts'])}
            row['zero_token_experts_per_batch'] = float(totals['zero_per_pass']) / self.n_passes
            if totals['n_tokens'] > 0:
                row['router_entropy'] = float(totals['entropy_sum']) / totals['n_tokens']
                row['routing_variance'] = float(totals['variance_sum']) / totals['n_tokens']
                mean = float(totals['experts_sum']) / totals['n_tokens']
                row['experts_per_token'] = mean
                # population std over the tokens, from the sums (clamped: round-off below 0 is 0)
                row['experts_per_token_std'] = max(float(totals['experts_square_sum']) / totals['n_tokens'] - mean ** 2,
                                                   0.0) ** 0.5
                if tables:
                    row['experts_per_token_histogram'] = totals['experts_histogram'].tolist()
                if 'cap_bound_sum' in totals:
                    row['cap_bound_frac'] = float(totals['cap_bound_sum']) / totals['n_tokens']
            if totals.get('overlap_tokens', 0) > 0:
                row['expert_overlap'] = float(totals['overlap_sum']) / float(totals['overlap_tokens'])
            if 'gate_weight' in totals:
                similarity = gate_similarity(totals['gate_weight'])
                row['pair_coactivation'] = float(totals['coactivation_sum']) / totals['n_tokens']
                row['gate_cos_sim'] = float(gate_cos_sim(totals['gate_weight']))
                row['gate_angle'] = float(gate_angle(similarity))
                row['gate_spectral_entropy'] = float(gate_spectral_entropy(similarity))
                if tables:
                    row['gate_similarity'] = [[round(v, 4) for v in r] for r in similarity.tolist()]
            if 'label_counts' in totals:
                row['specialization'] = normalized_mutual_information(totals['label_counts'])
                if tables:
                    row['expert_label_counts'] = totals['label_counts'].tolist()
                # None for a label with no token in these batches
                by_label = zip(totals['label_experts'].tolist(), totals['label_tokens'].tolist())
                row['experts_per_token_by_label'] = [experts / tokens if tokens else None
                                                     for experts, tokens in by_label]
            row['dropped_frac'] = 1.0 - float(totals['n_pairs']) / max(float(totals['n_requested']), 1.0)
            rows.append(row)
        return rows


def read_back(tensors):
    """Host copies of tensors on one device (any shapes and dtypes), in a single transfer:
    their bytes are concatenated on the device and copied once, where one .item() or
    .tolist() each would wait for the device once each."""
    if not tensors:
        return []
    flat = [t.detach().reshape(-1).view(torch.uint8) for t in tensors]
    host = torch.cat(flat).cpu()
    # clone: a dtype view needs its start aligned to the element size
    return [part.clone().view(t.dtype).view(t.shape) for part, t in zip(host.split([f.numel() for f in flat]), tensors)]


def format_routing_table(rows):
    """A compact per-layer table for the console."""
    lines = ['layer | load min   max | zero-token | max_vio | entropy | dropped | experts/token']
    for row in rows:
        lines.append(f"{row['layer']:5d} | {min(row['load']):8.3f} {max(row['load']):5.3f} | "
                     f"{row['zero_token_experts']:10d} | {row['max_vio']:7.3f} | "
                     f"{row.get('router_entropy', float('nan')):7.3f} | {row['dropped_frac']:7.3f} | "
                     f"{row.get('experts_per_token', float('nan')):13.2f}")
    return '\n'.join(lines)
