"""Tests of metrics.py: every routing metric on small cases worked out by hand."""

import math

import pytest
import torch

from metrics import load_metrics, router_entropy, routing_variance


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
