"""DDP on the CPU: `torchrun --standalone --nproc_per_node=2 train.py --device=cpu` (gloo)
against one process that takes the same global batch through gradient accumulation."""

import os
import subprocess
import sys

import pytest
import torch

from test_checkpoint import TINY, records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, above tests/


def torchrun(args):
    """train.py under `torchrun --standalone --nproc_per_node=2`, one thread per rank."""
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           os.path.join(REPO, 'train.py'), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'}, cwd=REPO)


def test_two_ranks_train_exactly_what_one_process_trains(runner, tiny_data, tmp_path):
    """Same losses (to 1e-5), same routing metrics (the logged counts are the global
    batch's), and the same DeepSeek-V3 bias on both ranks and in the single process:
    rank r's micro-batches are the ones one process draws for those micro-steps, and the
    dropout noise is seeded per micro-step of the global batch."""
    args = [*TINY, f'--data_dir={tiny_data}', '--router=aux_free', '--top_k=2', '--aux_free_update_rate=0.003',
            '--dropout=0.1', '--gradient_accumulation_steps=2', '--max_iters=4', '--eval_interval=4',
            '--always_save_checkpoint=True']
    one, two = tmp_path / 'one', tmp_path / 'two'
    result = runner.run([*args, f'--out_dir={one}'])
    assert result.returncode == 0, result.stderr
    ddp = torchrun([*args, f'--out_dir={two}'])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert 'DDP: all 2 ranks hold the same weights and router state' in ddp.stdout
    assert 'tokens per iteration: 128' in ddp.stdout  # 2 ranks x 1 micro-step x 4 x 16

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
