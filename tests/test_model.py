"""Tests of model.py: the MoE layer against a naive per-token reference, causality,
shapes and parameter counts. CPU, fp32, tiny models."""

import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, MoE, GPTConfig
from routers import expert_capacity, ortho_loss


def tiny_config(**overrides):
    args = dict(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_embd=32, n_exp=4, dropout=0.0)
    args.update(overrides)
    return GPTConfig(**args)


def naive_keep(expert_idx, n_exp, capacity):
    """Capacity by hand: walk the pairs in order, keep a pair while its expert has room."""
    used = [0] * n_exp
    keep = []
    for e in expert_idx.tolist():
        keep.append(used[e] < capacity)
        used[e] += 1
    return keep


def naive_moe(moe, x, capacity_factor=None):
    """For each token: sum over its (kept) assignments of weight * expert(x_token), one token
    and one expert at a time, plus the shared experts."""
    B, T, C = x.shape
    h = x.reshape(B * T, C)
    router = moe.router
    saved = router.capacity_factor, router.eval_capacity_factor
    if router.exactly_top_k:  # token choice: every pair the router asks for, dropped by hand below
        router.capacity_factor = router.eval_capacity_factor = None
    routing = router(h)
    router.capacity_factor, router.eval_capacity_factor = saved
    # an empty slot (topp past its cut, a ReLU gate <= 0, a null expert) is not kept: it runs nothing
    keep = [True] * routing.n_slots if routing.kept is None else routing.kept.tolist()
    if capacity_factor is not None:
        keep = naive_keep(routing.expert_idx, moe.n_exp, expert_capacity(B * T, moe.n_exp, router.top_k, capacity_factor))
    y = torch.zeros_like(h)
    for p in range(routing.n_slots):
        if not keep[p]:
            continue
        t, e, w = int(routing.token_idx[p]), int(routing.expert_idx[p]), routing.weight[p]
        y[t] += w * (F.gelu(h[t] @ moe.experts.w_fc[e]) @ moe.experts.w_proj[e])
    if moe.shared is not None:
        y = y + moe.shared(h)
    return y.view(B, T, C), sum(keep)


@pytest.mark.parametrize('overrides', [
    dict(),
    dict(top_k=1),
    dict(top_k=3, renormalize=False),
    dict(n_shared_exp=1),
    dict(n_exp=8, top_k=2, expert_hidden=24),
    dict(router='expert_choice'),  # a variable number of experts per token, no capacity dropping
    dict(router='topp'),  # as many experts as a token needs: empty slots run nothing
    dict(router='topp', top_p=0.9, max_k=2, renormalize=True),
    dict(router='remoe'),
    dict(router='remoe', top_k=1, max_k=1),
    dict(n_null_exp=2),  # a slot given to a null expert adds nothing
    dict(router='noisy_topk', n_null_exp=1),
])
def test_moe_matches_naive_reference(overrides):
    torch.manual_seed(0)
    moe = MoE(tiny_config(**overrides)).eval()
    x = torch.randn(3, 7, 32)
    y, routing, _ = moe(x)
    y_ref, n_kept = naive_moe(moe, x)
    assert routing.n_pairs == n_kept
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('capacity_factor', [0.5, 1.0, 1.25])
def test_moe_with_capacity_matches_naive_reference(capacity_factor):
    torch.manual_seed(1)
    config = tiny_config(capacity_factor=capacity_factor)
    moe = MoE(config).train()
    # skew the router so expert 0 overflows: inputs with a positive mean, gate row 0 along it
    with torch.no_grad():
        moe.router.gate.weight[0] += 0.1
    x = torch.randn(4, 8, 32) + 0.5
    y, routing, _ = moe(x)
    y_ref, n_kept = naive_moe(moe, x, capacity_factor)
    assert routing.n_pairs == n_kept
    assert routing.n_pairs < routing.n_requested  # something was dropped
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


def test_dropped_token_keeps_its_residual():
    torch.manual_seed(2)
    config = tiny_config(top_k=1, capacity_factor=0.25)
    moe = MoE(config).train()
    x = torch.randn(1, 16, 32)
    y, routing, _ = moe(x)
    routed = set(routing.token_idx[routing.kept].tolist())  # a dropped pair stays, with kept False
    dropped = [t for t in range(16) if t not in routed]
    assert dropped, "capacity 0.25 with 16 tokens and 4 experts must drop some tokens"
    # the MoE contributes exactly zero to a dropped token: its block output is the residual
    assert torch.all(y.view(16, 32)[dropped] == 0)


def test_a_token_whose_slots_all_go_to_null_experts_gets_exactly_zero():
    """Null experts add nothing: a token whose k slots all go to null experts gets an MoE
    output of exactly 0 (its block keeps the residual alone); the others get their experts."""
    torch.manual_seed(8)
    moe = MoE(tiny_config(n_exp=4, n_null_exp=2, top_k=2)).eval()
    # feature 0 is +1 for the first 4 tokens and -1 for the last 4; the null experts' gate rows
    # read it (logit +-10), the real experts' rows are small: the first tokens pick two nulls
    x = torch.randn(1, 8, 32) * 0.1
    x[0, :, 0] = torch.tensor([1.0] * 4 + [-1.0] * 4)
    with torch.no_grad():
        moe.router.gate.weight[4:] = 0.0
        moe.router.gate.weight[4:, 0] = 10.0
    y, routing, _ = moe(x)
    assert routing.experts_per_token(8).tolist() == [0] * 4 + [2] * 4
    assert torch.all(y[0, :4] == 0)  # exactly 0, not approximately
    assert (y[0, 4:].abs().sum(dim=-1) > 0).all()
    y_ref, _ = naive_moe(moe, x)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=0)


def test_remoe_layers_share_one_coefficient():
    """ReMoE holds the sparsity of the whole model: every layer's coefficient steps on the
    mean of the layers' counts, so a dense layer and a sparse one that average to the
    target leave both coefficients unchanged, and they stay equal."""
    torch.manual_seed(9)
    model = GPT(tiny_config(n_layer=2, router='remoe', n_exp=4, top_k=2)).train()
    idx = torch.randint(0, 37, (2, 8))  # 16 tokens, 64 gates a layer
    routers = [moe.router for _, moe in model.moe_layers()]
    model(idx, idx)
    # layer 0 ran all 64 gates (sparsity 0), layer 1 none: the mean, 32 of 64, is the target .5
    model.step_finished(0, {0: torch.tensor([16, 16, 16, 16]), 1: torch.zeros(4, dtype=torch.long)})
    assert [r.l1_coef.item() for r in routers] == [pytest.approx(1e-8)] * 2
    model(idx, idx)
    # 64 and 16 ran: the mean 40 of 64 is sparsity .375 < .5 -> both * 1.2 (layer 1 alone would go down)
    model.step_finished(1, {0: torch.tensor([16, 16, 16, 16]), 1: torch.tensor([4, 4, 4, 4])})
    assert [r.l1_coef.item() for r in routers] == [pytest.approx(1.2e-8)] * 2


def test_eval_capacity_factor_is_used_in_eval():
    config = tiny_config(capacity_factor=0.5, eval_capacity_factor=4.0)
    moe = MoE(config)
    x = torch.randn(2, 8, 32)
    _, routing_train, _ = moe.train()(x)
    _, routing_eval, _ = moe.eval()(x)
    assert routing_eval.n_pairs == routing_eval.n_requested  # 4.0 never drops with 4 experts
    assert routing_train.n_pairs <= expert_capacity(16, 4, 2, 0.5) * 4


def test_token_choice_model_is_causal():
    torch.manual_seed(3)
    model = GPT(tiny_config(n_layer=3)).eval()
    idx = torch.randint(0, 37, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = torch.randint(0, 37, (2, 6))
    logits_a = model(idx, idx)[0]  # targets given: logits for every position
    logits_b = model(changed, changed)[0]
    # not bit-exact: the experts' matmuls see groups of other sizes, which changes the
    # order of float additions (~1e-8); a leak would move the logits by ~1e-2
    torch.testing.assert_close(logits_a[:, :10], logits_b[:, :10], atol=1e-6, rtol=0)
    assert (logits_a[:, 10:] - logits_b[:, 10:]).abs().max() > 1e-3


def test_expert_choice_model_is_not_causal():
    # the mirror image of the test above: expert choice ranks all B*T tokens of the batch,
    # so changing later tokens changes the outputs at earlier positions (a leak)
    torch.manual_seed(3)
    model = GPT(tiny_config(n_layer=3, router='expert_choice')).eval()
    idx = torch.randint(0, 37, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = torch.randint(0, 37, (2, 6))
    logits_a = model(idx, idx)[0]
    logits_b = model(changed, changed)[0]
    assert (logits_a[:, :10] - logits_b[:, :10]).abs().max() > 1e-3


def test_ortho_loss_pairs_each_tokens_own_expert_outputs():
    # MoE un-sorts the expert outputs back to the router's pairs; compare with the outputs
    # computed token by token, expert by expert, in the router's choice order
    torch.manual_seed(6)
    moe = MoE(tiny_config(n_exp=4, top_k=3, ortho_loss_coef=0.5)).train()
    x = torch.randn(2, 5, 32)
    _, routing, losses = moe(x)
    assert 'ortho' not in routing.losses  # the layer does not edit what the router returned
    h = x.reshape(10, 32)
    chosen = routing.expert_idx.view(3, 10).t()  # choice-major pairs: [k, N] -> [N, k]
    out = torch.stack([torch.stack([F.gelu(h[t] @ moe.experts.w_fc[e]) @ moe.experts.w_proj[e] for e in chosen[t].tolist()])
                       for t in range(10)])
    torch.testing.assert_close(losses['ortho'], 0.5 * ortho_loss(out, 1e-6))
    losses['ortho'].backward()
    assert moe.experts.w_fc.grad.abs().sum() > 0  # L_o trains the experts


def test_hash_model_routes_by_token_id():
    torch.manual_seed(7)
    model = GPT(tiny_config(router='hash'))
    idx = torch.randint(0, 37, (2, 8))
    _, lm_loss, router_losses, routings = model(idx, idx)
    expected = model.transformer.h[0].ffn.router.expert_of_token[idx.reshape(-1)]
    assert torch.equal(routings[0].expert_idx, expected)
    assert torch.isfinite(lm_loss) and router_losses == {}


def test_expert_hidden_default_matches_dense_active_compute():
    # dense MLP: d -> 4d -> d. top-k experts of width 4d/k: the same multiply-adds per token
    assert tiny_config(top_k=2).expert_hidden == 64
    assert tiny_config(router='switch').expert_hidden == 128  # top-1
    assert tiny_config(router='expert_choice', capacity_factor=4.0).expert_hidden == 32  # 4 experts per token on average
    assert tiny_config(top_k=1).expert_hidden == 128
    assert tiny_config(top_k=1, n_shared_exp=1).expert_hidden == 64
    assert tiny_config(expert_hidden=50).expert_hidden == 50


def test_active_parameter_count():
    config = tiny_config(n_layer=2, n_exp=4, top_k=2, moe_every=2)  # layer 1 is MoE, layer 0 dense
    model = GPT(config)
    assert [i for i, _ in model.moe_layers()] == [1]
    expert_params = 2 * 4 * 32 * 64  # w_fc and w_proj of 4 experts
    # a token uses 2 of the 4 experts: half the expert parameters are inactive
    assert model.get_num_params() - model.get_num_active_params() == expert_params // 2


def test_mfu_counts_the_experts_that_ran():
    """estimate_mfu with the mean number of experts that ran per token (what train.py reads
    from a logged step's routing) counts their flops, not top_k's."""
    config = tiny_config(n_layer=2, n_exp=4, top_k=2, router='topp')  # both layers MoE
    model = GPT(config)
    expert_params = 2 * 4 * 32 * 64  # per layer: w_fc and w_proj of 4 experts of width 64 (4 * 32 / 2)
    T, fwdbwd = config.block_size, 3
    # 6 flops per active parameter, T tokens a sequence, 3 sequences, over dt = 1 s at a peak of 1 flop/s
    mfu = lambda k: model.estimate_mfu(fwdbwd, 1.0, 1.0, k)
    # one more expert per token in each of the 2 layers: 2 * expert_params / 4 more active parameters
    assert mfu(3.0) - mfu(2.0) == pytest.approx(6 * 2 * expert_params / 4 * T * fwdbwd)
    # None counts top_k = 2; a number per layer: 1.5 in layer 0 and 2.5 in layer 1 sum to 4 = 2 + 2
    assert mfu(None) == mfu(2.0) == pytest.approx(mfu({0: 1.5, 1: 2.5}))
    assert mfu({0: 1.0, 1: 2.0}) - mfu(2.0) == pytest.approx(-6 * expert_params / 4 * T * fwdbwd)
    # the active parameters: 1 of 4 experts in each layer leaves 3/4 of both layers' experts inactive
    assert model.get_num_params() - model.get_num_active_params(experts_per_token=1) == 2 * expert_params * 3 // 4


def test_dense_model_when_n_exp_is_one():
    model = GPT(tiny_config(n_exp=1))
    assert model.moe_layers() == []
    idx = torch.randint(0, 37, (2, 8))
    logits, lm_loss, router_losses, routings = model(idx, idx)
    assert routings == {} and router_losses == {}
    assert abs(lm_loss.item() - math.log(37)) < 0.5  # near-uniform predictions at init


def test_lm_loss_and_router_losses_come_back_separately():
    torch.manual_seed(4)
    model = GPT(tiny_config(aux_loss_coef=0.5, z_loss_coef=0.25))
    idx = torch.randint(0, 37, (2, 8))
    logits, lm_loss, router_losses, routings = model(idx, idx)
    torch.testing.assert_close(lm_loss, F.cross_entropy(logits.view(-1, 37), idx.view(-1)))
    assert len(routings) == 2 and set(router_losses) == {'aux', 'z'}
    for name in ('aux', 'z'):  # each summed over the two MoE layers
        torch.testing.assert_close(router_losses[name], routings[0].losses[name] + routings[1].losses[name])


@pytest.mark.parametrize('bad, message', [
    (dict(top_k=5, n_exp=4), 'top_k=5'),
    (dict(router='switch', top_k=2), "router 'switch' needs top_k=1"),
    (dict(n_embd=30, n_head=4), 'n_embd=30'),
    (dict(router='nope'), 'available: '),
    (dict(capacity_factor=0.0), 'capacity_factor=0.0'),
    (dict(expert_impl='fast'), "expert_impl='fast'"),
])
def test_config_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**bad)


def test_generate_reports_experts():
    torch.manual_seed(5)
    model = GPT(tiny_config()).eval()
    idx = torch.randint(0, 37, (2, 4))
    torch.manual_seed(6)
    out, experts = model.generate(idx, 5, return_experts=True)
    assert out.shape == (2, 9)
    assert len(experts) == 5 and set(experts[0]) == {0, 1}
    assert all(0 <= int(e) < 4 for step in experts for layer in step.values() for e in layer)
    # with the counts too: the same tokens (the seed draws the same), and top-2 gives every token 2 experts
    torch.manual_seed(6)
    out_again, experts_again, counts = model.generate(idx, 5, return_experts=True, return_expert_counts=True)
    assert torch.equal(out_again, out) and len(counts) == 5
    assert all(torch.equal(a[layer], b[layer]) for a, b in zip(experts, experts_again) for layer in a)
    assert all(c.tolist() == [2, 2] for step in counts for c in step.values())
    torch.manual_seed(6)
    assert torch.equal(model.generate(idx, 5), out)  # neither asked for: the tokens alone


def test_greedy_generation_is_the_argmax_and_survives_non_finite_weights():
    """top_tokens=1 (train.py's exact-match answers) is greedy decoding: the oracle feeds back
    the argmax of the last position's logits. A run that skips non-finite steps still
    evaluates, possibly with NaN weights: the answers are then wrong, and nothing crashes."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16, n_exp=4)).eval()
    idx = torch.randint(0, 20, (3, 4))
    expected = idx
    with torch.no_grad():
        for _ in range(5):
            logits = model(expected[:, -8:])[0][:, -1]
            expected = torch.cat([expected, logits.argmax(dim=-1, keepdim=True)], dim=1)
        assert torch.equal(model.generate(idx, 5, top_tokens=1), expected)
        model.lm_head.weight.fill_(float('nan'))
        assert model.generate(idx, 3, top_tokens=1).shape == (3, 7)
