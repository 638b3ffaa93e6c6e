"""What a GPU run needs, proven on the CPU: the experts' kernel chosen for each GPU, no host
sync in the forward and backward of any router on the grouped path (and the budget of a
whole train.py step), torch.compile without graph breaks or recompiles, and a grouped GEMM
that never sees an empty group nor leaves a row of its output uninitialised.

Syncs are counted with HostSyncCounter (tests/host_syncs.py), which tracks the tensors that
a GPU run would hold on the GPU and counts every read of one back to the host."""

import json
import os
from types import SimpleNamespace

import pytest
import torch

import fast_experts
from fast_experts import GROUP_ALIGN, choose_impl, describe_impl, grouped_mm, resolve_impl
from host_syncs import HostSyncCounter
from metrics import RoutingStats
from model import GPT, Experts, GPTConfig
from routers import ROUTERS, Routing
from system import cuda_bf16_native, peak_flops
from test_routers import router_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, above tests/
needs_grouped_mm = pytest.mark.skipif(grouped_mm is None, reason=f"torch {torch.__version__} has no grouped_mm")

# every router; capacity dropping in routers that are dropless by default; null experts; the
# variable-k routers with a cap that binds; the global-batch balance loss
EXTRA_CASES = {
    'topk_capacity': ('topk', {'capacity_factor': 1.0}),
    'aux_free_capacity': ('aux_free', {'capacity_factor': 1.0}),
    'topk_null': ('topk', {'n_null_exp': 2}),
    'switch_null': ('switch', {'n_null_exp': 1}),  # top-1 with a capacity: a null slot takes no room
    'topp_capped': ('topp', {'max_k': 2, 'top_p': 0.9}),
    'remoe_capped': ('remoe', {'max_k': 2}),
    # the global-batch balance loss: its counts accumulate in a buffer over the micro-steps
    'topk_global': ('topk', {'balance_scope': 'global'}),
    'topp_global': ('topp', {'balance_scope': 'global'}),
    'switch_null_global': ('switch', {'n_null_exp': 1, 'balance_scope': 'global'}),
}
CASES = [(name, {}) for name in sorted(ROUTERS)] + list(EXTRA_CASES.values())
CASE_IDS = sorted(ROUTERS) + list(EXTRA_CASES)


def tiny_model(router, expert_impl='grouped', **overrides):
    per_token = {} if 'top_k' in ROUTERS[router].fixed else {'top_k': 2}
    config = GPTConfig(**{**dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, n_exp=4, router=router,
                                 expert_impl=expert_impl), **per_token, **overrides})
    torch.manual_seed(0)
    return GPT(config)


def tiny_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g)


# -----------------------------------------------------------------------------
# which kernel runs where


@pytest.mark.parametrize('capability, expected', [
    ((8, 0), 'loop'),    # A100: torch's grouped GEMM has no native kernel here
    ((8, 9), 'loop'),    # L4, RTX 4090
    ((9, 0), 'grouped'),  # H100, H200
    ((10, 0), 'grouped'),  # B200
    ((12, 0), 'loop'),   # RTX 5090
])
def test_auto_picks_grouped_only_where_the_kernel_is_native(capability, expected, monkeypatch):
    impl, why = describe_impl('auto', 'cuda', capability, torch.bfloat16, 768, 1536)
    assert impl == expected and f"compute capability {capability[0]}.{capability[1]}" in why
    # what a forward runs: the same choice, from the device's capability (faked here)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: capability)
    x = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device='cuda:0')
    assert resolve_impl('auto', x, torch.empty(8, 768, 1536, device='meta')) == expected


def test_auto_needs_bf16_and_aligned_rows_and_says_why():
    assert choose_impl((9, 0), bf16=False, has_grouped_mm=True, aligned=True)[0] == 'loop'
    assert choose_impl((9, 0), bf16=True, has_grouped_mm=False, aligned=True)[0] == 'loop'
    impl, why = choose_impl((9, 0), bf16=True, has_grouped_mm=True, aligned=False)
    assert impl == 'loop' and 'multiple of 8' in why
    assert describe_impl('auto', 'cpu', None, torch.float32, 32, 64)[0] == 'loop'
    # asked for explicitly: runs as asked, and the line says when the GPU has no native kernel
    impl, why = describe_impl('grouped', 'cuda', (8, 0), torch.bfloat16, 32, 64)
    assert impl == 'grouped' and 'no native grouped GEMM' in why


def test_bf16_is_picked_only_where_it_is_native(monkeypatch):
    calls = []

    def is_bf16_supported(including_emulation=True):
        calls.append(including_emulation)
        return including_emulation  # a V100: bf16 only by emulation

    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', is_bf16_supported)
    assert not cuda_bf16_native() and calls == [False]


def test_mfu_peak_is_the_gpus_own_where_known():
    assert peak_flops('NVIDIA H100 80GB HBM3')[0] == 989e12
    assert peak_flops('NVIDIA H100 PCIe')[0] == 756e12
    assert peak_flops('NVIDIA A100-SXM4-80GB')[0] == 312e12
    assert peak_flops('NVIDIA L4')[0] == 121e12 and peak_flops('NVIDIA L40S')[0] == 362e12
    flops, source = peak_flops('Some Future GPU')
    assert flops == 312e12 and "A100's" in source and 'Some Future GPU' in source
    # no MFU on a CPU: a share of an A100's peak would read as a (tiny) utilisation of the CPU
    assert peak_flops('cpu')[0] is None and peak_flops('mps')[0] is None


# -----------------------------------------------------------------------------
# the grouped GEMM: no empty group, no uninitialised row, idle experts and dropped rows exact


@needs_grouped_mm
def test_grouped_gemm_sees_no_empty_group_and_every_row_is_computed(monkeypatch):
    """Groups of 5, 0, 9 and 1 rows and 3 dropped rows after them. Every group the kernel
    gets starts on the alignment and has at least GROUP_ALIGN rows, and the last one ends
    at the buffer's end; to be sure nothing reads past the last offset, the kernel's output
    there is poisoned with NaN. The idle expert's gradient is exactly zero, and so are the
    dropped rows' outputs and gradients; everything else matches the plain loop."""
    seen = []

    def checked_grouped_mm(a, b, offs):
        seen.append(offs.tolist())
        y = grouped_mm(a, b, offs=offs)
        return torch.cat([y[:offs[-1]], torch.full_like(y[offs[-1]:], float('nan'))])

    monkeypatch.setattr(fast_experts, 'grouped_mm', checked_grouped_mm)
    torch.manual_seed(6)
    experts = Experts(GPTConfig(vocab_size=37, block_size=16, n_layer=1, n_head=1, n_embd=32, n_exp=4,
                                expert_hidden=48))
    counts = torch.tensor([5, 0, 9, 1])
    x = torch.randn(18, 32)  # 15 rows in groups, 3 dropped
    results = {}
    for impl in ('plain', 'grouped'):
        experts.impl = impl
        experts.zero_grad(set_to_none=True)
        x_in = x.clone().requires_grad_()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=impl == 'plain'):
            y = experts(x_in, counts)
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results[impl] = [y.float(), x_in.grad, experts.w_fc.grad, experts.w_proj.grad]
    assert len(seen) == 2  # the two GEMMs of the forward (the backward is torch's, with the same offsets)
    for offs in seen:
        sizes = [b - a for a, b in zip([0] + offs[:-1], offs)]
        assert min(sizes) >= GROUP_ALIGN and all(o % GROUP_ALIGN == 0 for o in offs[:-1])
    y, grad_x, grad_fc, grad_proj = results['grouped']
    assert all(torch.isfinite(t).all() for t in results['grouped'])
    assert torch.all(grad_fc[1] == 0) and torch.all(grad_proj[1] == 0)  # the expert without rows
    assert torch.all(y[15:] == 0) and torch.all(grad_x[15:] == 0)  # the dropped rows
    for got, expected in zip(results['grouped'], results['plain']):
        torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)


# -----------------------------------------------------------------------------
# host syncs


@needs_grouped_mm
@pytest.mark.parametrize('name, extra', CASES, ids=CASE_IDS)
def test_no_host_sync_in_forward_and_backward_on_the_grouped_path(name, extra):
    model = tiny_model(name, **extra).train()
    X, Y = tiny_batch()
    with HostSyncCounter('cpu').mark(model, X, Y) as counter:
        for keep_expert_out in (False, True):  # a step, and a logging step
            _, lm_loss, router_losses, _ = model(X, Y, keep_expert_out=keep_expert_out)
            (lm_loss + sum(router_losses.values())).backward()
    assert counter.events == []


def test_the_counter_sees_what_waits_for_the_device():
    """The counter must be able to fail: the loop path reads the group sizes (one sync a
    layer), and a boolean mask, .item() and .tolist() of a device tensor count; reading
    a host tensor (a batch's offsets) does not, nor does a number already read back."""
    model = tiny_model('topk', expert_impl='loop')
    X, Y = tiny_batch()
    offsets = torch.randint(0, 100, (4,))
    with HostSyncCounter('cpu').mark(model, X, Y) as counter:
        _, lm_loss, _, routings = model(X, Y)
        assert counter.count() == 2 and counter.events[0][1][0][0] == 'fast_experts.py'
        lm_loss.item()
        routings[0].expert_idx[routings[0].weight > 0.5]
        host = routings[0].load().cpu()
        [int(i) for i in offsets] + host.tolist()
    assert [what for what, _ in counter.events[2:]] == ['aten._local_scalar_dense', 'aten.index', 'Tensor.cpu']


@pytest.mark.parametrize('name, extra', CASES, ids=CASE_IDS)
def test_a_logging_steps_metrics_are_read_back_in_one_transfer(name, extra):
    """Everything RoutingStats logs (every metric, the expert x label table, the gate
    similarity) is accumulated on the device and read back by one copy."""
    model = tiny_model(name, **extra).train()
    X, Y = tiny_batch()
    labels = X % 3
    stats = RoutingStats(['a', 'b', 'c'])
    with HostSyncCounter('cpu').mark(model, X, Y, labels) as counter:
        _, lm_loss, router_losses, routings = model(X, Y, keep_expert_out=True)
        stats.add(routings, router_losses, labels=labels)
        assert counter.events == []
        host, numbers = stats.to_host(lm_loss=lm_loss)
        rows, losses = host.summary(tables=True), host.loss_summary()
    assert counter.count() == 1 and counter.events[0][0] == 'Tensor.cpu'
    assert numbers['lm_loss'] == pytest.approx(lm_loss.item())
    assert rows == stats.summary(tables=True) and losses == stats.loss_summary()
    assert [row['layer'] for row in rows] == [0, 1] and 'specialization' in rows[0]


DRIVER = '''
import json, runpy, sys
from host_syncs import HostSyncCounter
events_path, script = sys.argv[1], sys.argv[2]
sys.argv = [script, *sys.argv[3:]]
counter = HostSyncCounter('cpu')
try:
    with counter:
        runpy.run_path(script, run_name='__main__')
finally:
    with open(events_path, 'w') as f:
        json.dump(counter.events, f)
'''


@needs_grouped_mm
@pytest.mark.parametrize('router_args', [['--router=aux_free', '--capacity_factor=1.0'], ['--router=remoe']],
                         ids=['aux_free_capacity', 'remoe'])
def test_a_train_py_step_syncs_once_and_a_logging_step_reads_back_once(runner, tiny_data, tmp_path, router_args):
    """The real train.py under the counter, 6 steps of 2 micro-steps, a log every 3. Every
    sync in a training step (from its first line to `iter_num += 1`) is listed in order:
    the finiteness check once a step, and on the logging steps (0 and 3) one read-back.
    aux_free with a capacity: pairs are dropped, and its bias moves after every step;
    remoe: empty slots, and its L1 coefficient moves after every step."""
    driver, events_path = tmp_path / 'count_syncs.py', tmp_path / 'events.json'
    driver.write_text(DRIVER)
    result = runner.run([str(events_path), os.path.join(REPO, 'train.py'), '--device=cpu', '--n_layer=2', '--n_head=2',
                         '--n_embd=32', '--n_exp=4', '--batch_size=4', '--block_size=16', '--eval_iters=2',
                         '--warmup_iters=2', f'--data_dir={tiny_data}', f'--out_dir={tmp_path / "out"}',
                         '--max_iters=6', '--log_interval=3', '--eval_interval=100', '--gradient_accumulation_steps=2',
                         '--expert_impl=grouped', *router_args],
                        script=str(driver))
    assert result.returncode == 0, result.stderr
    assert 'experts: grouped' in result.stdout
    source = open(os.path.join(REPO, 'train.py')).read().splitlines()
    first = next(i for i, line in enumerate(source) if line.startswith('    # forward, backward, update')) + 1
    last = next(i for i, line in enumerate(source) if line == '    iter_num += 1') + 1
    in_step = []
    for what, frames in json.load(open(events_path)):
        line = next(lineno for file, lineno, function in reversed(frames) if file == 'train.py')
        if first <= line <= last:
            in_step.append(source[line - 1].strip().split(' = ')[0])
    finite, read_back = 'finite', 'host_stats, host'
    assert in_step == [finite, read_back, finite, finite, finite, read_back, finite, finite]


# -----------------------------------------------------------------------------
# torch.compile


@needs_grouped_mm
@pytest.mark.parametrize('name, extra', CASES, ids=CASE_IDS)
def test_every_router_compiles_without_graph_breaks_on_the_grouped_path(name, extra):
    """A logging step's forward (the expert outputs kept too, the larger graph) and the
    backward; gatepro's test below compiles the plain step."""
    model = tiny_model(name, n_layer=1, **extra).train()
    X, Y = tiny_batch()

    def step(X, Y):
        _, lm_loss, router_losses, routings = model(X, Y, keep_expert_out=True)
        return lm_loss + sum(router_losses.values()), routings

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend='eager')  # fullgraph: a graph break is an error
    torch.manual_seed(2)  # the same router noise (noisy_topk, switch's jitter) in both
    loss, routings = compiled(X, Y)
    loss.backward()
    torch.manual_seed(2)
    expected, expected_routings = step(X, Y)
    torch.testing.assert_close(loss, expected)
    assert torch.equal(routings[0].expert_out, expected_routings[0].expert_out)


@needs_grouped_mm
def test_gatepro_compiles_once_while_its_window_opens_and_closes():
    """Steps 0-6 with the competition on for steps 2 and 3 only: one graph for all of them,
    and every step routes as the eager model does at that step (the window is applied)."""
    model = tiny_model('gatepro', n_layer=1, gatepro_start_iter=2, gatepro_end_iter=4).train()
    X, Y = tiny_batch()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend='eager')
    choices = []
    for iter_num in range(7):
        routing = compiled(X, Y)[3][0]
        assert torch.equal(routing.expert_idx, model(X, Y)[3][0].expert_idx)
        choices.append(routing.expert_idx)
        model.step_finished(iter_num, {layer: torch.zeros(4, dtype=torch.long) for layer, _ in model.moe_layers()})
    assert torch._dynamo.utils.counters['stats']['unique_graphs'] == 1
    assert not torch.equal(choices[1], choices[2]) and torch.equal(choices[1], choices[4])  # on at 2, off at 4


@pytest.mark.skipif(grouped_mm is None, reason=f"torch {torch.__version__} has no grouped_mm")
def test_calibration_compiles_to_one_graph_and_reads_nothing_back():
    torch.manual_seed(0)
    config = router_config(router='ortho_var', n_layer=1, n_embd=16, n_exp=4, top_k=2, expert_impl='grouped',
                           ortho_loss_target=1e-4, var_loss_target=1e-3)
    model, eager = GPT(config), GPT(config)
    eager.load_state_dict(model.state_dict())
    batches = [torch.randint(0, 50, (2, 16)) for _ in range(2)]
    with HostSyncCounter('cpu').mark(eager, *batches) as counter:
        expected = []
        for X in batches:
            _, lm_loss, router_losses, _ = eager(X, X)
            (lm_loss + sum(router_losses.values())).backward()
            expected.append(router_losses)
    assert counter.events == []
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend='eager')
    got = [compiled(X, X)[2] for X in batches]  # calibrates in the first call, keeps it in the second
    assert torch._dynamo.utils.counters['stats']['unique_graphs'] == 1
    assert got[0]['ortho'].item() == pytest.approx(1e-4) and got[0]['var'].item() == pytest.approx(-1e-3)
    assert got[1]['var'].item() != pytest.approx(-1e-3, rel=1e-4)  # another batch, step 0's gamma
    for losses, eager_losses in zip(got, expected):
        assert losses['ortho'].item() == pytest.approx(eager_losses['ortho'].item())
        assert losses['var'].item() == pytest.approx(eager_losses['var'].item())


def test_gatepro_loads_a_checkpoint_that_kept_its_count_as_extra_state():
    model = tiny_model('gatepro', gatepro_start_iter=3)
    state = model.state_dict()
    for layer in (0, 1):  # how checkpoints wrote GatePro's step count before it was a buffer
        state[f'transformer.h.{layer}.ffn.router._extra_state'] = 5
        del state[f'transformer.h.{layer}.ffn.router.iter_num']
    model.load_state_dict(state)
    assert all(moe.router.iter_num.item() == 5 and moe.router.competing() for _, moe in model.moe_layers())


# -----------------------------------------------------------------------------
# the GPU check itself, as a dry run on the CPU


@needs_grouped_mm
def test_the_gpu_check_runs_dry_on_the_cpu(runner):
    result = runner.run(['--gpu_check=True', '--device=cpu', '--steps=1', '--warmup=0'], script='bench.py')
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stdout.rstrip().endswith('gpu_check: all ok')
    report = json.loads(result.stdout.splitlines()[-2])
    assert set(report['routers']) == set(ROUTERS) | {'topk +capacity'}
    assert all(r['counted_syncs'] == 0 and r['grouped_error'] <= 3e-2 for r in report['routers'].values())
    assert set(report['timings_ms']) == {'4', '8'}  # DRY_SHAPE's expert counts


def test_metrics_of_dropped_pairs_equal_those_of_the_kept_pairs_alone():
    """A Routing that keeps its dropped pairs in place (weight 0, kept False) must give the
    metrics that the kept pairs alone give: load, dropped_frac, pair co-activation,
    specialization (top-1 expert by label), and top_expert itself."""
    torch.manual_seed(4)
    n_tokens, n_exp = 6, 4
    logits = torch.randn(n_tokens, n_exp)
    token_idx = torch.arange(n_tokens).repeat(2)
    expert_idx = torch.topk(logits, 2).indices.t().reshape(-1)
    weight = torch.rand(2 * n_tokens)
    kept = torch.tensor([1, 1, 0, 1, 1, 0, 1, 0, 1, 1, 0, 0], dtype=torch.bool)  # token 5 keeps nothing
    gate = torch.randn(n_exp, 8)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    in_place = Routing(token_idx, expert_idx, torch.where(kept, weight, 0.0), logits, gate_weight=gate, kept=kept)
    selected = Routing(token_idx[kept], expert_idx[kept], weight[kept], logits, gate_weight=gate)
    assert torch.equal(in_place.top_expert(n_tokens), selected.top_expert(n_tokens))
    assert in_place.top_expert(n_tokens)[5] == -1
    rows = {}
    for name, routing in (('in place', in_place), ('selected', selected)):
        stats = RoutingStats(['a', 'b', 'c'])
        stats.add({0: routing}, labels=labels)
        rows[name] = stats.summary(tables=True)[0]
    expected = rows['selected']
    expected['dropped_frac'] = 5 / 12  # the selection alone cannot know what was dropped: 5 of the 12 pairs
    assert_nested_close(rows['in place'], expected)


def assert_nested_close(got, expected, where='row'):
    """Field by field through nested dicts and lists, each number within pytest.approx's default
    tolerance (pytest 9.2 refuses approx() on a dict that holds lists)."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), where
        for key in expected:
            assert_nested_close(got[key], expected[key], f'{where}[{key!r}]')
    elif isinstance(expected, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_nested_close(g, e, f'{where}[{i}]')
    else:
        assert got == pytest.approx(expected), where
