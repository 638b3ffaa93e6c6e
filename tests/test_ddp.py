"""DDP on the CPU: `torchrun --standalone --nproc_per_node=2 train.py --device=cpu` (gloo)
against one process that takes the same global batch through gradient accumulation."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import system
from test_checkpoint import TINY, records
from test_faults import make_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, above tests/


def torchrun(args):
    """train.py under `torchrun --standalone --nproc_per_node=2`, one thread per rank."""
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           os.path.join(REPO, 'train.py'), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'}, cwd=REPO)


def one_process_and_two_ranks(runner, args, tmp_path, tokens_per_iter):
    """The same run in one process and under torchrun on 2 ranks (tmp_path/one, tmp_path/two),
    both finished, the ranks holding one model at the end."""
    one, two = tmp_path / 'one', tmp_path / 'two'
    result = runner.run([*args, f'--out_dir={one}'])
    assert result.returncode == 0, result.stderr
    ddp = torchrun([*args, f'--out_dir={two}'])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert 'DDP: all 2 ranks hold the same weights and router state' in ddp.stdout
    assert f'tokens per iteration: {tokens_per_iter:,}' in ddp.stdout
    return one, two


def test_two_ranks_train_exactly_what_one_process_trains(runner, tiny_data, tmp_path):
    """Same losses (to 1e-5), same routing metrics (the logged counts are the global
    batch's), and the same DeepSeek-V3 bias on both ranks and in the single process:
    rank r's micro-batches are the ones one process draws for those micro-steps, and the
    dropout noise is seeded per micro-step of the global batch."""
    args = [*TINY, f'--data_dir={tiny_data}', '--router=aux_free', '--top_k=2', '--aux_free_update_rate=0.003',
            '--dropout=0.1', '--gradient_accumulation_steps=2', '--max_iters=4', '--eval_interval=4',
            '--always_save_checkpoint=True']
    one, two = one_process_and_two_ranks(runner, args, tmp_path, 128)  # 2 ranks x 1 micro-step x 4 x 16

    expected, got = records(one), records(two)
    assert [(r['split'], r['iter']) for r in got] == [(r['split'], r['iter']) for r in expected]
    for e, g in zip(expected, got):
        where = (e['split'], e['iter'])
        assert g['loss'] == pytest.approx(e['loss'], abs=1e-5), where
        assert g['losses'].keys() == e['losses'].keys()
        for name in e['losses']:
            assert g['losses'][name] == pytest.approx(e['losses'][name], abs=1e-5), (where, name)
        for le, lg in zip(e['layers'], g['layers']):  # counted over the global batch, not rank 0's half
            assert lg['load'] == pytest.approx(le['load'], abs=1e-6), where
            assert lg['router_entropy'] == pytest.approx(le['router_entropy'], abs=1e-5), where
    a = torch.load(one / 'ckpt.pt', weights_only=True)['model']
    b = torch.load(two / 'ckpt.pt', weights_only=True)['model']
    bias = [k for k in a if k.endswith('expert_bias')][0]
    assert a[bias].abs().sum() > 0 and torch.allclose(a[bias], b[bias], atol=1e-6)
    for key in a:
        if torch.is_tensor(a[key]) and a[key].is_floating_point():
            assert torch.allclose(a[key], b[key], atol=1e-5), key


def test_loss_targets_give_every_rank_the_same_coefficients(tiny_data, tmp_path):
    """ortho_loss_target and var_loss_target set each coefficient on the first training
    forward, and each rank sees its own micro-batch there: without sharing rank 0's
    coefficients afterwards the ranks would train different models (and the end-of-run
    check fails the run)."""
    ddp = torchrun([*TINY, f'--data_dir={tiny_data}', '--router=topk', '--top_k=2', '--ortho_loss_target=1e-4',
                    '--var_loss_target=1e-3', '--gradient_accumulation_steps=2', '--max_iters=3', '--eval_interval=3',
                    '--always_save_checkpoint=True', f'--out_dir={tmp_path}'])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert 'DDP: all 2 ranks hold the same weights and router state' in ddp.stdout
    state = torch.load(tmp_path / 'ckpt.pt', weights_only=True)['model']
    scales = {k: v for k, v in state.items() if k.endswith('_loss_scale')}
    assert len(scales) == 2 * sum(k.endswith('ortho_loss_scale') for k in scales) > 0
    assert all(v > 0 for v in scales.values())


def test_the_bias_moves_the_same_on_every_rank_between_log_steps(runner, tiny_data, tmp_path):
    """With log_interval > 1 most steps log nothing, and on those only the load counts are
    summed over the ranks: DeepSeek-V3's bias must still move by the global batch's load,
    the same on both ranks and as in one process. Two micro-steps per rank also pin that
    the noise index of rank r's micro-step m is r * accumulation + m (with one micro-step
    per rank, as above, r + m gives the same indices)."""
    args = [*TINY, f'--data_dir={tiny_data}', '--log_interval=4', '--router=aux_free', '--top_k=2',
            '--aux_free_update_rate=0.003', '--dropout=0.1', '--gradient_accumulation_steps=4', '--max_iters=8',
            '--eval_interval=8', '--always_save_checkpoint=True']
    one, two = one_process_and_two_ranks(runner, args, tmp_path, 256)  # 2 ranks x 2 micro-steps x 4 x 16

    # iterations 0 and 4 log, the six others do not (on some of those, a rank's own half of
    # the batch would move the bias another way than the whole batch does)
    expected, got = records(one), records(two)
    assert [(r['split'], r['iter']) for r in got] == [('val', 0), ('train', 0), ('train', 4), ('val', 8)]
    assert [(r['split'], r['iter']) for r in expected] == [(r['split'], r['iter']) for r in got]
    for e, g in zip(expected, got):
        assert g['loss'] == pytest.approx(e['loss'], abs=1e-5), (e['split'], e['iter'])
    a = torch.load(one / 'ckpt.pt', weights_only=True)['model']
    b = torch.load(two / 'ckpt.pt', weights_only=True)['model']
    biases = [k for k in a if k.endswith('expert_bias')]
    assert biases and all(a[k].abs().sum() > 0 for k in biases)
    for k in biases:
        # each step adds +-0.003 (or 0) per expert: when every step's sign agrees the two
        # float32 sums of 8 steps agree to ~1e-9; one sign that differs moves an entry by
        # at least 0.003. 1e-6 lies between.
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), (k, a[k], b[k])


def test_each_micro_step_draws_its_own_dropout(runner, tmp_path):
    """The micro-steps of one step draw different dropout masks (each seeds the noise with
    its own index in the global batch), not one mask repeated. On a stream of one repeated
    token every micro-batch is the same rows, so the first step's logged loss with two
    micro-steps, (L0 + L1) / 2, equals the one-micro-step run's L0 exactly without dropout
    (the control: same model, same rows), and differs from it with dropout only because
    micro-step 1 drew a mask of its own (a repeated mask gives (L0 + L0) / 2 = L0 exactly)."""
    data = make_dataset(tmp_path / 'data', np.full(400, 5), np.full(400, 5))

    def first_loss(accumulation, dropout):
        out = tmp_path / f'out_{accumulation}_{dropout}'
        result = runner.run([*TINY, f'--data_dir={data}', '--router=topk', f'--dropout={dropout}',
                             f'--gradient_accumulation_steps={accumulation}', '--max_iters=1',
                             '--eval_interval=1000', f'--out_dir={out}'])
        assert result.returncode == 0, result.stderr
        return [r['loss'] for r in records(out) if r['split'] == 'train' and r['iter'] == 0][0]

    assert first_loss(2, 0.0) == first_loss(1, 0.0)  # x/2 + x/2 == x exactly in floating point
    assert first_loss(2, 0.1) != first_loss(1, 0.1)


# -----------------------------------------------------------------------------
# DDPSync's collectives, called directly: a stand-in for torch.distributed plays the
# other rank and hands back what it would send


class Replica(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))
        self.register_buffer('expert_bias', torch.zeros(4))


def sent_by(model, monkeypatch):
    """What a rank holding `model` sends in replicas_differ's all_gather_object."""
    sent = []

    def all_gather_object(out, obj):
        sent.append(obj)
        out[:] = [obj]

    monkeypatch.setattr(system.dist, 'get_world_size', lambda: 1)
    monkeypatch.setattr(system.dist, 'all_gather_object', all_gather_object)
    system.replicas_differ(model)
    return sent[0]


def differ_on_rank0(model, rank1_sends, monkeypatch):
    def all_gather_object(out, obj):
        out[:] = [obj, rank1_sends]

    monkeypatch.setattr(system.dist, 'get_world_size', lambda: 2)
    monkeypatch.setattr(system.dist, 'all_gather_object', all_gather_object)
    return system.replicas_differ(model)


def test_replicas_differ_names_exactly_the_entries_another_rank_holds_differently(monkeypatch):
    """The end-of-run check compares every rank's state with rank 0's, bit for bit: one
    ulp off in one buffer is named (and nothing else), equal replicas name nothing."""
    rank1 = Replica()
    with torch.no_grad():
        rank1.expert_bias[2] = torch.nextafter(torch.tensor(0.0), torch.tensor(1.0))  # the smallest step off 0
    assert differ_on_rank0(Replica(), sent_by(rank1, monkeypatch), monkeypatch) == ['expert_bias']
    assert differ_on_rank0(Replica(), sent_by(Replica(), monkeypatch), monkeypatch) == []


def test_loss_scales_are_shared_again_until_every_one_is_calibrated(monkeypatch):
    """Rank 1's side: it takes rank 0's coefficients (a 0 too), and as long as one of them
    is still 0 (not calibrated: a loss of exactly 0 sets nothing) DDPSync shares again
    after the next step; once all are set it stops, on every rank at once (the values
    it decides on are rank 0's)."""
    rank0_holds = [torch.tensor([0.5, 0.0]), torch.tensor([0.5, 0.25])]  # after step 1: one still 0; step 2: both
    sources = []

    def broadcast(tensor, src):  # rank 1 receives what rank 0 holds at this step
        tensor.copy_(rank0_holds[len(sources)] if src == 0 else tensor)
        sources.append(src)

    monkeypatch.setattr(system.dist, 'broadcast', broadcast)
    model = torch.nn.Module()
    model.register_buffer('ortho_loss_scale', torch.tensor(0.75))  # rank 1's own calibrations, to be replaced
    model.register_buffer('var_loss_scale', torch.tensor(0.125))
    sync = system.DDPSync(ddp=True, world_size=2, device='cpu', master_process=False)
    sync.share_router_state(model)
    assert (model.ortho_loss_scale.item(), model.var_loss_scale.item()) == (0.5, 0.0)
    assert sync.loss_scales_pending
    sync.share_router_state(model)
    assert (model.ortho_loss_scale.item(), model.var_loss_scale.item()) == (0.5, 0.25)
    assert not sync.loss_scales_pending
    sync.share_router_state(model)  # nothing left to share: no third broadcast
    assert sources == [0, 0]


def test_a_step_that_logs_nothing_sums_remoes_positive_gates_over_the_ranks(monkeypatch):
    """On a step that logs nothing only the counts the routers learn from travel between
    the ranks, in one all_reduce: every layer's load and, for ReMoE, its positive gates
    (what its coefficient reads: a rank's own half would step lambda on half the batch)."""
    from metrics import RoutingStats
    from routers import Routing
    calls = []

    def all_reduce(tensor):  # rank 1 holds 100 in every entry
        calls.append(tensor.shape)
        tensor += 100

    monkeypatch.setattr(system.dist, 'all_reduce', all_reduce)
    # layer 0 a top-1 router; layer 1 ReMoE-like: 2 tokens, 4 experts, its slots and its positive gates
    top1 = Routing(torch.tensor([0, 1]), torch.tensor([2, 2]), torch.ones(2), torch.zeros(2, 4))
    relu = Routing(torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 3, 2]), torch.ones(4), torch.zeros(2, 4),
                   used=torch.tensor([True, True, True, False]), active_gates=torch.tensor([1, 1, 1, 2]))
    stats = RoutingStats()
    stats.add({0: top1, 1: relu}, full=False)
    sync = system.DDPSync(ddp=True, world_size=2, device='cpu', master_process=False)
    sync.global_batch(stats, torch.tensor(1.0), log_step=False, finite=True)
    # one all_reduce of 3 rows of E = 4: the two layers' loads, then layer 1's positive gates
    assert calls == [torch.Size([3, 4])]
    assert stats.load_counts()[0].tolist() == [100, 100, 102, 100]  # this rank's load (0, 0, 2, 0) + rank 1's
    assert stats.load_counts()[1].tolist() == [101, 101, 100, 101]  # the used slots: experts 0, 1, 3
    assert stats.router_counts()[1].tolist() == [101, 101, 101, 102]  # its positive gates (1, 1, 1, 2) + 100
    assert stats.router_counts()[0].tolist() == [100, 100, 102, 100]  # top-1 learns from its load


# -----------------------------------------------------------------------------
# the global-batch balance loss: f counts every rank's micro-batch

GLOBAL_BALANCE_CHECK = '''
import json, os, sys
import torch
import torch.distributed as dist
from model import GPTConfig
from routers import build_router

dist.init_process_group('gloo')
rank = dist.get_rank()
# E = 2, top-1, aux_loss_coef = 1, gate = identity on h = log(probs): each rank's micro-batches
batches = {0: [[[0.9, 0.1], [0.6, 0.4]], [[0.7, 0.3], [0.4, 0.6]]],
           1: [[[0.2, 0.8], [0.3, 0.7]], [[0.8, 0.2], [0.9, 0.1]]]}[rank]
router = build_router(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=1, n_embd=2, n_exp=2, top_k=1,
                                aux_loss_coef=1.0, z_loss_coef=0.0, balance_scope='global'))
with torch.no_grad():
    router.gate.weight.copy_(torch.eye(2))
compiled = torch.compile(router, fullgraph=True, backend='eager')  # a graph break would be an error
losses = {}
for name, run in (('eager', router), ('compiled', compiled)):
    losses[name] = [run(torch.tensor(probs).log()).losses['aux'].item() for probs in batches]
    router.start_global_batch()  # the optimizer step between
    losses[name].append(run(torch.tensor(batches[0]).log()).losses['aux'].item())  # the next step's first
    router.start_global_batch()
gathered = [None, None]
dist.all_gather_object(gathered, losses)
if rank == 0:
    with open(sys.argv[1], 'w') as f:
        json.dump(gathered, f)
dist.barrier()  # leave together: gloo torn down while the other rank still talks can abort at exit
dist.destroy_process_group()
# and skip the interpreter's teardown: with everything done, a process here still sometimes
# aborts in it ("terminate called without an active exception"), failing torchrun
os._exit(0)
'''


def test_the_global_balance_loss_counts_every_ranks_micro_batches(tmp_path):
    """Two ranks (gloo), two micro-steps each: at micro-step m every rank's f counts
    micro-steps 1..m of both ranks, P its own micro-batch; the all_reduce is a functional
    collective, so the router also compiles under DDP without a graph break."""
    script, out = tmp_path / 'global_balance.py', tmp_path / 'losses.json'
    script.write_text(GLOBAL_BALANCE_CHECK)
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             str(script), str(out)], capture_output=True, text=True, timeout=120, cwd=REPO,
                            env={**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': REPO})
    assert result.returncode == 0, result.stderr[-3000:]
    # micro-step 1: rank 0 (.9, .1), (.6, .4): experts 0, 0, P = (.75, .25)
    #               rank 1 (.2, .8), (.3, .7): experts 1, 1, P = (.25, .75)
    #   counts (2, 2), f = (.5, .5): rank 0 2 * (.5*.75 + .5*.25) = 1.0, rank 1 the same
    #   (each rank's own micro-batch alone: f = (1, 0) or (0, 1), 2 * .75 = 1.5 on both)
    # micro-step 2: rank 0 (.7, .3), (.4, .6): experts 0, 1, P = (.55, .45)
    #               rank 1 (.8, .2), (.9, .1): experts 0, 0, P = (.85, .15)
    #   counts (2, 2) + (3, 1) = (5, 3), f = (5/8, 3/8): rank 0 2 * (5/8*.55 + 3/8*.45) = 1.025
    #                                                    rank 1 2 * (5/8*.85 + 3/8*.15) = 1.175
    # the next step's micro-step 1 (the buffer emptied): 1.0 again on both
    expected = [[1.0, 1.025, 1.0], [1.0, 1.175, 1.0]]
    gathered = json.loads(out.read_text())
    for rank, losses in enumerate(gathered):
        for name in ('eager', 'compiled'):
            assert losses[name] == pytest.approx(expected[rank], abs=1e-6), (rank, name)
