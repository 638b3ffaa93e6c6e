"""End-to-end tests of train.py and sample.py as a user runs them (subprocesses), on a
tiny generated dataset in a temporary folder. Also the config parser, in-process."""

import json
import os
import pickle
import re
import subprocess
import sys
from typing import Optional

import numpy as np
import pytest
import torch

from configurator import ConfigError, apply_overrides
from model import GPT, GPTConfig
from test_checkpoint import assert_one_line_error, records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, above tests/
TINY = ['--device=cpu', '--n_layer=2', '--n_head=2', '--n_embd=32', '--n_exp=4', '--top_k=2',
        '--batch_size=4', '--block_size=16', '--eval_iters=2', '--log_interval=5', '--warmup_iters=2']


def run(args, cwd=REPO, script='train.py'):
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=240)


# -----------------------------------------------------------------------------
# the config parser, in-process


def test_overrides_parse_and_convert(tmp_path):
    defaults = {'learning_rate': 1e-3, 'n_layer': 4, 'router': 'topk', 'compile': False, 'capacity_factor': None}
    config_file = tmp_path / 'my_config.py'
    config_file.write_text("n_layer = 6\nrouter = 'topk'\nimport os\n_private = 1\n")
    config, user_keys = apply_overrides(defaults, [str(config_file), '--learning_rate=1', '--compile=True',
                                                   '--capacity_factor=1.25'], {'capacity_factor': Optional[float]})
    assert config == {'learning_rate': 1.0, 'n_layer': 6, 'router': 'topk', 'compile': True, 'capacity_factor': 1.25}
    assert isinstance(config['learning_rate'], float)
    assert user_keys == {'n_layer', 'router', 'learning_rate', 'compile', 'capacity_factor'}


@pytest.mark.parametrize('argv, message', [
    (['--lerning_rate=1e-3'], "unknown config key 'lerning_rate' in --lerning_rate; did you mean learning_rate?"),
    (['--n_layer=abc'], "n_layer expects int, got 'abc' (str) in --n_layer"),
    (['--n_layer=2.5'], "n_layer expects int, got 2.5 (float) in --n_layer"),
    (['--n_layer=True'], "n_layer expects int, got True (bool)"),
    (['--compile'], "argument '--compile' needs a value: write --compile=VALUE"),
    (['no/such/config.py'], "config file 'no/such/config.py' not found"),
])
def test_override_errors(argv, message):
    defaults = {'learning_rate': 1e-3, 'n_layer': 4, 'compile': False}
    with pytest.raises(ConfigError) as e:
        apply_overrides(defaults, argv)
    assert message in str(e.value)


# -----------------------------------------------------------------------------
# train.py end to end


def test_train_logs_checkpoints_resumes_and_samples(tiny_data, tmp_path):
    out_dir = str(tmp_path / 'out')
    result = run([*TINY, f'--data_dir={tiny_data}', f'--out_dir={out_dir}', '--max_iters=20', '--eval_interval=10',
                  '--learning_rate=1e-2'])
    assert result.returncode == 0, result.stderr
    assert 'step 10: train loss' in result.stdout and 'zero-token' in result.stdout  # routing table

    # metrics.jsonl: the schema the README documents
    records = [json.loads(line) for line in open(os.path.join(out_dir, 'metrics.jsonl'))]
    train = [r for r in records if r['split'] == 'train']
    val = [r for r in records if r['split'] == 'val']
    assert [r['iter'] for r in train] == [0, 5, 10, 15]  # 20 steps, 0..19; iteration 20 is evaluated
    assert [r['iter'] for r in val] == [0, 10, 20]
    for r in records:
        assert {'iter', 'split', 'loss', 'lr', 'losses', 'layers'} <= set(r)
        assert set(r['losses']) == {'aux', 'z'}
        assert [layer['layer'] for layer in r['layers']] == [0, 1]
        for layer in r['layers']:
            assert len(layer['load']) == 4 and abs(sum(layer['load']) - 1) < 1e-6
            assert 0 <= layer['zero_token_experts'] <= 4
            assert layer['max_vio'] >= 0 and 0 <= layer['router_entropy'] <= np.log(4) + 1e-6
            assert 0 <= layer['expert_overlap'] <= 1 and 0 <= layer['pair_coactivation'] <= 1
            assert 0 <= layer['gate_angle'] <= 180 and 0 <= layer['gate_spectral_entropy'] <= np.log(4) + 1e-6
    for r in val:  # the dataset has characters: labels are character classes
        assert r['label_names'] == ['letter', 'digit', 'space', 'punctuation', 'newline']
        for layer in r['layers']:
            assert 0 <= layer['specialization'] <= 1 and len(layer['gate_similarity']) == 4
            assert np.array(layer['expert_label_counts']).shape == (4, 5)
            assert np.array(layer['expert_label_counts']).sum() == 2 * 4 * 16  # eval_iters x batch x block, all top-1
            assert layer['zero_token_experts_per_batch'] >= layer['zero_token_experts']
    assert val[-1]['loss'] < val[0]['loss']  # it learns

    # on a CPU no MFU (a share of a GPU's peak says nothing there), and a closing line with the
    # best val loss, the checkpoint and the next commands
    iter_lines = [line for line in result.stdout.splitlines() if line.startswith('iter ') and ': loss' in line]
    assert iter_lines and not any('mfu' in line for line in iter_lines) and all(r['mfu'] is None for r in train)
    assert 'mfu not shown on cpu' in result.stdout
    done = result.stdout.splitlines()[-1]
    assert done.startswith('done: iter 20 in ') and f"best val loss {min(r['loss'] for r in val):.4f}" in done
    assert f"checkpoint {os.path.join(out_dir, 'ckpt.pt')} (iter 20)" in done and f"python plot.py {out_dir}" in done

    ckpt = torch.load(os.path.join(out_dir, 'ckpt.pt'), weights_only=True)
    assert ckpt['iter_num'] == 20 and ckpt['model_args']['n_exp'] == 4
    assert set(ckpt) >= {'model', 'optimizer', 'model_args', 'iter_num', 'best_val_loss', 'config'}

    # resume: continues at the saved iteration, with the saved weights and optimizer
    result = run([*TINY, f'--data_dir={tiny_data}', f'--out_dir={out_dir}', '--max_iters=30', '--eval_interval=10',
                  '--init_from=resume'])
    assert result.returncode == 0, result.stderr
    assert 'resuming from' in result.stdout and 'at iter 20' in result.stdout
    records = [json.loads(line) for line in open(os.path.join(out_dir, 'metrics.jsonl'))]
    # appended: the eval of iteration 20 is not repeated (the checkpoint was saved right after it)
    assert [r['iter'] for r in records if r['split'] == 'val'] == [0, 10, 20, 30]
    assert [r['iter'] for r in records if r['split'] == 'train'] == [0, 5, 10, 15, 20, 25]
    resumed = [r for r in records if r['split'] == 'train' and r['iter'] == 20][0]
    val = [r['loss'] for r in records if r['split'] == 'val']
    assert abs(resumed['loss'] - val[2]) < 0.3  # same model: not back at the initial loss
    assert resumed['loss'] < val[0] - 0.1

    # sample.py on that checkpoint, with the expert of each character
    result = run([f'--out_dir={out_dir}', '--num_samples=1', '--max_new_tokens=20', '--show_experts=True',
                  '--start=ab', '--device=cpu'], script='sample.py')
    assert result.returncode == 0, result.stderr
    assert '<- layer 0' in result.stdout and '<- layer 1' in result.stdout
    assert 'experts per token' not in result.stdout  # top-k: every token takes 2, nothing to show

    # a prompt ending in a newline: the shown text starts with it, drawn as the legend's mark,
    # so the rows under it stay aligned (a raw newline would split the text row in two)
    (tmp_path / 'prompt.txt').write_text('ab\n')
    result = run([f'--out_dir={out_dir}', '--num_samples=1', '--max_new_tokens=20', '--show_experts=True',
                  f'--start=FILE:{tmp_path / "prompt.txt"}', '--device=cpu'], script='sample.py')
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    legend = next(line for line in lines if line.startswith('(a newline shows as '))
    mark = legend.split('(a newline shows as ')[1][0]
    prompt = next(i for i, line in enumerate(lines) if line.startswith('prompt '))
    text_row, layer_row = lines[prompt + 1], lines[prompt + 2]
    # 20 characters: the prompt's last one, then 19 generated ones fed back (the 20th is never fed)
    assert text_row.startswith(mark) and len(text_row) == len(layer_row.split('   <- layer')[0]) == 20


# train.py under a made-up GPU peak (a CPU has none, so no MFU), recording what each
# estimate_mfu call is given
MFU_DRIVER = '''
import json, runpy, sys
import model, system
calls_path, script = sys.argv[1], sys.argv[2]
sys.argv = [script, *sys.argv[3:]]
system.peak_flops = lambda device_name: (1e12, 'a made-up peak of 1 TFLOPS')
calls = []
estimate_mfu = model.GPT.estimate_mfu
def recording(self, fwdbwd_per_iter, dt, peak_flops=312e12, experts_per_token=None):
    calls.append(experts_per_token)
    return estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops, experts_per_token)
model.GPT.estimate_mfu = recording
try:
    runpy.run_path(script, run_name='__main__')
finally:
    with open(calls_path, 'w') as f:
        json.dump(calls, f)
'''


def test_a_topp_run_counts_the_experts_that_ran_and_sample_shows_them(runner, tiny_data, tmp_path):
    """Top-p gives each token as many experts as it needs: MFU counts the experts that ran
    (each logged step's experts_per_token, per layer), and sample.py --show_experts adds a
    row per layer with how many experts each character took."""
    out_dir, calls_path, driver = tmp_path / 'out', tmp_path / 'calls.json', tmp_path / 'mfu_driver.py'
    driver.write_text(MFU_DRIVER)
    result = runner.run([str(calls_path), os.path.join(REPO, 'train.py'), *TINY, f'--data_dir={tiny_data}',
                         f'--out_dir={out_dir}', '--router=topp', '--max_iters=8', '--eval_interval=8',
                         '--log_interval=1'], script=str(driver))
    assert result.returncode == 0, result.stderr
    # sized at top_k = 2, what a token takes on average: said so
    assert re.search(r"M active per token \(at top_k=2 experts\)", result.stdout)
    # train.py estimates MFU from the 6th step on (steps 5, 6, 7), each with that step's logged means
    logged = [{str(layer['layer']): layer['experts_per_token'] for layer in r['layers']}
              for r in records(out_dir) if r['split'] == 'train' and r['iter'] >= 5]
    assert json.loads(calls_path.read_text()) == logged and len(logged) == 3
    assert any(k != 2.0 for step in logged for k in step.values())  # not top_k: top-p varies
    assert all(r['mfu'] > 0 for r in records(out_dir) if r['split'] == 'train' and r['iter'] >= 5)

    result = runner.run([f'--out_dir={out_dir}', '--num_samples=1', '--max_new_tokens=20', '--show_experts=True',
                         '--start=ab', '--device=cpu'], script='sample.py')
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    legend = next(i for i, line in enumerate(lines) if line.startswith('(a newline shows as '))
    assert "how many experts it took in the layer: 0-9, '+' beyond" in lines[legend]
    mark = lines[legend].split('(a newline shows as ')[1][0]
    prompt = next(i for i, line in enumerate(lines) if line.startswith('prompt '))  # the legend is printed once
    text_row, rows = lines[prompt + 1], lines[prompt + 2:prompt + 6]
    assert [row.split('   <- ')[1] for row in rows] == ['layer 0', 'layer 0: experts per token',
                                                         'layer 1', 'layer 1: experts per token']
    shown = {layer: rows[2 * layer + 1].split('   <- ')[0] for layer in (0, 1)}
    # the oracle: the model on each prefix (its last block_size tokens, as generation feeds
    # them), its last token's kept pairs counted one by one. The text row starts at the
    # prompt's last character: prefix i is 'a' + text[:i + 1]
    checkpoint = torch.load(out_dir / 'ckpt.pt', weights_only=True)
    model = GPT(GPTConfig(**checkpoint['model_args']))
    model.load_state_dict(checkpoint['model'])
    model.eval()
    with open(os.path.join(tiny_data, 'meta.pkl'), 'rb') as f:
        stoi = pickle.load(f)['stoi']
    ids = [stoi['a']] + [stoi['\n' if c == mark else c] for c in text_row]
    expected = {0: '', 1: ''}
    with torch.no_grad():
        for i in range(len(text_row)):
            prefix = ids[:i + 2][-model.config.block_size:]
            routings = model(torch.tensor([prefix]))[3]
            last = len(prefix) - 1  # the token index of the prefix's last token (one sequence)
            for layer, r in routings.items():
                n = sum(1 for t, k in zip(r.token_idx.tolist(), r.kept.tolist()) if t == last and k)
                expected[layer] += str(n)
    assert shown == expected and len(text_row) == 20
    assert set(shown[0] + shown[1]) <= set('1234')  # top-p keeps 1 to max_k = 4 experts


def test_a_steps_time_leaves_out_its_eval(tiny_data, tmp_path):
    """time_ms and tokens_per_s measure the training step: the eval at the top of an
    iteration (here 2 x 10 batches with their routing tables, many steps' work) must not show
    up in that step's time, or an eval step reads as a slow step. The eval's own time is on
    its step line."""
    out_dir = tmp_path / 'out'
    result = run([*TINY, f'--data_dir={tiny_data}', f'--out_dir={out_dir}', '--max_iters=8', '--eval_interval=4',
                  '--eval_iters=10', '--log_interval=1'])
    assert result.returncode == 0, result.stderr
    assert re.search(r"step 4: train loss [\d.]+, val loss [\d.]+ \(eval \d+\.\ds\)", result.stdout)
    eval_ms = next(r['eval_ms'] for r in records(out_dir) if r['split'] == 'val' and r['iter'] == 4)
    step_ms = next(r['time_ms'] for r in records(out_dir) if r['split'] == 'train' and r['iter'] == 4)
    # with the eval counted, iteration 4's time would be at least the eval's
    assert step_ms < eval_ms / 2, (step_ms, eval_ms)


def test_resume_errors_write_nothing(tiny_data, tmp_path):
    out_dir = tmp_path / 'out'
    result = run([*TINY, f'--data_dir={tiny_data}', f'--out_dir={out_dir}', '--max_iters=4', '--eval_interval=2'])
    assert result.returncode == 0, result.stderr
    ckpt_before = (out_dir / 'ckpt.pt').read_bytes()
    log_before = (out_dir / 'metrics.jsonl').read_text()

    # a dataset with another vocabulary
    other = tmp_path / 'otherdata'
    other.mkdir()
    np.arange(3000, dtype=np.uint16).tofile(other / 'train.bin')
    np.arange(3000, dtype=np.uint16).tofile(other / 'val.bin')
    with open(other / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': 3000}, f)
    result = run([*TINY, f'--data_dir={other}', f'--out_dir={out_dir}', '--init_from=resume'])
    assert_one_line_error(result, 'vocab_size=13', 'vocab_size=3000')

    # an architecture change on resume
    result = run([*TINY, f'--data_dir={tiny_data}', f'--out_dir={out_dir}', '--init_from=resume', '--n_layer=3'])
    assert_one_line_error(result, 'n_layer=3', "checkpoint's n_layer=2")

    assert (out_dir / 'ckpt.pt').read_bytes() == ckpt_before
    assert (out_dir / 'metrics.jsonl').read_text() == log_before


@pytest.mark.parametrize('args, fragments', [
    (['--top_k=5'], ['top_k=5', 'n_exp=4']),
    (['--n_embd=33'], ['n_embd=33', 'n_head=2']),
    (['--block_size=5000'], ['block_size=5000', 'lower --block_size']),
    (['--router=nope'], ["unknown router 'nope'", 'topk']),
    (['--router=switch'], ["router 'switch' needs top_k=1, got top_k=2", 'drop --top_k']),  # TINY sets top_k=2
    (['--router=remoe', '--balance_scope=global'], ["balance_scope='global': router 'remoe' has no Switch balance"]),
    (['--lerning_rate=0.1'], ["'lerning_rate'", 'learning_rate']),
    (['--max_iters=ten'], ['max_iters expects int', "'ten'"]),
    (['--EVAL=3'], ["unknown config key 'EVAL'"]),  # a constant train.py imports is not a setting
    (['--init_from=resume'], ['ckpt.pt does not exist']),
])
def test_bad_settings_are_one_line_errors(tiny_data, tmp_path, args, fragments):
    out_dir = tmp_path / 'out'
    result = run([*TINY, f'--data_dir={tiny_data}', f'--out_dir={out_dir}', *args])
    assert_one_line_error(result, *fragments)
    assert not out_dir.exists()  # nothing written


def test_missing_dataset_names_the_prepare_command(tmp_path):
    result = run([*TINY, '--dataset=shakespeare_char', f'--data_dir={tmp_path / "empty"}', f'--out_dir={tmp_path / "out"}'])
    assert_one_line_error(result, 'python data/shakespeare_char/prepare.py')
    assert not (tmp_path / 'out').exists()
