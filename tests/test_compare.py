"""Tests of plot.py and compare.py: pictures from hand-written metrics.jsonl files, the
one-line errors, the results-table statistics worked out by hand, and compare.py end to
end (train.py subprocesses on a tiny model and dataset). CPU only."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest

import compare
import plot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, above tests/


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
# the results-table statistics, by hand

def test_run_stats_by_hand():
    stats = compare.run_stats(metrics_lines(optional=True))
    assert stats['val_loss'] == 1.5  # last val line (iter 30): 3.0 - 30/20
    # every logged step but the first (a warm-up; train.py leaves an eval's time out of its
    # step): (200 + 300 + 400 + 600) / 4
    assert stats['tokens_per_s'] == pytest.approx(375)
    # zero_token_experts by iteration, layers 0/1: 1/0, 0/0, 0/1, 0/0, 0/0 -> for good from 30
    assert stats['all_experts_iter'] == 30
    assert stats['max_vio'] == pytest.approx(0.3)  # mean of 0.2 and 0.4
    assert stats['pair_coactivation'] == pytest.approx(0.075)
    assert stats['expert_overlap'] == pytest.approx(0.15)
    assert stats['specialization'] == pytest.approx(1.0)  # mean of 0.5 and 1.5
    assert stats['zero_token_experts'] == 0 and stats['zero_token_experts_per_batch'] == 0.5
    # layer means of the train lines: .5, 0, .5, 0, 0 -> 1/5
    assert stats['zero_token_train_mean'] == pytest.approx(0.2)
    assert stats['dropped_train_mean'] == 0.0

    lines = metrics_lines()
    train = plot.by_iter(lines, 'train')
    train[1]['layers'][0]['dropped_frac'] = 0.1  # iteration 10, layer 0
    train[2]['layers'][1]['dropped_frac'] = 0.3  # iteration 20, layer 1
    # layer means by iteration 0, .05, .15, 0, 0 -> .2 / 5; the val lines' dropped_frac (0) do not count
    assert compare.run_stats(lines)['dropped_train_mean'] == pytest.approx(0.04)

    plain = compare.run_stats(metrics_lines(optional=False))
    assert plain['expert_overlap'] is None and plain['specialization'] is None and plain['gate_angle'] is None
    assert plain['zero_token_experts_per_batch'] is None and plain['max_vio'] == pytest.approx(0.3)
    # specialization logged once for the model, not per layer
    lines = metrics_lines()
    [val for val in lines if val['split'] == 'val'][-1]['specialization'] = 0.7
    assert compare.run_stats(lines)['specialization'] == 0.7


def test_task_table_by_hand():
    lines = metrics_lines()
    last = [line for line in lines if line['split'] == 'val'][-1]
    last['answer_accuracy'] = {'arithmetic': 0.5, 'lists': 0.25}
    last['eval_also'] = {'dataset': 'domains', 'loss': 1.2, 'other_domains_loss': 1.4,
                         'domain_loss': {'arithmetic': 0.6, 'english': 1.4}}
    stats = compare.run_stats(lines)
    assert stats['answer_accuracy'] == 0.375  # (0.5 + 0.25) / 2
    assert stats['also_loss'] == 1.2 and stats['other_domains_loss'] == 1.4 and stats['also_loss:english'] == 1.4
    plain = compare.run_stats(metrics_lines())
    assert plain['answer_accuracy'] is None and plain['also_loss'] is None
    # a table only when some run logs it; a row without it reads n/a
    assert compare.task_section(['a'], {'a': [plain]}) == []
    section = '\n'.join(compare.task_section(['a', 'b'], {'a': [stats, stats], 'b': [plain]}))
    assert ('| router | exact-match answers | val loss on domains | on the domains not trained on | on arithmetic '
            '| on english |') in section
    assert '| a | 0.375 ± 0.000 | 1.2000 ± 0.0000 | 1.4000 ± 0.0000 | 0.6000 ± 0.0000 | 1.4000 ± 0.0000 |' in section
    assert '| b | n/a | n/a | n/a | n/a | n/a |' in section


def test_zero_token_at_by_hand():
    # logged steps 0, 10, 20, 30, 40 with zero-token experts [1, 0], [0, 0], [0, 1], [0, 0], [0, 0]
    stats = compare.run_stats(metrics_lines(), [0, 5, 20, 25, 100])
    assert stats['zero_token_at:0'] == 0.5  # (1 + 0) / 2
    assert stats['zero_token_at:5'] == 0.5  # not logged: the step before it, 0
    assert stats['zero_token_at:20'] == 0.5 and stats['zero_token_at:25'] == 0.5
    assert stats['zero_token_at:100'] == 0.0  # the last logged step, 40
    later = [line for line in metrics_lines() if line['iter'] >= 10]
    assert compare.run_stats(later, [5])['zero_token_at:5'] is None  # nothing logged by then
    section = '\n'.join(compare.zero_token_section([0, 100], ['a'], {'a': [stats, stats]}))
    assert '| router | iter 0 | iter 100 |' in section and '| a | 0.50 ± 0.00 | 0.00 ± 0.00 |' in section
    assert compare.zero_token_section([], ['a'], {'a': [stats]}) == []


def test_all_experts_used_iter_by_hand():
    lines = metrics_lines()
    train = plot.by_iter(lines, 'train')
    assert compare.all_experts_used_iter(train) == 30
    train[-1]['layers'][1]['zero_token_experts'] = 2  # the last step (40) still has a dead expert
    assert compare.all_experts_used_iter(train) == math.inf
    # a resumed run logged iteration 40 again, now with every expert used: the later line wins
    lines.append({**lines[-1], 'layers': [layer(0), layer(1)]})
    assert compare.all_experts_used_iter(plot.by_iter(lines, 'train')) == 30
    assert compare.all_experts_used_iter([{'iter': 0, 'split': 'train', 'layers': []}]) is None  # dense


def test_mean_std_and_cells_by_hand():
    m, s = compare.mean_std([1.0, 2.0, 4.0])
    # mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 42/9, / (3 - 1) = 7/3, sqrt = 1.5275
    assert m == pytest.approx(7 / 3) and s == pytest.approx(math.sqrt(7 / 3))
    assert compare.cell([1.0, 2.0, 4.0], '.3f') == '2.333 ± 1.528'
    assert compare.cell([1.5], '.3f') == '1.500'  # one seed: no spread
    assert compare.cell([None, None], '.3f') == 'n/a'
    assert compare.cell([math.inf, math.inf], '.0f') == 'never'
    assert compare.cell([10, math.inf, 30], '.0f') == '20 ± 14 (never in 1 of 3)'


def test_paired_table_by_hand():
    val_loss = {('topk', 1): 1.5, ('topk', 2): 1.7, ('ortho', 1): 1.4, ('ortho', 2): 1.5,
                ('dense', 1): 1.6, ('dense', 2): None}
    lines = compare.paired_table(['topk', 'ortho', 'dense'], [1, 2], val_loss).splitlines()
    assert lines[0] == '| router | seed 1 | seed 2 | minus topk, same seed |'
    assert lines[2] == '| topk | 1.5000 | 1.7000 | baseline |'
    # differences -0.1 and -0.2: mean -0.15, sample std sqrt(((.05)^2 + (.05)^2) / 1) = 0.0707
    assert lines[3] == '| ortho | 1.4000 | 1.5000 | -0.1500 ± 0.0707 (2 of 2 lower) |'
    assert lines[4] == '| dense | 1.6000 | n/a | +0.1000 (0 of 1 lower) |'  # one seed in common: no spread


def markdown_tables(text):
    """The tables of a markdown text in order, each as (headers, {first cell: the row's cells})."""
    tables, block = [], []
    for line in [*text.splitlines(), '']:
        if line.startswith('|'):
            block.append([cell.strip() for cell in line.strip('|').split('|')])
        elif block:
            headers, rows = block[0], block[2:]  # block[1] is the | --- | line
            tables.append((headers, {row[0]: dict(zip(headers, row)) for row in rows}))
            block = []
    return tables


def results_tables(stats_by_row):
    """results.md's first table and its 'More numbers' table for runs with these stats, one seed each."""
    rows = list(stats_by_row)
    config = {'routers': rows, 'seeds': [1], 'jobs': 1, 'zero_token_at': [], 'compare_dir': 'cmp'}
    runs = [(f"{row}-s1", row, 1, f"cmp/{row}-s1", ['python', 'train.py', f'--router={row}']) for row in rows]
    stats = {f"{row}-s1": stats_by_row[row] for row in rows}
    text = compare.results_markdown(config, runs, stats, {name: 1.0 for name in stats}, ['compare.py'], 1.0, 0, None)
    tables = markdown_tables(text)
    assert tables[1][0] == ['router', 'seed 1', f"minus {rows[0]}, same seed"]  # the paired table between them
    assert 'More numbers of each run:' in text.split('| router | seed 1 |')[1].split('| router |')[0]
    return tables[0][0][1:], tables[2][0][1:]


# every column of the two tables; lessons/, RESULTS.md and docs quote these headers
EVERY_HEADER = ['val loss', 'tokens/s', 'zero-token experts', 'zero-token per batch', 'zero-token, training mean',
                'iters until all experts used', 'max_vio', 'routing_variance', 'expert_overlap', 'pair_coactivation',
                'specialization', 'router_entropy', 'load_cv', 'dropped_frac', 'dropped, training mean',
                'gate_cos_sim', 'gate_angle', 'gate_spectral_entropy', 'experts per token']


def test_first_table_is_short_and_takes_the_columns_that_matter_for_the_runs():
    def stats(pairs=False, drops=False, idle=False, variable_k=False):
        lines = metrics_lines(optional=pairs)  # optional: expert_overlap is logged, as for top-2
        for line in lines:
            for entry in line['layers']:
                if not pairs and 'pair_coactivation' in entry:
                    entry['pair_coactivation'] = 0.0  # top-1: no second expert to co-activate
        train = plot.by_iter(lines, 'train')
        if drops:
            train[1]['layers'][0]['dropped_frac'] = 0.1
        if idle:
            train[-1]['layers'][1]['zero_token_experts'] = 2  # still an idle expert at the end: never all used
        for step, line in enumerate(train):
            for entry in line['layers']:  # top-2 less its drops at every step; topp's wanders: 1.5, 1.6, ... 1.9
                entry['experts_per_token'] = 1.5 + step / 10 if variable_k else 2.0 * (1 - entry['dropped_frac'])
        return compare.run_stats(lines)

    core = ['val loss', 'tokens/s', 'zero-token experts', 'max_vio', 'specialization']
    first, more = results_tables({'switch': stats()})
    assert first == core
    assert sorted(first + more) == sorted(EVERY_HEADER)  # every number still in one of the two tables
    # one run that drops is enough to bring lesson 4's numbers to the first table
    first, more = results_tables({'switch': stats(), 'switch-cf1.0': stats(drops=True)})
    assert first == core + ['dropped, training mean', 'dropped_frac']
    assert sorted(first + more) == sorted(EVERY_HEADER)
    first, more = results_tables({'topk': stats(pairs=True)})
    assert first == core + ['pair_coactivation', 'expert_overlap']
    first, more = results_tables({'topk-noaux': stats(pairs=True, idle=True), 'switch-cf1.0': stats(drops=True)})
    assert first == core + ['zero-token, training mean', 'iters until all experts used', 'pair_coactivation',
                            'expert_overlap', 'dropped, training mean', 'dropped_frac']
    assert sorted(first + more) == sorted(EVERY_HEADER)
    # a topp run beside a top-k one: how many experts the tokens took comes to the first table
    first, more = results_tables({'topk': stats(pairs=True), 'topp': stats(pairs=True, variable_k=True)})
    assert first == core + ['pair_coactivation', 'expert_overlap', 'experts per token']
    assert sorted(first + more) == sorted(EVERY_HEADER)


def test_experts_per_token_column_by_hand():
    lines = metrics_lines()
    for step, line in enumerate(plot.by_iter(lines, 'train')):
        for entry in line['layers']:
            entry['experts_per_token'] = 1.5 + step / 10  # varies from step to step: topp
    for line in plot.by_iter(lines, 'val'):
        for entry in line['layers']:
            entry['experts_per_token'] = 1.6 + entry['layer'] / 2  # last eval: layers 1.6 and 2.1
    stats = compare.run_stats(lines)
    assert stats['experts_vary'] and stats['experts_per_token'] == pytest.approx(1.85)  # (1.6 + 2.1) / 2
    config = {'routers': ['topp'], 'seeds': [1], 'jobs': 1, 'zero_token_at': [], 'compare_dir': 'cmp'}
    runs = [('topp-s1', 'topp', 1, 'cmp/topp-s1', ['python', 'train.py', '--router=topp'])]
    text = compare.results_markdown(config, runs, {'topp-s1': stats}, {'topp-s1': 1.0}, ['compare.py'], 1.0, 0, None)
    headers, rows = markdown_tables(text)[0]
    assert rows['topp']['experts per token'] == '1.85'
    first_notes = text.split('Val loss seed by seed')[0]
    assert '- experts per token: the experts that ran per token, mean over the tokens' in first_notes
    assert 'experts per token: the last val line, mean over the MoE layers' in first_notes


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
    every = ['overview.png', 'zero_token.png', 'load.png', 'specialization.png', 'gate_similarity.png',
             'val_metrics.png']
    assert sorted(os.listdir(full)) == sorted(['metrics.jsonl', 'run.json', *every])
    assert sorted(os.listdir(plain)) == sorted(['metrics.jsonl', 'overview.png', 'zero_token.png', 'load.png',
                                                'val_metrics.png'])
    assert os.listdir(dense) == ['metrics.jsonl']
    assert sorted(os.listdir(odd)) == sorted(os.listdir(plain))
    for name in ('loss.png', 'curves.png', 'zero_token_layers.png'):  # to the runs' common parent
        assert (tmp_path / name).exists()
    for name in every:
        assert os.path.join(full, name) in printed
    assert str(tmp_path / 'loss.png') in printed
    skipped = os.path.join(plain, 'specialization.png')
    assert f"skipped {skipped}: the run logs no expert_label_counts on the last val line" in printed
    for path in [os.path.join(full, name) for name in every] + [str(tmp_path / 'loss.png')]:
        assert os.path.getsize(path) < 300_000  # dpi 100: small files

    plot.main([dense, f'--out={tmp_path / "figs"}'])
    assert sorted(os.listdir(tmp_path / 'figs')) == ['curves.png', 'loss.png']


def test_layer_series_by_hand():
    lines = metrics_lines()
    # train zero_token_experts, layers 0/1 at 0..40: 1/0, 0/0, 0/1, 0/0, 0/0
    assert plot.layer_series(lines, 'train', 'zero_token_experts') == {0: 0.5, 10: 0.0, 20: 0.5, 30: 0.0, 40: 0.0}
    assert plot.layer_series(lines, 'train', 'zero_token_experts', layer=1) == {0: 0, 10: 0, 20: 1, 30: 0, 40: 0}
    # val max_vio is 0.2 and 0.4 in both evals; val loss 3.0 - it/20 is the model's, not a layer mean
    assert plot.layer_series(lines, 'val', 'max_vio') == pytest.approx({0: 0.3, 30: 0.3})
    assert plot.layer_series(lines, 'val', 'loss') == {0: 3.0, 30: 1.5}
    assert plot.layer_series(lines, 'val', 'expert_overlap') == {}


def test_run_labels(tmp_path):
    assert plot.run_label(write_run(tmp_path / 'a', [], {'router': 'switch', 'seed': 7})) == ('switch s7', 'switch')
    os.makedirs(tmp_path / 'b')
    with open(tmp_path / 'b' / 'config.json', 'w') as f:
        json.dump({'router': 'topk', 'seed': 3, 'n_exp': 1}, f)
    assert plot.run_label(str(tmp_path / 'b')) == ('dense s3', 'b')
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


# -----------------------------------------------------------------------------
# compare.py: the config

def test_default_config_plans_21_runs():
    config = compare.load_config([os.path.join(REPO, 'config', 'compare_routers.py')])
    runs = compare.plan_runs(config)
    assert len(runs) == 21 and runs[0][0] == 'dense-s1337' and runs[-1][0] == 'switch-nodrop-s1339'
    # keys a router fixes or refuses are per router, never for all
    assert not {'top_k', 'aux_loss_coef', 'z_loss_coef'} & set(config['train'])
    name, router, seed, out_dir, command = runs[0]
    assert '--n_exp=1' in command and not any(arg.startswith('--router=') for arg in command)
    assert command[-1] == '--out_dir=' + os.path.join('out-compare', 'dense-s1337')
    switch = next(command for name, _, _, _, command in runs if name == 'switch-s1339')
    assert switch[-1] == '--router=switch' and '--n_exp=8' in switch
    # the variant: the same router with room for every token
    assert runs[-1][4][-1] == '--router=switch' and '--capacity_factor=8.0' in runs[-1][4]


@pytest.mark.parametrize('name', sorted(n for n in os.listdir(os.path.join(REPO, 'config'))
                                         if n.startswith(('results_', 'compare_'))))
def test_every_comparison_config_plans_its_runs(name):
    """The configs of RESULTS.md load, pass compare.py's checks and plan one run per row and seed."""
    config = compare.load_config([os.path.join(REPO, 'config', name)])
    runs = compare.plan_runs(config)
    assert len(runs) == len(config['routers']) * len(config['seeds']) >= 2
    assert all(out_dir.startswith(config['compare_dir'] + os.sep) for _, _, _, out_dir, _ in runs)
    if name.endswith('_gpu.py'):
        assert all('--device=cuda' in command for *_, command in runs)


def test_config_flags_update_the_dicts(tmp_path):
    config_file = tmp_path / 'cmp.py'
    config_file.write_text("routers = ['topk', 'switch']\ntrain = dict(n_layer=2, max_iters=10)\n"
                           "per_router = {'switch': {'capacity_factor': 2.0, 'switch_jitter': 0.0}}\n")
    config = compare.load_config([str(config_file), '--seeds=[1, 2]', "--train={'max_iters': 4}",
                                  "--per_router={'switch': {'capacity_factor': 1.0}}"])
    assert config['seeds'] == [1, 2] and config['routers'] == ['topk', 'switch']
    assert config['train'] == {'n_layer': 2, 'max_iters': 4}
    assert config['per_router'] == {'switch': {'capacity_factor': 1.0, 'switch_jitter': 0.0}}
    switch = compare.plan_runs(config)[-1][4]
    assert '--capacity_factor=1.0' in switch and '--max_iters=4' in switch and '--seed=2' in switch


@pytest.mark.parametrize('argv, message', [
    (["--routers=['topk', 'nope']"], "unknown router 'nope'"),
    (["--per_router={'tpok': {}}"], "unknown router 'tpok'"),
    (['--routers=topk'], 'routers expects list'),
    (['--seeds=[1, 1]'], 'seeds must be a non-empty list of different integers'),
    (["--train={'seed': 3}"], "train sets 'seed'"),
    (["--per_router={'dense': {'n_exp': 8}}"], "per_router['dense'] sets 'n_exp'"),
    (["--train={'n_layer': [2]}"], "train['n_layer'] = [2]"),
    (["--per_router={'switch': 3}"], "per_router['switch'] must be a dict of train.py keys"),
    (['--sedes=[1]'], "unknown config key 'sedes'"),
    # a train.py key given to compare.py: where it goes, in the syntax that works
    (['--max_iters=100'], "max_iters is a train.py key, not compare.py's: give it to every run as "
                          "--train=\"{'max_iters': 100}\""),
    (['--router=switch'], "compare.py sets router for each run itself: use --routers=\"['switch']\""),
    (['--seed=3'], "use --seeds=[3]"),
    (['--n_exp=16'], "--train=\"{'n_exp': 16}\""),
    (['--jobs=0'], 'jobs must be an integer >= 1'),
    (['--zero_token_at=[300, -1]'], 'zero_token_at must be a list of iterations (integers >= 0)'),
    (["--variants={'topk': {'router': 'topk'}}"], "variant name 'topk' must be a new name"),
    (["--variants={'k1': {'top_k': 1}}"], "variants['k1'] needs 'router'"),
    (["--variants={'k1': {'router': 'topk', 'seed': 1}}"], "variants['k1'] sets 'seed'"),
    (["--variants={'big': {'router': 'dense', 'n_exp': 4}}"], "variants['big'] sets 'n_exp'"),
    # resume_from: the base must be a row that trains from the start and saves its last step
    (["--variants={'on': {'router': 'topk', 'resume_from': 'base'}}", "--routers=['topk', 'on']"],
     "variants['on'] resumes 'base', which is not one of the routers; add 'base' to routers"),
    (["--variants={'on': {'router': 'topk', 'resume_from': 'topk'}}", "--routers=['topk', 'on']"],
     "give 'topk' always_save_checkpoint=True"),
    (["--variants={'a': {'router': 'topk', 'resume_from': 'b'}, 'b': {'router': 'topk', 'resume_from': 'a'}}",
      "--routers=['a', 'b']"], "variants['a'] resumes 'b', which resumes a row itself"),
    (["--variants={'on': {'router': 'topk', 'resume_from': 'topk', 'init_from': 'scratch'}}",
      "--routers=['topk', 'on']", "--train={'always_save_checkpoint': True}"], "variants['on'] sets 'init_from'"),
])
def test_config_errors(argv, message):
    with pytest.raises(compare.ConfigError) as e:
        compare.load_config(argv)
    assert message in str(e.value)


def test_variants_are_rows_with_their_own_keys():
    config = compare.load_config(["--routers=['topk', 'noaux', 'wide']", '--seeds=[5]',
                                  "--train={'n_exp': 8, 'aux_loss_coef': 0.01}",
                                  "--per_router={'topk': {'z_loss_coef': 0.0}}",
                                  "--variants={'noaux': {'router': 'topk', 'aux_loss_coef': 0.0}, "
                                  "'wide': {'router': 'dense', 'n_embd': 32}}"])
    (_, row0, _, _, topk), (name, row, _, out_dir, noaux), (_, _, _, _, wide) = compare.plan_runs(config)
    assert row0 == 'topk' and '--aux_loss_coef=0.01' in topk and '--z_loss_coef=0.0' in topk
    # the variant: its router, the router's per_router keys, then its own keys over train's
    assert name == 'noaux-s5' and row == 'noaux' and out_dir.endswith('noaux-s5')
    assert '--router=topk' in noaux and '--aux_loss_coef=0.0' in noaux and '--z_loss_coef=0.0' in noaux
    assert '--aux_loss_coef=0.01' not in noaux
    assert '--n_exp=1' in wide and '--n_embd=32' in wide and not any(a.startswith('--router=') for a in wide)


def test_resume_from_plans_a_resumed_run_per_seed():
    config = compare.load_config(["--routers=['base', 'on']", '--seeds=[1, 2]', '--compare_dir=cmp',
                                  "--variants={'base': {'router': 'gatepro', 'gatepro_start_iter': 99, "
                                  "'max_iters': 4, 'always_save_checkpoint': True}, "
                                  "'on': {'router': 'gatepro', 'resume_from': 'base', 'max_iters': 8}}"])
    runs = compare.plan_runs(config)
    on = [command for name, *_, command in runs if name.startswith('on-')]
    assert len(on) == 2 and all('--init_from=resume' in c and '--max_iters=8' in c for c in on)
    assert not any(a.startswith('--resume_from') for c in on for a in c)  # compare.py's key, not train.py's
    assert not any('--init_from=resume' in c for name, *_, c in runs if name.startswith('base-'))
    assert compare.resume_bases(config) == {'on-s1': os.path.join('cmp', 'base-s1'),
                                            'on-s2': os.path.join('cmp', 'base-s2')}


def test_child_env_shares_the_cores(monkeypatch):
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    monkeypatch.setattr(os, 'cpu_count', lambda: 8)
    assert 'OMP_NUM_THREADS' not in compare.child_env(1)
    assert compare.child_env(2)['OMP_NUM_THREADS'] == '4' and compare.child_env(16)['OMP_NUM_THREADS'] == '1'
    monkeypatch.setenv('OMP_NUM_THREADS', '3')  # the user's choice wins
    assert compare.child_env(2)['OMP_NUM_THREADS'] == '3'


# -----------------------------------------------------------------------------
# compare.py end to end

def tiny_config(tmp_path, tiny_data):
    path = tmp_path / 'tiny.py'
    path.write_text(f"routers = ['dense', 'switch']\nseeds = [1]\ncompare_dir = {str(tmp_path / 'cmp')!r}\n"
                    f"train = dict(device='cpu', data_dir={tiny_data!r}, n_layer=1, n_embd=16, n_head=2, n_exp=4,\n"
                    f"             block_size=16, batch_size=4, max_iters=8, eval_interval=2, eval_iters=1, log_interval=1)\n")
    return str(path)


def test_compare_end_to_end_and_skips_finished_runs(tmp_path, tiny_data, capsys):
    config = tiny_config(tmp_path, tiny_data)
    result = run(['compare.py', config, "--train={'max_iters': 4}", '--jobs=2'])
    assert result.returncode == 0, result.stderr
    cmp_dir = tmp_path / 'cmp'
    for name in ('dense-s1', 'switch-s1'):
        assert {'run.json', 'done.json', 'train.log', 'metrics.jsonl'} <= set(os.listdir(cmp_dir / name))
    info = json.loads((cmp_dir / 'switch-s1' / 'run.json').read_text())
    assert info['router'] == 'switch' and info['seed'] == 1
    assert '--max_iters=4' in info['command'] and f'--data_dir={tiny_data}' in info['command']  # file + flag
    done = json.loads((cmp_dir / 'switch-s1' / 'done.json').read_text())
    assert done['wall_s'] > 0 and done['command'] == info['command']

    results = (cmp_dir / 'results.md').read_text()
    (first, rows), _, (more, more_rows) = markdown_tables(results)[:3]
    assert first[:6] == ['router', 'val loss', 'tokens/s', 'zero-token experts', 'max_vio', 'specialization']
    assert sorted(first[1:] + more[1:]) == sorted(EVERY_HEADER)
    number = re.compile(r'[0-9][0-9,]*\.?[0-9]*|never')
    for row in (rows, more_rows):
        # the dense twin has a val loss and a speed, and no routing
        assert all(number.fullmatch(cell) if header in ('val loss', 'tokens/s') else cell == 'n/a'
                   for header, cell in row['dense'].items() if header != 'router'), row['dense']
        # switch is top-1: no expert_overlap; every other column has a number
        assert all(number.fullmatch(cell) if header != 'expert_overlap' else cell == 'n/a'
                   for header, cell in row['switch'].items() if header != 'router'), row['switch']
    assert "python compare.py" in results and "torch" in results and "Wall time" in results
    assert '2 runs trained at once' in results and 'OMP_NUM_THREADS=' in results
    if importlib.util.find_spec('matplotlib'):
        assert (cmp_dir / 'loss.png').exists() and (cmp_dir / 'curves.png').exists() and (cmp_dir / 'switch-s1' / 'load.png').exists()
        assert (cmp_dir / 'switch-s1' / 'specialization.png').exists()
    else:
        assert 'matplotlib is not installed' in results

    # the same command again: every run is finished, no train.py starts; without matplotlib
    mtimes = {name: os.path.getmtime(cmp_dir / name / 'done.json') for name in ('dense-s1', 'switch-s1')}
    block = ("import sys; sys.modules['matplotlib'] = None; __file__ = %r; "
             "sys.argv = ['compare.py', %r, \"--train={'max_iters': 4}\"]; "
             "exec(compile(open(__file__).read(), __file__, 'exec'))" % (os.path.join(REPO, 'compare.py'), config))
    result = run(['-c', block])
    assert result.returncode == 0, result.stderr
    assert 'skipping dense-s1: finished' in result.stdout and 'skipping switch-s1: finished' in result.stdout
    assert {name: os.path.getmtime(cmp_dir / name / 'done.json') for name in mtimes} == mtimes
    results = (cmp_dir / 'results.md').read_text()
    assert '0 runs trained, 2 already finished' in results
    assert 'Skipped: matplotlib is not installed. `pip install matplotlib`' in results

    # another train.py setting for a finished run: refused, not silently mixed into the table
    with pytest.raises(SystemExit) as e:
        compare.main([config, "--train={'max_iters': 6}"])
    assert e.value.code == 2
    assert_one_line_error(capsys.readouterr().err, 'dense-s1 holds a finished run of another train.py command')


def test_compare_failing_run_is_one_line_error(tmp_path, tiny_data, capsys):
    with pytest.raises(SystemExit) as e:
        compare.main([tiny_config(tmp_path, tiny_data), "--per_router={'switch': {'capacity_factr': 1.0}}",
                      "--routers=['switch']"])
    assert e.value.code == 2
    log = os.path.join(tmp_path / 'cmp', 'switch-s1', 'train.log')
    assert_one_line_error(capsys.readouterr().err, 'run switch-s1 failed', "unknown config key 'capacity_factr'", log)
    assert not os.path.exists(os.path.join(tmp_path / 'cmp', 'switch-s1', 'done.json'))


def test_compare_resume_from_continues_the_base_run(tmp_path, tiny_data):
    """A resumed row starts after its base (here with two jobs at once, so it must wait),
    from the base's last checkpoint: its log holds the base's steps and then its own."""
    config = tiny_config(tmp_path, tiny_data)
    variants = ("--variants={'base': {'router': 'gatepro', 'gatepro_start_iter': 100, 'max_iters': 4, "
                "'always_save_checkpoint': True}, 'on': {'router': 'gatepro', 'resume_from': 'base', "
                "'gatepro_start_iter': 4, 'max_iters': 8}}")
    result = run(['compare.py', config, variants, "--routers=['base', 'on']", '--jobs=2'])
    assert result.returncode == 0, result.stderr
    cmp_dir = tmp_path / 'cmp'
    assert 'resuming from' in (cmp_dir / 'on-s1' / 'train.log').read_text()
    lines = [json.loads(line) for line in (cmp_dir / 'on-s1' / 'metrics.jsonl').read_text().splitlines()]
    train_iters = [line['iter'] for line in lines if line['split'] == 'train']
    assert train_iters == list(range(8))  # 0-3 copied from base, 4-7 its own, none twice
    base_lines = (cmp_dir / 'base-s1' / 'metrics.jsonl').read_text().splitlines()
    assert (cmp_dir / 'on-s1' / 'metrics.jsonl').read_text().splitlines()[:len(base_lines)] == base_lines
    results = (cmp_dir / 'results.md').read_text()
    assert re.search(r"^\| on \| [0-9]", results, re.M), results


def test_compare_starts_an_unfinished_run_again_over_its_own_checkpoint(tmp_path, tiny_data):
    """A run that saved a checkpoint but did not finish (no done.json: killed, or the machine
    went away) starts again from scratch when the comparison is repeated: the checkpoint
    train.py refuses to let a new run replace is that run's own, and compare.py says so."""
    config = tiny_config(tmp_path, tiny_data)
    args = ['compare.py', config, "--routers=['dense']", "--train={'max_iters': 4, 'always_save_checkpoint': True}"]
    assert run(args).returncode == 0
    run_dir = tmp_path / 'cmp' / 'dense-s1'
    (run_dir / 'done.json').unlink()  # as a run killed after its last save leaves it
    assert (run_dir / 'ckpt.pt').exists()
    result = run(args)
    assert result.returncode == 0, result.stderr
    assert (run_dir / 'done.json').exists() and 'holds a checkpoint' not in (run_dir / 'train.log').read_text()
    # what it records is the planned command, so the next repeat finds it finished
    assert '--overwrite_out_dir' not in json.loads((run_dir / 'done.json').read_text())['command']
    assert 'skipping dense-s1: finished' in run(args).stdout
