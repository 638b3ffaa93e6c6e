"""Tests of plot.py: pictures from hand-written metrics.jsonl files and the one-line
errors. CPU only."""

import json
import os
import subprocess
import sys

import pytest

import plot

REPO = os.path.dirname(os.path.abspath(__file__))


def run(args, cwd=REPO):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=240)


def assert_one_line_error(stderr, *fragments):
    assert 'Traceback' not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# -----------------------------------------------------------------------------
# hand-written metrics: 2 MoE layers, 3 experts, train lines every 10 iterations, evals at 0 and 20

def layer(i, zero=0, optional=False, val=False):
    entry = {'layer': i, 'load': [0.5, 0.5, 0.0] if zero else [0.4, 0.3, 0.3], 'zero_token_experts': zero,
             'max_vio': 0.2 * (i + 1), 'load_cv': 0.1, 'router_entropy': 1.0, 'routing_variance': 0.01,
             'dropped_frac': 0.0}
    if val:
        entry.update(gate_cos_sim=0.3, pair_coactivation=0.05 * (i + 1))
    if val and optional:
        entry.update(expert_overlap=0.1 * (i + 1), gate_angle=1.2, gate_spectral_entropy=1.0,
                     gate_similarity=[[1.0, 0.2, -0.1], [0.2, 1.0, 0.4], [-0.1, 0.4, 1.0]],
                     specialization=0.5 + i, expert_label_counts=[[5, 0], [1, 4], [0, 0]],
                     zero_token_experts_per_batch=0.5)
    return entry


def metrics_lines(optional=False, n_layer=2):
    lines = []
    for it, zeros, speed in ((0, [1, 0], 100.0), (10, [0, 0], 200.0), (20, [0, 1], 300.0), (30, [0, 0], 400.0),
                             (40, [0, 0], 600.0)):
        if it in (0, 30):
            val = {'iter': it, 'split': 'val', 'loss': 3.0 - it / 20, 'train_loss': 3.1 - it / 20, 'lr': 1e-3,
                   'losses': {}, 'layers': [layer(i, optional=optional, val=True) for i in range(n_layer)]}
            if optional:
                val['label_names'] = ['math', 'code']
            lines.append(val)
        lines.append({'iter': it, 'split': 'train', 'loss': 3.2 - it / 20, 'lr': 1e-3, 'losses': {'aux': 0.01},
                      'layers': [layer(i, zero=zeros[i]) for i in range(n_layer)], 'time_ms': 10.0,
                      'tokens_per_s': speed, 'mfu': -1.0})
    return lines


def write_run(path, lines, run_info=None):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, 'metrics.jsonl'), 'w') as f:
        f.writelines(json.dumps(line) + '\n' for line in lines)
    if run_info:
        with open(os.path.join(path, 'run.json'), 'w') as f:
            json.dump(run_info, f)
    return str(path)


# -----------------------------------------------------------------------------
# plot.py

def test_plot_writes_every_png(tmp_path, capsys):
    pytest.importorskip('matplotlib', reason='plot.py needs matplotlib')
    full = write_run(tmp_path / 'topk-s1', metrics_lines(optional=True), {'router': 'topk', 'seed': 1})
    plain = write_run(tmp_path / 'plain', metrics_lines(optional=False))
    dense = write_run(tmp_path / 'dense', [{**line, 'layers': []} for line in metrics_lines()])
    odd = metrics_lines(optional=True)  # optional fields of an unexpected shape are skipped, not a crash
    for line in odd:
        line.pop('label_names', None)
        for entry in line['layers']:
            entry.update(gate_similarity=[[1.0], [0.5, 1.0]], expert_label_counts='many')
    odd = write_run(tmp_path / 'odd', odd)
    plot.main([full, plain, dense, odd])
    printed = capsys.readouterr().out.splitlines()
    every = ['zero_token.png', 'load.png', 'specialization.png', 'gate_similarity.png', 'val_metrics.png']
    assert sorted(os.listdir(full)) == sorted(['metrics.jsonl', 'run.json', *every])
    assert sorted(os.listdir(plain)) == sorted(['metrics.jsonl', 'zero_token.png', 'load.png', 'val_metrics.png'])
    assert os.listdir(dense) == ['metrics.jsonl']
    assert sorted(os.listdir(odd)) == sorted(os.listdir(plain))
    assert (tmp_path / 'loss.png').exists()  # the overlay goes to the runs' common parent
    for name in every:
        assert os.path.join(full, name) in printed
    assert str(tmp_path / 'loss.png') in printed
    skipped = os.path.join(plain, 'specialization.png')
    assert f"skipped {skipped}: the run logs no expert_label_counts on the last val line" in printed
    for path in [os.path.join(full, name) for name in every] + [str(tmp_path / 'loss.png')]:
        assert os.path.getsize(path) < 300_000  # dpi 100: small files

    plot.main([dense, f'--out={tmp_path / "figs"}'])
    assert os.listdir(tmp_path / 'figs') == ['loss.png']


def test_run_labels(tmp_path):
    assert plot.run_label(write_run(tmp_path / 'a', [], {'router': 'switch', 'seed': 7})) == ('switch s7', 'switch')
    os.makedirs(tmp_path / 'b')
    with open(tmp_path / 'b' / 'config.json', 'w') as f:
        json.dump({'router': 'topk', 'seed': 3, 'n_exp': 1}, f)
    assert plot.run_label(str(tmp_path / 'b')) == ('dense s3', 'dense')
    assert plot.run_label(str(tmp_path / 'c') + '/') == ('c', 'c')


def test_plot_without_matplotlib_is_one_line_error(tmp_path):
    run_dir = write_run(tmp_path / 'run', metrics_lines())
    block = ("import sys; sys.modules['matplotlib'] = None; sys.argv = ['plot.py', %r]; "
             "exec(compile(open('plot.py').read(), 'plot.py', 'exec'))" % run_dir)
    result = run(['-c', block])
    assert result.returncode == 2
    assert_one_line_error(result.stderr, 'plot.py needs matplotlib: pip install matplotlib')
    assert os.listdir(run_dir) == ['metrics.jsonl']


@pytest.mark.parametrize('content, fragment', [
    (None, 'metrics.jsonl'),  # a folder without one
    ('', 'is empty'),
    ('{"iter": 0, "split": "train"}\n{not json\n', 'line 2 is not JSON'),
    ('[1, 2]\n', 'line 1 is not a train.py metrics line'),
])
def test_plot_bad_run_is_one_line_error(tmp_path, capsys, content, fragment):
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    if content is not None:
        (run_dir / 'metrics.jsonl').write_text(content)
    with pytest.raises(SystemExit) as e:
        plot.main([str(run_dir)])
    assert e.value.code == 2
    assert_one_line_error(capsys.readouterr().err, str(run_dir / 'metrics.jsonl'), fragment)


def test_plot_cli_errors(tmp_path):
    result = run(['plot.py', str(tmp_path / 'nowhere')])
    assert result.returncode == 2
    assert_one_line_error(result.stderr, 'nowhere is not a folder')
    result = run(['plot.py'])
    assert result.returncode == 2 and 'usage: python plot.py OUT_DIR' in result.stderr
