"""Tests of routers.py. Formula tests use values computed by hand (in the comments), not
the code under test. Every router gets the contract test; each formula its own case."""

import math

import pytest
import torch

from model import GPTConfig
from routers import ROUTERS, Routing, build_router, capacity_keep_mask, expert_capacity, switch_aux_loss, z_loss


def router_config(**overrides):
    args = dict(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=8, n_exp=4, top_k=2)
    args.update(overrides)
    return GPTConfig(**args)


# -----------------------------------------------------------------------------
# pure functions, by hand


def test_switch_aux_loss_by_hand():
    probs = torch.tensor([[0.8, 0.2], [0.4, 0.6]])
    # both tokens picked expert 0: f = [1, 0], P = mean probs = [0.6, 0.4] -> 2 * (1*0.6 + 0*0.4)
    assert switch_aux_loss(probs, torch.tensor([0, 0]), 2).item() == pytest.approx(1.2)
    # one each: f = [0.5, 0.5] -> 2 * (0.5*0.6 + 0.5*0.4) = 1.0 (the balanced value)
    assert switch_aux_loss(probs, torch.tensor([0, 1]), 2).item() == pytest.approx(1.0)
    # f counts assignments, so top-2 pairs count twice per token: E=3, pairs -> experts 0,1,0,2
    # f = [2/4, 1/4, 1/4], P = [1/3]*3 -> 3 * (1/3) * (2/4 + 1/4 + 1/4) = 1
    probs3 = torch.full((2, 3), 1 / 3)
    assert switch_aux_loss(probs3, torch.tensor([0, 1, 0, 2]), 3).item() == pytest.approx(1.0)


def test_z_loss_by_hand():
    # logsumexp([0, 0]) = ln 2; logsumexp([ln 3, 0]) = ln 4 = 2 ln 2
    # mean of squares = (ln2^2 + 4 ln2^2) / 2 = 2.5 ln2^2
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert z_loss(logits).item() == pytest.approx(2.5 * math.log(2) ** 2)


def test_capacity_keep_mask_by_hand():
    # capacity 2: the third pair of expert 0 is dropped, expert 1's only pair kept
    keep = capacity_keep_mask(torch.tensor([0, 0, 1, 0]), n_exp=2, capacity=2)
    assert keep.tolist() == [True, True, True, False]
    # Switch eq. (3) with k assignments per token: 1.25 * 16 tokens * 2 / 4 experts = 10
    assert expert_capacity(16, 4, 2, 1.25) == 10


# -----------------------------------------------------------------------------
# topk


def set_gate(router, weight):
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor(weight, dtype=torch.float32))


def test_topk_by_hand():
    router = build_router(router_config(n_embd=3, n_head=1, n_exp=3, top_k=2, renormalize=True)).eval()
    set_gate(router, [[1, 0, 0], [0, 1, 0], [0, 0, 1]])  # logits = h
    r = router(torch.tensor([[1.0, 2.0, 3.0]]))
    # softmax([1,2,3]) = [0.0900, 0.2447, 0.6652]; top-2 = experts 2, 1;
    # renormalised: 0.6652/0.9100 = 0.7311 = sigmoid(1), and 0.2689
    assert r.expert_idx.tolist() == [2, 1]
    assert r.token_idx.tolist() == [0, 0]
    torch.testing.assert_close(r.weight, torch.tensor([0.7311, 0.2689]), atol=1e-4, rtol=0)

    router.renormalize = False  # OLMoE: the raw softmax values
    r = router(torch.tensor([[1.0, 2.0, 3.0]]))
    torch.testing.assert_close(r.weight, torch.tensor([0.6652, 0.2447]), atol=1e-4, rtol=0)


def test_topk_lists_first_choices_before_second_choices():
    router = build_router(router_config(n_embd=3, n_head=1, n_exp=3, top_k=2))
    set_gate(router, [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    r = router(torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0]]))
    # first choices of tokens 0, 1, then their second choices: capacity drops these first
    assert r.token_idx.tolist() == [0, 1, 0, 1]
    assert r.expert_idx.tolist() == [0, 1, 1, 2]


@pytest.mark.parametrize('loss_name, coefs', [('aux', dict(aux_loss_coef=1.0, z_loss_coef=0.0)),
                                              ('z', dict(aux_loss_coef=0.0, z_loss_coef=1.0))])
def test_router_loss_gradient_reaches_gate(loss_name, coefs):
    torch.manual_seed(0)
    router = build_router(router_config(**coefs))
    r = router(torch.randn(32, 8))
    assert set(r.losses) == {loss_name}
    r.losses[loss_name].backward()
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0


def test_aux_loss_uses_full_softmax_not_topk_weights():
    # with renormalised top-1 weights every kept weight is 1.0; the loss must still see
    # how the probability mass is spread over all experts
    router = build_router(router_config(n_embd=2, n_head=1, n_exp=2, top_k=1, aux_loss_coef=1.0, z_loss_coef=0.0))
    set_gate(router, [[1, 0], [0, 1]])
    h = torch.tensor([[2.0, 0.0], [2.0, 0.0]])  # probs = softmax([2, 0]) = [0.8808, 0.1192] for both
    r = router(h)
    # f = [1, 0], P = [0.8808, 0.1192] -> 2 * 0.8808 = 1.7616 (renormalised weights would give 2.0)
    assert r.losses['aux'].item() == pytest.approx(2 * 0.880797, abs=1e-5)


def test_unknown_router_lists_the_names():
    with pytest.raises(ValueError, match='available: .*topk'):
        router_config(router='no_such_router')


# -----------------------------------------------------------------------------
# the contract, for every router in the registry


@pytest.mark.parametrize('name', sorted(ROUTERS))
def test_router_contract(name):
    torch.manual_seed(0)
    config = router_config(router=name)
    router = build_router(config)
    N, E = 24, config.n_exp
    h = torch.randn(N, config.n_embd)
    token_ids = torch.randint(0, config.vocab_size, (N,))
    r = router.train()(h, token_ids)
    assert isinstance(r, Routing)
    P = r.n_pairs
    assert r.token_idx.shape == r.expert_idx.shape == r.weight.shape == (P,)
    assert r.logits.shape == (N, E) and r.logits.dtype == torch.float32
    assert r.token_idx.min() >= 0 and r.token_idx.max() < N
    assert r.expert_idx.min() >= 0 and r.expert_idx.max() < E
    assert (r.weight >= 0).all()
    if getattr(router, 'token_choice', True) and not getattr(router, 'variable_k', False):
        # token choice: exactly k distinct experts for every token
        assert P == N * config.top_k
        pairs = set(zip(r.token_idx.tolist(), r.expert_idx.tolist()))
        assert len(pairs) == P
        assert torch.bincount(r.token_idx, minlength=N).tolist() == [config.top_k] * N
    # gradient reaches the router's parameters through the gate weights (and losses)
    params = [p for p in router.parameters() if p.requires_grad]
    if params:
        (r.weight.sum() + sum(r.losses.values(), torch.zeros(()))).backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    # deterministic in eval
    router.eval()
    with torch.no_grad():
        a, b = router(h, token_ids), router(h, token_ids)
    assert torch.equal(a.expert_idx, b.expert_idx) and torch.equal(a.weight, b.weight)
