"""What train.py refuses before training (token ids outside the vocabulary, .bin files that
are not whole uint16 ids) and what it does with a non-finite loss: stop with one line and
keep the last checkpoint, or skip the step and count it. End to end through forkrun's
runner; the router-level finiteness tests are in test_routers.py."""

import pickle
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from checkpoint import starting_point
from dataset import DATA, check_tokens, open_dataset, seed_for
from faults import NonFiniteGuard
from metrics import RoutingStats
from model import GPTConfig
from routers import build_router
from test_checkpoint import TINY, assert_one_line_error, records, without_times

VOCAB = sorted('abcdefgh ijk\n')  # 13 symbols, as the tiny dataset


def make_dataset(path, train, val, vocab_size=len(VOCAB), meta=True):
    path.mkdir()
    np.asarray(train, dtype=np.uint16).tofile(path / 'train.bin')
    np.asarray(val, dtype=np.uint16).tofile(path / 'val.bin')
    if meta:
        stoi = {c: i for i, c in enumerate(VOCAB[:vocab_size])}
        with open(path / 'meta.pkl', 'wb') as f:
            pickle.dump({'vocab_size': vocab_size, 'stoi': stoi, 'itos': {i: c for c, i in stoi.items()}}, f)
    return path


# -----------------------------------------------------------------------------
# data that does not fit


def test_token_ids_outside_the_vocabulary_are_refused_before_training(runner, tmp_path):
    ids = np.arange(5000) % 13
    bad = ids.copy()
    bad[4321] = 20
    for split, (train, val) in {'train': (bad, ids), 'val': (ids, bad)}.items():
        data = make_dataset(tmp_path / f'bad_{split}', train, val)
        result = runner.run([*TINY, f'--data_dir={data}', f'--out_dir={tmp_path / "out"}'])
        assert_one_line_error(result, str(data / f'{split}.bin'), 'token id 20', 'vocabulary has 13 ids',
                              str(data / 'meta.pkl'))
    # no meta.pkl: GPT-2's padded vocabulary, 50304
    data = make_dataset(tmp_path / 'no_meta', ids, np.full(5000, 60000), meta=False)
    result = runner.run([*TINY, f'--data_dir={data}', f'--out_dir={tmp_path / "out"}'])
    assert_one_line_error(result, str(data / 'val.bin'), 'token id 60000', 'no meta.pkl: vocab_size=50304')
    assert not (tmp_path / 'out').exists()


def test_a_bin_file_with_an_odd_number_of_bytes_is_refused(runner, tmp_path):
    data = make_dataset(tmp_path / 'data', np.arange(5000) % 13, np.arange(5000) % 13)
    with open(data / 'train.bin', 'ab') as f:
        f.write(b'\x00')
    result = runner.run([*TINY, f'--data_dir={data}', f'--out_dir={tmp_path / "out"}'])
    assert_one_line_error(result, str(data / 'train.bin'), '10001 bytes, an odd number')
    assert not (tmp_path / 'out').exists()


def test_a_token_id_equal_to_the_vocabulary_size_is_refused(tmp_path):
    """Ids run 0 .. vocab_size - 1: the id vocab_size itself is one past the embedding."""
    path = tmp_path / 'train.bin'
    np.array([0, 5, 12, 3], dtype=np.uint16).tofile(path)
    assert check_tokens(str(path), 13, 'meta.pkl') == 4  # 12, the largest id of 13, fits
    np.array([0, 5, 13, 3], dtype=np.uint16).tofile(path)
    with pytest.raises(ValueError, match='holds token id 13, but the vocabulary has 13 ids'):
        check_tokens(str(path), 13, 'meta.pkl')


# -----------------------------------------------------------------------------
# non-finite losses


def test_a_non_finite_loss_stops_with_one_line_and_keeps_the_last_checkpoint(runner, tiny_data, tmp_path):
    out_dir = tmp_path / 'out'
    args = [*TINY, f'--data_dir={tiny_data}', f'--out_dir={out_dir}']
    result = runner.run([*args, '--max_iters=4', '--eval_interval=4'])
    assert result.returncode == 0, result.stderr
    ckpt_before = (out_dir / 'ckpt.pt').read_bytes()
    # a learning rate of 1e10: step 4 still sees finite weights, its update makes step 5 NaN
    result = runner.run([*args, '--init_from=resume', '--max_iters=20', '--eval_interval=2', '--learning_rate=1e10'])
    assert_one_line_error(result, 'non-finite loss at iter 5: loss nan, aux nan, z nan',
                          'first non-finite router logits in layer 0',
                          f'{out_dir / "ckpt.pt"} (iter 4) is kept', code=1)
    assert (out_dir / 'ckpt.pt').read_bytes() == ckpt_before
    assert [r['iter'] for r in records(out_dir) if r['split'] == 'train'] == [0, 1, 2, 3, 4]


def poisoned_expert_setup(tmp_path, runner):
    """A hash-routed model, and data in which one rare token (the only one hashed to expert
    `bad`) appears in some training batches. The checkpoint's expert `bad` is then set to
    inf: any batch with the rare token gives a NaN loss, every other batch is fine."""
    config = GPTConfig(router='hash', n_exp=4, vocab_size=len(VOCAB), n_layer=1, n_head=2, n_embd=16, block_size=16)
    expert_of = build_router(config).expert_of_token.tolist()
    bad = min(set(expert_of), key=expert_of.count)
    rare = expert_of.index(bad)
    common = [t for t in range(len(VOCAB)) if expert_of[t] != bad]
    rng = np.random.default_rng(1)
    train = rng.choice(common, 20_000)
    train[rng.choice(20_000, 200, replace=False)] = rare
    data = make_dataset(tmp_path / 'data', train, rng.choice(common, 4_000))
    out_dir = tmp_path / 'out'
    args = [*TINY, '--router=hash', f'--data_dir={data}', f'--out_dir={out_dir}', '--eval_interval=2',
            '--always_save_checkpoint=True']
    result = runner.run([*args, '--max_iters=2'])
    assert result.returncode == 0, result.stderr
    ckpt = torch.load(out_dir / 'ckpt.pt', weights_only=True)
    for name in ('transformer.h.0.ffn.experts.w_fc', 'transformer.h.0.ffn.experts.w_proj'):
        ckpt['model'][name][bad] = float('inf')
    torch.save(ckpt, out_dir / 'ckpt.pt')

    def has_rare(it):  # train.py's sampling (one process, no accumulation): does step it see the rare token?
        generator = torch.Generator().manual_seed(seed_for(1337, it, DATA))
        offsets = torch.randint(len(train) - 16, (1, 4), generator=generator)[0]
        return any(rare in train[i:i + 16] for i in offsets.tolist())

    return args, out_dir, has_rare, bad


def test_skip_nonfinite_skips_exactly_the_bad_steps_and_counts_them(runner, tmp_path):
    args, out_dir, has_rare, bad = poisoned_expert_setup(tmp_path, runner)
    ckpt_before = (out_dir / 'ckpt.pt').read_bytes()
    bad_steps = [it for it in range(2, 14) if has_rare(it)]
    assert 2 <= len(bad_steps) <= 10, bad_steps  # the data makes some steps bad, not all

    # without --skip_nonfinite: one line at the first bad step; the router's logits were fine
    result = runner.run([*args, '--init_from=resume', '--max_iters=14', '--eval_interval=100'])
    assert_one_line_error(result, f'non-finite loss at iter {bad_steps[0]}: loss nan',
                          'router logits finite in every layer', '(iter 2) is kept', code=1)
    assert (out_dir / 'ckpt.pt').read_bytes() == ckpt_before

    # with it: those steps are skipped (no update, no train line), the others train
    (out_dir / 'ckpt.pt').write_bytes(ckpt_before)
    with open(out_dir / 'metrics.jsonl', 'w') as f:  # the log as the poisoned checkpoint's run left it
        f.write('')
    result = runner.run([*args, '--init_from=resume', '--max_iters=14', '--skip_nonfinite=True'])
    assert result.returncode == 0, result.stderr
    skipped = [int(line.split()[4].rstrip(':')) for line in result.stdout.splitlines() if 'step skipped' in line]
    assert skipped == bad_steps
    train = [r for r in records(out_dir) if r['split'] == 'train']
    assert [r['iter'] for r in train] == [it for it in range(2, 14) if it not in bad_steps]
    for r in train:
        assert np.isfinite(r['loss']) and r['skipped_steps'] == sum(it <= r['iter'] for it in bad_steps)
    ckpt = torch.load(out_dir / 'ckpt.pt', weights_only=True)  # the val loss stayed finite: saved at 14
    assert ckpt['iter_num'] == 14 and ckpt['skipped_steps'] == len(bad_steps)
    for name, value in ckpt['model'].items():  # nothing but the poisoned expert went non-finite
        if name.endswith(('experts.w_fc', 'experts.w_proj')):
            assert torch.isinf(value[bad]).all()
            value = torch.cat([value[:bad], value[bad + 1:]])
        assert not torch.is_tensor(value) or torch.isfinite(value).all(), name
    val = [r for r in records(out_dir) if r['split'] == 'val']
    assert all(np.isfinite(r['loss']) for r in val)


def test_a_resumed_run_keeps_counting_skipped_steps(runner, tmp_path):
    """A run that skips steps, stopped at iteration 8 and resumed to 14, logs what one run
    to 14 logs: its train lines' skipped_steps go on from the checkpoint's count, and the
    checkpoint's other counters (iter_num, best_val_loss, evaluated) come back with it."""
    args, out_dir, has_rare, bad = poisoned_expert_setup(tmp_path, runner)
    args = [a for a in args if not a.startswith('--out_dir=')]
    bad_steps = [it for it in range(2, 14) if has_rare(it)]
    # steps skipped on both sides of the split, and a trained step after it to log the count
    assert any(it < 8 for it in bad_steps) and any(it >= 8 for it in bad_steps), bad_steps
    assert any(it >= 8 and it not in bad_steps for it in range(8, 14)), bad_steps
    straight, split = tmp_path / 'straight', tmp_path / 'split'
    shutil.copytree(out_dir, straight)  # both start from the poisoned checkpoint at iteration 2
    shutil.copytree(out_dir, split)
    resume = [*args, '--init_from=resume', '--skip_nonfinite=True']
    result = runner.run([*resume, f'--out_dir={straight}', '--max_iters=14'])
    assert result.returncode == 0, result.stderr
    result = runner.run([*resume, f'--out_dir={split}', '--max_iters=8'])
    assert result.returncode == 0, result.stderr

    at_8 = torch.load(split / 'ckpt.pt', weights_only=True)
    # saved right after the eval of 8 (eval_interval=2, always_save_checkpoint), counting the
    # bad steps 2..7; the best val loss is the lowest one logged so far (every eval is finite:
    # the val split lacks the rare token)
    assert at_8['iter_num'] == 8 and at_8['evaluated'] is True
    assert at_8['skipped_steps'] == sum(it < 8 for it in bad_steps) > 0
    assert at_8['best_val_loss'] == min(r['loss'] for r in records(split) if r['split'] == 'val')
    data = open_dataset('poisoned', str(tmp_path / 'data'), 16, len(VOCAB))
    for eval_only in (False, True):
        start = starting_point('resume', str(split), dict(at_8['model_args']), set(), data, 'cpu', eval_only)
        assert (start.iter_num, start.best_val_loss, start.skipped_steps) == \
            (8, at_8['best_val_loss'], at_8['skipped_steps'])
        assert start.evaluated is not eval_only  # --eval_only evaluates even a checkpoint saved after its eval

    result = runner.run([*resume, f'--out_dir={split}', '--max_iters=14'])
    assert result.returncode == 0, result.stderr
    expected, got = records(straight), records(split)
    assert [(r['split'], r['iter']) for r in got] == [(r['split'], r['iter']) for r in expected]
    for e, g in zip(expected, got):
        assert without_times(g) == without_times(e), (e['split'], e['iter'])
    # the hand count: each train line says how many of the bad steps came before it
    for r in got:
        if r['split'] == 'train':
            assert r['skipped_steps'] == sum(it < r['iter'] for it in bad_steps), r['iter']
    a = torch.load(straight / 'ckpt.pt', weights_only=True)
    b = torch.load(split / 'ckpt.pt', weights_only=True)
    for key in ('iter_num', 'best_val_loss', 'evaluated', 'skipped_steps'):
        assert a[key] == b[key], key
    assert b['iter_num'] == 14 and b['skipped_steps'] == len(bad_steps)
    for key in a['model']:
        assert torch.equal(a['model'][key], b['model'][key]), key


@pytest.mark.parametrize('router', ['aux_free', 'gatepro'])
def test_a_skipped_step_routes_nothing_but_is_counted(runner, tiny_data, tmp_path, router):
    """A skipped step never reaches the routers' own state: DeepSeek-V3's bias, moved by
    the load of each step, stays where it was (train.py gives the routers zero loads); while
    GatePro's step count, which places its window in training steps, counts it."""
    out_dir = tmp_path / 'out'
    # z_loss_coef=1e300 is inf in float32: every training loss is inf, while the eval's loss
    # (the language-model loss alone) stays finite, so the run saves at its last iteration
    router_args = ['--aux_free_update_rate=0.1'] if router == 'aux_free' else []  # a bias step easy to see
    result = runner.run([*TINY, f'--data_dir={tiny_data}', f'--out_dir={out_dir}', f'--router={router}', '--top_k=2',
                         *router_args, '--z_loss_coef=1e300', '--skip_nonfinite=True', '--max_iters=3',
                         '--eval_interval=3', '--always_save_checkpoint=True'])
    assert result.returncode == 0, result.stderr
    skipped = [line for line in result.stdout.splitlines() if 'step skipped' in line]
    assert [line.split()[4] for line in skipped] == ['0:', '1:', '2:'] and all('z inf' in line for line in skipped)
    assert [r['split'] for r in records(out_dir)] == ['val', 'val']  # no train line: nothing was trained
    ckpt = torch.load(out_dir / 'ckpt.pt', weights_only=True)
    assert ckpt['iter_num'] == 3 and ckpt['skipped_steps'] == 3
    name = {'aux_free': 'expert_bias', 'gatepro': 'iter_num'}[router]
    state = [value for key, value in ckpt['model'].items() if key.endswith(f'.ffn.router.{name}')]
    assert state  # the one MoE layer of TINY
    for value in state:
        if router == 'aux_free':  # a fresh run's bias, 0, after three steps that routed nothing
            assert torch.equal(value, torch.zeros(4)), value
        else:  # three steps finished, all of them skipped: the next forward belongs to iteration 3
            assert int(value) == 3


def test_a_finite_loss_with_a_non_finite_gradient_is_a_bad_step(capsys):
    """The step's gradient norm is checked along with its loss: a finite loss whose gradient
    overflowed must not reach the weights either, and the line says it was the gradient.
    Under fp16 the loss scaler finds non-finite gradients itself, so only the loss counts."""
    inf = torch.tensor(float('inf'))
    loss = torch.tensor(2.5)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    guard = NonFiniteGuard(skip=True, ddp=False, master_process=True, ckpt_path='out/ckpt.pt')
    assert guard.is_finite(loss, torch.tensor(0.75), scaler)
    assert guard.is_finite(loss, None, scaler)  # grad_clip=0: no norm is computed
    assert not guard.is_finite(loss, inf, scaler)
    assert not guard.is_finite(loss, torch.tensor(float('nan')), scaler)
    assert not guard.is_finite(inf, torch.tensor(0.75), scaler)
    assert guard.is_finite(loss, inf, torch.amp.GradScaler('cpu', enabled=True))

    # skipped: one line, 2.5 and inf printed with :.4g
    guard.skip_or_stop(7, loss, RoutingStats(), inf, saved_iter=None)
    assert capsys.readouterr().out == ("non-finite gradient at iter 7: loss 2.5, gradient norm inf; router logits "
                                       "finite in every layer; step skipped (1 so far)\n")
    assert guard.skipped_steps == 1

    # stopped: the same line on stderr, exit code 1, naming the checkpoint kept
    guard = NonFiniteGuard(skip=False, ddp=False, master_process=True, ckpt_path='out/ckpt.pt')
    with pytest.raises(SystemExit) as stopped:
        guard.skip_or_stop(7, loss, RoutingStats(), inf, saved_iter=6)
    assert stopped.value.code == 1
    assert capsys.readouterr().err == ("error: non-finite gradient at iter 7: loss 2.5, gradient norm inf; router "
                                       "logits finite in every layer; training stopped, out/ckpt.pt (iter 6) is "
                                       "kept; --skip_nonfinite=True skips such steps\n")


def test_the_message_names_the_first_router_that_went_non_finite_in_this_step(capsys):
    """watch() collects, over a step's micro-steps, which MoE layers' router logits were not
    finite; the line names the lowest one. A step that ends (finite, or skipped) forgets
    them, so the next bad step names only its own."""
    nan, ok = torch.tensor([[float('nan'), 0.0]]), torch.zeros(1, 2)
    routings = lambda logits: {layer: SimpleNamespace(logits=value) for layer, value in logits.items()}
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    guard = NonFiniteGuard(skip=True, ddp=False, master_process=True, ckpt_path='ckpt.pt')
    nan_loss = torch.tensor(float('nan'))

    def skipped_line(iter_num):
        assert not guard.is_finite(nan_loss, None, scaler)
        guard.skip_or_stop(iter_num, nan_loss, RoutingStats(), None, saved_iter=None)
        return capsys.readouterr().out

    # two micro-steps: layer 3 goes bad in the first, layer 1 in the second; layer 2 never
    guard.watch(routings({1: ok, 2: ok, 3: nan}))
    guard.watch(routings({1: nan, 2: ok, 3: ok}))
    assert skipped_line(5) == "non-finite loss at iter 5: loss nan; first non-finite router logits in layer 1; " \
                              "step skipped (1 so far)\n"
    # the next step's logits are finite: the skipped step's bad layers are not reported again
    guard.watch(routings({1: ok, 2: ok, 3: ok}))
    assert 'router logits finite in every layer' in skipped_line(6)
    # a finite step forgets its bad logits too
    guard.watch(routings({1: ok, 2: nan, 3: ok}))
    assert guard.is_finite(torch.tensor(1.0), None, scaler)
    guard.watch(routings({1: ok, 2: ok, 3: nan}))
    assert 'first non-finite router logits in layer 3;' in skipped_line(8)
