"""Tests of routers.py. Formula tests use values computed by hand (in the comments), not
the code under test. Every router gets the contract test; each formula its own case."""

import math
import re
from dataclasses import replace

import pytest
import torch

from checkpoint import load_start_weights
from metrics import RoutingStats, gate_cos_sim, pair_coactivation
from model import GPT, GPTConfig
from routers import (ROUTERS, RouterConfig, Routing, TopKRouter, build_router, capacity_keep_mask, dynamic_loss,
                     expert_capacity, flatten_choices, gatepro_partners, gatepro_penalize, global_balance_loss,
                     null_balance_loss, ortho_loss,
                     remoe_coefficient_step, remoe_l1_loss, selected_balance_loss, sequence_balance_loss,
                     switch_aux_loss, top_p_keep, variance_loss, z_loss)


def router_config(**overrides):
    args = dict(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=8, n_exp=4)
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


def test_balance_loss_per_sequence_by_hand():
    # E = 2, top-1, two sequences of T = 2 tokens; gate = identity on h = log(probs), so the
    # router's softmax is exactly these probabilities:
    #   sequence 0: (0.9, 0.1), (0.6, 0.4): both pick expert 0: f = E/(kT) * (2, 0) = (2, 0),
    #               P = (0.75, 0.25) -> sum f P = 1.5
    #   sequence 1: (0.2, 0.8) picks 1, (0.7, 0.3) picks 0: f = (1, 1), P = (0.45, 0.55) -> 1.0
    # per sequence: (1.5 + 1.0) / 2 = 1.25; over the batch (Switch): f = (3/4, 1/4),
    # P = (0.6, 0.4) -> 2 * (0.45 + 0.1) = 1.1
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.7, 0.3]])
    for per_sequence, expected in ((True, 1.25), (False, 1.1)):
        router = build_router(router_config(n_embd=2, n_exp=2, top_k=1, aux_loss_coef=0.5, z_loss_coef=0.0,
                                            aux_loss_per_sequence=per_sequence))
        with torch.no_grad():
            router.gate.weight.copy_(torch.eye(2))
        routing = router(probs.log(), seq_len=2)
        assert routing.losses['aux'].item() == pytest.approx(0.5 * expected, abs=1e-6), per_sequence
    with pytest.raises(ValueError, match='aux_loss_per_sequence=True: router .expert_choice. has no Switch'):
        router_config(router='expert_choice', aux_loss_per_sequence=True)
    assert 'aux_loss_coef 0.01 per sequence' in router_config(aux_loss_per_sequence=True).describe()


def test_balance_loss_per_sequence_reads_each_tokens_own_top2():
    """With top_k = 2 the router lists its pairs choice-major (every first choice, then every
    second choice); the per-sequence loss must count each token's own two experts inside its
    own sequence. Top-1 cannot tell a token-major reading from the right one: this can."""
    # E = 4, top-2, two sequences of T = 2 tokens; gate = identity on h = log(probs):
    #   seq 0: t0 (.5, .3, .1, .1) picks 0 then 1;  t1 (.2, .6, .1, .1) picks 1 then 0
    #   seq 1: t2 (.1, .1, .6, .2) picks 2 then 3;  t3 (.1, .1, .3, .5) picks 3 then 2
    # pairs, choice-major: experts (0, 1, 2, 3 | 1, 0, 3, 2)
    # per sequence, f = E/(kT) * counts = counts:
    #   seq 0: counts (2, 2, 0, 0), P = (.35, .45, .1, .1)  -> 2*.35 + 2*.45 = 1.6
    #   seq 1: counts (0, 0, 2, 2), P = (.1, .1, .45, .35)  -> 2*.45 + 2*.35 = 1.6
    #   loss = (1.6 + 1.6) / 2 = 1.6
    # read token-major instead, the rows would be (0, 1), (2, 3) | (1, 0), (3, 2): every
    # sequence would look balanced, f = (1, 1, 1, 1), and the loss would be 1.0
    # over the batch (Switch): f = 2/8 each, P = (.225, .275, .275, .225) -> 4 * .25 * 1 = 1.0
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.2, 0.6, 0.1, 0.1],
                          [0.1, 0.1, 0.6, 0.2], [0.1, 0.1, 0.3, 0.5]])
    for per_sequence, expected in ((True, 1.6), (False, 1.0)):
        router = build_router(router_config(n_embd=4, n_exp=4, top_k=2, aux_loss_coef=0.5, z_loss_coef=0.0,
                                            aux_loss_per_sequence=per_sequence))
        set_gate(router, torch.eye(4).tolist())
        routing = router(probs.log(), seq_len=2)
        assert routing.expert_idx.tolist() == [0, 1, 2, 3, 1, 0, 3, 2]  # choice-major, as worked out above
        assert routing.losses['aux'].item() == pytest.approx(0.5 * expected, abs=1e-6), per_sequence

# -----------------------------------------------------------------------------
# the global-batch balance loss (balance_scope='global')


def test_global_balance_loss_by_hand():
    probs = torch.tensor([[0.8, 0.2], [0.4, 0.6]])  # P = (0.6, 0.4)
    # counts (1, 3) from more tokens than probs holds: f = (.25, .75) -> 2 * (.25*.6 + .75*.4) = 0.9
    assert global_balance_loss(probs, torch.tensor([1, 3])).item() == pytest.approx(0.9)
    # eta = (1, .5): 2 * (.25*.6 + .5*.75*.4) = 2 * .3 = 0.6
    assert global_balance_loss(probs, torch.tensor([1, 3]), torch.tensor([1.0, 0.5])).item() == pytest.approx(0.6)
    # the micro-batch's own counts: Switch's loss (both tokens on expert 0: 2 * .6 = 1.2)
    assert global_balance_loss(probs, torch.tensor([2, 0])).item() == pytest.approx(1.2)


def test_global_balance_loss_counts_every_micro_step_of_the_step_so_far():
    # E = 2, top-1, aux_loss_coef = 1, gate = identity on h = log(probs):
    #   micro-batch 1: (.9, .1), (.6, .4): both pick expert 0, counts (2, 0), P1 = (.75, .25)
    #   micro-batch 2: (.2, .8), (.3, .7): both pick expert 1, counts (0, 2), P2 = (.25, .75)
    # micro-step 1 counts micro-batch 1: f = (1, 0)          -> 2 * .75 = 1.5
    # micro-step 2 counts both: (2, 2), f = (.5, .5)        -> 2 * (.5*.25 + .5*.75) = 1.0
    #   (micro-batch 2 alone, f = (0, 1), would give 2 * .75 = 1.5)
    # the next step starts from zero: micro-batch 2 first   -> 1.5
    #   then micro-batch 1 with both counted, f = (.5, .5) -> 2 * (.5*.75 + .5*.25) = 1.0
    router = logit_router('topk', n_exp=2, top_k=1, aux_loss_coef=1.0, z_loss_coef=0.0, balance_scope='global')
    batch1 = torch.tensor([[0.9, 0.1], [0.6, 0.4]]).log()
    batch2 = torch.tensor([[0.2, 0.8], [0.3, 0.7]]).log()
    assert router(batch1).losses['aux'].item() == pytest.approx(1.5)
    assert router(batch2).losses['aux'].item() == pytest.approx(1.0)
    # an eval batch counts itself alone and leaves the step's counts as they are
    assert router.eval()(batch2).losses['aux'].item() == pytest.approx(1.5)
    assert router.train().global_counts.tolist() == [2, 2]
    router.start_global_batch()  # after the optimizer step
    assert router(batch2).losses['aux'].item() == pytest.approx(1.5)
    h = batch1.clone().requires_grad_()
    aux = router(h).losses['aux']
    assert aux.item() == pytest.approx(1.0)
    # the gradient flows through P alone: that of 2 * sum_i f_i P_i with f = (.5, .5) held fixed
    aux.backward()
    expected_h = batch1.clone().requires_grad_()
    (2 * (torch.tensor([0.5, 0.5]) * expected_h.softmax(dim=-1).mean(dim=0)).sum()).backward()
    torch.testing.assert_close(h.grad, expected_h.grad)


def hand_counts(name, logits, top_k, top_p):
    """Assignments per scored expert, by a loop over the tokens (not the router's code):
    the top_k largest logits; topp: the fewest most probable experts whose sum reaches p."""
    counts = [0] * logits.size(1)
    for row in logits.tolist():
        order = sorted(range(len(row)), key=lambda i: -row[i])
        if name == 'topp':
            probs = torch.tensor(row).softmax(dim=0).tolist()
            mass, order_kept = 0.0, []
            for i in order:
                if mass >= top_p:
                    break
                order_kept.append(i)
                mass += probs[i]
            order = order_kept
        else:
            order = order[:top_k]
        for i in order:
            counts[i] += 1
    return torch.tensor(counts, dtype=torch.float64)


@pytest.mark.parametrize('name, settings', [
    ('topk', {}),
    ('switch', {'switch_jitter': 0.0, 'capacity_factor': 1.0}),  # f counts what was asked for, drops included
    ('topp', {'top_p': 0.5}),
    ('topk', {'n_null_exp': 2}),
], ids=['topk', 'switch_capacity', 'topp', 'null_experts'])
def test_global_balance_loss_of_each_router_that_has_it(name, settings):
    """Two micro-batches of 16 tokens: micro-step 2's f counts both, by hand from each
    micro-batch's logits; P is micro-step 2's alone. Null experts: f and P over all E + M,
    a null expert's term weighed by tau."""
    torch.manual_seed(3)
    router = build_router(router_config(router=name, n_embd=8, aux_loss_coef=0.5, balance_scope='global', **settings))
    top_k, n_scored = router.top_k, router.gate.weight.size(0)
    eta = torch.tensor([1.0] * 4 + [0.75] * (n_scored - 4), dtype=torch.float64)
    h1, h2 = torch.randn(16, 8), torch.randn(16, 8)
    logits1, logits2 = (h.double() @ router.gate.weight.detach().double().t() for h in (h1, h2))
    counts = hand_counts(name, logits1, top_k, 0.5)
    for h, logits in ((h1, logits1), (h2, logits2)):
        aux = router(h).losses['aux']
        P = logits.softmax(dim=-1).mean(dim=0)
        expected = 0.5 * n_scored * (eta * counts / counts.sum() * P).sum()
        assert aux.item() == pytest.approx(expected.item(), rel=1e-5)
        counts = counts + hand_counts(name, logits2, top_k, 0.5)


def test_a_models_step_finished_starts_the_next_global_batch():
    """In a GPT, micro-step 1 of a step is the batch-scope loss of its micro-batch, micro-step
    2 is not, and after model.step_finished the next step starts from zero again."""
    def model_of(scope):
        torch.manual_seed(0)
        return GPT(router_config(n_layer=2, n_embd=16, top_k=2, balance_scope=scope))

    scoped, batch = model_of('global'), model_of('batch')
    X1, X2 = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))
    aux = lambda model, X: model(X, X)[2]['aux'].item()
    assert aux(scoped, X1) == aux(batch, X1)
    assert aux(scoped, X2) != pytest.approx(aux(batch, X2), rel=1e-4)
    scoped.step_finished(0, {layer: torch.zeros(4, dtype=torch.long) for layer, _ in scoped.moe_layers()})
    assert aux(scoped, X2) == aux(batch, X2)
    assert 'global_counts' not in str(scoped.state_dict().keys())  # never in a checkpoint


def test_balance_scope_settings():
    assert router_config(balance_scope='global').balance_scope == 'global'
    assert 'aux_loss_coef 0.01 over the global batch' in router_config(balance_scope='global').describe()
    # the older name: read as 'sequence', and the two fields agree whichever was given
    old, new = router_config(aux_loss_per_sequence=True), router_config(balance_scope='sequence')
    assert (old.balance_scope, old.aux_loss_per_sequence) == (new.balance_scope, new.aux_loss_per_sequence) == \
        ('sequence', True)
    assert 'aux_loss_coef 0.01 per sequence' in new.describe()
    assert router_config(router='topp', n_null_exp=0, balance_scope='global').balance_scope == 'global'
    assert router_config(n_null_exp=2, balance_scope='global').balance_scope == 'global'
    # a run from trained weights that gives one of the two replaces the source's other
    assert RouterConfig.replaced_by({'balance_scope'}) == {'aux_loss_per_sequence'}
    assert RouterConfig.replaced_by({'aux_loss_per_sequence'}) == {'balance_scope'}


@pytest.mark.parametrize('bad, message', [
    (dict(balance_scope='micro'), "balance_scope='micro' must be one of 'batch', 'sequence', 'global'"),
    (dict(balance_scope='global', aux_loss_per_sequence=True), "contradict each other; drop --aux_loss_per_seq"),
    (dict(router='expert_choice', balance_scope='global'),
     "balance_scope='global': router 'expert_choice' has no Switch balance loss to take over the global batch; "
     "use one of topk, gatepro, ortho_var, switch, noisy_topk, topp"),
    (dict(router='aux_free', balance_scope='global'), "router 'aux_free' has no Switch balance loss"),
    (dict(router='remoe', balance_scope='global'), "router 'remoe' has no Switch balance loss"),
    (dict(router='hash', balance_scope='sequence'), "router 'hash' has no Switch balance loss to take per sequence"),
    (dict(router='topp', balance_scope='sequence'), "router 'topp' has no Switch balance loss to take per sequence"),
    (dict(n_null_exp=2, balance_scope='sequence'), 'the per-sequence loss has no weight for null experts'),
])
def test_balance_scopes_that_cannot_work_are_errors(bad, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        router_config(**bad)


def test_z_loss_by_hand():
    # logsumexp([0, 0]) = ln 2; logsumexp([ln 3, 0]) = ln 4 = 2 ln 2
    # mean of squares = (ln2^2 + 4 ln2^2) / 2 = 2.5 ln2^2
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert z_loss(logits).item() == pytest.approx(2.5 * math.log(2) ** 2)


def test_flatten_choices_by_hand():
    # token 0 chose experts 2 then 0, token 1 chose 1 then 3: all first choices, then all second
    token_idx, expert_idx, weight = flatten_choices(torch.tensor([[2, 0], [1, 3]]), torch.tensor([[.7, .3], [.6, .4]]))
    assert token_idx.tolist() == [0, 1, 0, 1]
    assert expert_idx.tolist() == [2, 1, 0, 3]
    assert weight.tolist() == pytest.approx([.7, .6, .3, .4])


def test_capacity_keep_mask_by_hand():
    # capacity 2: the third pair of expert 0 is dropped, expert 1's only pair kept
    keep = capacity_keep_mask(torch.tensor([0, 0, 1, 0]), n_exp=2, capacity=2)
    assert keep.tolist() == [True, True, True, False]
    # experts 2, 0, 2, 2, 0, 1, 2: expert 2's pairs are 0, 2, 3, 6, expert 0's 1, 4, expert 1's 5
    experts = torch.tensor([2, 0, 2, 2, 0, 1, 2])
    # capacity 2: expert 2 keeps pairs 0 and 2, drops 3 and 6; the others keep all theirs
    assert capacity_keep_mask(experts, n_exp=3, capacity=2).tolist() == [True, True, True, False, True, True, False]
    # capacity 1: each expert keeps its first pair only (0, 1 and 5)
    assert capacity_keep_mask(experts, n_exp=3, capacity=1).tolist() == [True, True, False, False, False, True, False]


def test_expert_capacity_by_hand():
    # Switch eq. (3) with k assignments per token: 1.25 * 16 tokens * 2 / 4 experts = 10
    assert expert_capacity(16, 4, 2, 1.25) == 10
    # the capacity is a whole number of slots, rounded down: 1.25 * 10 / 4 = 3.125 -> 3, 1.25 * 12 / 8 = 1.875 -> 1
    assert expert_capacity(10, 4, 1, 1.25) == 3
    assert expert_capacity(12, 8, 1, 1.25) == 1
    # and at least one: 1.0 * 2 / 8 = 0.25 -> 1
    assert expert_capacity(2, 8, 1, 1.0) == 1


def test_variance_loss_by_hand():
    # softmax([0, ln 3]) = [1/4, 3/4]: mean 1/2, population variance ((1/4)^2 + (1/4)^2) / 2 = 1/16
    # softmax([0, 0]) = [1/2, 1/2]: variance 0.   L_v = -(1/16 + 0) / 2 = -1/32
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    assert variance_loss(logits).item() == pytest.approx(-1 / 32)


def test_ortho_loss_by_hand():
    # token 0: e1 = (1, 0), e2 = (1, 1); <e1, e2> = 1, |e1|^2 = 1, |e2|^2 = 2
    #   project e1 on e2: (1/2) e2, squared length 1/4 * 2 = 1/2
    #   project e2 on e1: (1/1) e1, squared length 1           -> 3/2
    # token 1: (1, 0), (0, 1) orthogonal -> 0.      L_o = (3/2 + 0) / 2 = 3/4
    out = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]])
    assert ortho_loss(out, eps=0.0).item() == pytest.approx(0.75)
    # eps sits in the denominator: with eps = 1, token 0 gives (1/3)^2 * 2 + (1/2)^2 * 1 = 2/9 + 1/4
    assert ortho_loss(out, eps=1.0).item() == pytest.approx((2 / 9 + 1 / 4) / 2)


def test_ortho_loss_pairs_outputs_of_the_same_token():
    # orthogonal within each token, parallel ACROSS tokens: the loss must be exactly 0
    # (pairing outputs of different tokens, as a wrong reshape does, would give > 0)
    out = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [0.0, 3.0]]])
    assert ortho_loss(out).item() == 0.0


def test_sequence_balance_loss_by_hand():
    # DeepSeek-V3 eqs. 17-20, E = 2, k = 1, T = 2, two sequences
    # sequence 0: scores (0.3, 0.2), (0.4, 0.1) -> normalised (0.6, 0.4), (0.8, 0.2); both pick expert 0
    #   f = E/(kT) * counts = 1 * (2, 0);  P = (0.7, 0.3);  sum f P = 1.4
    # sequence 1: normalised (0.9, 0.1) picks 0, (0.3, 0.7) picks 1: f = (1, 1), P = (0.6, 0.4) -> 1.0
    scores = torch.tensor([[0.3, 0.2], [0.4, 0.1], [0.9, 0.1], [0.3, 0.7]])
    topk_idx = torch.tensor([[0], [0], [0], [1]])
    assert sequence_balance_loss(scores, topk_idx, seq_len=2).item() == pytest.approx((1.4 + 1.0) / 2)
    # E = 3, k = 2, T = 2, one sequence: f = E/(kT) * counts = 3/4 * (2, 1, 1) = (1.5, .75, .75)
    # scores (1.2, .6, .2) and (.1, .1, .3) normalise to (.6, .3, .1) and (.2, .2, .6): P = (.4, .25, .35)
    # sum f P = .6 + .1875 + .2625 = 1.05
    scores = torch.tensor([[1.2, 0.6, 0.2], [0.1, 0.1, 0.3]])
    assert sequence_balance_loss(scores, torch.tensor([[0, 1], [2, 0]]), seq_len=2).item() == pytest.approx(1.05)


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


# -----------------------------------------------------------------------------
# gatepro

# E = 4 gate rows: 0 and 1 nearly parallel, 2 and 3 nearly parallel, the two pairs orthogonal.
# cos(0, 1) = 1/sqrt(1.01) = 0.995, cos(2, 3) = 0.995, cos(0, 2) = 0, cos(1, 2) = 0.1/sqrt(1.01) = 0.0995
# -> partners j*(0) = 1, j*(1) = 0, j*(2) = 3, j*(3) = 2
PAIRED_GATE = [[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]]


def test_gatepro_partners_by_hand():
    assert gatepro_partners(torch.tensor(PAIRED_GATE)).tolist() == [1, 0, 3, 2]
    # directed: a = (1, 0), b = (1, .5), c = (.2, 1); cos(a, b) = 1/sqrt(1.25) = .894,
    # cos(a, c) = .2/sqrt(1.04) = .196, cos(b, c) = .7/(sqrt(1.25) sqrt(1.04)) = .614
    # -> j*(a) = b, j*(b) = a, j*(c) = b (and j*(j*(c)) = a, not c)
    assert gatepro_partners(torch.tensor([[1.0, 0.0], [1.0, 0.5], [0.2, 1.0]])).tolist() == [1, 0, 1]
    # cosines, not dot products or |cos|: a = (1, 0), b = (10, 10), c = (1, .1), d = (-1, -.05)
    # cos(a, b) = .7071, cos(a, c) = .9950, cos(a, d) = -.9988, cos(b, c) = .7740, cos(b, d) = -.7415,
    # cos(c, d) = -.9988 -> j*(a) = c (the dot product would say b, |cos| d), j*(b) = c, j*(c) = a, j*(d) = b
    gate = torch.tensor([[1.0, 0.0], [10.0, 10.0], [1.0, 0.1], [-1.0, -0.05]])
    assert gatepro_partners(gate).tolist() == [2, 2, 0, 1]


def test_gatepro_penalize_by_hand():
    gate = torch.tensor(PAIRED_GATE)  # partners 0<->1, 2<->3
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0],    # 0 loses to 1 (1 < 2), 3 loses to 2 (0 < 3)
                           [2.0, 2.0, 0.0, 1.0]])   # tie 0-1: neither is strictly smaller, both win; 2 loses
    expected = torch.tensor([[1.0 - 10, 2.0, 3.0, 0.0 - 10],
                             [2.0, 2.0, 0.0 - 10, 1.0]])
    torch.testing.assert_close(gatepro_penalize(logits, gate, penalty=10.0), expected)


def brute_force_partners(gate):
    """j*(i) by the definition, one pair at a time: the j != i of the largest cosine."""
    rows = gate.tolist()
    partners = []
    for i, a in enumerate(rows):
        best, best_j = -2.0, None
        for j, b in enumerate(rows):
            if j == i:
                continue
            cos = sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
            if cos > best:
                best, best_j = cos, j
        partners.append(best_j)
    return partners


def test_gatepro_partner_matches_brute_force_cosine():
    torch.manual_seed(0)
    gate = torch.randn(7, 5)
    assert gatepro_partners(gate).tolist() == brute_force_partners(gate)


def fewer_winners_gate():
    """A gate W [6, 7] with h = (100, 0, ..., 0) giving logits (5, 4.5, 0, .1, .2, .3), in
    which every expert i > 0 has expert 0 as its partner: column 0 carries logit/100 (too
    small to matter for the cosines), column 1 a shared 10, and each row i > 0 a private 3
    in column i + 1. cos(0, i) = 100 / (10 sqrt(109)) = .958 > cos(i, j) = 100 / 109 = .917."""
    logits = [5.0, 4.5, 0.0, 0.1, 0.2, 0.3]
    gate = torch.zeros(6, 7)
    gate[:, 0] = torch.tensor(logits) / 100
    gate[:, 1] = 10.0
    for i in range(1, 6):
        gate[i, i + 1] = 3.0
    h = torch.zeros(1, 7)
    h[0, 0] = 100.0
    return gate, h


@pytest.mark.parametrize('penalty, weights', [
    (1e4, [1.0, 0.0]),            # the loser that fills the slot weighs ~0: e^(4.5 - 1e4 - 5)
    (1e-4, [0.62248, 0.37752]),   # softmax(5, 4.4999) = 1 / (1 + e^-0.5001) = .62248
])
def test_gatepro_fills_a_slot_with_the_loser_of_largest_logit(penalty, weights):
    # Algorithm 1: experts 1-5 all lose to expert 0 (their logits are smaller); expert 0
    # wins against its own partner. One winner for k = 2: the second slot goes to the
    # loser with the largest penalised logit, expert 1 (4.5 - lambda), not to whichever
    # loser has the smallest index among the probabilities that underflowed to 0.
    gate, h = fewer_winners_gate()
    assert gatepro_partners(gate)[1:].tolist() == [0] * 5  # the set-up above
    router = build_router(router_config(router='gatepro', n_embd=7, n_head=1, n_exp=6, top_k=2,
                                        gatepro_penalty=penalty, aux_loss_coef=0.0, z_loss_coef=0.0)).eval()
    set_gate(router, gate.tolist())
    r = router(h)
    assert r.expert_idx.tolist() == [0, 1]
    torch.testing.assert_close(r.weight, torch.tensor(weights), atol=1e-4, rtol=0)


@pytest.mark.parametrize('n_exp', [8, 16])
@pytest.mark.parametrize('top_k', [2, 4, 6])
def test_gatepro_chooses_the_topk_of_the_penalised_logits(n_exp, top_k):
    # Algorithm 1 token by token: i loses when l_i < l_j*(i) (strictly), a loser's logit drops
    # by lambda = 1e4, and the token takes the k largest of the results; also when fewer
    # than k experts win (frequent at k = 4, 6)
    torch.manual_seed(n_exp + top_k)
    router = build_router(router_config(router='gatepro', n_exp=n_exp, top_k=top_k, aux_loss_coef=0.0,
                                        z_loss_coef=0.0)).eval()  # the choice alone: no loss functions
    h = torch.randn(400, 8)
    r = router(h)
    partner = brute_force_partners(router.gate.weight.detach())
    chosen = r.expert_idx.view(top_k, -1).t().tolist()  # choice-major pairs -> [N, k]
    for token, logits in enumerate((h @ router.gate.weight.detach().t()).tolist()):
        penalised = [l - 1e4 if l < logits[partner[i]] else l for i, l in enumerate(logits)]
        expected = sorted(range(n_exp), key=lambda i: -penalised[i])[:top_k]
        assert sorted(chosen[token]) == sorted(expected), token


def test_gatepro_literal_small_penalty_only_breaks_near_ties():
    # hand case, PAIRED_GATE, k = 2: l = (3, 2.00005, 2.0, 0). Plain top-2 = {0, 1}. Expert 1
    # loses to its partner 0 (2.00005 < 3) and drops by 1e-4 to 1.99995 < 2.0, while expert 2
    # wins against 3 (2.0 > 0): GatePro picks {0, 2}. The two logits were 5e-5 apart.
    gate = torch.tensor(PAIRED_GATE)
    logits = torch.tensor([[3.0, 2.00005, 2.0, 0.0]])
    assert set(torch.topk(gatepro_penalize(logits, gate, 1e-4), 2).indices[0].tolist()) == {0, 2}
    # random logits: a token's top-2 changes only when its 2nd and 3rd logits are within 1e-4
    torch.manual_seed(2)
    gate = torch.randn(8, 6)
    logits = torch.randn(2000, 8)
    # plant near-ties at the top-2 boundary in half the tokens: 3rd = 2nd - (0 to 5e-5)
    top = torch.topk(logits[:1000], 3)
    near = top.values[:, 1] - 5e-5 * torch.rand(1000)
    logits[:1000].scatter_(1, top.indices[:, 2:], near[:, None])
    plain = torch.topk(logits, 2).indices.sort().values
    penalised = torch.topk(gatepro_penalize(logits, gate, 1e-4), 2).indices.sort().values
    differs = (plain != penalised).any(dim=-1)
    top3 = torch.topk(logits, 3).values
    assert differs.any()
    assert (top3[differs, 1] - top3[differs, 2] < 1e-4).all()


def test_gatepro_equals_topk_exactly_outside_the_window():
    torch.manual_seed(3)
    config = router_config(router='gatepro', n_exp=8, gatepro_start_iter=5, gatepro_end_iter=10)
    gatepro = build_router(config)
    topk = build_router(router_config(n_exp=8))
    topk.gate.load_state_dict(gatepro.gate.state_dict())
    h = torch.randn(64, 8)
    reference = topk(h)
    for iter_num, competing in [(0, False), (4, False), (5, True), (9, True), (10, False), (100, False)]:
        gatepro.iter_num.fill_(iter_num)  # the count is a tensor buffer
        r = gatepro(h)
        same = torch.equal(r.expert_idx, reference.expert_idx) and torch.equal(r.weight, reference.weight)
        assert same != competing, iter_num
        if not competing:
            assert r.losses.keys() == reference.losses.keys()
            assert all(torch.equal(r.losses[name], reference.losses[name]) for name in r.losses)


def test_gatepro_counts_its_steps_and_keeps_the_count_in_its_state():
    config = router_config(router='gatepro', n_exp=8, gatepro_start_iter=3)
    router = build_router(config)
    assert router.iter_num == 0 and not router.competing()
    for iter_num in range(3):  # what the training loop does after each optimizer step
        router.step_finished(iter_num, torch.zeros(8))
    assert router.iter_num == 3 and router.competing()
    resumed = build_router(config)
    resumed.load_state_dict(router.state_dict())  # as a checkpoint brings it back
    assert resumed.iter_num == 3 and resumed.competing()


def test_gatepro_balance_loss_uses_unpenalised_probs_and_actual_assignments():
    # PAIRED_GATE (partners 0<->1, 2<->3), k = 2, lambda = 1e4.
    # token A, h = (1, 0):  l = (1, 1, 0, .1); 0-1 tie (both win), 2 loses to 3 -> picks {0, 1}
    # token B, h = (1, .5): l = (1, 1.05, .5, .6); 0 and 2 lose -> picks {1, 3}
    #   (plain top-2 would pick {1, 0})
    # f = counts / 4 = (1, 2, 0, 1) / 4
    # P = mean of the UNpenalised softmaxes: A (.36043, .36043, .13260, .14654),
    #     B (.30047, .31588, .18224, .20141) -> P = (.33045, .33815, .15742, .17398)
    # L = 4 * (.25 * .33045 + .5 * .33815 + 0 + .25 * .17398) = 1.18073
    router = build_router(router_config(router='gatepro', n_embd=2, n_head=1, n_exp=4, top_k=2,
                                        aux_loss_coef=1.0, z_loss_coef=0.0)).eval()
    set_gate(router, PAIRED_GATE)
    r = router(torch.tensor([[1.0, 0.0], [1.0, 0.5]]))
    assert sorted(zip(r.token_idx.tolist(), r.expert_idx.tolist())) == [(0, 0), (0, 1), (1, 1), (1, 3)]
    assert r.losses['aux'].item() == pytest.approx(1.18073, abs=1e-5)


def four_experts_in_two_pairs(**overrides):
    """Gate rows w0 = e0, w1 = e0 + 0.1 e1, w2 = e2, w3 = e2 + 0.1 e3: cos(w0, w1) = cos(w2, w3)
    = 1/sqrt(1.01) = 0.995 and every other pair is orthogonal, so j*(0) = 1, j*(1) = 0,
    j*(2) = 3, j*(3) = 2. h is chosen so that the logits are l = [3, 0.001, 0, -1]."""
    router = build_router(router_config(**{**dict(n_embd=4, n_exp=4, top_k=2, router='gatepro'), **overrides}))
    set_gate(router, [[1, 0, 0, 0], [1, 0.1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0.1]])
    # l0 = h0 = 3; l1 = h0 + 0.1 h1 = 0.001 -> h1 = -29.99; l2 = h2 = 0; l3 = h2 + 0.1 h3 = -1 -> h3 = -10
    return router, torch.tensor([[3.0, -29.99, 0.0, -10.0]])


def test_gatepro_lambda_on_probabilities_by_hand():
    # The readings differ only where a loser falls below a lower WINNER on one scale and not on the
    # other (two losers move together). A winner below a loser needs its partner below itself, so
    # with 3 experts (a > loser > that winner) it cannot happen, nor at top-1 (the argmax always wins):
    # 4 experts, top-2.
    # losers: 1 (l1 = 0.001 < l0 = 3) and 3 (l3 = -1 < l2 = 0); 0 and 2 win.
    # softmax: exp = [20.0855, 1.0010, 1.0, 0.3679], sum 22.4544 -> p = [0.89450, 0.044580, 0.044535, 0.016383]
    # lambda = 1e-4 on logits: l1' = 0.0009 > l2 = 0, so the top-2 stays {0, 1};
    # on probabilities: p1' = 0.044480 < p2 = 0.044535 (p1 - p2 = 4.46e-5 < 1e-4), so it is {0, 2}
    # weights, renormalised: logits {0, 1}: softmax([3, 0.0009]) = 20.0855 / (20.0855 + 1.0009) = 0.95254, 0.04746;
    # probs {0, 2}: p0 / (p0 + p2) = 20.0855 / 21.0855 = 0.95257, 0.04743
    for penalty_on, experts, weights in (('logits', [0, 1], [0.95254, 0.04746]), ('probs', [0, 2], [0.95257, 0.04743])):
        router, h = four_experts_in_two_pairs(gatepro_penalty=1e-4, gatepro_penalty_on=penalty_on)
        r = router(h)
        assert r.expert_idx.tolist() == experts, penalty_on
        torch.testing.assert_close(r.weight, torch.tensor(weights), atol=1e-4, rtol=0)
    # lambda = 1e4: every loser below every winner on either scale, so both pick {0, 2} with the same weights
    for penalty_on in ('logits', 'probs'):
        router, h = four_experts_in_two_pairs(gatepro_penalty=1e4, gatepro_penalty_on=penalty_on)
        r = router(h)
        assert r.expert_idx.tolist() == [0, 2], penalty_on
        torch.testing.assert_close(r.weight, torch.tensor([0.95257, 0.04743]), atol=1e-4, rtol=0)


def test_gatepro_lambda_on_probabilities_weighs_a_chosen_loser_zero_and_keeps_the_window():
    # top-3 of the four with lambda = 1e4 on probabilities: winners 0, 2, then the loser of larger
    # probability, 1, with p1' = p1 - 1e4 < 0 -> weight 0 (raw, renormalize=False); 0 and 2 keep p0, p2
    router, h = four_experts_in_two_pairs(gatepro_penalty=1e4, gatepro_penalty_on='probs', top_k=3, renormalize=False)
    r = router(h)
    assert r.expert_idx.tolist() == [0, 2, 1]
    torch.testing.assert_close(r.weight, torch.tensor([0.89450, 0.044535, 0.0]), atol=1e-4, rtol=0)
    # before the window opens the router is plain topk: the two largest logits, 0 and 1
    router, h = four_experts_in_two_pairs(gatepro_penalty=1e4, gatepro_penalty_on='probs', gatepro_start_iter=5)
    assert router(h).expert_idx.tolist() == [0, 1]


def test_gatepro_penalty_on_takes_two_values():
    with pytest.raises(ValueError, match="gatepro_penalty_on='softmax' must be 'logits' or 'probs'"):
        router_config(router='gatepro', gatepro_penalty_on='softmax')


def test_pair_coactivation_by_hand():
    # tokens 0, 1, 2 pick {0, 1}, {0, 2}, {1, 3}; token 3 got no expert (dropped); partners 0<->1, 2<->3.
    # Expert 0 is with its partner 1 in token 0 alone: 1 of 4 tokens; expert 1 the same;
    # experts 2 and 3 are never together: 0 -> (1/4 + 1/4 + 0 + 0) / 4 = 1/8
    token_idx, expert_idx = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 0, 1, 1, 2, 3])
    assert pair_coactivation(token_idx, expert_idx, torch.tensor([1, 0, 3, 2]), n_tokens=4).item() == pytest.approx(1 / 8)
    # directed partners j* = (1, 0, 0, 2): expert 2 with 0 in token 1 -> (1/4 + 1/4 + 1/4 + 0) / 4 = 3/16
    assert pair_coactivation(token_idx, expert_idx, torch.tensor([1, 0, 0, 2]), n_tokens=4).item() == pytest.approx(3 / 16)


def test_gatepro_metrics_by_hand():
    # rows (1,0), (0,1), (1,1): |cos| = 0, 1/sqrt2, 1/sqrt2 for the pairs (0,1), (0,2), (1,2)
    assert gate_cos_sim(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])).item() == pytest.approx(2 / 3 / math.sqrt(2))
    # partners of PAIRED_GATE: 0<->1, 2<->3. Token 0 picks {0, 1}, token 1 picks {0, 2}:
    # expert 0 and its partner together in 1 of 2 tokens, expert 1 too, experts 2, 3 in none
    # -> (1/2 + 1/2 + 0 + 0) / 4 = 1/4
    partner = gatepro_partners(torch.tensor(PAIRED_GATE))
    coactivation = pair_coactivation(torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 2]), partner, n_tokens=2)
    assert coactivation.item() == pytest.approx(0.25)


# -----------------------------------------------------------------------------
# switch, noisy_topk


def test_switch_is_top1_with_the_raw_probability():
    config = router_config(router='switch', n_embd=3, n_head=1, n_exp=3)
    assert config.top_k == 1 and config.capacity_factor == 1.25 and config.eval_capacity_factor == 2.0
    router = build_router(config).eval()
    set_gate(router, [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    r = router(torch.tensor([[1.0, 2.0, 3.0]]))
    # softmax([1, 2, 3])[2] = 0.6652: the weight is p_i itself, not renormalised to 1
    assert r.expert_idx.tolist() == [2]
    torch.testing.assert_close(r.weight, torch.tensor([0.6652]), atol=1e-4, rtol=0)


def test_switch_keeps_user_capacity_factors():
    config = router_config(router='switch', capacity_factor=1.0, eval_capacity_factor=1.5)
    assert (config.capacity_factor, config.eval_capacity_factor) == (1.0, 1.5)


def test_switch_jitter_is_multiplicative_and_training_only():
    config = router_config(router='switch', n_embd=3, n_head=1, n_exp=3, switch_jitter=0.1)
    router = build_router(config)
    set_gate(router, [[1, 0, 0], [0, 1, 0], [0, 0, 1]])  # logits = jittered h
    h = torch.tensor([[1.0, 2.0, 3.0]]).repeat(50, 1)
    logits = router.train()(h).logits
    # every input component is scaled by a factor in [0.9, 1.1]
    assert (logits >= 0.9 * h - 1e-6).all() and (logits <= 1.1 * h + 1e-6).all()
    assert logits.std(dim=0).min() > 0  # the noise is there...
    assert torch.equal(router.eval()(h).logits, h)  # ...and not in eval


def test_noisy_topk_adds_softplus_scaled_gaussian_noise_in_training_only():
    config = router_config(router='noisy_topk', n_embd=3, n_head=1, n_exp=3, top_k=2)
    router = build_router(config)
    set_gate(router, [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    with torch.no_grad():
        router.noise.weight.zero_()  # softplus(0) = ln 2: H = x W_g + ln2 * z (eq. 4)
    h = torch.tensor([[1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])
    torch.manual_seed(5)
    r = router.train()(h)
    torch.manual_seed(5)
    z = torch.randn(2, 3)
    torch.testing.assert_close(r.logits, h + math.log(2) * z)
    # eval: no noise; eq. 3 softmax over the kept two of [1, 2, 3] is the renormalised top-2
    r = router.eval()(h)
    assert r.expert_idx.tolist() == [2, 0, 1, 2]
    torch.testing.assert_close(r.weight, torch.tensor([0.7311, 0.7311, 0.2689, 0.2689]), atol=1e-4, rtol=0)


def test_noisy_topk_noise_weights_get_gradient():
    torch.manual_seed(6)
    router = build_router(router_config(router='noisy_topk')).train()
    router(torch.randn(32, 8)).weight.sum().backward()
    assert router.noise.weight.grad.abs().sum() > 0


# -----------------------------------------------------------------------------
# expert_choice


def test_expert_choice_by_hand():
    config = router_config(router='expert_choice', n_embd=2, n_head=1, n_exp=2, capacity_factor=1.0)
    router = build_router(config).eval()
    set_gate(router, [[1, 0], [0, 1]])
    # softmax per token: t0 (2,0) -> (.8808, .1192), t1 (0,2) -> (.1192, .8808),
    #                    t2 (1,0) -> (.7311, .2689), t3 (0,1) -> (.2689, .7311)
    h = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 1.0]])
    # C = 4 * 1.0 / 2 = 2: expert 0 takes t0, t2 (its two best), expert 1 takes t1, t3
    r = router(h)
    assert r.expert_idx.tolist() == [0, 0, 1, 1] and r.token_idx.tolist() == [0, 2, 1, 3]
    torch.testing.assert_close(r.weight, torch.tensor([.8808, .7311, .8808, .7311]), atol=1e-4, rtol=0)
    assert 'aux' not in r.losses  # balanced by construction
    # C = 4 * 0.5 / 2 = 1: t2 and t3 get no expert at all
    router.eval_capacity_factor = 0.5
    r = router(h)
    assert r.token_idx.tolist() == [0, 1]


def test_expert_choice_is_not_causal_at_the_router():
    # continue the hand case with C = 1: expert 1 took t1 (.8808). A LATER token t3 = (0, 5)
    # has softmax (0.0067, 0.9933) and takes expert 1's only slot: t1's routing changed
    # because of a token that comes after it.
    config = router_config(router='expert_choice', n_embd=2, n_head=1, n_exp=2, capacity_factor=0.5)
    router = build_router(config).eval()
    set_gate(router, [[1, 0], [0, 1]])
    h = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 1.0]])
    assert 1 in router(h).token_idx.tolist()
    h[3] = torch.tensor([0.0, 5.0])
    assert 1 not in router(h).token_idx.tolist()


def test_expert_choice_defaults():
    config = router_config(router='expert_choice')
    assert config.capacity_factor == config.eval_capacity_factor == 2.0  # EC-CF2
    assert config.experts_per_token == 2.0 and config.top_k is None


# -----------------------------------------------------------------------------
# aux_free


def test_aux_free_by_hand():
    config = router_config(router='aux_free', n_embd=3, n_head=1, n_exp=3, top_k=2)
    router = build_router(config).eval()
    set_gate(router, [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    h = torch.tensor([[1.0, 0.5, 0.2]])
    # s = sigmoid(1, .5, .2) = (.7311, .6225, .5498); top-2 = experts 0, 1
    assert router(h).expert_idx.tolist() == [0, 1]
    # bias (0, 0, .2): s + b = (.7311, .6225, .7498) -> picks 2, then 0; the weights come from s
    # alone: .5498 / (.5498 + .7311) = .4293 and .7311 / 1.2809 = .5707
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.2]))
    r = router(h)
    assert r.expert_idx.tolist() == [2, 0]
    torch.testing.assert_close(r.weight, torch.tensor([.4293, .5707]), atol=1e-4, rtol=0)


def test_aux_free_bias_update_by_hand():
    router = build_router(router_config(router='aux_free', n_exp=3, aux_free_update_rate=0.5))
    # counts (6, 2, 4): mean 4, sign(mean - load) = (-1, +1, 0)
    router.step_finished(0, torch.tensor([6, 2, 4]))
    assert router.expert_bias.tolist() == [-0.5, 0.5, 0.0]
    # the next step adds to the bias: counts (2, 6, 4) give (+1, -1, 0) -> back to 0
    router.step_finished(1, torch.tensor([2, 6, 4]))
    assert router.expert_bias.tolist() == [0.0, 0.0, 0.0]
    assert 'expert_bias' in router.state_dict()  # checkpointed with the model
    assert not router.expert_bias.requires_grad


def test_aux_free_bias_updates_drive_max_vio_down():
    torch.manual_seed(7)
    router = build_router(router_config(router='aux_free', n_exp=8, aux_free_update_rate=0.02,
                                        aux_free_seq_loss_coef=0.0)).eval()
    with torch.no_grad():
        router.gate.weight[0] += 0.5  # skew: expert 0 scores high on inputs with a positive mean
    h = torch.randn(256, 8) + 1.0

    @torch.no_grad()
    def load():
        return torch.bincount(router(h).expert_idx, minlength=8).float()

    def max_vio(counts):  # Loss-Free Balancing's MaxVio
        return ((counts.max() - counts.mean()) / counts.mean()).item()

    first = max_vio(load())
    for _ in range(40):
        router.step_finished(0, load())
    assert first > 2.0 and max_vio(load()) < 0.25 * first


def test_aux_free_sequence_loss_counts_the_topk_without_bias():
    # DeepSeek-V3 eqs. 17-20, E = 4, k = 2, one sequence of T = 2 tokens, logits chosen so
    # that s = sigmoid(l) is t1 = (.8, .6, .4, .2), t2 = (.2, .8, .6, .4) (l = ln(s / (1 - s))).
    # f counts the top-2 of s itself: t1 {0, 1}, t2 {1, 2}; f_i = E / (k T) * count = (1, 2, 1, 0).
    # Both rows of s sum to 2: P = mean of s / 2 = ((.4 + .1)/2, (.3 + .4)/2, (.2 + .3)/2, (.1 + .2)/2)
    #   = (.25, .35, .25, .15);  L = .25 + .70 + .25 + 0 = 1.20.
    # The bias b = (0, 0, 0, 5) routes both tokens to expert 3, but must not enter f
    # (counting the biased choices {3, 0}, {3, 1} would give f = (1, 1, 0, 2), L = .90).
    router = build_router(router_config(router='aux_free', n_embd=4, n_head=1, n_exp=4, top_k=2,
                                        aux_free_seq_loss_coef=1.0)).eval()
    set_gate(router, torch.eye(4).tolist())  # logits = h
    s = torch.tensor([[.8, .6, .4, .2], [.2, .8, .6, .4]])
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))
    r = router(torch.log(s / (1 - s)), seq_len=2)
    assert sorted(zip(r.token_idx.tolist(), r.expert_idx.tolist())) == [(0, 0), (0, 3), (1, 1), (1, 3)]
    assert r.losses['seq_aux'].item() == pytest.approx(1.20, abs=1e-5)


def test_aux_free_has_no_switch_loss_and_a_sequence_loss():
    router = build_router(router_config(router='aux_free', z_loss_coef=0.0, aux_free_seq_loss_coef=1.0))
    r = router(torch.randn(12, 8), seq_len=4)
    assert set(r.losses) == {'seq_aux'}


# -----------------------------------------------------------------------------
# hash


def test_hash_routes_by_token_id_only():
    config = router_config(router='hash', n_exp=4)
    assert config.top_k == 1
    router = build_router(config)
    assert list(router.parameters()) == []
    router.expert_of_token[:4] = torch.tensor([2, 0, 3, 1])  # set the map by hand
    ids = torch.tensor([0, 1, 0, 3, 2])
    r = router(torch.randn(5, 8), ids)
    assert r.expert_idx.tolist() == [2, 0, 2, 1, 3]  # token 0 -> expert 2 wherever it appears
    assert r.weight.tolist() == [1.0] * 5
    assert r.logits[0].tolist() == [-1e4, -1e4, 0.0, -1e4]  # one-hot scores, for the metrics
    # another h, same ids: the same routing
    assert torch.equal(router(torch.randn(5, 8), ids).expert_idx, r.expert_idx)


def test_hash_map_is_fixed_by_its_seed():
    a = build_router(router_config(router='hash', hash_seed=1)).expert_of_token
    b = build_router(router_config(router='hash', hash_seed=1)).expert_of_token
    c = build_router(router_config(router='hash', hash_seed=2)).expert_of_token
    assert a.shape == (50,) and torch.equal(a, b) and not torch.equal(a, c)


# -----------------------------------------------------------------------------
# topp: the fewest experts whose probabilities reach p (Huang et al. 2024)


def test_top_p_keep_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    # sums of the candidates before each: 0, .5, .8, .95; kept where that sum is < p
    assert top_p_keep(probs, 0.7).tolist() == [[True, True, False, False]]    # .5 < .7, .8 reaches it: 2 experts
    assert top_p_keep(probs, 0.85).tolist() == [[True, True, True, False]]    # .8 < .85, .95 reaches it: 3
    assert top_p_keep(probs, 0.4).tolist() == [[True, False, False, False]]   # the first alone reaches .4
    assert top_p_keep(probs, 1.0).tolist() == [[True, True, True, True]]      # .95 < 1: all four
    # a prefix that reaches p exactly stops there (sums of powers of 2 are exact in fp32):
    # .5 + .25 = .75 reaches p = .75 with two experts; the authors' code ("> p") would take a third
    assert top_p_keep(torch.tensor([[0.5, 0.25, 0.125, 0.125]]), 0.75).tolist() == [[True, True, False, False]]


def test_dynamic_loss_by_hand():
    # uniform over 4: ln 4 = 1.386294; one-hot: 0; (.5, .25, .25, 0): .5 ln 2 + 2 * .25 ln 4 = 1.5 ln 2 = 1.039721
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, -1e4, -1e4, -1e4], [math.log(2), 0.0, 0.0, -1e4]])
    assert dynamic_loss(logits).item() == pytest.approx((math.log(4) + 0 + 1.5 * math.log(2)) / 3, abs=1e-6)


def test_selected_balance_loss_counts_only_the_assignments_made():
    probs = torch.tensor([[0.8, 0.2], [0.4, 0.6]])  # P = (.6, .4)
    # slots of experts 0, 0, 1, 1, only the first two used: f = (1, 0) -> 2 * .6 = 1.2
    # (counting every slot would give f = (.5, .5) -> 1.0)
    loss = selected_balance_loss(probs, torch.tensor([0, 0, 1, 1]), torch.tensor([True, True, False, False]))
    assert loss.item() == pytest.approx(1.2)


def logit_router(name, n_exp=4, **settings):
    """A router on h [N, n_exp] whose gate is the identity: logits = h (h = log(probs) gives
    softmax(logits) = probs)."""
    router = build_router(router_config(router=name, n_embd=n_exp, n_head=1, n_exp=n_exp, **settings))
    set_gate(router, torch.eye(router.gate.weight.size(0), n_exp).tolist())
    return router


def test_topp_router_by_hand():
    router = logit_router('topp', top_p=0.7, aux_loss_coef=0.0, dynamic_loss_coef=0.0).eval()
    # token 0: probs (.5, .3, .15, .05) -> experts 0, 1 (.5 + .3 reaches .7), raw weights .5, .3
    # token 1: probs (.05, .15, .3, .5) -> experts 3, 2, weights .5, .3
    # token 2: probs (.12, .75, .08, .05) -> expert 1 alone (.75 >= .7)
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5], [0.12, 0.75, 0.08, 0.05]])
    r = router(probs.log())
    # 3 tokens x max_k = 4 slots, choice-major: every token's most probable candidate, then the second, ...
    assert r.token_idx.tolist() == [0, 1, 2] * 4
    assert r.expert_idx[:6].tolist() == [0, 3, 1, 1, 2, 0]  # first and second candidates
    assert r.used.tolist() == [True, True, True, True, True, False] + [False] * 6
    assert r.kept.tolist() == r.used.tolist()
    torch.testing.assert_close(r.weight[:6], torch.tensor([0.5, 0.5, 0.75, 0.3, 0.3, 0.0]))
    assert (r.weight[6:] == 0).all() and r.experts_per_token(3).tolist() == [2, 2, 1]
    assert not r.cap_bound.any()  # no cap below E: it never binds
    # renormalize=True divides by the kept experts' sum: .5 / .8 = .625, .3 / .8 = .375; the lone expert 1
    router.renormalize = True
    torch.testing.assert_close(router(probs.log()).weight[:6], torch.tensor([0.625, 0.625, 1.0, 0.375, 0.375, 0.0]))
    # max_k = 2 at p = .85: token 0 needs 3 experts (.5 + .3 = .8 < .85): it keeps its 2 best, and the cap binds;
    # token 2 needs 2 (.75 + .12 = .87 reaches it) and fits
    capped = logit_router('topp', top_p=0.85, max_k=2).eval()
    r = capped(probs.log())
    assert r.n_slots == 6 and r.used.tolist() == [True, True, True, True, True, True]
    assert r.cap_bound.tolist() == [True, True, False]


def test_topp_losses_by_hand():
    router = logit_router('topp', top_p=0.4, max_k=2, aux_loss_coef=0.5, dynamic_loss_coef=0.1)
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
    r = router(probs.log())
    # balance: each token's first expert reaches .4 alone: experts 0 and 3, f = (.5, 0, 0, .5),
    # P = (.275, .225, .225, .275) -> 4 * (.5 * .275 + .5 * .275) = 1.1
    # (counting the empty slots too, experts 0, 1 | 3, 2, would give f uniform and 1.0)
    assert r.losses['aux'].item() == pytest.approx(0.5 * 1.1, abs=1e-6)
    # dynamic loss: both tokens have the entropy of (.5, .3, .15, .05)
    entropy = -sum(p * math.log(p) for p in (0.5, 0.3, 0.15, 0.05))
    assert r.losses['dynamic'].item() == pytest.approx(0.1 * entropy, abs=1e-6)
    assert set(r.losses) == {'aux', 'dynamic'}  # no z-loss by default


def test_capacity_gives_no_room_to_empty_slots():
    # E = 4, N = 2 tokens, top_k = 2, capacity factor 1: capacity = 1 * 2 * 2 / 4 = 1 pair an expert.
    # Slots of experts 0, 0, 1: the first is empty. The used pair of expert 0 must keep its room
    # (an empty slot counted as load would take it and drop the pair: [False, False, True])
    router = build_router(router_config(router='topp', capacity_factor=1.0)).train()
    routing = Routing(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]), torch.tensor([0.0, 0.6, 0.4]),
                      torch.zeros(2, 4), used=torch.tensor([False, True, True]))
    dropped = router.drop_over_capacity(routing)
    assert dropped.kept.tolist() == [False, True, True]
    # two used pairs of expert 0: the second is over capacity, and the empty slot stays unkept
    routing = replace(routing, used=torch.tensor([True, True, True]), kept=None)
    assert router.drop_over_capacity(routing).kept.tolist() == [True, False, True]


# -----------------------------------------------------------------------------
# remoe: ReLU gates, an L1 penalty whose coefficient adapts (Wang et al. 2025)


def test_remoe_l1_loss_by_hand():
    gates = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]])
    # plain: the L1 norm of each token's gates, averaged: (3 + 3) / 2 = 3
    assert remoe_l1_loss(gates, top_k=1, balanced=False).item() == pytest.approx(3.0)
    # balanced, E = 3, k = 1, N = 2: active gates per expert (1, 0, 2) -> f = 3 / (1 * 2) * (1, 0, 2) = (1.5, 0, 3)
    # token 0: 1.5 * 1 + 3 * 2 = 7.5; token 1: 3 * 3 = 9 -> mean 8.25
    assert remoe_l1_loss(gates, top_k=1).item() == pytest.approx(8.25)


def test_remoe_coefficient_step_by_hand():
    coef = torch.tensor(1e-8)
    # target sparsity .5 (k = 2 of E = 4): at .25 too many gates are active -> lambda * 1.2
    assert remoe_coefficient_step(coef, torch.tensor(0.25), 0.5, 1.2).item() == pytest.approx(1.2e-8)
    # at .75 too few -> lambda / 1.2; on target -> unchanged
    assert remoe_coefficient_step(coef, torch.tensor(0.75), 0.5, 1.2).item() == pytest.approx(1e-8 / 1.2)
    assert remoe_coefficient_step(coef, torch.tensor(0.5), 0.5, 1.2).item() == pytest.approx(1e-8)


def test_remoe_router_by_hand():
    router = logit_router('remoe', remoe_l1_init=0.5, remoe_balanced_l1=False).train()
    # token 0: logits (1, -2, 3, -.5) -> gates (1, 0, 3, 0): experts 2 (3), 0 (1); token 1: (-1, -1, -1, -1): none
    h = torch.tensor([[1.0, -2.0, 3.0, -0.5], [-1.0, -1.0, -1.0, -1.0]])
    r = router(h)
    # slots choice-major over the 4 largest logits; a gate <= 0 leaves its slot empty
    assert r.token_idx.tolist() == [0, 1] * 4
    assert r.expert_idx[[0, 2, 4, 6]].tolist() == [2, 0, 3, 1]  # token 0's candidates, largest logit first
    assert r.used.tolist() == [True, False, True, False, False, False, False, False]
    assert r.weight.tolist() == [3.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # the ReLU gate itself, not normalised
    assert r.experts_per_token(2).tolist() == [2, 0] and not r.cap_bound.any()
    # the L1: lambda * mean of the gates' sums = .5 * (4 + 0) / 2 = 1
    assert set(r.losses) == {'l1'} and r.losses['l1'].item() == pytest.approx(1.0)
    assert router.tokens_seen.item() == 2  # counted in training only
    router.eval()(h)
    assert router.tokens_seen.item() == 2
    # max_k = 2: token 0's 2 positive gates fit; token 2 has 3 (logits 1, 2, 3, -1) and keeps its
    # 2 largest, experts 2 (3.0) and 1 (2.0): the cap binds for it alone
    capped = logit_router('remoe', max_k=2, top_k=1).eval()
    r = capped(torch.cat([h, torch.tensor([[1.0, 2.0, 3.0, -1.0]])]))
    assert r.expert_idx[[0, 2, 3, 5]].tolist() == [2, 2, 0, 1] and r.used.tolist() == [True, False, True] * 2
    assert r.weight[[0, 2, 3, 5]].tolist() == [3.0, 3.0, 1.0, 2.0]
    assert r.cap_bound.tolist() == [False, False, True]


def test_remoe_coefficient_follows_the_sparsity_of_each_step():
    router = logit_router('remoe').train()  # E = 4, top_k = 2: target sparsity .5, lambda_0 = 1e-8
    h = torch.randn(6, 4)
    router(h)
    router(h)  # two micro-steps: 12 tokens, 48 gates
    # 36 experts ran: sparsity 1 - 36/48 = .25 < .5 -> lambda * 1.2
    router.step_finished(0, torch.tensor([9, 9, 9, 9]))
    assert router.l1_coef.item() == pytest.approx(1.2e-8) and router.tokens_seen.item() == 0
    router(h)  # 6 tokens, 24 gates; 18 ran: sparsity .25 -> * 1.2 again
    router.step_finished(1, torch.tensor([18, 0, 0, 0]))
    assert router.l1_coef.item() == pytest.approx(1.44e-8)
    router(h)  # 6 of 24 ran: sparsity .75 > .5 -> / 1.2
    router.step_finished(2, torch.tensor([3, 3, 0, 0]))
    assert router.l1_coef.item() == pytest.approx(1.2e-8)
    router(h)  # exactly on target (12 of 24): unchanged
    router.step_finished(3, torch.tensor([3, 3, 3, 3]))
    assert router.l1_coef.item() == pytest.approx(1.2e-8)
    router(h)  # a skipped step passes zeros: nothing learned, and the count starts again
    router.step_finished(4, torch.zeros(4, dtype=torch.long))
    assert router.l1_coef.item() == pytest.approx(1.2e-8) and router.tokens_seen.item() == 0
    # lambda is checkpointed, the token count is not (it is 0 after every step)
    state = router.state_dict()
    assert 'l1_coef' in state and 'tokens_seen' not in state


def test_remoe_sparsity_counts_the_positive_gates_the_cap_cut():
    """Under a cap that binds, the coefficient must see how dense the gates are, not how many
    experts ran: counting only the experts that ran, the cap would tell it "on target" while
    every token wants 3 of 4 experts."""
    router = logit_router('remoe', max_k=2).train()  # E = 4, top_k = 2: target sparsity 1 - 2/4 = .5
    # 3 tokens, each with 3 positive gates of 4 (and a negative one): 9 positive gates of 12
    h = torch.tensor([[1.0, 2.0, 3.0, -1.0], [-1.0, 1.0, 2.0, 3.0], [3.0, -1.0, 1.0, 2.0]])
    routing = router(h)
    assert routing.kept.sum() == 6 and routing.cap_bound.all()  # 2 ran per token: the cap cut one each
    # positive gates per expert: expert 0 in tokens 0, 2; 1 in 0, 1; 2 in all three; 3 in 1, 2 -> (2, 2, 3, 2)
    assert routing.active_gates.tolist() == [2, 2, 3, 2]
    stats = RoutingStats()
    stats.add({0: routing}, full=False)  # what train.py counts on a step that logs nothing
    counts = stats.router_counts()[0]
    assert counts.tolist() == [2, 2, 3, 2] and stats.load_counts()[0].sum() == 6
    # sparsity 1 - 9/12 = .25 < .5: too dense -> lambda * 1.2 (the 6 that ran, 1 - 6/12 = .5, would leave it)
    router.step_finished(0, counts)
    assert router.l1_coef.item() == pytest.approx(1.2e-8)


def test_remoe_gradient_reaches_every_positive_gate():
    """The ReLU gate is differentiable where it is positive: the LM loss reaches the gate
    of every expert that ran, not only the top-k (what ReMoE is for)."""
    router = logit_router('remoe', remoe_l1_init=1e-8)
    h = torch.tensor([[1.0, 2.0, 3.0, -1.0]])
    r = router(h)
    r.weight.sum().backward()  # d/dW of sum of the positive gates: row e gets h for each positive gate
    grad = router.gate.weight.grad
    assert (grad[:3].abs().sum(dim=1) > 0).all() and grad[3].abs().sum() == 0


# -----------------------------------------------------------------------------
# null experts (MoE++'s zero experts) in the top-k routers


def test_null_balance_loss_by_hand():
    # E = 2 real experts and M = 1 null; probs t0 (.5, .2, .3), t1 (.1, .3, .6): P = (.3, .25, .45)
    # slots of experts 0, 2 | 2, 1: f = (1, 1, 2) / 4 = (.25, .25, .5)
    probs = torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.3, 0.6]])
    slots = torch.tensor([0, 2, 2, 1])
    # tau = .5: 3 * (.25 * .3 + .25 * .25 + .5 * .5 * .45) = 3 * .25 = .75
    assert null_balance_loss(probs, slots, n_exp=2, tau=0.5).item() == pytest.approx(0.75)
    # tau = 1: every expert alike, Switch's loss over all 3: 3 * (.075 + .0625 + .225) = 1.0875
    assert null_balance_loss(probs, slots, n_exp=2, tau=1.0).item() == pytest.approx(1.0875)
    assert switch_aux_loss(probs, slots, 3).item() == pytest.approx(1.0875)


def test_topk_with_null_experts_by_hand():
    # E = 2 real experts, M = 2 null ones, top-2, renormalised; the gate [4, 2] passes h to the real
    # experts' logits and gives both null experts the logit 0
    router = logit_router('topk', n_exp=2, n_null_exp=2, aux_loss_coef=0.0, z_loss_coef=0.0).eval()
    assert router.gate.weight.tolist() == [[1, 0], [0, 1], [0, 0], [0, 0]]
    h = torch.tensor([[2.0, -3.0], [-3.0, -2.0], [1.0, 0.5]])
    r = router(h)
    # token 0: logits (2, -3, 0, 0): top-2 = expert 0 (2) and a null one (0); weight of expert 0 =
    #   e^2 / (e^2 + e^0) = .880797, the null slot empty
    # token 1: logits (-3, -2, 0, 0): both slots null -> no real expert
    # token 2: logits (1, .5, 0, 0): experts 0 and 1; weights e^1 / (e^1 + e^.5) = .622459 and .377541
    assert r.experts_per_token(3).tolist() == [1, 0, 2]
    assert r.logits.shape == (3, 2) and r.gate_weight.shape == (2, 2)  # the metrics see the real experts only
    kept = {(t, e): w for t, e, w, k in zip(r.token_idx.tolist(), r.expert_idx.tolist(), r.weight.tolist(),
                                             r.kept.tolist()) if k}
    assert kept == {(0, 0): pytest.approx(0.880797, abs=1e-6), (2, 0): pytest.approx(0.622459, abs=1e-6),
                    (2, 1): pytest.approx(0.377541, abs=1e-6)}
    assert (r.weight[~r.used] == 0).all() and r.load().tolist() == [2, 1]
    assert r.n_requested == 3  # the three real assignments; a null choice is not one


@pytest.mark.parametrize('name', sorted(name for name, cls in ROUTERS.items() if issubclass(cls, TopKRouter)))
def test_null_expert_contract(name):
    """Every top-k softmax router takes null experts: k slots a token, the real ones kept
    (unless capacity drops them), 0 to k real experts a token, gradient to the null rows."""
    torch.manual_seed(0)
    no_ortho = {'ortho_loss_coef': 0.0} if name == 'ortho_var' else {}  # L_o needs k outputs a token: refused
    config = router_config(router=name, n_null_exp=3, **no_ortho)
    router = build_router(config).train()
    N, E, k = 24, config.n_exp, config.top_k
    r = router(torch.randn(N, config.n_embd), torch.randint(0, 50, (N,)), seq_len=N)
    assert r.n_slots == N * k and r.logits.shape == (N, E) and (r.expert_idx < E).all()
    assert 0 < r.used.sum() < N * k  # some slots went to a null expert, some to a real one
    assert not (r.kept & ~r.used).any() and (r.weight[~r.kept] == 0).all()
    assert (r.experts_per_token(N) <= k).all()
    (r.weight.sum() + sum(r.losses.values())).backward()
    assert router.gate.weight.grad[E:].abs().sum() > 0  # the null experts' scores learn too


# -----------------------------------------------------------------------------
# config: what the routers fix, fill in and refuse


@pytest.mark.parametrize('name, losses', [
    ('topk', {'aux_loss_coef': 0.01, 'z_loss_coef': 0.001}),          # OLMoE's two
    ('gatepro', {'aux_loss_coef': 0.01, 'z_loss_coef': 0.001}),       # topk's: GatePro adds none
    ('ortho_var', {'aux_loss_coef': 0.01, 'z_loss_coef': 0.001, 'ortho_loss_coef': 0.1, 'var_loss_coef': 0.3}),
    ('switch', {'aux_loss_coef': 0.01}),                              # Switch: no z-loss yet
    ('noisy_topk', {'aux_loss_coef': 0.01}),                          # stand-in for importance/load
    ('expert_choice', {}),                                            # balanced by construction
    ('aux_free', {'aux_free_seq_loss_coef': 1e-4}),                   # DeepSeek-V3: the bias, no z-loss
    ('hash', {}),                                                     # nothing learned
    ('topp', {'aux_loss_coef': 0.01, 'dynamic_loss_coef': 1e-4}),     # balance + dynamic (entropy) loss
    ('remoe', {'remoe_l1_init': 1e-8}),                               # the adaptive L1 alone
])
def test_each_router_trains_with_its_papers_losses_by_default(name, losses):
    config = router_config(router=name)
    coefs = {key: getattr(config, key)
             for key in ('aux_loss_coef', 'z_loss_coef', 'ortho_loss_coef', 'var_loss_coef', 'dynamic_loss_coef')}
    coefs['aux_free_seq_loss_coef'] = config.aux_free_seq_loss_coef if name == 'aux_free' else 0.0
    coefs['remoe_l1_init'] = config.remoe_l1_init if name == 'remoe' else 0.0
    assert {key: value for key, value in coefs.items() if value} == losses
    # and the losses the router returns are exactly those
    torch.manual_seed(0)
    router = build_router(config).train()
    r = router(torch.randn(8, 8), torch.randint(0, 50, (8,)), seq_len=4)
    names = {'aux_loss_coef': 'aux', 'z_loss_coef': 'z', 'var_loss_coef': 'var', 'aux_free_seq_loss_coef': 'seq_aux',
             'dynamic_loss_coef': 'dynamic', 'remoe_l1_init': 'l1'}
    assert set(r.losses) == {names[key] for key in losses if key in names}  # ortho comes after the experts


@pytest.mark.parametrize('bad, message', [
    (dict(router='switch', top_k=2), "router 'switch' needs top_k=1, got top_k=2"),
    (dict(router='switch', renormalize=True), "needs renormalize=False"),
    (dict(router='hash', top_k=2), "router 'hash' needs top_k=1"),
    (dict(router='hash', z_loss_coef=0.001), "needs z_loss_coef=0.0"),
    (dict(router='expert_choice', top_k=2), "needs top_k=None"),
    (dict(router='aux_free', aux_loss_coef=0.01), "router 'aux_free' needs aux_loss_coef=0.0"),
    (dict(router='remoe', capacity_factor=1.25), "router 'remoe' needs capacity_factor=None"),
    (dict(router='remoe', renormalize=True), "router 'remoe' needs renormalize=False"),
])
def test_a_value_that_contradicts_what_a_router_fixes_is_an_error(bad, message):
    with pytest.raises(ValueError, match=message):
        router_config(**bad)


@pytest.mark.parametrize('bad, message', [
    (dict(max_k=2), "max_k=2: router 'topk' gives every token a fixed number of experts; drop --max_k"),
    (dict(router='topp', max_k=5), 'max_k=5 must be between top_k=2 and n_exp=4'),
    (dict(router='remoe', max_k=1), 'max_k=1 must be between top_k=2 and n_exp=4'),
    (dict(top_p=0.0), r'top_p=0.0 is outside \(0, 1\]; give'),
    (dict(router='topp', top_p=1.5), r'top_p=1.5 is outside \(0, 1\]'),
    (dict(dynamic_loss_coef=1e-4), "only router 'topp' trains with the dynamic loss"),
    (dict(router='remoe', remoe_l1_multiplier=0.5), 'alpha >= 1'),
    (dict(router='aux_free', n_null_exp=2), "null experts are for the top-k softmax routers .*not 'aux_free'"),
    (dict(router='topp', n_null_exp=2), "null experts are for the top-k softmax routers .*not 'topp'"),
    (dict(n_null_exp=2, aux_loss_per_sequence=True), 'the per-sequence loss has no weight for null experts'),
    (dict(router='ortho_var', n_null_exp=2), 'needs fixed-k token choice without drops: n_null_exp=2'),
    (dict(n_null_exp=-1), 'n_null_exp=-1, null_balance_weight=0.75: both must be >= 0; e.g. --n_null_exp=0'),
])
def test_settings_of_the_variable_k_routers_that_cannot_work_are_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        router_config(**bad)


def test_variable_k_routers_fill_in_their_cap_and_describe_themselves():
    topp = router_config(router='topp')
    assert (topp.max_k, topp.top_p, topp.renormalize, topp.experts_per_token) == (4, 0.4, False, 2)
    assert 'top-p 0.4, at most 4 experts a token, sized for 2' in topp.describe()
    assert 'dynamic_loss_coef 0.0001' in topp.describe()
    remoe = router_config(router='remoe', max_k=3)
    assert (remoe.max_k, remoe.aux_loss_coef, remoe.capacity_factor) == (3, 0.0, None)
    assert 'ReLU gates, 2 of 4 active on average, at most 3 a token' in remoe.describe()
    assert '2 null experts (balance weight 0.75)' in router_config(n_null_exp=2).describe()


@pytest.mark.parametrize('router', ['topp', 'remoe'])
@pytest.mark.parametrize('n_exp, top_k, max_k', [
    (64, 2, 4),   # 2 * 2 = 4 slots a token, not 64: twice top-2's compute, not 32 times
    (8, 1, 2),    # 2 * 1
    (8, 3, 6),    # 2 * 3
    (4, 3, 4),    # 2 * 3 = 6 > E = 4: every expert, E
    (4, 2, 4),    # 2 * 2 = E
])
def test_the_default_cap_is_twice_top_k_at_most_every_expert(router, n_exp, top_k, max_k):
    assert router_config(router=router, n_exp=n_exp, top_k=top_k).max_k == max_k
    # the papers' routing, uncapped, when asked for
    assert router_config(router=router, n_exp=n_exp, top_k=top_k, max_k=n_exp).max_k == n_exp


def test_user_values_win_over_a_routers_defaults():
    config = router_config(router='switch', top_k=1, z_loss_coef=0.001, capacity_factor=None)
    assert (config.top_k, config.z_loss_coef) == (1, 0.001)
    assert config.capacity_factor == 1.25  # None is "the router's default"
    assert router_config(router='aux_free', z_loss_coef=0.002).z_loss_coef == 0.002


def test_ortho_var_preset_turns_both_losses_on():
    config = router_config(router='ortho_var')
    assert config.ortho_loss_coef > 0 and config.var_loss_coef > 0
    assert router_config().ortho_loss_coef == 0.0 and router_config().var_loss_coef == 0.0
    assert router_config(router='ortho_var', ortho_loss_coef=0.0).ortho_loss_coef == 0.0
    r = build_router(config)(torch.randn(6, 8))
    assert r.losses['var'].item() < 0  # maximised variance: a negative loss


@pytest.mark.parametrize('bad, message', [
    (dict(router='switch'), 'top_k=1'),
    (dict(router='hash'), 'needs ortho_loss_coef=0.0'),
    (dict(router='expert_choice'), 'exactly top_k'),
    (dict(capacity_factor=1.25), 'dropless'),
])
def test_ortho_loss_refuses_routers_without_fixed_k_pairs(bad, message):
    with pytest.raises(ValueError, match=message):
        router_config(ortho_loss_coef=0.1, **bad)


def test_var_loss_target_sets_the_coefficient_at_the_first_training_forward():
    router = build_router(router_config(n_embd=2, n_exp=2, top_k=1, var_loss_target=1e-3))
    set_gate(router, [[1, 0], [0, 1]])  # logits = h
    # as in test_variance_loss_by_hand: L_v([[0, ln 3], [0, 0]]) = -1/32, so gamma = 1e-3 / (1/32) = 0.032
    r = router(torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]]))
    assert r.losses['var'].item() == pytest.approx(-1e-3)  # the term starts at -target: minimising raises the variance
    assert router.var_loss_scale.item() == pytest.approx(0.032)
    # a second step keeps step 0's gamma: L_v([[0, ln 3], [0, ln 3]]) = -1/16 -> 0.032 * -1/16 = -0.002
    r = router(torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]]))
    assert r.losses['var'].item() == pytest.approx(-0.002)
    assert router.var_loss_scale.item() == pytest.approx(0.032)


def one_token_pair(first, second):
    """A Routing of one token with two experts, and its two expert outputs in the router's order."""
    routing = Routing(torch.tensor([0, 0]), torch.tensor([0, 1]), torch.tensor([0.5, 0.5]), torch.zeros(1, 4))
    return routing, torch.tensor([first, second]), torch.tensor([0, 1])


def test_ortho_loss_target_sets_beta_on_the_first_nonzero_loss():
    router = build_router(router_config(ortho_loss_target=1e-4))
    # orthogonal outputs: L_o = 0, nothing to calibrate on; beta stays unset and the term is 0
    assert router.output_losses(*one_token_pair([1.0, 0.0], [0.0, 1.0]))['ortho'].item() == 0.0
    assert router.ortho_loss_scale.item() == 0.0
    # e1 = [1, 0], e2 = [1, 1]: (1 on 2) <e1,e2>/<e2,e2> = 1/2 -> (1/2)^2 * 2 = 0.5; (2 on 1) 1/1 -> 1 * 1 = 1
    # L_o = 1.5 (less ~1e-6 for eps), beta = 1e-4 / 1.5, the term 1e-4
    assert router.output_losses(*one_token_pair([1.0, 0.0], [1.0, 1.0]))['ortho'].item() == pytest.approx(1e-4)
    assert router.ortho_loss_scale.item() == pytest.approx(1e-4 / 1.5, rel=1e-5)
    # e1 = [2, 0], e2 = [1, 1]: (1 on 2) 2/2 -> 1 * 2 = 2; (2 on 1) 2/4 -> 1/4 * 4 = 1; L_o = 3 -> 3 * 1e-4 / 1.5 = 2e-4
    term = router.output_losses(*one_token_pair([2.0, 0.0], [1.0, 1.0]))['ortho']
    assert term.item() == pytest.approx(2e-4, rel=1e-5)


def test_an_eval_before_calibration_reports_zero_and_sets_nothing():
    router = build_router(router_config(n_embd=2, n_exp=2, top_k=1, var_loss_target=1e-3)).eval()
    set_gate(router, [[1, 0], [0, 1]])
    h = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])  # L_v = -1/32
    assert router(h).losses['var'].item() == 0.0 and router.var_loss_scale.item() == 0.0
    router.train()(h)  # calibrates: gamma = 0.032
    assert router.eval()(h * 2).losses['var'].item() == pytest.approx(0.032 * variance_loss(h * 2).item())
    assert router.var_loss_scale.item() == pytest.approx(0.032)


def test_a_target_with_its_coefficient_is_an_error_but_a_routers_default_is_not():
    with pytest.raises(ValueError, match='var_loss_coef=0.3 and var_loss_target=0.001 both given.*--var_loss_coef or'):
        router_config(router='ortho_var', var_loss_coef=0.3, var_loss_target=1e-3)
    config = router_config(router='ortho_var', ortho_loss_target=1e-4)  # its default beta = 0.1 is not "given"
    assert (config.ortho_loss_coef, config.var_loss_coef) == (None, 0.3)
    assert 'ortho_loss_target 0.0001' in config.describe() and 'var_loss_coef 0.3' in config.describe()
    assert 'ortho_loss_coef' not in config.describe()


@pytest.mark.parametrize('bad, message', [
    (dict(var_loss_target=0.0), 'var_loss_target=0.0 must be > 0'),
    (dict(router='hash', var_loss_target=1e-3), "router 'hash' needs var_loss_coef=0.0, got var_loss_target=0.001"),
    (dict(router='expert_choice', ortho_loss_target=1e-4), 'ortho_loss_target=0.0001 needs fixed-k token choice'),
])
def test_a_target_the_router_cannot_train_with_is_an_error(bad, message):
    with pytest.raises(ValueError, match=message):
        router_config(**bad)


def calibrated_model():
    torch.manual_seed(0)
    model = GPT(router_config(router='ortho_var', n_layer=2, n_embd=16, n_exp=4, top_k=2, expert_impl='plain',
                              ortho_loss_target=1e-4, var_loss_target=1e-3))
    X = torch.randint(0, 50, (2, 16))
    _, _, router_losses, _ = model(X, X)
    return model, router_losses


def test_the_calibrated_coefficients_are_checkpointed_and_a_new_run_sets_them_again():
    model, router_losses = calibrated_model()
    # each of the two layers starts at the target: the sums are twice the targets
    assert router_losses['ortho'].item() == pytest.approx(2e-4) and router_losses['var'].item() == pytest.approx(-2e-3)
    routers = [moe.router for _, moe in model.moe_layers()]
    scales = [(r.ortho_loss_scale.item(), r.var_loss_scale.item()) for r in routers]
    assert all(ortho > 0 and var > 0 for ortho, var in scales) and scales[0] != scales[1]  # one per layer
    resumed = GPT(model.config)
    resumed.load_state_dict(model.state_dict())  # init_from=resume
    assert [(moe.router.ortho_loss_scale.item(), moe.router.var_loss_scale.item())
            for _, moe in resumed.moe_layers()] == scales
    new_run = GPT(model.config)
    load_start_weights(new_run, model.state_dict(), 'source')  # a new run from trained weights
    assert all(moe.router.ortho_loss_scale.item() == 0 and moe.router.var_loss_scale.item() == 0
               for _, moe in new_run.moe_layers())
    assert torch.equal(new_run.transformer.h[0].ffn.router.gate.weight, model.transformer.h[0].ffn.router.gate.weight)


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
    P = r.n_slots  # every pair asked for stays in the tensors; capacity marks the dropped ones in r.kept
    assert r.token_idx.shape == r.expert_idx.shape == r.weight.shape == (P,)
    assert r.logits.shape == (N, E) and r.logits.dtype == torch.float32
    assert r.token_idx.min() >= 0 and r.token_idx.max() < N
    assert r.expert_idx.min() >= 0 and r.expert_idx.max() < E
    assert (r.weight >= 0).all()
    if router.exactly_top_k:
        # token choice: exactly k distinct experts for every token, some dropped by capacity
        assert r.n_requested == N * config.top_k
        kept = torch.ones(P, dtype=torch.bool) if r.kept is None else r.kept
        pairs = set(zip(r.token_idx.tolist(), r.expert_idx.tolist()))
        assert len(pairs) == P
        per_token = torch.bincount(r.token_idx[kept], minlength=N)
        if config.capacity_factor is None:
            assert per_token.tolist() == [config.top_k] * N and r.kept is None
        else:
            capacity = expert_capacity(N, E, config.top_k, config.capacity_factor)
            assert (per_token <= config.top_k).all() and r.n_pairs == kept.sum() < N * config.top_k
            assert torch.bincount(r.expert_idx[kept], minlength=E).max() <= capacity
            assert (r.weight[~kept] == 0).all()  # a dropped pair weighs nothing
    if router.variable_k:
        # as many experts as a token needs: max_k slots a token, choice-major, distinct experts;
        # an empty slot (used False) is never kept and weighs nothing; a token keeps 0 to max_k
        assert P == N * config.max_k and r.used.shape == r.kept.shape == (P,) and r.cap_bound.shape == (N,)
        assert r.token_idx.tolist() == list(range(N)) * config.max_k
        assert len(set(zip(r.token_idx.tolist(), r.expert_idx.tolist()))) == P
        assert not (r.kept & ~r.used).any() and (r.weight[~r.kept] == 0).all()
        assert r.n_requested == r.used.sum() and r.n_pairs == r.kept.sum()
        assert (torch.bincount(r.token_idx[r.kept], minlength=N) <= config.max_k).all()
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


# -----------------------------------------------------------------------------
# finite at the extremes: huge logits, all-equal logits, bf16 and fp16 autocast

EXTREME_LOGITS = {
    'plus_minus_1e4': [[1e4, -1e4, 1e4, -1e4], [-1e4, 1e4, -1e4, -1e4], [1e4, 1e4, 1e4, -1e4]],
    'all_minus_1e4': [[-1e4] * 4] * 3,
    'all_plus_1e4': [[1e4] * 4] * 3,
    'all_zero': [[0.0] * 4] * 3,
}


@pytest.mark.parametrize('autocast', [None, torch.bfloat16, torch.float16], ids=['fp32', 'bf16_autocast', 'fp16_autocast'])
@pytest.mark.parametrize('case', sorted(EXTREME_LOGITS))
@pytest.mark.parametrize('name', sorted(ROUTERS))
def test_router_is_finite_at_extreme_and_equal_logits(name, case, autocast):
    """Every weight, loss and gradient stays finite when the gate's logits are +-1e4 (what
    a diverging gate produces), all equal (perfect balance: ties everywhere, zero variance),
    or both, in training and eval, in fp32 and under bf16 and fp16 autocast. The gate is the identity on
    the first 4 features, so h sets the logits exactly; for all_zero the gate rows are also
    identical (GatePro's cosine similarity is then 1 for every pair)."""
    config = router_config(router=name, n_embd=8, n_exp=4)
    router = build_router(config)
    logits = torch.tensor(EXTREME_LOGITS[case] * 2)  # N = 6 tokens: 2 sequences of 3
    h = torch.cat([logits, torch.zeros(6, 4)], dim=1)
    with torch.no_grad():
        if router.gate is not None:
            router.gate.weight.copy_(torch.eye(4, 8) if case != 'all_zero' else torch.ones(4, 8))
        if name == 'noisy_topk':
            router.noise.weight.copy_(torch.eye(4, 8))  # noise std softplus(+-1e4): 1e4 or 0
    token_ids = torch.tensor([0, 1, 2, 3, 4, 5])
    for training in (True, False):
        router.train(training)
        router.zero_grad()
        h_in = h.clone().requires_grad_(True)
        with torch.autocast('cpu', dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            r = router(h_in.to(autocast) if autocast else h_in, token_ids, seq_len=3)
            n_tokens = r.logits.size(0)
            expert_out = torch.randn(r.n_slots, 8)  # a row for every pair, dropped ones and empty slots too
            order = torch.argsort(r.expert_idx, stable=True)
            losses = {**r.losses, **router.output_losses(r, expert_out[order], order)}
        what = f"{name}, {case}, {'train' if training else 'eval'}"
        assert n_tokens == 6 and torch.isfinite(r.weight).all(), f"{what}: weights {r.weight}"
        for loss_name, value in losses.items():
            assert torch.isfinite(value), f"{what}: {loss_name} = {value}"
        total = r.weight.float().sum() + sum(losses.values(), torch.zeros(()))
        if total.requires_grad:
            total.backward()
            grads = [p.grad for p in router.parameters() if p.grad is not None]
            assert all(torch.isfinite(g).all() for g in grads), f"{what}: non-finite gradient"
            assert h_in.grad is None or torch.isfinite(h_in.grad).all(), f"{what}: non-finite gradient of h"
