"""Tests of metrics.py: every routing metric on small cases worked out by hand."""

import math

import pytest
import torch

from metrics import (RoutingStats, character_class, expert_overlap, gate_angle, gate_spectral_entropy, load_metrics,
                     normalized_mutual_information, router_entropy, routing_variance)
from routers import Routing, gate_similarity


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
