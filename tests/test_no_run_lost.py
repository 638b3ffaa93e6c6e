"""No run lost: a run killed at any moment resumes into one log, as if never killed; SIGTERM
(what a scheduler sends before SIGKILL) saves like Ctrl-C, on one process and under
torchrun; a new run never replaces another run's checkpoint by accident, and a second run
into a folder that a live run holds is refused; a save that fails says why in one line and
keeps the previous checkpoint. Each case breaks a real run."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import plot
from test_checkpoint import REPO, TINY, assert_one_line_error, records, without_times


def steady(rows):
    return [without_times(r) for r in rows]


# -----------------------------------------------------------------------------
# a killed run, resumed


def test_a_run_killed_anywhere_resumes_into_the_log_of_an_uninterrupted_run(runner, tiny_data, tmp_path):
    """SIGKILL at three points of one run (the log then holds lines past the last checkpoint),
    each time resumed: the final metrics.jsonl is the uninterrupted run's, bit for bit (times
    aside), every iteration once; the lines logged past a checkpoint went to
    metrics.replaced.jsonl, and a torn last line (a kill inside a write) goes there too."""
    # a save after each eval (every 7 iterations), 70 lines in all; kills after 12, 22 and 32 lines
    args = [*TINY, f'--data_dir={tiny_data}', '--max_iters=60', '--eval_interval=7', '--always_save_checkpoint=True']
    straight, killed = tmp_path / 'straight', tmp_path / 'killed'
    result = runner.run([*args, f'--out_dir={straight}'])
    assert result.returncode == 0, result.stderr

    log = killed / 'metrics.jsonl'
    result = runner.run([*args, f'--out_dir={killed}'], signal_after=(log, 12, signal.SIGKILL))
    assert result.returncode == -signal.SIGKILL
    moved = 0
    for lines in (22, 32, None):  # each resumed run is killed again, further on; the last one ends
        ckpt_iter = torch.load(killed / 'ckpt.pt', weights_only=True)['iter_num']
        # past the checkpoint (saved right after its iteration's eval): that iteration's step and later
        past = [r for r in plot.read_metrics(str(killed)) if r['iter'] > ckpt_iter or (r['iter'] == ckpt_iter and r['split'] == 'train')]
        if lines == 32:  # a kill inside a write leaves half a line without its newline
            with open(log, 'a') as f:
                f.write('{"iter": 99, "split": "tr')
        kill = None if lines is None else (log, lines, signal.SIGKILL)
        result = runner.run([*args, f'--out_dir={killed}', '--init_from=resume'], signal_after=kill)
        assert result.returncode == (0 if lines is None else -signal.SIGKILL), result.stderr
        moved += len(past) + (lines == 32)
        if past:
            assert f"logged after the checkpoint's iter {ckpt_iter} moved to" in result.stdout

    got, expected = records(killed), records(straight)
    assert [(r['split'], r['iter']) for r in got] == [(r['split'], r['iter']) for r in expected]
    assert steady(got) == steady(expected)
    replaced = (killed / 'metrics.replaced.jsonl').read_text().splitlines()
    assert moved > 0 and len(replaced) == moved
    assert '{"iter": 99, "split": "tr' in replaced  # kept for whoever wants to look, on a line of its own


def test_readers_of_the_log_skip_a_torn_last_line(tmp_path):
    """plot.py and compare.py read the log through plot.read_metrics: a last line that a kill
    (or a write still going on) cut short is skipped; a broken line elsewhere is an error."""
    rows = [{'iter': 0, 'split': 'train', 'loss': 1.0}, {'iter': 1, 'split': 'train', 'loss': 0.5}]
    text = ''.join(json.dumps(r) + '\n' for r in rows)
    (tmp_path / 'metrics.jsonl').write_text(text + '{"iter": 2, "spl')
    assert plot.read_metrics(str(tmp_path)) == rows
    (tmp_path / 'metrics.jsonl').write_text('{"iter": 2, "spl\n' + text)
    with pytest.raises(plot.MetricsError, match='line 1 is not JSON'):
        plot.read_metrics(str(tmp_path))


# -----------------------------------------------------------------------------
# SIGTERM


def test_sigterm_saves_at_the_next_iteration_and_exits_143(runner, tiny_data, tmp_path):
    """A scheduler's SIGTERM: the step finishes, the checkpoint is saved at the top of the next
    iteration, one line says so, the exit code is 143 (128 + 15), and the resumed run logs what
    one uninterrupted run logs."""
    args = [*TINY, f'--data_dir={tiny_data}', '--max_iters=40', '--eval_interval=10']
    out_dir = tmp_path / 'out'
    result = runner.run([*args, f'--out_dir={out_dir}', '--max_iters=100000'],
                        signal_after=(out_dir / 'metrics.jsonl', 6, signal.SIGTERM))
    assert result.returncode == 143, result.stderr
    ckpt = torch.load(out_dir / 'ckpt.pt', weights_only=True)
    last_logged = records(out_dir)[-1]['iter']
    assert ckpt['iter_num'] == last_logged + 1 and ckpt['evaluated'] is False
    lines = [line for line in result.stderr.splitlines() if not line.startswith('eval')]
    assert lines == [f"interrupted at iter {ckpt['iter_num']} (SIGTERM): checkpoint saved to {out_dir / 'ckpt.pt'}; "
                     f"continue with --init_from=resume --out_dir={out_dir}"]
    assert 'SIGTERM: saving a checkpoint after this step' in result.stdout
    result = runner.run([*args, f'--out_dir={out_dir}', '--init_from=resume'])
    assert result.returncode == 0, result.stderr
    straight = tmp_path / 'straight'
    assert runner.run([*args, f'--out_dir={straight}']).returncode == 0
    assert steady(records(out_dir)) == steady(records(straight))


def worker_pid(parent, rank):
    """The pid of torchrun's worker of that rank (Linux: /proc), or None."""
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/stat') as f:
                ppid = int(f.read().rsplit(')', 1)[1].split()[1])
            with open(f'/proc/{pid}/environ', 'rb') as f:
                environ = f.read().split(b'\0')
        except OSError:
            continue
        if ppid == parent and f'RANK={rank}'.encode() in environ:
            return int(pid)
    return None


@pytest.mark.skipif(not os.path.isdir('/proc'), reason="finds torchrun's workers through /proc")
def test_sigterm_to_one_rank_stops_every_rank_at_one_iteration(tiny_data, tmp_path):
    """A SIGTERM that reaches one rank only (or each rank at its own moment, as torchrun
    passes one on): the flag travels in the step's all_reduce, so both ranks stop at the top
    of the same iteration and rank 0 saves there. Had rank 1 left alone, rank 0 would wait
    forever in the next collective and nothing would be saved."""
    out_dir = tmp_path / 'out'
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
               os.path.join(REPO, 'train.py'), *TINY, f'--data_dir={tiny_data}', '--router=aux_free', '--top_k=2',
               '--gradient_accumulation_steps=2', '--max_iters=100000', '--eval_interval=1000', f'--out_dir={out_dir}']
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                               env={**os.environ, 'OMP_NUM_THREADS': '1'})
    try:
        log, deadline = out_dir / 'metrics.jsonl', time.time() + 120
        while not (log.exists() and len(log.read_text().splitlines()) >= 6) and time.time() < deadline:
            time.sleep(0.05)
        os.kill(worker_pid(process.pid, 1), signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:  # a rank stuck in a collective would outlive torchrun: end the workers first
        for pid in filter(None, (worker_pid(process.pid, rank) for rank in (0, 1))):
            os.kill(pid, signal.SIGKILL)
        process.kill()
        process.wait()
    assert '(a signal on another rank): checkpoint saved to' in stderr, stderr[-3000:]  # rank 0 did not get it
    ckpt = torch.load(out_dir / 'ckpt.pt', weights_only=True)
    assert ckpt['iter_num'] == records(out_dir)[-1]['iter'] + 1  # the iteration after the last trained step
    assert stderr.count('interrupted at iter') == 1  # rank 0 alone saves and says so


# -----------------------------------------------------------------------------
# a run into another run's folder


def test_a_new_run_never_replaces_a_checkpoint_by_accident(runner, tiny_data, tmp_path):
    """python train.py twice into one out_dir: the second says what the folder holds and the
    ways on, in one line, and writes nothing; with --overwrite_out_dir=True it replaces it.
    A new run from trained weights into another run's folder is refused the same way."""
    out_dir = tmp_path / 'out'
    args = [*TINY, f'--data_dir={tiny_data}', '--max_iters=4', '--eval_interval=4', f'--out_dir={out_dir}']
    assert runner.run(args).returncode == 0
    ckpt, log = (out_dir / 'ckpt.pt').read_bytes(), (out_dir / 'metrics.jsonl').read_text()
    val_loss = torch.load(out_dir / 'ckpt.pt', weights_only=True)['best_val_loss']
    result = runner.run(args)
    assert_one_line_error(result, f"out_dir={out_dir} holds a checkpoint (iter 4, val loss {val_loss:.4f})",
                          '--init_from=resume', 'another --out_dir', '--overwrite_out_dir=True')
    other = tmp_path / 'other'
    assert runner.run([*args, f'--out_dir={other}']).returncode == 0
    result = runner.run([*args, f'--init_from={other}'])  # a new run from other's weights, into out's folder
    assert_one_line_error(result, f"out_dir={out_dir} holds a checkpoint (iter 4")
    assert (out_dir / 'ckpt.pt').read_bytes() == ckpt and (out_dir / 'metrics.jsonl').read_text() == log
    result = runner.run([*args, '--overwrite_out_dir=True', '--seed=7'])
    assert result.returncode == 0, result.stderr
    assert (out_dir / 'ckpt.pt').read_bytes() != ckpt


def test_a_second_run_into_a_live_runs_folder_is_refused(runner, tiny_data, tmp_path):
    """Two runs into one out_dir at once would interleave one log and overwrite each other's
    checkpoint: while the first lives, the second (new or resumed) is refused in one line."""
    out_dir = tmp_path / 'out'
    args = [*TINY, f'--data_dir={tiny_data}', '--eval_interval=1000', f'--out_dir={out_dir}']
    first = subprocess.Popen([sys.executable, os.path.join(REPO, 'train.py'), *args, '--max_iters=100000'],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
                             env={**os.environ, 'OMP_NUM_THREADS': '1'})
    try:
        deadline = time.time() + 120
        while not (out_dir / 'metrics.jsonl').exists() and time.time() < deadline:
            time.sleep(0.05)
        for extra in ([], ['--init_from=resume'], ['--overwrite_out_dir=True']):
            result = runner.run([*args, '--max_iters=2', *extra])
            assert_one_line_error(result, f"out_dir={out_dir} is in use by another training run (pid {first.pid})")
    finally:
        first.kill()
        first.wait()
    # the first one gone (killed: the OS drops its lock), the folder is free again
    result = runner.run([*args, '--max_iters=2', '--overwrite_out_dir=True'])
    assert result.returncode == 0, result.stderr


# -----------------------------------------------------------------------------
# a save that fails

FULL_DISK = r'''
import errno, os, runpy, sys
import torch
code, script = int(sys.argv[1]), sys.argv[2]
def save(obj, f, *args, **kwargs):  # what a full disk (or a folder that turned read-only) does to a save
    f.write(b'half a checkpoint')
    raise OSError(code, os.strerror(code))
torch.save = save
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name='__main__')
'''


@pytest.mark.parametrize('code', [errno.ENOSPC, errno.EACCES])
def test_a_save_that_fails_is_one_line_and_keeps_the_previous_checkpoint(runner, tiny_data, tmp_path, code):
    """No space left, or no permission, at a save: one line names the file and the cause, the
    run stops (exit code 1) rather than train on with nothing to go back to, the previous
    checkpoint is whole and no half-written file is left beside it."""
    out_dir = tmp_path / 'out'
    args = [*TINY, f'--data_dir={tiny_data}', '--eval_interval=2', '--always_save_checkpoint=True',
            f'--out_dir={out_dir}']
    assert runner.run([*args, '--max_iters=2']).returncode == 0
    ckpt = (out_dir / 'ckpt.pt').read_bytes()
    driver = tmp_path / 'full_disk.py'
    driver.write_text(FULL_DISK)
    result = runner.run([str(code), os.path.join(REPO, 'train.py'), *args, '--max_iters=6', '--init_from=resume'],
                        script=str(driver))
    assert_one_line_error(result, f"cannot save {out_dir / 'ckpt.pt'}: {os.strerror(code)}",
                          'the checkpoint of iter 2 is kept', code=1)
    assert (out_dir / 'ckpt.pt').read_bytes() == ckpt
    assert sorted(os.listdir(out_dir)) == ['.train.lock', 'ckpt.pt', 'metrics.jsonl']
