"""Checkpoints end to end: loading runs no code, broken files are one-line errors, saves
are atomic under SIGKILL, a resumed run repeats the uninterrupted one bit for bit for
every router, and Ctrl-C saves. train.py and sample.py run as a user runs them, through
forkrun's runner (a fork per run instead of a fresh interpreter); the Ctrl-C test starts
a real subprocess."""

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from routers import ROUTERS
from dataset import load_meta

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, above tests/
TINY = ['--device=cpu', '--n_layer=1', '--n_head=2', '--n_embd=16', '--n_exp=4', '--batch_size=4', '--block_size=16',
        '--eval_iters=2', '--log_interval=1', '--warmup_iters=2']


def assert_one_line_error(result, *fragments, code=2):
    assert result.returncode == code, (result.returncode, result.stderr)
    assert 'Traceback' not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def records(out_dir):
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


VOLATILE = ('time_ms', 'tokens_per_s', 'mfu', 'eval_ms')


def without_times(record):
    """A metrics.jsonl line without the fields that time the run: what a repeated run repeats."""
    return {k: v for k, v in record.items() if k not in VOLATILE}


@pytest.fixture(scope='module')
def good_run(runner, tiny_data, tmp_path_factory):
    """A checkpoint of 2 iterations (its bytes), and the args that made it."""
    out_dir = tmp_path_factory.mktemp('good') / 'out'
    args = [*TINY, f'--data_dir={tiny_data}', '--max_iters=2', '--eval_interval=2', '--always_save_checkpoint=True']
    result = runner.run([*args, f'--out_dir={out_dir}'])
    assert result.returncode == 0, result.stderr
    return (out_dir / 'ckpt.pt').read_bytes()


# -----------------------------------------------------------------------------
# loading runs no code


class WritesAFile:
    """Unpickling this calls open(path, 'w'): the file appears if the pickle ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, 'w'))


class RunsAShellCommand:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f'touch {self.path}',))


def write_malicious(kind, path, marker):
    if kind == 'torch.save':  # a real checkpoint layout with one poisoned entry
        torch.save({'model': {'w': torch.ones(2)}, 'model_args': {}, 'evil': WritesAFile(marker)}, path)
    elif kind == 'pickle':
        with open(path, 'wb') as f:
            pickle.dump(WritesAFile(marker), f)
    else:
        torch.save({'model': RunsAShellCommand(marker)}, path)


@pytest.mark.parametrize('kind', ['torch.save', 'pickle', 'os.system'])
def test_a_checkpoint_that_would_run_code_is_refused(runner, tiny_data, tmp_path, kind):
    out_dir = tmp_path / 'out'
    out_dir.mkdir()
    marker = tmp_path / 'it_ran'
    write_malicious(kind, str(out_dir / 'ckpt.pt'), str(marker))
    result = runner.run([f'--out_dir={out_dir}', '--device=cpu', '--num_samples=1', '--max_new_tokens=2'],
                        script='sample.py')
    assert_one_line_error(result, str(out_dir / 'ckpt.pt'), 'refused', 'nothing in it was run')
    result = runner.run([*TINY, f'--data_dir={tiny_data}', f'--out_dir={out_dir}', '--init_from=resume'])
    assert_one_line_error(result, str(out_dir / 'ckpt.pt'), 'refused')
    assert not marker.exists()
    assert sorted(os.listdir(out_dir)) == ['ckpt.pt']  # nothing written


def damaged(kind, good_bytes, path):
    if kind == 'truncated':
        path.write_bytes(good_bytes[:len(good_bytes) // 2])
    elif kind == 'empty':
        path.write_bytes(b'')
    elif kind == 'text':
        path.write_text('this is not a checkpoint\n')
    else:
        checkpoint = torch.load(path.parent.parent / 'good.pt', weights_only=True)
        if kind == 'tensor':
            checkpoint = torch.ones(3)
        elif kind == 'no_model_args':
            del checkpoint['model_args']
        elif kind == 'other_shape':  # model_args of another model: the weights do not fit
            checkpoint['model_args']['n_embd'] = 32
        elif kind == 'missing_weight':
            del checkpoint['model']['lm_head.weight']
        torch.save(checkpoint, path)


@pytest.mark.parametrize('kind, fragment', [
    ('truncated', 'cannot be read: it is truncated or not a checkpoint'),
    ('empty', 'cannot be read'),
    ('text', 'cannot be read'),
    ('tensor', 'holds a Tensor, not a training checkpoint'),
    ('no_model_args', "it has no 'model_args'"),
    ('other_shape', 'does not fit the model it describes: size mismatch'),
    ('missing_weight', 'does not fit the model it describes: Missing key'),
])
def test_a_broken_checkpoint_is_a_one_line_error(runner, tiny_data, good_run, tmp_path, kind, fragment):
    (tmp_path / 'good.pt').write_bytes(good_run)
    out_dir = tmp_path / 'out'
    out_dir.mkdir()
    ckpt = out_dir / 'ckpt.pt'
    damaged(kind, good_run, ckpt)
    before = ckpt.read_bytes()
    result = runner.run([f'--out_dir={out_dir}', '--device=cpu', '--num_samples=1', '--max_new_tokens=2'],
                        script='sample.py')
    assert_one_line_error(result, str(ckpt), fragment)
    # resume takes the shape from the checkpoint: no shape keys on the command line
    result = runner.run(['--device=cpu', f'--data_dir={tiny_data}', f'--out_dir={out_dir}', '--init_from=resume',
                         '--batch_size=4', '--eval_iters=2'])
    assert_one_line_error(result, str(ckpt), fragment)
    assert ckpt.read_bytes() == before and sorted(os.listdir(out_dir)) == ['ckpt.pt']


def test_meta_pkl_loads_plain_values_only(tmp_path):
    marker = tmp_path / 'it_ran'
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):  # nanoGPT-style metas need no class lookup
        meta = {'vocab_size': 3, 'stoi': {'a': 0, 'b': 1, '\n': 2}, 'itos': {0: 'a', 1: 'b', 2: '\n'},
                'domains': ['x', 'y'], 'seed': 1, 'encoding': 'gpt2', 'share': 0.5}
        with open(tmp_path / 'meta.pkl', 'wb') as f:
            pickle.dump(meta, f, protocol=protocol)
        assert load_meta(str(tmp_path)) == meta
    for evil in (WritesAFile(str(marker)), {'vocab_size': 3, 'itos': RunsAShellCommand(str(marker))}):
        with open(tmp_path / 'meta.pkl', 'wb') as f:
            pickle.dump(evil, f)
        with pytest.raises(ValueError, match=r'meta\.pkl was refused: it names (io|builtins)\.open|posix\.system'):
            load_meta(str(tmp_path))
    assert not marker.exists()
    (tmp_path / 'meta.pkl').write_bytes(pickle.dumps({'stoi': {}})[:-3])
    with pytest.raises(ValueError, match='cannot be read'):
        load_meta(str(tmp_path))
    (tmp_path / 'meta.pkl').write_bytes(pickle.dumps({'stoi': {}}))
    with pytest.raises(ValueError, match='positive integer vocab_size'):
        load_meta(str(tmp_path))


def test_meta_pkl_needs_a_positive_integer_vocab_size(tmp_path):
    """vocab_size sizes the embedding and bounds every token id: it must be an int of at
    least 1, not a bool (an int to isinstance), a float or a string."""
    for vocab_size in (0, -1, True, 13.0, '13', None):
        with open(tmp_path / 'meta.pkl', 'wb') as f:
            pickle.dump({'vocab_size': vocab_size}, f)
        with pytest.raises(ValueError, match='positive integer vocab_size'):
            load_meta(str(tmp_path))
    with open(tmp_path / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': 1}, f)
    assert load_meta(str(tmp_path)) == {'vocab_size': 1}


def test_a_checkpoint_with_values_of_the_wrong_kind_is_damaged(tmp_path):
    """A checkpoint that loads but whose parts have the wrong type is refused at load, in one
    line, rather than failing somewhere in the run that uses it."""
    path = str(tmp_path / 'ckpt.pt')
    good = {'model': {'w': torch.ones(2)}, 'model_args': {'n_layer': 1}, 'optimizer': {}, 'iter_num': 4}
    torch.save(good, path)
    assert load_checkpoint(path)['iter_num'] == 4
    for key, value, kind in (('model', [torch.ones(2)], 'list'), ('model_args', None, 'NoneType'),
                             ('optimizer', [], 'list'), ('iter_num', '4', 'str'), ('iter_num', 4.0, 'float')):
        torch.save({**good, key: value}, path)
        with pytest.raises(CheckpointError) as damaged:
            load_checkpoint(path)
        assert str(damaged.value).startswith(f"checkpoint {path} is damaged: {key!r} is a {kind}, not a "), \
            str(damaged.value)


class CallsABuiltin:
    """Unpickling this calls a builtin (eval or exec) on source that creates a marker file:
    no import is needed, the pickle names only builtins.eval / builtins.exec."""

    def __init__(self, builtin, path):
        self.builtin, self.path = builtin, path

    def __reduce__(self):
        if self.builtin is eval:
            return (eval, (f"__import__('pathlib').Path({self.path!r}).touch()",))
        return (exec, (f"import pathlib; pathlib.Path({self.path!r}).touch()",))


@pytest.mark.parametrize('builtin', [eval, exec], ids=['eval', 'exec'])
def test_a_pickle_that_calls_a_builtin_is_refused(tmp_path, builtin):
    """eval and exec live in the 'builtins' module, which an unpickler might think harmless
    (it holds dict, list, int...): a meta.pkl or a checkpoint that calls them is refused
    like any other code, nothing in it runs, and the error is one line naming the file."""
    marker = tmp_path / 'it_ran'
    evil = CallsABuiltin(builtin, str(marker))
    for protocol in (0, pickle.HIGHEST_PROTOCOL):  # GLOBAL (text) and STACK_GLOBAL opcodes
        with open(tmp_path / 'meta.pkl', 'wb') as f:
            pickle.dump({'vocab_size': 3, 'itos': evil}, f, protocol=protocol)
        with pytest.raises(ValueError) as refused:
            load_meta(str(tmp_path))
        assert not marker.exists()
        message = str(refused.value)
        assert '\n' not in message and str(tmp_path / 'meta.pkl') in message, message
        # protocols 0-2 spell the module as Python 2 did, __builtin__
        assert re.search(rf'was refused: it names (__builtin__|builtins)\.{builtin.__name__},', message), message
        assert 'nothing in it was run' in message

    ckpt = str(tmp_path / 'ckpt.pt')
    for layout in ({'model': {'w': torch.ones(2)}, 'model_args': {}, 'iter_num': evil}, evil):
        torch.save(layout, ckpt)
        with pytest.raises(CheckpointError) as refused:
            load_checkpoint(ckpt)
        assert not marker.exists()
        message = str(refused.value)
        assert '\n' not in message and message.startswith(f'checkpoint {ckpt} was refused'), message
        assert re.search(rf'\b{builtin.__name__}\b', message) and 'nothing in it was run' in message  # which one


def test_a_meta_pkl_that_would_run_code_is_refused_by_train_and_sample(runner, tiny_data, good_run, tmp_path):
    data = tmp_path / 'data'
    data.mkdir()
    for name in ('train.bin', 'val.bin', 'meta.pkl'):
        (data / name).write_bytes(open(os.path.join(tiny_data, name), 'rb').read())
    out_dir = tmp_path / 'out'
    result = runner.run([*TINY, f'--data_dir={data}', f'--out_dir={out_dir}', '--max_iters=2', '--eval_interval=2'])
    assert result.returncode == 0, result.stderr
    marker = tmp_path / 'it_ran'
    with open(data / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': 13, 'stoi': RunsAShellCommand(str(marker))}, f)
    result = runner.run([*TINY, f'--data_dir={data}', f'--out_dir={tmp_path / "out2"}'])
    assert_one_line_error(result, str(data / 'meta.pkl'), 'refused', 'system')
    result = runner.run([f'--out_dir={out_dir}', '--device=cpu', '--num_samples=1', '--max_new_tokens=2', '--start=ab'],
                        script='sample.py')
    assert_one_line_error(result, str(data / 'meta.pkl'), 'refused')
    assert not marker.exists() and not (tmp_path / 'out2').exists()


# -----------------------------------------------------------------------------
# saving


def test_save_checkpoint_refuses_what_weights_only_cannot_load(tmp_path):
    path = str(tmp_path / 'ckpt.pt')
    save_checkpoint({'model': {'w': torch.ones(2)}, 'args': {'a': [1, 2.0, 'x', None, True, (3, 4)]}}, path)
    assert torch.load(path, weights_only=True)['args']['a'][5] == (3, 4)
    with pytest.raises(TypeError, match=r"checkpoint\['config'\]\['s'\] is a set"):
        save_checkpoint({'config': {'s': {1, 2}}}, path)
    assert torch.load(path, weights_only=True)['args']['a'][0] == 1  # the old one, untouched
    assert os.listdir(tmp_path) == ['ckpt.pt']


KILLER = r'''
import json, os, random, signal, sys, time
import torch
from checkpoint import save_checkpoint
path = sys.argv[1]
random.seed(0)
versions = [{'n': n, 'payload': torch.full((1 << 20,), float(n)), 'tags': [n] * 100} for n in range(2)]
loaded = mid_save = 0
for kill in range(15):
    pid = os.fork()
    if pid == 0:  # saves as fast as it can, alternating two checkpoints, until killed
        i = kill
        while True:
            save_checkpoint(versions[i % 2], path)
            i += 1
    time.sleep(random.uniform(0.0, 0.25))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    mid_save += os.path.exists(path + '.tmp')
    if os.path.exists(path):  # absent, the old or the new one: always whole
        ckpt = torch.load(path, weights_only=True)
        assert ckpt['tags'] == [ckpt['n']] * 100 and bool((ckpt['payload'] == ckpt['n']).all()), 'a mixed checkpoint'
        loaded += 1
save_checkpoint(versions[0], path)  # a stale .tmp is simply overwritten
print(json.dumps({'loaded': loaded, 'mid_save': mid_save, 'left': sorted(os.listdir(os.path.dirname(path)))}))
'''


def test_saves_are_atomic_under_sigkill(runner, tmp_path):
    """15 times: a child saves checkpoints in a loop, is SIGKILLed at a random moment, and the
    file left behind is loaded with weights_only=True. Runs in a fork of the runner's
    single-threaded server, so forking again is safe."""
    script = tmp_path / 'killer.py'
    script.write_text(KILLER)
    (tmp_path / 'ckpts').mkdir()
    started = time.time()
    result = runner.run([str(tmp_path / 'ckpts' / 'ckpt.pt')], script=str(script), timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report['loaded'] >= 10
    assert report['mid_save'] >= 1  # some kills did land in the middle of a save
    assert report['left'] == ['ckpt.pt']
    assert time.time() - started < 20


# -----------------------------------------------------------------------------
# exact resume, every router

N = 4  # the first run stops (and saves) at iteration N; the straight run goes to 2N
ROUTER_ARGS = {
    'topk': ['--top_k=2'],
    'gatepro': ['--top_k=2', f'--gatepro_end_iter={N + 2}'],  # the GatePro window ends in the second half
    'ortho_var': ['--top_k=2'],
    'switch': [],  # input jitter on by default
    'noisy_topk': ['--top_k=2'],
    'expert_choice': [],
    'aux_free': ['--top_k=2', '--aux_free_update_rate=0.003'],  # a bias that has moved by N (0.1 flips back and forth)
    'hash': [],
    'topp': ['--top_k=2'],
    'remoe': ['--top_k=2'],  # its L1 coefficient, a checkpointed buffer, moves after every step
}


# and the global-batch balance loss, whose counts over the micro-steps are never checkpointed
RESUME_CASES = {**{router: [f'--router={router}', *args] for router, args in ROUTER_ARGS.items()},
                'topk_global': ['--router=topk', '--top_k=2', '--balance_scope=global']}


def test_resume_covers_every_router():
    assert set(ROUTER_ARGS) == set(ROUTERS)


@pytest.mark.parametrize('case', sorted(RESUME_CASES))
def test_resume_repeats_the_straight_run_bit_for_bit(runner, tiny_data, tmp_path, case):
    """2N iterations in one run, and N then --init_from=resume for N more, log the same
    metrics.jsonl line for line (timings aside): losses, router losses and routing metrics
    as exact floats. With gradient accumulation, dropout and each router's noise."""
    args = [*TINY, f'--data_dir={tiny_data}', *RESUME_CASES[case], '--dropout=0.1',
            '--gradient_accumulation_steps=2', f'--eval_interval={N}', '--always_save_checkpoint=True']
    straight, split = tmp_path / 'straight', tmp_path / 'split'
    result = runner.run([*args, f'--out_dir={straight}', f'--max_iters={2 * N}'])
    assert result.returncode == 0, result.stderr
    result = runner.run([*args, f'--out_dir={split}', f'--max_iters={N}'])
    assert result.returncode == 0, result.stderr
    at_n = torch.load(split / 'ckpt.pt', weights_only=True)
    assert at_n['iter_num'] == N
    if case == 'aux_free':  # the bias the resumed run must pick up has moved
        assert any(v.abs().sum() > 0 for k, v in at_n['model'].items() if k.endswith('expert_bias'))
    result = runner.run([*args, f'--out_dir={split}', f'--max_iters={2 * N}', '--init_from=resume'])
    assert result.returncode == 0, result.stderr
    assert f'resuming from {split / "ckpt.pt"} at iter {N}' in result.stdout

    expected, got = records(straight), records(split)
    assert [(r['split'], r['iter']) for r in expected] == (
        [('val', 0)] + [('train', i) for i in range(N)] + [('val', N)] + [('train', i) for i in range(N, 2 * N)]
        + [('val', 2 * N)])
    assert [(r['split'], r['iter']) for r in got] == [(r['split'], r['iter']) for r in expected]
    for e, g in zip(expected, got):
        assert without_times(e) == without_times(g), (e['split'], e['iter'])
    a = torch.load(straight / 'ckpt.pt', weights_only=True)
    b = torch.load(split / 'ckpt.pt', weights_only=True)
    assert a['iter_num'] == b['iter_num'] == 2 * N
    for key in a['model']:  # weights, router buffers and GatePro's count: the same at the end
        assert torch.equal(a['model'][key], b['model'][key]) if torch.is_tensor(a['model'][key]) \
            else a['model'][key] == b['model'][key], key


def test_a_checkpoint_from_before_balance_scope_resumes_and_starts_new_runs(runner, tiny_data, tmp_path):
    """A checkpoint written before balance_scope holds aux_loss_per_sequence=True and no
    balance_scope. Resumed with its old command line it goes on per sequence, logging what a
    straight run with balance_scope='sequence' logs; a new run from its weights (same router)
    takes the per-sequence loss from it, unless it gives balance_scope, which then rules."""
    args = [*TINY, f'--data_dir={tiny_data}', '--router=topk', '--top_k=2', '--gradient_accumulation_steps=2',
            f'--eval_interval={N}', '--always_save_checkpoint=True']
    old, straight = tmp_path / 'old', tmp_path / 'straight'
    result = runner.run([*args, '--aux_loss_per_sequence=True', f'--out_dir={old}', f'--max_iters={N}'])
    assert result.returncode == 0, result.stderr
    checkpoint = torch.load(old / 'ckpt.pt', weights_only=True)
    # as it was written before balance_scope existed (the config as given, the model's as read)
    assert checkpoint['config'].pop('balance_scope') == 'batch'
    assert checkpoint['model_args'].pop('balance_scope') == 'sequence'
    assert checkpoint['model_args']['aux_loss_per_sequence'] is True
    save_checkpoint(checkpoint, str(old / 'ckpt.pt'))

    for given, scope in (([], 'per sequence'), (['--balance_scope=global'], 'over the global batch')):
        result = runner.run([*args, f'--init_from={old / "ckpt.pt"}', f'--out_dir={tmp_path / "new"}',
                             '--max_iters=1', '--overwrite_out_dir=True', *given])
        assert result.returncode == 0, result.stderr
        assert f'aux_loss_coef 0.01 {scope}' in result.stdout, given

    result = runner.run([*args, '--aux_loss_per_sequence=True', f'--out_dir={old}', f'--max_iters={2 * N}',
                         '--init_from=resume'])
    assert result.returncode == 0, result.stderr
    assert 'aux_loss_coef 0.01 per sequence' in result.stdout
    result = runner.run([*args, '--balance_scope=sequence', f'--out_dir={straight}', f'--max_iters={2 * N}'])
    assert result.returncode == 0, result.stderr
    expected, got = records(straight), records(old)
    assert len(got) == len(expected) == 2 * N + 3
    for e, g in zip(expected, got):
        assert without_times(e) == without_times(g), (e['split'], e['iter'])


# -----------------------------------------------------------------------------
# Ctrl-C


def test_ctrl_c_saves_and_the_run_resumes_exactly(runner, tiny_data, tmp_path):
    """SIGINT during training: one line on stderr saying where the checkpoint is; the
    checkpoint loads with weights_only=True and resumes, and the interrupted run plus its
    continuation log what one uninterrupted run logs."""
    args = [*TINY, f'--data_dir={tiny_data}', '--eval_interval=1000', '--dropout=0.1']
    out_dir = tmp_path / 'out'
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    process = subprocess.Popen([sys.executable, os.path.join(REPO, 'train.py'), *args, f'--out_dir={out_dir}',
                                '--max_iters=100000'], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)
    log = out_dir / 'metrics.jsonl'
    deadline = time.time() + 120
    while not (log.exists() and sum(1 for _ in open(log)) >= 4) and time.time() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('interrupted at iter '), stderr
    assert f'checkpoint saved to {out_dir / "ckpt.pt"}' in lines[0] and '--init_from=resume' in lines[0]
    stopped_at = int(lines[0].split()[3].rstrip(':'))
    ckpt = torch.load(out_dir / 'ckpt.pt', weights_only=True)
    assert ckpt['iter_num'] == stopped_at and ckpt['evaluated'] is False
    assert [r['iter'] for r in records(out_dir) if r['split'] == 'train'] == list(range(stopped_at))

    end = stopped_at + 3
    result = runner.run([*args, f'--out_dir={out_dir}', f'--max_iters={end}', '--init_from=resume'])
    assert result.returncode == 0, result.stderr
    result = runner.run([*args, f'--out_dir={tmp_path / "straight"}', f'--max_iters={end}'])
    assert result.returncode == 0, result.stderr
    got, expected = records(out_dir), records(tmp_path / 'straight')
    assert [(r['split'], r['iter']) for r in got] == [(r['split'], r['iter']) for r in expected]
    assert [r['loss'] for r in got] == [r['loss'] for r in expected]


SECOND_CTRL_C = r'''
import os, signal, time
from faults import Interrupt
interrupt = Interrupt()
interrupt.install()
os.kill(os.getpid(), signal.SIGINT)
time.sleep(0.5)
print('requested', interrupt.requested, flush=True)
os.kill(os.getpid(), signal.SIGINT)  # the second one ends the process at once
time.sleep(5)
print('still running', flush=True)
'''


def test_a_second_ctrl_c_exits_at_once(runner, tmp_path):
    script = tmp_path / 'second.py'
    script.write_text(SECOND_CTRL_C)
    result = runner.run([], script=str(script), timeout=30)
    assert result.returncode == -signal.SIGINT
    assert 'requested True' in result.stdout and 'still running' not in result.stdout
    assert 'Traceback' not in result.stderr


def test_save_on_interrupt_false_leaves_ctrl_c_alone(runner, tiny_data, tmp_path):
    out_dir = tmp_path / 'out'
    result = runner.run([*TINY, f'--data_dir={tiny_data}', f'--out_dir={out_dir}', '--max_iters=100000',
                         '--eval_interval=1000', '--save_on_interrupt=False'],
                        sigint_after=(out_dir / 'metrics.jsonl', 3))
    assert result.returncode == 1 and 'KeyboardInterrupt' in result.stderr  # Python's default: no save
    assert not (out_dir / 'ckpt.pt').exists()
