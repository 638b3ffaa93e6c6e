"""Tests of metrics.py: every routing metric on small cases worked out by hand."""

import math

import pytest
import torch

from metrics import (RoutingStats, character_class, expert_overlap, gate_angle, gate_cos_sim, gate_spectral_entropy,
                     kept_pair_coactivation, load_metrics, normalized_mutual_information, router_entropy,
                     routing_variance)
from routers import Routing, gate_similarity, gatepro_partners


def test_load_metrics_when_every_token_goes_to_expert_0():
    # counts (8, 0, 0, 0): mean 2; max_vio = (8 - 2) / 2 = 3; population variance
    # ((8-2)^2 + 3 * 2^2) / 4 = 12, load_cv = sqrt(12) / 2 = 1.7321
    m = load_metrics(torch.tensor([8, 0, 0, 0]))
    assert m['load'] == [1.0, 0.0, 0.0, 0.0]
    assert m['zero_token_experts'] == 3
    assert m['max_vio'] == pytest.approx(3.0)
    assert m['load_cv'] == pytest.approx(math.sqrt(12) / 2)


def test_load_metrics_of_a_balanced_and_an_uneven_load():
    balanced = load_metrics(torch.tensor([5, 5, 5, 5]))
    assert balanced['load'] == [0.25] * 4
    assert (balanced['zero_token_experts'], balanced['max_vio'], balanced['load_cv']) == (0, 0.0, 0.0)
    # counts (6, 2, 4, 0): mean 3; max_vio = (6 - 3) / 3 = 1; variance (9 + 1 + 1 + 9) / 4 = 5
    uneven = load_metrics(torch.tensor([6, 2, 4, 0]))
    assert uneven['load'] == pytest.approx([0.5, 1 / 6, 1 / 3, 0.0])
    assert uneven['zero_token_experts'] == 1
    assert uneven['max_vio'] == pytest.approx(1.0)
    assert uneven['load_cv'] == pytest.approx(math.sqrt(5) / 3)


def test_router_entropy_by_hand():
    logits = torch.tensor([[0.0, -1e4, -1e4, -1e4],       # one-hot: entropy 0
                           [1.0, 1.0, 1.0, 1.0],          # uniform over 4: ln 4 = 1.3863
                           [0.0, 0.0, -1e4, -1e4]])       # uniform over 2: ln 2 = 0.6931
    torch.testing.assert_close(router_entropy(logits), torch.tensor([0.0, math.log(4), math.log(2)]),
                               atol=1e-5, rtol=0)


def test_routing_variance_by_hand():
    logits = torch.tensor([[0.0, -1e4, -1e4, -1e4],       # s = (1, 0, 0, 0): (.75^2 + 3 * .25^2) / 4 = .1875
                           [1.0, 1.0, 1.0, 1.0],          # uniform: 0
                           [0.0, 0.0, -1e4, -1e4]])       # s = (.5, .5, 0, 0): 4 * .25^2 / 4 = .0625
    torch.testing.assert_close(routing_variance(logits), torch.tensor([0.1875, 0.0, 0.0625]), atol=1e-6, rtol=0)


def test_gate_angle_and_spectral_entropy_by_hand():
    # rows (1,0), (0,1), (1,1): cos = 0, 1/sqrt2, 1/sqrt2 -> angles 90, 45, 45 degrees, mean 60
    similarity = gate_similarity(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    assert gate_angle(similarity).item() == pytest.approx(60.0, abs=1e-3)
    # S = I (orthogonal rows): four singular values 1, p = 1/4 each -> ln 4
    assert gate_spectral_entropy(torch.eye(4)).item() == pytest.approx(math.log(4), abs=1e-6)
    # all rows parallel: S = ones(3, 3) has singular values (3, 0, 0) -> entropy 0
    assert gate_spectral_entropy(torch.ones(3, 3)).item() == pytest.approx(0.0, abs=1e-6)
    # S = [[1, .5], [.5, 1]]: singular values 1.5 and .5 -> p = (.75, .25) -> .5623
    assert gate_spectral_entropy(torch.tensor([[1.0, 0.5], [0.5, 1.0]])).item() == pytest.approx(0.562335, abs=1e-5)


def test_expert_overlap_by_hand():
    # two tokens, k = 2, pairs in choice-major order: token 0 gets (1,0) and (0,1), |cos| = 0;
    # token 1 gets (2,0) and (-1,0), |cos| = 1 -> sum 1 over 2 tokens
    token_idx = torch.tensor([0, 1, 0, 1])
    out = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    total, n = expert_overlap(token_idx, out, 2)
    assert (total.item(), n) == (pytest.approx(1.0), 2)
    # k = 3, one token: (1,0), (0,1), (1,1) -> |cos| 0, 1/sqrt2, 1/sqrt2 over the 3 pairs -> .4714
    total, n = expert_overlap(torch.tensor([0, 0, 0]), torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), 1)
    assert total.item() == pytest.approx(2 / math.sqrt(2) / 3, abs=1e-6) and n == 1
    # not defined for one expert per token, or for tokens with different numbers of experts
    assert expert_overlap(torch.tensor([0, 1]), out[:2], 2) is None
    assert expert_overlap(torch.tensor([0, 0, 1]), out[:3], 2) is None


def test_expert_overlap_groups_each_tokens_own_pairs_and_needs_every_pair_kept():
    """Pairs are listed choice-major (p = c*N + t): the overlap must compare the outputs of
    one token's experts, not of neighbouring pairs; and with a pair dropped a token has
    fewer than k outputs, so the metric is not defined for the batch (0 tokens, not a value)."""
    # token 0 owns pairs 0 and 2: (1, 0) and (0, 1), |cos| = 0
    # token 1 owns pairs 1 and 3: (1, 0) and (1, 1), |cos| = 1/sqrt2 = .707107 -> sum .707107 over 2 tokens
    # (neighbouring pairs (0, 1) and (2, 3) would give 1 + .707107)
    token_idx = torch.tensor([0, 1, 0, 1])
    out = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    total, n = expert_overlap(token_idx, out, 2)
    assert (total.item(), int(n)) == (pytest.approx(1 / math.sqrt(2)), 2)
    # the last pair dropped: token 1 keeps one output -> nothing counted
    total, n = expert_overlap(token_idx, out, 2, kept=torch.tensor([True, True, True, False]))
    assert (total.item(), int(n)) == (0.0, 0)
    # through RoutingStats: the mean over the 2 tokens, .707107 / 2 = .353553; absent once a pair is dropped
    logits = torch.zeros(2, 4)
    stats = RoutingStats()
    stats.add({0: Routing(token_idx, torch.tensor([0, 1, 2, 3]), torch.ones(4), logits, expert_out=out)})
    assert stats.summary()[0]['expert_overlap'] == pytest.approx(1 / (2 * math.sqrt(2)))
    stats = RoutingStats()
    stats.add({0: Routing(token_idx, torch.tensor([0, 1, 2, 3]), torch.ones(4), logits, expert_out=out,
                          kept=torch.tensor([True, True, True, False]))})
    assert 'expert_overlap' not in stats.summary()[0]


def test_gate_cos_sim_takes_absolute_cosines():
    """gate_cos_sim is the mean |S_ij|: opposite gate rows are as alike as parallel ones
    (they split the same direction), so a negative cosine must not cancel a positive one."""
    # rows (1, 0), (-1, 0), (0, 1): S_01 = -1, S_02 = 0, S_12 = 0 -> mean |S| = 1/3 (the signed mean is -1/3)
    assert gate_cos_sim(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])).item() == pytest.approx(1 / 3)

def test_normalized_mutual_information_by_hand():
    assert normalized_mutual_information(torch.tensor([[5, 0], [0, 5]])) == pytest.approx(1.0)
    assert normalized_mutual_information(torch.tensor([[1, 1], [1, 1]])) == pytest.approx(0.0)
    # joint (.5, 0; .25, .25): I = .5 ln(4/3) + .25 ln(2/3) + .25 ln 2 = .215762,
    # H(expert) = ln 2 = .693147, H(label) = -(.75 ln .75 + .25 ln .25) = .562335
    # NMI = 2 * .215762 / 1.255482 = .343713
    assert normalized_mutual_information(torch.tensor([[2, 0], [1, 1]])) == pytest.approx(0.343713, abs=1e-5)


def test_character_classes():
    assert [character_class(c) for c in 'a7 .\nZ'] == [0, 1, 2, 3, 4, 0]


def one_hot_routing(experts, n_exp=4):
    """A top-1 Routing sending token t to experts[t], with weight 1."""
    n = len(experts)
    logits = torch.full((n, n_exp), -1e4).scatter_(1, torch.tensor(experts)[:, None], 0.0)
    return Routing(torch.arange(n), torch.tensor(experts), torch.ones(n), logits)


def test_zero_token_experts_over_all_batches_and_per_batch():
    # batch 1 uses only expert 0, batch 2 only expert 1 (E = 4): over both batches together
    # 2 experts got nothing; each batch alone leaves 3 idle -> per batch 3.0
    stats = RoutingStats()
    stats.add({0: one_hot_routing([0, 0, 0])})
    stats.add({0: one_hot_routing([1, 1, 1])})
    row = stats.summary()[0]
    assert row['zero_token_experts'] == 2 and row['zero_token_experts_per_batch'] == 3.0
    assert row['load'] == [0.5, 0.5, 0.0, 0.0]


def test_specialization_table_and_score():
    # tokens routed (top-1) to experts 0, 0, 1, 1, 2 with labels 1, 1, 0, 0, 0 (two labels):
    # table expert x label = [[0, 2], [2, 0], [1, 0], [0, 0]]
    # joint = table / 5; p_expert = (.4, .4, .2, 0), p_label = (.6, .4)
    # I = .4 ln(.4/.16) + .4 ln(.4/.24) + .2 ln(.2/.12) = .366516 + .204330 + .102165 = .673012
    # H(expert) = -(2 * .4 ln .4 + .2 ln .2) = 1.054920, H(label) = .673012 -> NMI = 2I / (sum) = .778979
    stats = RoutingStats(label_names=['a', 'b'])
    stats.add({0: one_hot_routing([0, 0, 1, 1, 2])}, labels=torch.tensor([1, 1, 0, 0, 0]))
    row = stats.summary(tables=True)[0]
    assert row['expert_label_counts'] == [[0, 2], [2, 0], [1, 0], [0, 0]]
    assert row['specialization'] == pytest.approx(0.778979, abs=1e-5)


# E = 4 gate rows: 0 and 1 nearly parallel, 2 and 3 nearly parallel, the two pairs orthogonal:
# cos(0, 1) = cos(2, 3) = 1/sqrt(1.01) = .995, cos(1, 2) = cos(0, 3) = .0995, cos(0, 2) = cos(1, 3) = 0
# -> partners j*(0) = 1, j*(1) = 0, j*(2) = 3, j*(3) = 2
PAIRED_GATE = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])


def test_coactivation_and_specialization_count_only_the_kept_pairs():
    """Capacity leaves a dropped pair in the Routing (weight 0, kept False): pair
    co-activation is its definition on the kept pairs only, and a token that kept no pair
    has no top-1 expert, so the expert x label table counts it nowhere (not under expert 0,
    nor under the last expert)."""
    # five tokens, top-2, pairs choice-major (first choices of t0..t4, then second choices):
    #   t0 asks (0, 1), keeps both        -> {0, 1}, top-1 expert 0 (weight .6 over .4)
    #   t1 asks (1, 0), second dropped    -> {1},    top-1 expert 1
    #   t2 asks (2, 3), keeps both        -> {2, 3}, top-1 expert 2
    #   t3 asks (3, 2), both dropped      -> {},     no top-1 expert
    #   t4 asks (0, 2), first dropped     -> {2},    top-1 expert 2 (its only kept pair)
    expert_idx = torch.tensor([0, 1, 2, 3, 0, 1, 0, 3, 2, 2])
    kept = torch.tensor([1, 1, 1, 0, 0, 1, 0, 1, 0, 1], dtype=torch.bool)
    weight = torch.where(kept, torch.tensor([0.6] * 5 + [0.4] * 5), 0.0)  # a dropped pair weighs 0
    routing = Routing(torch.arange(5).repeat(2), expert_idx, weight, torch.zeros(5, 4), gate_weight=PAIRED_GATE,
                      kept=kept)
    assert routing.top_expert(5).tolist() == [0, 1, 2, -1, 2]
    # co-activation over N = 5 tokens, partners 0<->1, 2<->3, kept pairs only:
    #   expert 0 with 1: t0 -> 1/5;  expert 1 with 0: t0 -> 1/5
    #   expert 2 with 3: t2 -> 1/5;  expert 3 with 2: t2 -> 1/5;  mean over i = 1/5
    # (the dropped pairs would add t1 to experts 0 and 1 and t3 to experts 2 and 3: 2/5)
    assert kept_pair_coactivation(routing, gatepro_partners(PAIRED_GATE), 5).item() == pytest.approx(0.2)
    # labels of t0..t4: 0, 1, 1, 0, 1. Table expert x label over the four tokens with an expert:
    #   expert 0: t0 (label 0)         -> [1, 0]
    #   expert 1: t1 (label 1)         -> [0, 1]
    #   expert 2: t2, t4 (both label 1) -> [0, 2]
    #   expert 3: none                 -> [0, 0]
    # t3 (label 0) is in no row: under expert 0 it would make [2, 0], under expert 3 [1, 0]
    # NMI: joint = table / 4, p_expert = (.25, .25, .5, 0), p_label = (.25, .75)
    #   I = .25 ln 4 + .25 ln(4/3) + .5 ln(4/3) = .346574 + .215762 = .562335
    #   H(expert) = 2 * .25 ln 4 + .5 ln 2 = 1.039721, H(label) = .25 ln 4 + .75 ln(4/3) = .562335
    #   NMI = 2 * .562335 / 1.602056 = .702017
    stats = RoutingStats(label_names=['a', 'b'])
    stats.add({0: routing}, labels=torch.tensor([0, 1, 1, 0, 1]))
    row = stats.summary(tables=True)[0]
    assert row['pair_coactivation'] == pytest.approx(0.2)
    assert row['expert_label_counts'] == [[1, 0], [0, 1], [0, 2], [0, 0]]
    assert row['specialization'] == pytest.approx(0.702017, abs=1e-5)
    # six of the ten pairs kept: loads (1, 2, 2, 1) / 6, and 4/10 dropped
    assert row['load'] == pytest.approx([1 / 6, 2 / 6, 2 / 6, 1 / 6])
    assert row['dropped_frac'] == pytest.approx(0.4)


def test_a_token_that_no_expert_picked_has_no_top1_expert():
    """Expert choice leaves some tokens in no pair at all (there is no kept mask to say so):
    such a token has no top-1 expert and is in no row of the expert x label table, and
    pair co-activation still divides by every token of the batch."""
    # E = 3, N = 5, each expert takes its C = 2 best tokens by probability:
    #   probs t0 (.7, .2, .1), t1 (.5, .4, .1), t2 (.1, .46, .44), t3 (.1, .2, .7), t4 (.3, .3, .4)
    #   expert 0 takes t0 (.7), t1 (.5); expert 1 takes t2 (.46), t1 (.4); expert 2 takes t3 (.7), t2 (.44)
    #   t4 is below every expert's second best: in no pair
    token_idx = torch.tensor([0, 1, 2, 1, 3, 2])
    expert_idx = torch.tensor([0, 0, 1, 1, 2, 2])
    weight = torch.tensor([0.7, 0.5, 0.46, 0.4, 0.7, 0.44])
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.4, 0.1], [0.1, 0.46, 0.44], [0.1, 0.2, 0.7], [0.3, 0.3, 0.4]])
    # gate rows (1, 0), (1, .1), (0, 1): cos(0, 1) = .995, cos(1, 2) = .0995, cos(0, 2) = 0
    # -> partners j*(0) = 1, j*(1) = 0, j*(2) = 1
    gate = PAIRED_GATE[:3]
    routing = Routing(token_idx, expert_idx, weight, probs.log(), gate_weight=gate)
    # top-1: t0 -> 0, t1 -> 0 (.5 over .4), t2 -> 1 (.46 over .44), t3 -> 2, t4 -> none
    assert routing.top_expert(5).tolist() == [0, 0, 1, 2, -1]
    # co-activation over all N = 5 tokens: expert 0 with 1 in t1, expert 1 with 0 in t1,
    # expert 2 with 1 in t2 -> (1/5 + 1/5 + 1/5) / 3 = 1/5
    assert kept_pair_coactivation(routing, gatepro_partners(gate), 5).item() == pytest.approx(0.2)
    # labels of t0..t4: 0, 0, 1, 1, 0. Table over the four tokens with an expert:
    #   expert 0: t0, t1 -> [2, 0];  expert 1: t2 -> [0, 1];  expert 2: t3 -> [0, 1]
    # (t4, label 0, under expert 0 would make [3, 0], under expert 2 [1, 1])
    # NMI: joint = table / 4, p_expert = (.5, .25, .25), p_label = (.5, .5)
    #   I = .5 ln 2 + 2 * .25 ln 2 = ln 2;  H(expert) = 1.5 ln 2, H(label) = ln 2 -> 2 ln 2 / 2.5 ln 2 = .8
    stats = RoutingStats(label_names=['a', 'b'])
    stats.add({0: routing}, labels=torch.tensor([0, 0, 1, 1, 0]))
    row = stats.summary(tables=True)[0]
    assert row['pair_coactivation'] == pytest.approx(0.2)
    assert row['expert_label_counts'] == [[2, 0], [0, 1], [0, 1]]
    assert row['specialization'] == pytest.approx(0.8, abs=1e-6)


def variable_k_routing():
    """Four tokens with 3 slots each (a router with max_k = 3 over E = 4), pairs choice-major:
    t0 uses 2 slots, t1 none, t2 one, t3 all three, one of which capacity dropped."""
    token_idx = torch.arange(4).repeat(3)
    expert_idx = torch.tensor([0, 1, 2, 3,  # first slots
                               1, 2, 3, 0,  # second slots
                               2, 3, 0, 1])  # third slots
    used = torch.tensor([1, 0, 1, 1,  1, 0, 0, 1,  0, 0, 0, 1], dtype=torch.bool)
    kept = used & ~torch.tensor([0, 0, 0, 0,  0, 0, 0, 1,  0, 0, 0, 0], dtype=torch.bool)  # t3's second pair dropped
    weight = torch.where(kept, 0.5, 0.0)
    return Routing(token_idx, expert_idx, weight, torch.zeros(4, 4), kept=kept, used=used,
                   cap_bound=torch.tensor([False, False, False, True]))


def test_experts_per_token_by_hand():
    routing = variable_k_routing()
    # experts that ran (kept pairs) per token: t0 2, t1 0, t2 1, t3 2 (3 used, 1 dropped)
    assert routing.experts_per_token(4).tolist() == [2, 0, 1, 2]
    stats = RoutingStats(label_names=['a', 'b', 'c'])
    stats.add({0: routing}, labels=torch.tensor([0, 1, 0, 1]))
    row = stats.summary(tables=True)[0]
    # mean (2 + 0 + 1 + 2) / 4 = 1.25; mean of squares (4 + 0 + 1 + 4) / 4 = 2.25;
    # population std sqrt(2.25 - 1.5625) = sqrt(.6875) = .829156
    assert row['experts_per_token'] == pytest.approx(1.25)
    assert row['experts_per_token_std'] == pytest.approx(math.sqrt(0.6875))
    # tokens with 0, 1, 2, 3, 4 experts: t1 | t2 | t0, t3 | - | -
    assert row['experts_per_token_histogram'] == [1, 1, 2, 0, 0]
    # by label: a = t0, t2 -> (2 + 1) / 2 = 1.5; b = t1, t3 -> (0 + 2) / 2 = 1.0; c has no token
    assert row['experts_per_token_by_label'] == [1.5, 1.0, None]
    assert row['cap_bound_frac'] == pytest.approx(0.25)  # t3 wanted more than the cap
    # 6 assignments asked for (the empty slots are none), 5 kept: 1/6 dropped, not 7/12
    assert row['dropped_frac'] == pytest.approx(1 / 6)
    # the load counts the 5 kept pairs only: experts 0 (t0), 1 (t0's second), 2 (t2), 3 (t3), 1 (t3's third)
    assert row['load'] == pytest.approx([0.2, 0.4, 0.2, 0.2])
    # a train line (no tables): the mean, the std and the cap, no histogram
    train_row = stats.summary()[0]
    assert 'experts_per_token_histogram' not in train_row and train_row['experts_per_token_std'] > 0


def test_experts_per_token_accumulate_over_passes():
    # two top-1 passes: every token has exactly one expert -> mean 1, std 0; no cap, no cap_bound_frac
    stats = RoutingStats()
    stats.add({0: one_hot_routing([0, 1, 2])})
    stats.add({0: one_hot_routing([3, 3, 0])})
    row = stats.summary(tables=True)[0]
    assert (row['experts_per_token'], row['experts_per_token_std']) == (1.0, 0.0)
    assert row['experts_per_token_histogram'] == [0, 6, 0, 0, 0] and 'cap_bound_frac' not in row
    # a third pass where token 0 gets all E = 4 experts (expert choice can) and token 1 one:
    # 8 tokens with 1, 1, 1, 1, 1, 1, 4, 1 experts -> histogram [0, 7, 0, 0, 1], mean 11/8 = 1.375,
    # mean of squares 23/8 = 2.875, std sqrt(2.875 - 1.890625) = sqrt(.984375)
    token_idx, expert_idx = torch.tensor([0, 0, 0, 0, 1]), torch.tensor([0, 1, 2, 3, 0])
    stats.add({0: Routing(token_idx, expert_idx, torch.ones(5), torch.zeros(2, 4))})
    row = stats.summary(tables=True)[0]
    assert row['experts_per_token_histogram'] == [0, 7, 0, 0, 1]
    assert row['experts_per_token'] == pytest.approx(1.375)
    assert row['experts_per_token_std'] == pytest.approx(math.sqrt(0.984375))
