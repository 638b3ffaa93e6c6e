"""
Pictures of what the routers did, from the metrics.jsonl that train.py writes.

$ python plot.py out
$ python plot.py out-compare/topk-s1337 out-compare/gatepro-s1337 --out=figs

Into each OUT_DIR, one PNG per picture of that run:
    zero_token.png       experts that got no token in a training step, vs iteration, one line per layer
    load.png             expert load over training: a panel per layer, iteration on x, expert on y
    specialization.png   expert x domain at the last eval (needs expert_label_counts)
    gate_similarity.png  cosine similarity of the gate rows at the last eval (needs gate_similarity)
    val_metrics.png      router metrics at every eval (gate_cos_sim, pair_coactivation, ...), a line per layer
and one overlaid picture of all runs given:
    loss.png             training loss (logged steps) and val loss (evals), a line per run
    curves.png           the runs grouped by router (their seeds): mean and spread over the
                         seeds of val loss, zero-token experts, max_vio, pair co-activation,
                         gate cosine similarity and expert overlap, vs iteration
    zero_token_layers.png  the same grouping: zero-token experts per training step, a panel
                         per MoE layer (not drawn when no run has MoE layers)
into --out=DIR, by default the runs' common parent folder (the run itself when only one
is given; the current folder for sibling runs such as `out` and `out2`).

A picture whose fields a run does not log (a dense model has no routing; older logs have
no expert_label_counts) is skipped with a note. Runs are labelled by router and seed from
out_dir/run.json (written by compare.py) or out_dir/config.json, else by folder name.
matplotlib is optional for the rest of nanorouter; this script needs it (Agg, no display).
A run resumed from a checkpoint logs some iterations twice: the later line wins.
"""

import json
import math
import os
import sys

import numpy as np

DPI = 100  # small files: these are for looking at, not printing


class MetricsError(Exception):
    pass


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# -----------------------------------------------------------------------------
# reading a run (no matplotlib needed: compare.py uses these too)

def read_metrics(out_dir):
    """The JSON lines of out_dir/metrics.jsonl, in file order. MetricsError with a one-line
    message naming the file when it is missing, unreadable, empty or not JSON lines. A last
    line without its newline that is not JSON is skipped: a run killed while writing it (or
    still writing it) leaves it torn."""
    path = os.path.join(out_dir, 'metrics.jsonl')
    if not os.path.isdir(out_dir):
        raise MetricsError(f"{out_dir} is not a folder (give the out_dir of a train.py run)")
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise MetricsError(f"cannot read {path}: {e.strerror or e}") from None
    lines = []
    rows = text.splitlines()
    for n, line in enumerate(rows, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(rows) and not text.endswith('\n'):
                break  # torn
            raise MetricsError(f"{path} line {n} is not JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get('iter'), int) or record.get('split') not in ('train', 'val'):
            raise MetricsError(f"{path} line {n} is not a train.py metrics line (needs 'iter' and 'split')")
        lines.append(record)
    if not lines:
        raise MetricsError(f"{path} is empty: the run logged nothing yet")
    return lines


def by_iter(lines, split):
    """The lines of one split sorted by iteration; a resumed run logs some iterations
    twice, and the later line (what the final model went through) wins."""
    latest = {}
    for line in lines:
        if line['split'] == split:
            latest[line['iter']] = line
    return [latest[i] for i in sorted(latest)]


def is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def run_label(out_dir):
    """(label, group): 'topk s1337' and the row 'topk' from compare.py's run.json; 'topk
    s1337' and the folder name from train.py's config.json; the folder name for both when
    neither says."""
    for name in ('run.json', 'config.json'):
        try:
            with open(os.path.join(out_dir, name)) as f:
                info = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(info, dict) or 'router' not in info:
            continue
        router = str(info['router'])
        if name == 'config.json' and is_number(info.get('n_exp')) and info['n_exp'] <= 1:
            router = 'dense'  # train.py's dense twin keeps a router name it does not use
        seed = info.get('seed')
        label = f"{router} s{seed}" if seed is not None else router
        if name == 'config.json':
            # runs of train.py alone: nothing says which of them share a setting, so each is
            # its own group (compare.py's run.json names the row its seeds belong to)
            return label, os.path.basename(os.path.normpath(os.path.abspath(out_dir)))
        return label, router
    name = os.path.basename(os.path.normpath(os.path.abspath(out_dir)))
    return name, name


# -----------------------------------------------------------------------------
# pictures; each returns the path written, or None when the run logs nothing to draw

def pyplot():
    import matplotlib
    matplotlib.use('Agg')  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


def layer_ids(lines):
    return sorted({entry['layer'] for line in lines for entry in line.get('layers') or []
                   if isinstance(entry, dict) and 'layer' in entry})


def layer_entry(line, layer):
    for entry in line.get('layers') or []:
        if isinstance(entry, dict) and entry.get('layer') == layer:
            return entry
    return None


def panel_grid(plt, n, width=4.0, height=3.0, max_cols=4):
    """A figure with n panels, at most max_cols a row; returns (fig, flat list of n axes)."""
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def as_matrix(value):
    """A non-empty rectangular list of lists of numbers as a float array, else None."""
    try:
        matrix = np.array(value, dtype=float)
    except (TypeError, ValueError):  # ragged, or not numbers
        return None
    return matrix if matrix.ndim == 2 and matrix.size else None


def integer_ticks(*axes):
    """Expert ids and counts: ticks at whole numbers only."""
    from matplotlib.ticker import MaxNLocator
    for axis in axes:
        axis.set_major_locator(MaxNLocator(integer=True))


def save(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_zero_token(plt, lines, label, out_dir):
    train = by_iter(lines, 'train')
    layers = layer_ids(train)
    if not layers:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, layer in enumerate(layers):
        points = [(line['iter'], entry['zero_token_experts']) for line in train
                  if (entry := layer_entry(line, layer)) and is_number(entry.get('zero_token_experts'))]
        if points:
            # the counts are small integers and the layers' lines would hide each other:
            # shift each layer a little
            iters, counts = zip(*points)
            ax.plot(iters, [c + 0.04 * i for c in counts], label=f"layer {layer}", marker='.', alpha=0.8)
    ax.set_xlabel('iteration')
    ax.set_ylabel(f"experts with no token{' (+0.04 per layer)' if len(layers) > 1 else ''}")
    ax.set_title(f"{label}: zero-token experts per training step")
    integer_ticks(ax.yaxis)
    ax.legend(fontsize='small')
    return save(plt, fig, os.path.join(out_dir, 'zero_token.png'))


def plot_load(plt, lines, label, out_dir):
    train = by_iter(lines, 'train')
    layers = layer_ids(train)
    if not layers:
        return None
    iters = [line['iter'] for line in train]
    # cell edges halfway between logged iterations, so uneven logging still draws right
    mids = [(a + b) / 2 for a, b in zip(iters, iters[1:])]
    first = iters[0] - (mids[0] - iters[0] if mids else 0.5)
    last = iters[-1] + (iters[-1] - mids[-1] if mids else 0.5)
    edges = [first, *mids, last]
    fig, axes = panel_grid(plt, len(layers), width=6.0, height=2.4, max_cols=2)  # long x axes
    for ax, layer in zip(axes, layers):
        loads = [(entry or {}).get('load') for entry in (layer_entry(line, layer) for line in train)]
        n_exp = max((len(load) for load in loads if isinstance(load, list)), default=0)
        if n_exp == 0:
            ax.set_title(f"layer {layer}: no load logged")
            continue
        grid = np.full((n_exp, len(train)), np.nan)  # NaN: this step logged no load
        for col, load in enumerate(loads):
            if isinstance(load, list):
                grid[:len(load), col] = [x if is_number(x) else np.nan for x in load]
        mesh = ax.pcolormesh(edges, np.arange(n_exp + 1) - 0.5, grid, cmap='viridis', vmin=0)
        fig.colorbar(mesh, ax=ax, label='share of assignments')
        integer_ticks(ax.yaxis)
        ax.set_xlabel('iteration')
        ax.set_ylabel('expert')
        ax.set_title(f"layer {layer}")
    fig.suptitle(f"{label}: expert load per training step (uniform = 1/E)")
    return save(plt, fig, os.path.join(out_dir, 'load.png'))


def plot_specialization(plt, lines, label, out_dir):
    """Each domain's assignments split over the experts (a column sums to 1): an expert
    that takes most of one domain and little of the others has specialised. Columns are
    normalised, not rows, so that a frequent domain does not fill every expert's row."""
    val = by_iter(lines, 'val')
    if not val:
        return None
    last = val[-1]
    tables = [(entry.get('layer'), as_matrix(entry.get('expert_label_counts'))) for entry in last.get('layers') or []
              if isinstance(entry, dict)]
    tables = [(layer, counts) for layer, counts in tables if counts is not None]
    if not tables:
        return None
    fig, axes = panel_grid(plt, len(tables), width=4.5, height=3.5)
    for ax, (layer, counts) in zip(axes, tables):  # counts [E, n_labels]
        share = counts / np.maximum(counts.sum(axis=0, keepdims=True), 1)
        names = last.get('label_names')
        if not isinstance(names, list) or len(names) != counts.shape[1]:
            names = [str(i) for i in range(counts.shape[1])]
        image = ax.imshow(share, aspect='auto', cmap='magma', vmin=0)
        fig.colorbar(image, ax=ax, label="share of the domain's assignments")
        ax.set_xticks(range(len(names)), names, rotation=45, ha='right', fontsize='small')
        integer_ticks(ax.yaxis)
        ax.set_ylabel('expert')
        ax.set_title(f"layer {layer}")
    fig.suptitle(f"{label}: expert x domain at iteration {last['iter']}")
    return save(plt, fig, os.path.join(out_dir, 'specialization.png'))


def plot_gate_similarity(plt, lines, label, out_dir):
    val = by_iter(lines, 'val')
    if not val:
        return None
    last = val[-1]
    matrices = [(entry.get('layer'), as_matrix(entry.get('gate_similarity'))) for entry in last.get('layers') or []
                if isinstance(entry, dict)]
    matrices = [(layer, similarity) for layer, similarity in matrices if similarity is not None]
    if not matrices:
        return None
    fig, axes = panel_grid(plt, len(matrices), width=4.0, height=3.5)
    for ax, (layer, similarity) in zip(axes, matrices):
        image = ax.imshow(similarity, cmap='RdBu_r', vmin=-1, vmax=1)
        fig.colorbar(image, ax=ax, label='cosine similarity')
        integer_ticks(ax.xaxis, ax.yaxis)
        ax.set_xlabel('expert')
        ax.set_ylabel('expert')
        ax.set_title(f"layer {layer}")
    fig.suptitle(f"{label}: gate rows' cosine similarity S at iteration {last['iter']}")
    return save(plt, fig, os.path.join(out_dir, 'gate_similarity.png'))


# per-layer numbers of the val lines worth following over training; those a run does not log are left out
VAL_METRICS = ['max_vio', 'router_entropy', 'gate_cos_sim', 'pair_coactivation', 'gate_angle',
               'gate_spectral_entropy', 'expert_overlap', 'specialization', 'zero_token_experts_per_batch']


def plot_val_metrics(plt, lines, label, out_dir):
    val = by_iter(lines, 'val')
    layers = layer_ids(val)
    series = {}  # metric -> layer -> [(iter, value)]
    for metric in VAL_METRICS:
        for layer in layers:
            points = [(line['iter'], entry[metric]) for line in val
                      if (entry := layer_entry(line, layer)) and is_number(entry.get(metric))]
            if points:
                series.setdefault(metric, {})[layer] = points
    if not series:
        return None
    fig, axes = panel_grid(plt, len(series), width=4.0, height=3.0)
    for ax, (metric, per_layer) in zip(axes, series.items()):
        for layer, points in per_layer.items():
            ax.plot(*zip(*points), marker='.', label=f"layer {layer}")
        ax.set_xlabel('iteration')
        ax.set_title(metric)
    axes[0].legend(fontsize='small')
    fig.suptitle(f"{label}: router metrics at each eval")
    return save(plt, fig, os.path.join(out_dir, 'val_metrics.png'))


def plot_losses(plt, runs, path):
    """runs: [(label, group, lines)]. Runs of one group (the seeds of a router) share a colour."""
    groups = list(dict.fromkeys(group for _, group, _ in runs))
    colours = plt.get_cmap('tab10' if len(groups) <= 10 else 'tab20')
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    named = set()
    for label, group, lines in runs:
        colour = colours(groups.index(group) % colours.N)
        # one legend entry per group: the seeds of a router are one colour, one name
        name = group if group not in named else None
        named.add(group)
        train = [(line['iter'], line['loss']) for line in by_iter(lines, 'train') if is_number(line.get('loss'))]
        val = [(line['iter'], line['loss']) for line in by_iter(lines, 'val') if is_number(line.get('loss'))]
        if train:
            ax_train.plot(*zip(*train), color=colour, alpha=0.6, linewidth=1, label=name)
        if val:
            ax_val.plot(*zip(*val), color=colour, marker='.', alpha=0.8, label=name)
    for ax, title in ((ax_train, 'training loss (logged steps)'), (ax_val, 'val loss (evals)')):
        ax.set_xlabel('iteration')
        ax.set_ylabel('cross-entropy (router losses excluded)')
        ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize='small')
    fig.suptitle(f"{len(runs)} run{'s' * (len(runs) != 1)}")
    return save(plt, fig, path)


def layer_series(lines, split, key, layer=None):
    """{iteration: value of key} for one run: of one MoE layer, or the mean over the layers
    (layer=None); the whole-model value for 'loss'."""
    series = {}
    for line in by_iter(lines, split):
        if key == 'loss':
            values = [line['loss']] if is_number(line.get('loss')) else []
        else:
            values = [entry[key] for entry in line.get('layers') or []
                      if isinstance(entry, dict) and is_number(entry.get(key)) and layer in (None, entry.get('layer'))]
        if values:
            series[line['iter']] = sum(values) / len(values)
    return series


def plot_group_lines(ax, runs, series_of, colours, groups):
    """On ax, a line per group: the mean over its runs at each iteration, and a band from the
    smallest to the largest run. series_of(lines) -> {iteration: value}."""
    for g, group in enumerate(groups):
        per_run = [series_of(lines) for _, name, lines in runs if name == group]
        iters = sorted({i for series in per_run for i in series})
        if not iters:
            continue
        values = [[series[i] for series in per_run if i in series] for i in iters]
        colour = colours(g % colours.N)
        ax.plot(iters, [sum(v) / len(v) for v in values], color=colour, linewidth=1.2, label=group)
        if len(per_run) > 1:
            ax.fill_between(iters, [min(v) for v in values], [max(v) for v in values], color=colour, alpha=0.15)
    ax.set_xlabel('iteration')
    if not ax.get_lines():
        ax.text(0.5, 0.5, 'not logged', ha='center', va='center', transform=ax.transAxes, color='grey')


def finish_group_figure(plt, fig, axes, runs, groups, path):
    handles, labels = next((ax.get_legend_handles_labels() for ax in axes if ax.get_lines()), ([], []))
    fig.legend(handles, labels, loc='lower center', ncol=min(len(groups), 6), fontsize='small')
    seeds = sorted({sum(1 for _, g, _ in runs if g == group) for group in groups})
    fig.suptitle(f"mean over {'/'.join(map(str, seeds))} run{'s' * (seeds != [1])} per line; "
                 "band: smallest to largest run")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


# (split, key, title) of the panels of curves.png
CURVES = [
    ('val', 'loss', 'val loss'),
    ('train', 'zero_token_experts', 'zero-token experts per training step (layer mean)'),
    ('val', 'max_vio', 'max_vio (val, layer mean)'),
    ('val', 'pair_coactivation', 'pair co-activation (val, layer mean)'),
    ('val', 'gate_cos_sim', 'gate cosine similarity (val, layer mean)'),
    ('val', 'expert_overlap', 'expert overlap (val, layer mean)'),
]


def plot_group_curves(plt, runs, path):
    """runs: [(label, group, lines)]. A panel per entry of CURVES, a line per group (the
    seeds of a router). Returns path."""
    groups = list(dict.fromkeys(group for _, group, _ in runs))
    colours = plt.get_cmap('tab10' if len(groups) <= 10 else 'tab20')
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (split, key, title) in zip(axes.flat, CURVES):
        plot_group_lines(ax, runs, lambda lines: layer_series(lines, split, key), colours, groups)
        ax.set_title(title, fontsize='medium')
    return finish_group_figure(plt, fig, list(axes.flat), runs, groups, path)


def plot_group_zero_token(plt, runs, path):
    """Zero-token experts per training step, a panel per MoE layer, a line per group.
    Returns path, or None when no run has MoE layers."""
    layers = sorted({layer for _, _, lines in runs for layer in layer_ids(by_iter(lines, 'train'))})
    if not layers:
        return None
    groups = list(dict.fromkeys(group for _, group, _ in runs))
    colours = plt.get_cmap('tab10' if len(groups) <= 10 else 'tab20')
    fig, axes = panel_grid(plt, len(layers), height=3.5)
    for ax, layer in zip(axes, layers):
        plot_group_lines(ax, runs, lambda lines: layer_series(lines, 'train', 'zero_token_experts', layer),
                         colours, groups)
        ax.set_title(f"layer {layer}: experts with no token", fontsize='medium')
    return finish_group_figure(plt, fig, axes, runs, groups, path)


# (file, function, what the run must log for it)
PICTURES = [
    ('zero_token.png', plot_zero_token, 'MoE layers on the train lines'),
    ('load.png', plot_load, 'MoE layers on the train lines'),
    ('specialization.png', plot_specialization, "expert_label_counts on the last val line"),
    ('gate_similarity.png', plot_gate_similarity, "gate_similarity on the last val line"),
    ('val_metrics.png', plot_val_metrics, 'per-layer router metrics on the val lines'),
]


def default_out(out_dirs):
    """The common parent of the runs, or the run itself when there is one."""
    if len(out_dirs) == 1:
        return out_dirs[0]
    paths = [os.path.normpath(d) for d in out_dirs]
    try:
        common = os.path.commonpath(paths)
    except ValueError:  # some absolute, some relative
        common = os.path.commonpath([os.path.abspath(p) for p in paths])
    return common or '.'


def plot_runs(out_dirs, out=None, runs_lines=None):
    """Every picture of every run, then the overlaid losses into out (default_out).
    runs_lines: their read_metrics lines when the caller has them already.
    Returns (paths written, [(out_dir, picture, what it needs)] skipped)."""
    plt = pyplot()
    if runs_lines is None:
        runs_lines = [read_metrics(d) for d in out_dirs]
    written, skipped = [], []
    runs = []
    for out_dir, lines in zip(out_dirs, runs_lines):
        label, group = run_label(out_dir)
        runs.append((label, group, lines))
        for picture, draw, needs in PICTURES:
            path = draw(plt, lines, label, out_dir)
            if path:
                written.append(path)
            else:
                skipped.append((out_dir, picture, needs))
    out = out or default_out(out_dirs)
    os.makedirs(out, exist_ok=True)
    written.append(plot_losses(plt, runs, os.path.join(out, 'loss.png')))
    written.append(plot_group_curves(plt, runs, os.path.join(out, 'curves.png')))
    zero_token = plot_group_zero_token(plt, runs, os.path.join(out, 'zero_token_layers.png'))
    if zero_token:
        written.append(zero_token)
    return written, skipped


def main(argv):
    out = None
    out_dirs = []
    for arg in argv:
        if arg.startswith('--out='):
            out = arg[len('--out='):]
        elif arg.startswith('-'):
            fail(f"unknown option {arg!r}; usage: python plot.py OUT_DIR [OUT_DIR ...] [--out=DIR]")
        else:
            out_dirs.append(arg)
    if not out_dirs:
        fail("no run given; usage: python plot.py OUT_DIR [OUT_DIR ...] [--out=DIR]")
    try:
        runs_lines = [read_metrics(d) for d in out_dirs]  # all inputs checked before anything is drawn
    except MetricsError as e:
        fail(e)
    try:
        pyplot()
    except ImportError:
        fail("plot.py needs matplotlib: pip install matplotlib")
    written, skipped = plot_runs(out_dirs, out, runs_lines)
    for out_dir, picture, needs in skipped:
        print(f"skipped {os.path.join(out_dir, picture)}: the run logs no {needs}")
    for path in written:
        print(path)


if __name__ == '__main__':
    main(sys.argv[1:])
