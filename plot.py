"""
Pictures of what the routers did, from the metrics.jsonl that train.py writes.

$ python plot.py out
$ python plot.py out-compare/topk-s1337 out-compare/gatepro-s1337 --out=figs

Into each OUT_DIR, one PNG per picture of that run:
    overview.png         the run at a glance: training and val loss; the router's entropy per
                         layer against ln E (no preference between the experts); the smallest
                         and largest expert load per layer against 1/E (perfect balance); the
                         specialization score per layer; the dropped share per layer when the
                         run drops assignments past a capacity; the experts per token per layer
                         (mean, and a band of one standard deviation over the tokens) when the
                         number a token takes varies (topp, remoe, null experts)
    zero_token.png       experts that got no token in a training step, vs iteration, one line per layer
    load.png             expert load over training: a panel per layer, iteration on x, expert on y,
                         one colour scale for all layers (white: 1/E, red above, blue below)
    specialization.png   expert x domain at the last eval: the share of each domain's tokens whose
                         top-1 expert each expert is, one 0-to-1 colour scale (needs expert_label_counts)
    gate_similarity.png  cosine similarity of the gate rows at the last eval (needs gate_similarity)
    experts_by_domain.png  mean experts per token of each domain's tokens at the last eval, a bar
                         per domain, a panel per layer (needs experts_per_token_by_label)
    val_metrics.png      router metrics at every eval (load imbalance, entropy, gate similarity, ...),
                         a line per layer; a metric that is 0 at every eval is named, not drawn
and one overlaid picture of all runs given:
    loss.png             training loss (logged steps) and val loss (evals), a line per run
    curves.png           the runs grouped by router (their seeds): mean and spread over the
                         seeds of val loss, zero-token experts, max_vio, the dropped share,
                         pair co-activation, gate cosine similarity and expert overlap, vs
                         iteration, and the experts per token when some run's varies (topp,
                         remoe, null experts); a panel that no run logs, or that is 0 in
                         every run (pair co-activation and expert overlap under top-1, the
                         dropped share without a capacity), is named at the bottom instead
                         of drawn
    zero_token_layers.png  the same grouping: zero-token experts per training step, a panel
                         per MoE layer on one y scale (not drawn when no run has MoE layers)
into --out=DIR, by default the runs' common parent folder (the run itself when only one
is given; the current folder for sibling runs such as `out` and `out2`).
Panel titles say what a number is in words, with its metrics.jsonl field under them in
small print.

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


# What each logged field is, in words, for panel titles (short: they must fit a panel), and
# what its axis counts. The field's own name goes under the words in small print
# (panel_title), so that it can still be found in metrics.jsonl, the README's metrics table
# and results.md.
WORDS = {
    'load': 'expert load',
    'max_vio': 'load imbalance',
    'router_entropy': "router's entropy over the experts",
    'gate_cos_sim': "how alike the gate rows are",
    'pair_coactivation': 'an expert picked with its most alike one',
    'gate_angle': 'angle between the gate rows',
    'gate_spectral_entropy': 'how spread out the gate rows are',
    'expert_overlap': "how alike a token's experts' outputs are",
    'specialization': 'specialization',
    'zero_token_experts': 'experts with no token in a training step',
    'zero_token_experts_per_batch': 'experts with no token in an eval batch',
    'dropped_frac': 'dropped share',
    'gate_similarity': "cosine similarity of the gate rows",
    'experts_per_token': 'experts per token',
}
AXIS = {
    'load': 'share of the assignments',
    'max_vio': '(largest load - mean) / mean',
    'router_entropy': 'nats (mean over tokens)',
    'gate_cos_sim': 'mean |cos| over expert pairs',
    'pair_coactivation': 'share of tokens (mean over experts)',
    'gate_angle': 'degrees (90: orthogonal)',
    'gate_spectral_entropy': "entropy of S's singular values",
    'expert_overlap': 'mean |cos| of the two outputs',
    'specialization': '0: none, 1: an expert per domain',
    'zero_token_experts': 'experts',
    'zero_token_experts_per_batch': 'experts (mean over batches)',
    'dropped_frac': 'share of the assignments dropped',
    'experts_per_token': 'experts that ran (mean over tokens)',
}


def panel_title(ax, words, field=None):
    """A panel's title in words, with the logged field's name (and where it comes from) in
    small grey print under it."""
    ax.set_title(words, fontsize='medium', pad=15 if field else 6)
    if field:
        ax.annotate(f"({field})", xy=(0.5, 1), xycoords='axes fraction', xytext=(0, 3), textcoords='offset points',
                    ha='center', va='bottom', fontsize='small', color='dimgrey')


def layer_ids(lines):
    return sorted({entry['layer'] for line in lines for entry in line.get('layers') or []
                   if isinstance(entry, dict) and 'layer' in entry})


def layer_entry(line, layer):
    for entry in line.get('layers') or []:
        if isinstance(entry, dict) and entry.get('layer') == layer:
            return entry
    return None


def layer_points(lines, layer, key):
    """[(iteration, value of key)] of one MoE layer, over the lines that log it as a number."""
    return [(line['iter'], entry[key]) for line in lines
            if (entry := layer_entry(line, layer)) and is_number(entry.get(key))]


def all_zero(values):
    """True when there are no values or every one is 0: nothing to see in a panel of them."""
    return all(abs(v) < 1e-12 for v in values)


def expert_count(lines):
    """E, the experts per MoE layer, from the longest logged load; 0 when none is logged."""
    return max((len(entry['load']) for line in lines for entry in line.get('layers') or []
                if isinstance(entry, dict) and isinstance(entry.get('load'), list)), default=0)


def experts_vary(lines):
    """True when the number of experts a token asks for changes from one logged step to the
    next: a router that gives a token as many experts as it needs (topp, remoe), or null
    experts. A fixed-k router's experts_per_token moves only by what its capacity drops, so
    that is divided back out: experts_per_token / (1 - dropped_frac) is top_k (expert
    choice: its capacity factor) at every step. Each split on its own: an eval has its own
    capacity."""
    for split in ('train', 'val'):
        routed = by_iter(lines, split)
        for layer in layer_ids(routed):
            asked = [entry['experts_per_token'] / (1 - entry['dropped_frac']) for line in routed
                     if (entry := layer_entry(line, layer)) and is_number(entry.get('experts_per_token'))
                     and is_number(entry.get('dropped_frac')) and entry['dropped_frac'] < 1]
            if asked and max(asked) - min(asked) > 1e-6 * max(asked):
                return True
    return False


def layer_colour(plt, i):
    """The same colour for layer i in every panel of a picture."""
    return plt.get_cmap('tab10')(i % 10)


def panel_grid(plt, n, width=4.0, height=3.0, max_cols=4, layout=None):
    """A figure with n panels, at most max_cols a row; returns (fig, flat list of n axes).
    layout='constrained' for figures with a colour bar shared by their panels."""
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, layout=layout)
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


def footnote(fig, text):
    """A grey line at the bottom of the figure (what was left out, and why); returns the
    share of the figure's height to keep free for it."""
    if not text:
        return 0.0
    fig.text(0.01, 0.01, text, fontsize='small', color='dimgrey', ha='left', va='bottom')
    return 0.3 / fig.get_figheight()  # 0.3 inch


def save(plt, fig, path, rect=None):
    if fig.get_layout_engine() is None:  # a constrained layout places its panels itself
        fig.tight_layout(rect=rect or (0, 0, 1, 1))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def layer_lines(plt, ax, per_layer, layers, **style):
    """A line per layer on ax, in the layer's colour. per_layer: {layer: [(iteration, value)]}."""
    for i, layer in enumerate(layers):
        if per_layer.get(layer):
            ax.plot(*zip(*per_layer[layer]), color=layer_colour(plt, i), label=f"layer {layer}", **style)


def overview_loss(ax, train, val):
    train_loss = [(line['iter'], line['loss']) for line in train if is_number(line.get('loss'))]
    val_loss = [(line['iter'], line['loss']) for line in val if is_number(line.get('loss'))]
    if train_loss:
        ax.plot(*zip(*train_loss), color='tab:grey', linewidth=1, label='training (logged steps)')
    if val_loss:
        ax.plot(*zip(*val_loss), color='black', marker='o', markersize=4, label='val (evals)')
    panel_title(ax, 'loss')
    ax.set_ylabel('cross-entropy (nats)')
    if train_loss or val_loss:
        ax.legend(fontsize='small')


def overview_entropy(plt, ax, routed, layers, n_exp, where):
    """The router's entropy per layer, and ln E: the entropy of a router with no preference."""
    layer_lines(plt, ax, {layer: layer_points(routed, layer, 'router_entropy') for layer in layers}, layers, marker='.')
    if n_exp:
        uniform = math.log(n_exp)
        ax.axhline(uniform, color='black', linestyle='--', linewidth=1, label=f"ln {n_exp} = {uniform:.2f}: no preference")
        bottom, top = ax.get_ylim()
        ax.set_ylim(bottom, max(top, uniform + 0.08 * (uniform - bottom)))  # the line clear of the frame
    panel_title(ax, f"router's entropy over the experts, {where}", 'router_entropy')
    ax.set_ylabel(AXIS['router_entropy'])
    ax.legend(fontsize='small', loc='lower left')


def overview_load(plt, ax, routed, layers, n_exp, where):
    """Per layer, the smallest and the largest expert's load (a band between them), and 1/E:
    every expert's load when the router is perfectly balanced."""
    from matplotlib.lines import Line2D
    key = []  # the legend: a colour per layer, a line style for largest and smallest
    for i, layer in enumerate(layers):
        extremes = [(line['iter'], min(load), max(load)) for line in routed
                    if (entry := layer_entry(line, layer)) and isinstance(load := entry.get('load'), list)
                    and load and all(is_number(x) for x in load)]
        if extremes:
            iters, smallest, largest = zip(*extremes)
            colour = layer_colour(plt, i)
            ax.fill_between(iters, smallest, largest, color=colour, alpha=0.15)
            ax.plot(iters, largest, color=colour, marker='.')
            ax.plot(iters, smallest, color=colour, marker='.', linestyle=':')
            key.append(Line2D([], [], color=colour, linewidth=4, alpha=0.5, label=f"layer {layer}"))
    key += [Line2D([], [], color='black', label='largest'),
            Line2D([], [], color='black', linestyle=':', label='smallest')]
    if n_exp:
        key.append(ax.axhline(1 / n_exp, color='black', linestyle='--', linewidth=1,
                              label=f"balanced: 1/{n_exp} = {1 / n_exp:.3f}"))
    panel_title(ax, f"smallest and largest expert load, {where}", 'load')
    ax.set_ylabel(AXIS['load'])
    ax.set_ylim(0, ax.get_ylim()[1] * 1.35)  # headroom for the legend above the lines
    ax.legend(handles=key, fontsize='small', ncol=3, loc='upper center')


def overview_experts_per_token(plt, ax, train, layers):
    """Per layer, the mean number of experts that ran per token at each logged training step,
    and a band of one standard deviation over the tokens around it."""
    for i, layer in enumerate(layers):
        points = [(line['iter'], entry['experts_per_token'], entry.get('experts_per_token_std'))
                  for line in train if (entry := layer_entry(line, layer)) and is_number(entry.get('experts_per_token'))]
        if not points:
            continue
        iters, means, stds = zip(*points)
        colour = layer_colour(plt, i)
        ax.plot(iters, means, color=colour, marker='.', label=f"layer {layer}")
        if all(is_number(std) for std in stds):
            ax.fill_between(iters, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=colour, alpha=0.15)
    panel_title(ax, 'experts per token at each logged training step (band: one std over the tokens)',
                'experts_per_token')
    ax.set_ylabel(AXIS['experts_per_token'])
    ax.set_ylim(bottom=0)
    ax.legend(fontsize='small')


def plot_overview(plt, lines, label, out_dir):
    """A run at a glance: the loss; the router's entropy per layer against ln E (a router
    that cannot tell the experts apart); the smallest and largest expert load per layer
    against 1/E (perfect balance); the specialization score per layer when logged; the
    dropped share per layer when the run drops anything; and the experts per token per
    layer when that number varies (experts_vary). The routing panels read the eval
    lines, the numbers of train.py's routing table (the training steps when no eval logs them)."""
    train, val = by_iter(lines, 'train'), by_iter(lines, 'val')
    routed, where = (val, 'at each eval') if layer_ids(val) else (train, 'at each logged training step')
    layers = layer_ids(routed)
    if not layers:
        return None  # dense: nothing is routed, and loss.png has the loss
    n_exp = expert_count(routed)
    specialization = {layer: layer_points(val, layer, 'specialization') for layer in layers}
    # training drops (an eval drops past its own, larger, capacity): a panel when any step dropped
    drops = {layer: layer_points(train, layer, 'dropped_frac') for layer in layers}
    has_specialization = any(specialization.values())
    has_drops = not all_zero(v for points in drops.values() for _, v in points)
    has_experts = experts_vary(lines)
    fig, axes = panel_grid(plt, 3 + has_specialization + has_drops + has_experts, width=5.5, height=3.6, max_cols=2)
    ax_loss, ax_entropy, ax_load, *more = axes
    overview_loss(ax_loss, train, val)
    overview_entropy(plt, ax_entropy, routed, layers, n_exp, where)
    overview_load(plt, ax_load, routed, layers, n_exp, where)
    if has_specialization:
        ax = more.pop(0)
        layer_lines(plt, ax, specialization, layers, marker='.')
        panel_title(ax, 'specialization at each eval (heatmap: specialization.png)', 'specialization')
        ax.set_ylabel(AXIS['specialization'])
        ax.set_ylim(0, 1)
        ax.legend(fontsize='small')
    if has_drops:
        ax = more.pop(0)
        layer_lines(plt, ax, drops, layers)
        panel_title(ax, 'dropped share at each logged training step', 'dropped_frac')
        ax.set_ylabel(AXIS['dropped_frac'])
        ax.set_ylim(bottom=0)
        ax.legend(fontsize='small')
    if has_experts:
        overview_experts_per_token(plt, more.pop(0), train, layers)
    for ax in axes:
        ax.set_xlabel('iteration')
    fig.suptitle(f"{label}: loss, router entropy and expert load over training")
    return save(plt, fig, os.path.join(out_dir, 'overview.png'))


def plot_zero_token(plt, lines, label, out_dir):
    train = by_iter(lines, 'train')
    layers = layer_ids(train)
    if not layers:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, layer in enumerate(layers):
        points = layer_points(train, layer, 'zero_token_experts')
        if points:
            # the counts are small integers and the layers' lines would hide each other:
            # shift each layer a little
            iters, counts = zip(*points)
            ax.plot(iters, [c + 0.04 * i for c in counts], label=f"layer {layer}", marker='.', alpha=0.8,
                    color=layer_colour(plt, i))
    ax.set_xlabel('iteration')
    ax.set_ylabel(f"experts with no token{' (+0.04 per layer)' if len(layers) > 1 else ''}")
    panel_title(ax, f"{label}: {WORDS['zero_token_experts']}", 'zero_token_experts')
    integer_ticks(ax.yaxis)
    ax.legend(fontsize='small')
    return save(plt, fig, os.path.join(out_dir, 'zero_token.png'))


def plot_load(plt, lines, label, out_dir):
    """Each layer's load, expert by expert, over training, on one colour scale for all the
    layers: white is the balanced 1/E, red an expert above it, blue one below it."""
    from matplotlib.colors import TwoSlopeNorm
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
    grids = {}
    for layer in layers:
        loads = [(entry or {}).get('load') for entry in (layer_entry(line, layer) for line in train)]
        n_exp = max((len(load) for load in loads if isinstance(load, list)), default=0)
        if n_exp == 0:
            continue
        grid = np.full((n_exp, len(train)), np.nan)  # NaN: this step logged no load
        for col, load in enumerate(loads):
            if isinstance(load, list):
                grid[:len(load), col] = [x if is_number(x) else np.nan for x in load]
        grids[layer] = grid
    if not grids:
        return None
    n_exp = max(grid.shape[0] for grid in grids.values())
    balanced = 1 / n_exp
    largest = max(np.nanmax(grid) if not np.isnan(grid).all() else 0.0 for grid in grids.values())
    # one scale for every layer, white at balance; at least up to 2/E so that a run close
    # to balance stays pale instead of stretching its small differences over the whole scale
    norm = TwoSlopeNorm(vmin=0.0, vcenter=balanced, vmax=max(largest, 2 * balanced))
    cmap = plt.get_cmap('RdBu_r').with_extremes(bad='lightgrey')  # a step without load: not white, which is balance
    fig, axes = panel_grid(plt, len(layers), width=6.0, height=2.6, max_cols=2, layout='constrained')  # long x axes
    mesh = None
    for ax, layer in zip(axes, layers):
        if layer not in grids:
            panel_title(ax, f"layer {layer}: no load logged")
            continue
        grid = grids[layer]
        mesh = ax.pcolormesh(edges, np.arange(grid.shape[0] + 1) - 0.5, grid, cmap=cmap, norm=norm)
        integer_ticks(ax.yaxis)
        ax.set_xlabel('iteration')
        ax.set_ylabel('expert')
        panel_title(ax, f"layer {layer}")
    bar = fig.colorbar(mesh, ax=axes, label=f"share of the assignments\n(white: balanced, 1/{n_exp} = {balanced:.3f})")
    # ticks at 0, 1, 2, 4, 8 ... times the balanced share: how many times its fair share an expert takes
    multiples = [0, 1] + [2 ** i for i in range(1, 12) if 2 ** i * balanced <= norm.vmax]
    bar.set_ticks([k * balanced for k in multiples], labels=[f"{k}/{n_exp}" if k else '0' for k in multiples])
    fig.suptitle(f"{label}: expert load, each expert's share of the assignments in a training step (load)")
    return save(plt, fig, os.path.join(out_dir, 'load.png'))


# how specialization.png's colour bar reads a cell: metrics.py counts each token once, at
# the expert with its largest gate weight among the experts it kept (top_expert)
SPECIALIZATION_CELL = "share of the domain's tokens whose top-1 expert this is (top-1: the largest gate weight)"


def plot_specialization(plt, lines, label, out_dir):
    """Each domain's tokens split over the experts by their top-1 expert (a column sums to
    1): an expert that takes most of one domain and little of the others has specialised.
    Columns are normalised, not rows, so that a frequent domain does not fill every
    expert's row. A token that capacity dropped from all its experts has no top-1 and is
    not counted. One colour scale, 0 to 1, for every layer."""
    val = by_iter(lines, 'val')
    if not val:
        return None
    last = val[-1]
    tables = [(entry.get('layer'), as_matrix(entry.get('expert_label_counts'))) for entry in last.get('layers') or []
              if isinstance(entry, dict)]
    tables = [(layer, counts) for layer, counts in tables if counts is not None]
    if not tables:
        return None
    fig, axes = panel_grid(plt, len(tables), width=4.5, height=3.6, layout='constrained')
    n_exp = max(counts.shape[0] for _, counts in tables)
    for ax, (layer, counts) in zip(axes, tables):  # counts [E, n_labels]
        share = counts / np.maximum(counts.sum(axis=0, keepdims=True), 1)
        names = last.get('label_names')
        if not isinstance(names, list) or len(names) != counts.shape[1]:
            names = [str(i) for i in range(counts.shape[1])]
        image = ax.imshow(share, aspect='auto', cmap='magma', vmin=0, vmax=1)
        ax.set_xticks(range(len(names)), names, rotation=45, ha='right', fontsize='small')
        integer_ticks(ax.yaxis)
        ax.set_ylabel('expert')
        panel_title(ax, f"layer {layer}")
    fig.colorbar(image, ax=axes, location='bottom', shrink=0.9, aspect=40,
                 label=f"{SPECIALIZATION_CELL}\na column sums to 1; a domain spread evenly would be "
                       f"1/{n_exp} = {1 / n_exp:.3f} in each cell")
    fig.suptitle(f"{label}: where each domain's tokens go, at iteration {last['iter']}")
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
    fig, axes = panel_grid(plt, len(matrices), width=4.0, height=3.6, layout='constrained')
    for ax, (layer, similarity) in zip(axes, matrices):
        image = ax.imshow(similarity, cmap='RdBu_r', vmin=-1, vmax=1)
        integer_ticks(ax.xaxis, ax.yaxis)
        ax.set_xlabel('expert')
        ax.set_ylabel('expert')
        panel_title(ax, f"layer {layer}")
    fig.colorbar(image, ax=axes, label='cosine similarity\n(1: same direction, 0: orthogonal)')
    fig.suptitle(f"{label}: {WORDS['gate_similarity']} at iteration {last['iter']} (gate_similarity)")
    return save(plt, fig, os.path.join(out_dir, 'gate_similarity.png'))


def plot_experts_by_domain(plt, lines, label, out_dir):
    """Which kind of text takes more experts: the mean number of experts that ran per token
    for each domain's tokens (or character class), a bar per domain, a panel per layer, at
    the last eval, on one y scale; a dashed line at the mean over all tokens. A domain with
    no token in the eval batches has no bar."""
    val = by_iter(lines, 'val')
    if not val:
        return None
    last = val[-1]
    bars = [(entry.get('layer'), entry) for entry in last.get('layers') or [] if isinstance(entry, dict)
            and isinstance(entry.get('experts_per_token_by_label'), list) and entry['experts_per_token_by_label']
            and any(is_number(v) for v in entry['experts_per_token_by_label'])]
    if not bars:
        return None
    top = max(v for _, entry in bars for v in entry['experts_per_token_by_label'] if is_number(v))
    fig, axes = panel_grid(plt, len(bars), width=4.5, height=3.6)
    layers = layer_ids([last])
    for ax, (layer, entry) in zip(axes, bars):
        values = entry['experts_per_token_by_label']
        names = last.get('label_names')
        if not isinstance(names, list) or len(names) != len(values):
            names = [str(i) for i in range(len(values))]
        colour = layer_colour(plt, layers.index(layer) if layer in layers else 0)
        ax.bar(range(len(values)), [v if is_number(v) else 0.0 for v in values], color=colour)
        for x, v in enumerate(values):
            if not is_number(v):
                ax.text(x, 0, 'no token', rotation=90, ha='center', va='bottom', fontsize='small', color='dimgrey')
        if is_number(entry.get('experts_per_token')):
            ax.axhline(entry['experts_per_token'], color='black', linestyle='--', linewidth=1,
                       label=f"all tokens: {entry['experts_per_token']:.2f}")
            ax.legend(fontsize='small', loc='lower right')
        ax.set_xticks(range(len(values)), names, rotation=45, ha='right', fontsize='small')
        ax.set_ylim(0, top * 1.15)  # one scale for every layer
        ax.set_ylabel(AXIS['experts_per_token'], fontsize='small')
        panel_title(ax, f"layer {layer}")
    fig.suptitle(f"{label}: experts per token of each domain's tokens at iteration {last['iter']} "
                 f"(experts_per_token_by_label)")
    return save(plt, fig, os.path.join(out_dir, 'experts_by_domain.png'))


# per-layer numbers of the val lines worth following over training; those a run does not
# log, or logs as 0 at every eval, are left out (named at the bottom of the picture)
VAL_METRICS = ['max_vio', 'router_entropy', 'gate_cos_sim', 'pair_coactivation', 'gate_angle',
               'gate_spectral_entropy', 'expert_overlap', 'specialization', 'zero_token_experts_per_batch',
               'dropped_frac']


def plot_val_metrics(plt, lines, label, out_dir):
    val = by_iter(lines, 'val')
    layers = layer_ids(val)
    series = {}  # metric -> layer -> [(iter, value)]
    zero = []  # metrics logged, but 0 at every eval
    for metric in VAL_METRICS:
        per_layer = {layer: points for layer in layers if (points := layer_points(val, layer, metric))}
        if not per_layer:
            continue
        if all_zero(v for points in per_layer.values() for _, v in points):
            zero.append(metric)
        else:
            series[metric] = per_layer
    if not series:
        return None
    fig, axes = panel_grid(plt, len(series), width=4.0, height=3.2)
    for ax, (metric, per_layer) in zip(axes, series.items()):
        for layer, points in per_layer.items():
            ax.plot(*zip(*points), marker='.', label=f"layer {layer}", color=layer_colour(plt, layers.index(layer)))
        ax.set_xlabel('iteration')
        ax.set_ylabel(AXIS[metric], fontsize='small')
        panel_title(ax, WORDS[metric], metric)
    axes[0].legend(fontsize='small')
    fig.suptitle(f"{label}: router metrics at each eval, a line per layer")
    left_out = ', '.join(f"{WORDS[metric]} ({metric})" for metric in zero)
    bottom = footnote(fig, f"not drawn, 0 at every eval: {left_out}" if zero else '')
    return save(plt, fig, os.path.join(out_dir, 'val_metrics.png'), rect=(0, bottom, 1, 1))


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
        panel_title(ax, title)
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


def finish_group_figure(plt, fig, axes, runs, groups, path, note=''):
    handles, labels = next((ax.get_legend_handles_labels() for ax in axes if ax.get_lines()), ([], []))
    fig.legend(handles, labels, loc='lower center', ncol=min(len(groups), 6), fontsize='small',
               bbox_to_anchor=(0.5, 0.3 / fig.get_figheight() if note else 0))
    seeds = sorted({sum(1 for _, g, _ in runs if g == group) for group in groups})
    fig.suptitle(f"mean over {'/'.join(map(str, seeds))} run{'s' * (seeds != [1])} per line; "
                 "band: smallest to largest run")
    bottom = footnote(fig, note)
    return save(plt, fig, path, rect=(0, bottom + 0.45 / fig.get_figheight(), 1, 1))  # the legend: 0.45 inch


# (split, key) of the panels of curves.png; each is drawn when some run logs it as something
# other than 0 (a top-1 router has no pair of experts to co-activate or overlap, and only a
# run with a capacity drops)
CURVES = [
    ('val', 'loss'),
    ('train', 'zero_token_experts'),
    ('val', 'max_vio'),
    ('train', 'dropped_frac'),
    ('train', 'experts_per_token'),  # drawn only when some run's varies (experts_vary)
    ('val', 'pair_coactivation'),
    ('val', 'gate_cos_sim'),
    ('val', 'expert_overlap'),
]


def curve_words(split, key):
    """(title, small print) of a curves.png panel."""
    if key == 'loss':
        return f"{split} loss", None
    where = 'training steps' if split == 'train' else 'evals'
    return WORDS[key], f"{key}; {where}, mean over the layers"


def curve_panels(runs):
    """The CURVES entries with something to draw: some run logs the key as a number other
    than 0; the experts per token when some run's varies (every MoE run logs it: a fixed
    top_k would fill a panel with flat lines, left out without a word). Returns (panels,
    [(title, why) left out])."""
    panels, left_out = [], []
    for split, key in CURVES:
        if key == 'experts_per_token' and not any(experts_vary(lines) for _, _, lines in runs):
            continue
        values = [v for _, _, lines in runs for v in layer_series(lines, split, key).values()]
        if values and not all_zero(values):
            panels.append((split, key))
        else:
            left_out.append((f"{curve_words(split, key)[0]} ({key})", '0 in every run' if values else 'no run logs it'))
    return panels, left_out


def plot_group_curves(plt, runs, path):
    """runs: [(label, group, lines)]. A panel per CURVES entry with something to draw (at
    least the val loss panel), a line per group (the seeds of a router); the ones left out
    are named at the bottom. Returns path."""
    groups = list(dict.fromkeys(group for _, group, _ in runs))
    colours = plt.get_cmap('tab10' if len(groups) <= 10 else 'tab20')
    panels, left_out = curve_panels(runs)
    if not panels:  # nothing logged at all: an empty val loss panel says so
        panels, left_out = CURVES[:1], left_out[1:]
    fig, axes = panel_grid(plt, len(panels), width=4.4, height=3.3, max_cols=3)
    for ax, (split, key) in zip(axes, panels):
        plot_group_lines(ax, runs, lambda lines: layer_series(lines, split, key), colours, groups)
        panel_title(ax, *curve_words(split, key))
        ax.set_ylabel(AXIS.get(key, 'cross-entropy (nats)'), fontsize='small')
    note = '; '.join(f"{title}: {why}" for title, why in left_out)
    return finish_group_figure(plt, fig, axes, runs, groups, path, f"not drawn: {note}" if note else '')


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
        panel_title(ax, f"layer {layer}: {WORDS['zero_token_experts']}", 'zero_token_experts')
        ax.set_ylabel(AXIS['zero_token_experts'])
        integer_ticks(ax.yaxis)
    # one y scale, so that the layers compare at a glance
    bottom, top = min(ax.get_ylim()[0] for ax in axes), max(ax.get_ylim()[1] for ax in axes)
    for ax in axes:
        ax.set_ylim(bottom, top)
    return finish_group_figure(plt, fig, axes, runs, groups, path)


# (file, function, what the run must log for it)
PICTURES = [
    ('overview.png', plot_overview, 'MoE layers'),
    ('zero_token.png', plot_zero_token, 'MoE layers on the train lines'),
    ('load.png', plot_load, 'MoE layers on the train lines'),
    ('specialization.png', plot_specialization, "expert_label_counts on the last val line"),
    ('gate_similarity.png', plot_gate_similarity, "gate_similarity on the last val line"),
    ('experts_by_domain.png', plot_experts_by_domain, "experts_per_token_by_label on the last val line"),
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
