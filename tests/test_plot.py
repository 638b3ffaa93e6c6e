"""Tests of what plot.py's pictures show, read from the matplotlib figures it saves: one
colour scale per picture, words in the panel titles, the overview picture's panels and
reference lines, panels left out when no run has data for them, and the dropped share.
The runs are hand-written metrics.jsonl files (test_compare's), no training. CPU only."""

import math
import os

import pytest

import plot
from test_compare import metrics_lines, write_run

pytest.importorskip('matplotlib', reason='plot.py needs matplotlib')


@pytest.fixture
def figures(monkeypatch):
    """{path: the matplotlib Figure plot.py saved there}, filled as plot.py saves."""
    saved = {}
    real_save = plot.save

    def keep(plt, fig, path, rect=None):
        saved[path] = fig
        return real_save(plt, fig, path, rect)

    monkeypatch.setattr(plot, 'save', keep)
    return saved


def figure(figures, run_dir, name):
    return figures[os.path.join(run_dir, name)]


def draw(draw_picture, run_dir):
    """One per-run picture of run_dir (plot.main would draw all nine)."""
    draw_picture(plot.pyplot(), plot.read_metrics(run_dir), 'run', run_dir)


def draw_group(draw_picture, run_dirs, path):
    """One picture of several runs, into path."""
    runs = [(*plot.run_label(d), plot.read_metrics(d)) for d in run_dirs]
    draw_picture(plot.pyplot(), runs, str(path))


def panels(fig):
    """{title: the panel's axes} of a figure's titled panels (colour bars have no title)."""
    return {ax.get_title(): ax for ax in fig.axes if ax.get_visible() and ax.get_title()}


def small_print(ax):
    return [text.get_text() for text in ax.texts]


def colour_bars(fig):
    return [ax for ax in fig.axes if hasattr(ax, '_colorbar')]


def footnotes(fig):
    return ' '.join(text.get_text() for text in fig.texts)


def with_drops(lines):
    """The run of test_compare's metrics_lines with two training steps that dropped assignments."""
    train = plot.by_iter(lines, 'train')
    train[1]['layers'][0]['dropped_frac'] = 0.1  # iteration 10, layer 0
    train[2]['layers'][1]['dropped_frac'] = 0.3  # iteration 20, layer 1
    return lines


def top1(lines):
    """The same run as a top-1 router logs it: no second expert, so pair_coactivation is 0."""
    for line in lines:
        for entry in line['layers']:
            if 'pair_coactivation' in entry:
                entry['pair_coactivation'] = 0.0
    return lines


# -----------------------------------------------------------------------------
# one colour scale per picture

def test_specialization_layers_share_one_colour_scale_and_say_what_a_cell_is(tmp_path, figures):
    lines = metrics_lines(optional=True)
    plot.by_iter(lines, 'val')[-1]['layers'][1]['expert_label_counts'] = [[1, 1], [1, 1], [0, 0]]  # shares: 0.5 at most
    run_dir = write_run(tmp_path / 'run', lines)
    draw(plot.plot_specialization, run_dir)
    fig = figure(figures, run_dir, 'specialization.png')
    images = [ax.images[0] for ax in panels(fig).values()]
    assert len(images) == 2
    # shares are 0 to 1 in every layer: one scale, not each layer's own largest share
    assert [image.get_clim() for image in images] == [(0.0, 1.0), (0.0, 1.0)]
    # layer 0 counts [[5, 0], [1, 4], [0, 0]]: column by column 5/6, 1/6, 0 and 0, 4/4, 0
    assert images[0].get_array().ravel().tolist() == pytest.approx([5 / 6, 0, 1 / 6, 1, 0, 0])
    assert images[1].get_array().max() == 0.5  # 1 of each column's 2 tokens
    [bar] = colour_bars(fig)
    label = bar.get_xlabel() + bar.get_ylabel()
    assert "share of the domain's tokens whose top-1 expert this is" in label, label
    assert 'assignments' not in label  # a token is counted once, at its top-1 expert, not per assignment
    assert '1/3 = 0.333' in label  # an even spread over E = 3 experts


def test_load_layers_share_one_colour_scale(tmp_path, figures):
    lines = metrics_lines()
    plot.by_iter(lines, 'train')[3]['layers'][1]['load'] = [0.9, 0.05, 0.05]  # iteration 30
    run_dir = write_run(tmp_path / 'run', lines)
    draw(plot.plot_load, run_dir)
    fig = figure(figures, run_dir, 'load.png')
    meshes = [ax.collections[0] for ax in panels(fig).values()]
    assert len(meshes) == 2
    # layer 0's largest load is 0.5 (iteration 0), layer 1's 0.9 (iteration 30); both layers
    # on the scale from 0 to max(0.9, 2/E = 2/3) = 0.9, its middle (white) at 1/E = 1/3
    for mesh in meshes:
        assert mesh.get_clim() == pytest.approx((0.0, 0.9))
        assert mesh.norm.vcenter == pytest.approx(1 / 3)
    assert len(colour_bars(fig)) == 1


def test_zero_token_layers_share_one_y_scale(tmp_path, figures):
    lines = metrics_lines()
    plot.by_iter(lines, 'train')[4]['layers'][1]['zero_token_experts'] = 3  # layer 0 has at most 1
    run_dir = write_run(tmp_path / 'run', lines)
    draw_group(plot.plot_group_zero_token, [run_dir], tmp_path / 'zero_token_layers.png')
    axes = list(panels(figures[str(tmp_path / 'zero_token_layers.png')]).values())
    assert len(axes) == 2 and axes[0].get_ylim() == axes[1].get_ylim()
    assert axes[0].get_ylim()[1] >= 3


# -----------------------------------------------------------------------------
# words in the titles

def test_panel_titles_are_words_with_the_field_in_small_print(tmp_path, figures):
    run_dir = write_run(tmp_path / 'run', with_drops(metrics_lines(optional=True)))
    plot.main([run_dir])
    val_metrics = panels(figure(figures, run_dir, 'val_metrics.png'))
    # the val lines log these nine as numbers other than 0; dropped_frac is 0 at both evals
    assert sorted(text for ax in val_metrics.values() for text in small_print(ax)) == sorted(
        f"({field})" for field in ['max_vio', 'router_entropy', 'gate_cos_sim', 'pair_coactivation', 'gate_angle',
                                   'gate_spectral_entropy', 'expert_overlap', 'specialization',
                                   'zero_token_experts_per_batch'])
    assert val_metrics['load imbalance'].texts[0].get_text() == '(max_vio)'
    assert "experts with no token in an eval batch" in val_metrics
    assert 'dropped share (dropped_frac)' in footnotes(figure(figures, run_dir, 'val_metrics.png'))
    for name in ('overview.png', 'zero_token.png', 'load.png', 'val_metrics.png', 'specialization.png',
                 'gate_similarity.png'):
        for title in panels(figure(figures, run_dir, name)):
            assert '_' not in title, (name, title)  # words, not field names
    for name in ('curves.png', 'zero_token_layers.png', 'loss.png'):
        for title, ax in panels(figures[os.path.join(run_dir, name)]).items():
            assert '_' not in title, (name, title)
            if name == 'curves.png' and title != 'val loss':
                assert small_print(ax) and small_print(ax)[0].startswith('(') and '_' in small_print(ax)[0]


# -----------------------------------------------------------------------------
# overview.png

def test_overview_has_the_loss_entropy_against_ln_e_and_load_against_one_over_e(tmp_path, figures):
    run_dir = write_run(tmp_path / 'run', metrics_lines(optional=True))
    draw(plot.plot_overview, run_dir)
    fig = figure(figures, run_dir, 'overview.png')
    titled = panels(fig)
    assert list(titled) == ['loss', "router's entropy over the experts, at each eval",
                            'smallest and largest expert load, at each eval',
                            'specialization at each eval (heatmap: specialization.png)']
    assert fig.get_size_inches()[0] * plot.DPI <= 1200  # readable on a screen as saved
    entropy = titled["router's entropy over the experts, at each eval"]
    ys = [list(line.get_ydata()) for line in entropy.get_lines()]
    # E = 3 experts: ln 3 = 1.0986, where a router that cannot tell the experts apart sits
    assert [math.log(3), math.log(3)] in [pytest.approx(y) for y in ys]
    assert [1.0, 1.0] in ys  # each layer's router_entropy at the evals of iterations 0 and 30
    load = titled['smallest and largest expert load, at each eval']
    ys = [list(line.get_ydata()) for line in load.get_lines()]
    assert [1 / 3, 1 / 3] in [pytest.approx(y) for y in ys]  # balanced: 1/E
    # the evals log load [0.4, 0.3, 0.3] in both layers: largest 0.4, smallest 0.3
    assert ys.count([0.4, 0.4]) == 2 and ys.count([0.3, 0.3]) == 2
    [loss_val] = [line for line in titled['loss'].get_lines() if line.get_label() == 'val (evals)']
    assert list(loss_val.get_ydata()) == [3.0, 1.5]  # 3.0 - iter / 20 at iterations 0 and 30

    plain_dir = write_run(tmp_path / 'plain', metrics_lines(optional=False))  # logs no specialization
    draw(plot.plot_overview, plain_dir)
    assert len(panels(figure(figures, plain_dir, 'overview.png'))) == 3


# -----------------------------------------------------------------------------
# curves.png: only panels with data; the dropped share

def curve_titles(figures, out):
    return list(panels(figures[os.path.join(out, 'curves.png')]))


def test_curves_leave_out_the_panels_no_run_has_data_for(tmp_path, figures):
    # a top-1 run: pair co-activation 0 at every eval, expert overlap not logged, no drops
    switch = write_run(tmp_path / 'one' / 'switch-s1', top1(metrics_lines()), {'router': 'switch', 'seed': 1})
    draw_group(plot.plot_group_curves, [switch], tmp_path / 'one' / 'curves.png')
    assert curve_titles(figures, str(tmp_path / 'one')) == [
        'val loss', 'experts with no token in a training step', 'load imbalance', 'how alike the gate rows are']
    note = footnotes(figures[str(tmp_path / 'one' / 'curves.png')])
    assert 'an expert picked with its most alike one (pair_coactivation): 0 in every run' in note
    assert "how alike a token's experts' outputs are (expert_overlap): no run logs it" in note
    assert 'dropped share (dropped_frac): 0 in every run' in note

    # beside a top-2 run that logs both, the two panels come back (the top-1 run's line reads 0)
    topk = write_run(tmp_path / 'two' / 'topk-s1', metrics_lines(optional=True), {'router': 'topk', 'seed': 1})
    switch = write_run(tmp_path / 'two' / 'switch-s1', top1(metrics_lines()), {'router': 'switch', 'seed': 1})
    draw_group(plot.plot_group_curves, [topk, switch], tmp_path / 'two' / 'curves.png')
    titles = curve_titles(figures, str(tmp_path / 'two'))
    assert 'an expert picked with its most alike one' in titles and "how alike a token's experts' outputs are" in titles
    assert 'dropped share' not in titles


def test_dropped_share_is_drawn_for_a_run_that_drops_and_not_without(tmp_path, figures):
    drops = write_run(tmp_path / 'drops' / 'switch-s1', with_drops(metrics_lines()), {'router': 'switch', 'seed': 1})
    draw_group(plot.plot_group_curves, [drops], tmp_path / 'drops' / 'curves.png')
    draw(plot.plot_overview, drops)
    curves = panels(figures[str(tmp_path / 'drops' / 'curves.png')])
    [line] = curves['dropped share'].get_lines()
    # training dropped_frac, mean over the 2 layers: 0, (0.1 + 0) / 2, (0 + 0.3) / 2, 0, 0
    assert list(line.get_xdata()) == [0, 10, 20, 30, 40]
    assert list(line.get_ydata()) == pytest.approx([0, 0.05, 0.15, 0, 0])
    overview = panels(figure(figures, drops, 'overview.png'))
    layer_lines = overview['dropped share at each logged training step'].get_lines()
    assert [list(line.get_ydata()) for line in layer_lines] == [[0, 0.1, 0, 0, 0], [0, 0, 0.3, 0, 0]]

    none = write_run(tmp_path / 'none' / 'topk-s1', metrics_lines(), {'router': 'topk', 'seed': 1})
    draw_group(plot.plot_group_curves, [none], tmp_path / 'none' / 'curves.png')
    draw(plot.plot_overview, none)
    assert 'dropped share' not in curve_titles(figures, str(tmp_path / 'none'))
    assert 'dropped share at each logged training step' not in panels(figure(figures, none, 'overview.png'))


# -----------------------------------------------------------------------------
# experts per token: a router that gives a token as many experts as it needs

# experts_per_token at the training steps 0..40 of layers 0 and 1 (std 0.5 everywhere)
TOPP_TRAIN = {0: [1.2, 1.5, 1.8, 2.0, 2.1], 1: [2.0, 2.0, 2.2, 2.4, 2.3]}


def variable_k(lines):
    """test_compare's run as topp logs it: experts_per_token varies from step to step, and
    the evals (iterations 0 and 30) log it for each of the two labels, 'code' left without
    a token at the last eval."""
    for step, line in enumerate(plot.by_iter(lines, 'train')):
        for entry in line['layers']:
            entry.update(experts_per_token=TOPP_TRAIN[entry['layer']][step], experts_per_token_std=0.5)
    for line in plot.by_iter(lines, 'val'):
        for entry in line['layers']:
            entry.update(experts_per_token=1.75 + entry['layer'], experts_per_token_std=0.4,
                         experts_per_token_by_label=[1.5 + entry['layer'], 2.0 + entry['layer']])
    plot.by_iter(lines, 'val')[-1]['layers'][1]['experts_per_token_by_label'] = [3.0, None]
    return lines


def fixed_k(lines, k=2.0):
    """The same run as a top-k router logs it: every token takes k experts, less what capacity drops."""
    for line in lines:
        for entry in line['layers']:
            entry.update(experts_per_token=k * (1 - entry['dropped_frac']), experts_per_token_std=0.0)
    return lines


def test_experts_vary_by_hand():
    assert plot.experts_vary(variable_k(metrics_lines(optional=True)))
    assert not plot.experts_vary(fixed_k(metrics_lines()))
    # a top-1 router that drops .1 and .3 at two steps: 0.9 and 0.7 experts per token there, and
    # 0.9 / (1 - 0.1) = 0.7 / (1 - 0.3) = 1 asked for at every step: it does not vary
    assert not plot.experts_vary(fixed_k(with_drops(metrics_lines()), k=1.0))
    assert not plot.experts_vary(metrics_lines())  # an older log: no experts_per_token at all
    # one layer of one logged step asks for 2.5 instead of 2: varies
    lines = fixed_k(metrics_lines())
    plot.by_iter(lines, 'train')[2]['layers'][1]['experts_per_token'] = 2.5
    assert plot.experts_vary(lines)


def test_overview_draws_experts_per_token_when_it_varies(tmp_path, figures):
    run_dir = write_run(tmp_path / 'topp', variable_k(metrics_lines()))
    draw(plot.plot_overview, run_dir)
    titled = panels(figure(figures, run_dir, 'overview.png'))
    ax = titled['experts per token at each logged training step (band: one std over the tokens)']
    assert small_print(ax) == ['(experts_per_token)']
    assert [list(line.get_ydata()) for line in ax.get_lines()] == [TOPP_TRAIN[0], TOPP_TRAIN[1]]
    # the band of layer 0 runs from its smallest mean less one std to its largest plus one: 1.2 - .5, 2.1 + .5
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert (band.min(), band.max()) == pytest.approx((0.7, 2.6))

    # top-2, and top-1 that drops: experts_per_token moves only by the drops, no panel
    for name, lines in (('topk', fixed_k(metrics_lines())), ('switch', fixed_k(with_drops(metrics_lines()), k=1.0))):
        run_dir = write_run(tmp_path / name, lines)
        draw(plot.plot_overview, run_dir)
        assert not any(title.startswith('experts per token') for title in panels(figure(figures, run_dir, 'overview.png')))


def test_curves_draw_experts_per_token_when_some_run_varies(tmp_path, figures):
    topp = write_run(tmp_path / 'two' / 'topp-s1', variable_k(metrics_lines()), {'router': 'topp', 'seed': 1})
    topk = write_run(tmp_path / 'two' / 'topk-s1', fixed_k(metrics_lines()), {'router': 'topk', 'seed': 1})
    draw_group(plot.plot_group_curves, [topp, topk], tmp_path / 'two' / 'curves.png')
    ax = panels(figures[str(tmp_path / 'two' / 'curves.png')])['experts per token']
    assert small_print(ax) == ['(experts_per_token; training steps, mean over the layers)']
    lines = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    # topp: the mean of its two layers at each step, (1.2 + 2.0) / 2, (1.5 + 2.0) / 2, ...; topk: 2 throughout
    assert lines['topp'] == pytest.approx([1.6, 1.75, 2.0, 2.2, 2.2])
    assert lines['topk'] == [2.0] * 5

    # top-k alone: no panel, and the note at the bottom does not name it either
    alone = write_run(tmp_path / 'one' / 'topk-s1', fixed_k(metrics_lines()), {'router': 'topk', 'seed': 1})
    draw_group(plot.plot_group_curves, [alone], tmp_path / 'one' / 'curves.png')
    assert 'experts per token' not in curve_titles(figures, str(tmp_path / 'one'))
    assert 'experts_per_token' not in footnotes(figures[str(tmp_path / 'one' / 'curves.png')])


def test_experts_by_domain_bars_each_labels_mean_at_the_last_eval(tmp_path, figures):
    run_dir = write_run(tmp_path / 'topp', variable_k(metrics_lines(optional=True)))
    draw(plot.plot_experts_by_domain, run_dir)
    fig = figure(figures, run_dir, 'experts_by_domain.png')
    titled = panels(fig)
    assert list(titled) == ['layer 0', 'layer 1']
    heights = {title: [bar.get_height() for bar in ax.patches] for title, ax in titled.items()}
    # the last eval (iteration 30): layer 0 (1.5, 2.0); layer 1 (3.0, no token: no bar, a note)
    assert heights == {'layer 0': [1.5, 2.0], 'layer 1': [3.0, 0.0]}
    assert 'no token' in small_print(titled['layer 1']) and 'no token' not in small_print(titled['layer 0'])
    assert [tick.get_text() for tick in titled['layer 0'].get_xticklabels()] == ['math', 'code']
    # one y scale, up to the largest bar (3.0) and a bit: the layers compare at a glance
    assert titled['layer 0'].get_ylim() == titled['layer 1'].get_ylim() == pytest.approx((0, 3.0 * 1.15))
    # a dashed line at the mean over all the tokens of the layer: 1.75 and 2.75
    assert [list(line.get_ydata()) for ax in titled.values() for line in ax.get_lines()] == [[1.75, 1.75],
                                                                                              [2.75, 2.75]]
    assert 'iteration 30' in fig._suptitle.get_text()

    # an older log without the field: no picture (plot.main says why)
    plain = write_run(tmp_path / 'plain', metrics_lines(optional=True))
    assert plot.plot_experts_by_domain(plot.pyplot(), plot.read_metrics(plain), 'run', plain) is None
