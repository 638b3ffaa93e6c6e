"""
Train the same model on the same data with several routers and seeds, then tabulate
and plot what each router did.

$ python compare.py config/compare_routers.py
$ python compare.py config/compare_routers.py --seeds=[1337] --compare_dir=out-quick
$ python compare.py config/compare_routers.py --routers="['topk', 'switch']" --train="{'max_iters': 100}"
$ python compare.py config/results_dead_experts.py --jobs=2

The keys (defaults below) come from a config file (plain Python, like train.py's) and
then from --key=value flags, checked by configurator.py:
  routers     the rows of the table: names from routers.ROUTERS, 'dense' (the dense twin:
              n_exp=1, no router) and names of variants
  variants    {name: {'router': a router or 'dense', train.py key: value, ...}}: a row that
              is a router with its own settings, e.g. 'topk-noaux': {'router': 'topk',
              'aux_loss_coef': 0.0}; its keys come after train. With 'resume_from': row,
              each of its runs continues that row's run of the same seed (below)
  seeds       one run per row and seed
  compare_dir a folder per run, compare_dir/<row>-s<seed>, and results.md
  train       {train.py key: value} for every run
  per_router  {router: {train.py key: value}} for that router's runs, after train
  zero_token_at  iterations at which results.md tabulates the zero-token experts of each
              row (the logged training step at or last before each): how fast idle experts
              come back after a switch
  jobs        runs trained at once (each train.py gets OMP_NUM_THREADS = cores // jobs
              unless OMP_NUM_THREADS is set); 1 = one after another
A variant with 'resume_from': 'base' changes settings part-way through training: its run
starts once base's run of the same seed has finished, as a copy of that run's ckpt.pt and
metrics.jsonl, and train.py resumes it (--init_from=resume) with the variant's keys, e.g. a
larger max_iters and gatepro_start_iter or aux_loss_coef. base must save its last step
(always_save_checkpoint=True) and must not resume another row itself.
A --train, --per_router or --variants flag adds to (updates) the config file's dict
instead of replacing it, so `--train="{'device': 'cuda'}"` keeps the file's model size.
compare.py sets seed, out_dir and router (or n_exp=1 for dense) itself; a variant's router
comes from its 'router' key. Keys a router fixes or refuses (top_k for switch and hash,
aux_loss_coef for aux_free and expert_choice) belong in per_router or a variant, not in
train.

Each run is `python train.py --key=value ...` in a subprocess, its output in
out_dir/train.log. out_dir/run.json (router, seed, command) is written when a run starts,
out_dir/done.json (the same, and its wall time) when it exits 0. A run with done.json is
skipped, so an interrupted comparison continues where it stopped (an unfinished run starts
again from scratch); a finished run whose train.py arguments differ from the ones the
config now gives is refused rather than mixed into the table. Then compare_dir/results.md
gets a table, a row per router or variant, mean ± std over the seeds, each column defined
under it, and plot.py draws every run and the rows' means (when matplotlib is installed).
With jobs > 1 and a failing run, the runs already training finish before the error.
"""

import ast
import importlib.metadata
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import fields

from tqdm import tqdm

import plot
from configurator import ConfigError, apply_overrides
from model import GPTConfig
from routers import ROUTERS

REPO = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(REPO, 'train.py')

# -----------------------------------------------------------------------------
# compare.py's own keys; config/compare_routers.py holds a real comparison
defaults = {
    'routers': ['dense', 'topk'],  # 'dense' = the dense twin; the rest are names in routers.ROUTERS
    'seeds': [1337],
    'compare_dir': 'out-compare',
    'train': {},  # train.py keys for every run
    'per_router': {},  # {router: {train.py keys}} for one router's runs
    'variants': {},  # {row name: {'router': router or 'dense', train.py keys}}
    'jobs': 1,  # train.py processes at once
    'zero_token_at': [],  # iterations for the table of zero-token experts over training
}
# -----------------------------------------------------------------------------


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def train_keys():
    """train.py's config keys: its top-level settings (the assignments of a literal) and
    the fields of GPTConfig, read from the source so that train.py does not run."""
    with open(TRAIN) as f:
        tree = ast.parse(f.read())
    settings = {target.id for node in tree.body if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                for target in node.targets if isinstance(target, ast.Name)}
    return settings | {f.name for f in fields(GPTConfig)}


def train_key_flag_error(arg):
    """The error for --key=value when key is train.py's, not compare.py's: say where it goes."""
    key, text = arg[2:].split('=', 1)
    try:
        value = ast.literal_eval(text)
    except (SyntaxError, ValueError):
        value = text
    own = {'router': f'--routers="[{value!r}]"', 'seed': f'--seeds=[{value!r}]', 'out_dir': f'--compare_dir={text}'}
    if key in own:
        return ConfigError(f"compare.py sets {key} for each run itself: use {own[key]}")
    return ConfigError(f"{key} is a train.py key, not compare.py's: give it to every run as "
                       f"--train=\"{{{key!r}: {value!r}}}\" (or to one router's runs with --per_router)")


def load_config(argv):
    """defaults, then the config files and --key=value flags of argv in order."""
    config = dict(defaults)
    for arg in argv:
        before = config
        key = arg[2:].split('=', 1)[0] if arg.startswith('--') and '=' in arg else None
        if key and key not in config and key in train_keys():
            raise train_key_flag_error(arg)
        config, _ = apply_overrides(config, [arg])
        if arg.startswith('--train='):
            config['train'] = {**before['train'], **config['train']}
        elif arg.startswith('--variants='):
            config['variants'] = {**before['variants'], **config['variants']}
        elif arg.startswith('--per_router='):
            merged = dict(before['per_router'])
            for router, keys in config['per_router'].items():
                old = merged.get(router, {})
                # a value that is not a dict is left as given, for check_config to reject
                merged[router] = {**old, **keys} if isinstance(old, dict) and isinstance(keys, dict) else keys
            config['per_router'] = merged
    check_config(config)
    return config


def check_train_keys(keys, where, reserved):
    if not isinstance(keys, dict) or not all(isinstance(k, str) for k in keys):
        raise ConfigError(f"{where} must be a dict of train.py keys, got {keys!r}")
    for key, value in keys.items():
        if key in reserved:
            raise ConfigError(f"{where} sets {key!r}, which compare.py sets for each run (use routers, seeds, compare_dir)")
        if not isinstance(value, (int, float, bool, str, type(None))):
            raise ConfigError(f"{where}[{key!r}] = {value!r}: a train.py key takes a number, bool, string or None")


def check_config(config):
    known = ['dense', *ROUTERS]
    routers, seeds, variants = config['routers'], config['seeds'], config['variants']
    if not routers or not all(isinstance(r, str) for r in routers) or len(set(routers)) != len(routers):
        raise ConfigError(f"routers must be a non-empty list of different names, got {routers!r}")
    if not isinstance(config['jobs'], int) or isinstance(config['jobs'], bool) or config['jobs'] < 1:
        raise ConfigError(f"jobs must be an integer >= 1, got {config['jobs']!r}")
    for name, keys in variants.items():
        if not isinstance(name, str) or name in known or not name or '/' in name:
            raise ConfigError(f"variant name {name!r} must be a new name (not a router, no '/')")
        if not isinstance(keys, dict) or keys.get('router') not in known:
            raise ConfigError(f"variants[{name!r}] needs 'router': one of {', '.join(known)}")
    for router in routers:
        if router not in known and router not in variants:
            raise ConfigError(f"unknown router {router!r}; available: {', '.join(known)}, or a name in variants")
    for router in config['per_router']:
        if router not in known:
            raise ConfigError(f"unknown router {router!r}; available: {', '.join(known)}")
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be a non-empty list of different integers, got {seeds!r}")
    at = config['zero_token_at']
    if not isinstance(at, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in at):
        raise ConfigError(f"zero_token_at must be a list of iterations (integers >= 0), got {at!r}")
    if not config['compare_dir']:
        raise ConfigError("compare_dir must not be empty")
    reserved = {'seed', 'out_dir', 'router'}
    check_train_keys(config['train'], 'train', reserved)
    for router, keys in config['per_router'].items():
        # the dense twin is n_exp=1 by definition
        check_train_keys(keys, f"per_router[{router!r}]", reserved | ({'n_exp'} if router == 'dense' else set()))
    for name, keys in variants.items():
        rest = {k: v for k, v in keys.items() if k not in ('router', 'resume_from')}
        check_train_keys(rest, f"variants[{name!r}]", reserved | ({'n_exp'} if keys['router'] == 'dense' else set())
                         | ({'init_from'} if 'resume_from' in keys else set()))
        if 'resume_from' in keys:
            check_resume_from(config, name, keys['resume_from'])


def check_resume_from(config, name, base):
    """A variant that resumes row base: base is trained in this comparison, saves its last
    step, and starts from scratch itself (one level: a run waits for its base only)."""
    if base not in config['routers']:
        raise ConfigError(f"variants[{name!r}] resumes {base!r}, which is not one of the routers; "
                          f"add {base!r} to routers")
    if base == name or 'resume_from' in config['variants'].get(base, {}):
        raise ConfigError(f"variants[{name!r}] resumes {base!r}, which resumes a row itself; "
                          f"resume a row that trains from the start")
    variant = config['variants'].get(base, {'router': base})
    keys = {**config['train'], **config['per_router'].get(variant['router'], {}), **variant}
    if keys.get('always_save_checkpoint') is not True:
        raise ConfigError(f"variants[{name!r}] resumes {base!r}, whose runs save only when val loss improves; "
                          f"give {base!r} always_save_checkpoint=True so its last step is saved")


def flag(key, value):
    # strings go as they are (train.py keeps them strings), the rest as Python literals
    return f"--{key}={value}" if isinstance(value, str) else f"--{key}={value!r}"


def shell_join(args):
    """A command to show and to paste: --routers="['topk', 'switch']" rather than shlex's
    '--routers=['"'"'topk'"'"', ...]'."""
    quoted = []
    for arg in args:
        if shlex.quote(arg) != arg and not any(c in arg for c in '"$`\\!'):
            quoted.append(f'"{arg}"')
        else:
            quoted.append(shlex.quote(arg))
    return ' '.join(quoted)


def run_name(row, seed):
    return f"{row}-s{seed}"


def plan_runs(config):
    """[(name, row, seed, out_dir, command)] in table order: row by row, seed by seed. A row
    is a router, 'dense' or a variant; a variant trains its 'router' with its own keys."""
    runs = []
    for row in config['routers']:
        variant = dict(config['variants'].get(row, {'router': row}))
        router = variant.pop('router')
        resumes = variant.pop('resume_from', None) is not None
        for seed in config['seeds']:
            name = run_name(row, seed)
            out_dir = os.path.join(config['compare_dir'], name)
            keys = {**config['train'], **config['per_router'].get(router, {}), **variant, 'seed': seed, 'out_dir': out_dir}
            if resumes:
                keys['init_from'] = 'resume'  # from the copy of its base's checkpoint (start_from_base)
            if router == 'dense':
                keys['n_exp'] = 1  # in place of train's n_exp, if it sets one
            else:
                keys['router'] = router
            command = [sys.executable, TRAIN, *(flag(k, v) for k, v in keys.items())]
            runs.append((name, row, seed, out_dir, command))
    return runs


def resume_bases(config):
    """{run name: the out_dir of the run it resumes} for the runs of resume_from variants."""
    bases = {}
    for row in config['routers']:
        base = config['variants'].get(row, {}).get('resume_from')
        if base is not None:
            for seed in config['seeds']:
                bases[run_name(row, seed)] = os.path.join(config['compare_dir'], run_name(base, seed))
    return bases


def start_from_base(out_dir, base_dir):
    """Make out_dir a copy of the finished run base_dir, for train.py to resume: its
    checkpoint, and its metrics.jsonl so this run's log and plots hold the whole history.
    Raises RuntimeError (one line) when base_dir has no checkpoint."""
    os.makedirs(out_dir, exist_ok=True)
    for file in ('ckpt.pt', 'metrics.jsonl'):
        source = os.path.join(base_dir, file)
        if not os.path.exists(source):
            raise RuntimeError(f"{out_dir} resumes {base_dir}, which has no {file}; delete {base_dir} and run again")
        shutil.copyfile(source, os.path.join(out_dir, file))


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def same_run(done, command):
    # what train.py is asked to do; the interpreter and the path of train.py may differ
    return isinstance(done, dict) and done.get('command_argv', [None, None])[2:] == command[2:]


def child_env(jobs):
    """The environment of the train.py processes: with several jobs at once, each gets an
    equal share of the cores (torch would otherwise start one thread per core in each and
    they would fight), unless OMP_NUM_THREADS is set already."""
    env = dict(os.environ)
    if jobs > 1 and 'OMP_NUM_THREADS' not in env:
        env['OMP_NUM_THREADS'] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def train_run(name, router, seed, out_dir, command, env=None):
    """Run train.py (in env, default this process's); write run.json before and done.json
    after. Returns the wall time (s); RuntimeError with a one-line message when train.py fails."""
    os.makedirs(out_dir, exist_ok=True)
    info = {'router': router, 'seed': seed, 'command': shell_join(command), 'command_argv': command}
    with open(os.path.join(out_dir, 'run.json'), 'w') as f:
        json.dump(info, f, indent=1)
    log_path = os.path.join(out_dir, 'train.log')
    executed = command
    if os.path.exists(os.path.join(out_dir, 'ckpt.pt')) and '--init_from=resume' not in command:
        # a run that did not finish starts again from scratch: the checkpoint train.py would
        # refuse to replace is that run's own
        executed = [*command, '--overwrite_out_dir=True']
    t0 = time.time()
    with open(log_path, 'w') as log:
        result = subprocess.run(executed, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    wall = time.time() - t0
    if result.returncode != 0:
        # train.py ends bad settings with one 'error: ...' line: show it with the run
        with open(log_path, errors='replace') as f:
            last = [line.strip() for line in f if line.strip()][-1:] or ['no output']
        raise RuntimeError(f"run {name} failed (exit code {result.returncode}): {last[0]}  [log: {log_path}]")
    with open(os.path.join(out_dir, 'done.json'), 'w') as f:
        json.dump({**info, 'wall_s': wall, 'finished': time.strftime('%Y-%m-%d %H:%M:%S')}, f, indent=1)
    return wall


# -----------------------------------------------------------------------------
# the table

def mean(values):
    return sum(values) / len(values) if values else None


def layer_mean(line, key):
    """Mean over the MoE layers of a per-layer number; None when no layer logs it."""
    return mean([entry[key] for entry in line.get('layers') or []
                 if isinstance(entry, dict) and plot.is_number(entry.get(key))])


def training_mean(train, key):
    """Mean over the logged training steps of a per-layer number's mean over the MoE layers."""
    return mean([v for line in train if (v := layer_mean(line, key)) is not None])


def all_experts_used_iter(train):
    """The iteration from which every expert got tokens for good: the first logged training
    step such that in it and in every later logged step, every MoE layer has
    zero_token_experts == 0. math.inf (never) when the last logged step still has an expert
    without tokens; None when the run has no MoE layer (dense). Steps between two logged
    ones (log_interval) are not seen. train: train lines sorted by iteration."""
    if not any(line.get('layers') for line in train):
        return None
    since = math.inf
    for line in reversed(train):
        if any(entry.get('zero_token_experts', 0) != 0 for entry in line.get('layers') or [] if isinstance(entry, dict)):
            break
        since = line['iter']
    return since


def zero_token_at(train, iteration):
    """zero_token_experts, mean over the MoE layers, of the last logged training step at or
    before `iteration` (log_interval decides which steps are logged); None when there is
    none. train: train lines sorted by iteration."""
    before = [line for line in train if line['iter'] <= iteration]
    return layer_mean(before[-1], 'zero_token_experts') if before else None


def run_stats(lines, zero_token_iters=()):
    """One run's numbers for the tables, from its metrics.jsonl lines; None where absent.
    zero_token_iters: the iterations of compare's zero_token_at."""
    train, val = plot.by_iter(lines, 'train'), plot.by_iter(lines, 'val')
    last = val[-1] if val else {}
    # train.py times the training step alone, an eval at its top not counted; the run's first
    # logged step is left out (it warms up: memory, caches)
    speeds = [line['tokens_per_s'] for line in train[1:] or train if plot.is_number(line.get('tokens_per_s'))]
    stats = {
        'val_loss': last['loss'] if plot.is_number(last.get('loss')) else None,
        'tokens_per_s': mean(speeds),
        'all_experts_iter': all_experts_used_iter(train),
        'zero_token_train_mean': training_mean(train, 'zero_token_experts'),
        'dropped_train_mean': training_mean(train, 'dropped_frac'),
        'experts_vary': plot.experts_vary(lines),  # topp, remoe, null experts: not top_k at every token
    }
    for iteration in zero_token_iters:
        stats[f"zero_token_at:{iteration}"] = zero_token_at(train, iteration)
    for key in LAST_VAL_KEYS:
        stats[key] = layer_mean(last, key)
    if stats['specialization'] is None and plot.is_number(last.get('specialization')):
        stats['specialization'] = last['specialization']  # logged for the whole model, not per layer
    accuracy = [v for v in (last.get('answer_accuracy') or {}).values() if plot.is_number(v)]
    stats['answer_accuracy'] = mean(accuracy)
    also = last.get('eval_also') if isinstance(last.get('eval_also'), dict) else {}
    stats['eval_also'] = also.get('dataset')
    stats['also_loss'] = also.get('loss')
    stats['other_domains_loss'] = also.get('other_domains_loss')
    for domain, value in (also.get('domain_loss') or {}).items():
        stats[f"also_loss:{domain}"] = value
    return stats


def mean_std(values):
    """(mean, sample standard deviation) of the numbers; std is None for one value."""
    m = sum(values) / len(values)
    return m, (statistics.stdev(values) if len(values) > 1 else None)


def cell(values, spec):
    """'mean ± std' of one column over a router's seeds, or n/a. math.inf means never
    (all_experts_iter): the seeds that never got there are counted, not averaged."""
    present = [v for v in values if v is not None]
    if not present:
        return 'n/a'
    finite = [v for v in present if v != math.inf]
    if not finite:
        return 'never'
    m, s = mean_std(finite)
    text = format(m, spec) + (f" ± {format(s, spec)}" if s is not None else '')
    if len(finite) < len(present):
        text += f" (never in {len(present) - len(finite)} of {len(present)})"
    return text


# (stats key, column header, format). Lessons, RESULTS.md and the tests quote the headers:
# keep their texts. The first table is short: MAIN_COLUMNS, which every comparison is read
# by, then each group of SOMETIMES_COLUMNS that matters for the runs in it (main_columns);
# the second table has the rest, so that every number is in one of the two.
MAIN_COLUMNS = [
    ('val_loss', 'val loss', '.4f'),
    ('tokens_per_s', 'tokens/s', ',.0f'),
    ('zero_token_experts', 'zero-token experts', '.2f'),
    ('max_vio', 'max_vio', '.3f'),
    ('specialization', 'specialization', '.3f'),
]
SOMETIMES_COLUMNS = {
    # some run ends with an idle expert: how long experts sat idle, and whether all came back
    'idle': [
        ('zero_token_train_mean', 'zero-token, training mean', '.2f'),
        ('all_experts_iter', 'iters until all experts used', '.0f'),
    ],
    # some run sends a token to two experts or more: how alike a token's experts are
    'pairs': [
        ('pair_coactivation', 'pair_coactivation', '.4f'),
        ('expert_overlap', 'expert_overlap', '.3f'),
    ],
    # some run drops assignments past its capacity
    'drops': [
        ('dropped_train_mean', 'dropped, training mean', '.4f'),
        ('dropped_frac', 'dropped_frac', '.4f'),
    ],
    # some run gives a token as many experts as it needs (topp, remoe) or has null experts
    'variable_k': [
        ('experts_per_token', 'experts per token', '.2f'),
    ],
}
MORE_COLUMNS = [
    ('zero_token_experts_per_batch', 'zero-token per batch', '.2f'),
    ('routing_variance', 'routing_variance', '.4f'),
    ('router_entropy', 'router_entropy', '.3f'),
    ('load_cv', 'load_cv', '.3f'),
    ('gate_cos_sim', 'gate_cos_sim', '.3f'),
    ('gate_angle', 'gate_angle', '.3f'),
    ('gate_spectral_entropy', 'gate_spectral_entropy', '.3f'),
]


def groups_that_matter(all_stats):
    """The SOMETIMES_COLUMNS groups that belong in the first table for these runs' stats."""
    def some(test):
        return any(test(s) for s in all_stats)
    positive = lambda s, key: (s.get(key) or 0) > 0
    matter = {
        'idle': some(lambda s: positive(s, 'zero_token_experts') or s.get('all_experts_iter') == math.inf),
        # a top-1 router's token has no second expert: its pair_coactivation is 0 and its
        # expert_overlap is not logged
        'pairs': some(lambda s: positive(s, 'pair_coactivation') or s.get('expert_overlap') is not None),
        'drops': some(lambda s: positive(s, 'dropped_train_mean') or positive(s, 'dropped_frac')),
        # a fixed top_k makes it top_k (less the drops) in every run: then it waits in the second table
        'variable_k': some(lambda s: s.get('experts_vary')),
    }
    return [group for group in SOMETIMES_COLUMNS if matter[group]]


def main_columns(all_stats):
    """(the first table's columns, the second table's) for these runs' stats."""
    groups = groups_that_matter(all_stats)
    first = MAIN_COLUMNS + [c for group in groups for c in SOMETIMES_COLUMNS[group]]
    second = [c for group in SOMETIMES_COLUMNS if group not in groups for c in SOMETIMES_COLUMNS[group]] + MORE_COLUMNS
    return first, second


# what each column is, under the table it is in; the columns of the last val line share a note
LAST_VAL_KEYS = ('zero_token_experts', 'zero_token_experts_per_batch', 'max_vio', 'routing_variance',
                 'expert_overlap', 'pair_coactivation', 'specialization', 'router_entropy', 'load_cv',
                 'dropped_frac', 'gate_cos_sim', 'gate_angle', 'gate_spectral_entropy', 'experts_per_token')
COLUMN_NOTES = {
    'val_loss': '`loss` of the last val line (cross-entropy, router losses excluded).',
    'zero_token_train_mean': 'zero_token_experts of every logged training step, mean over the steps and the '
                             'MoE layers: how many experts sat idle, on average, over the whole run.',
    'all_experts_iter': 'the first logged training step from which on every logged step has '
                        'zero_token_experts = 0 in every MoE layer (steps between logs are not seen); '
                        '"never" when the last logged step still has an expert without tokens.',
    'dropped_train_mean': 'dropped_frac of every logged training step, mean over the steps and the MoE '
                          'layers: the share of the assignments dropped past the capacity (training drops '
                          'past capacity_factor, an eval past eval_capacity_factor).',
    'experts_per_token': 'the experts that ran per token, mean over the tokens (experts_per_token): top_k, '
                         'less what capacity drops, for a fixed-k router; what the tokens took under topp, '
                         'remoe or null experts.',
}


def column_notes(columns, jobs):
    """The lines under a table that say what each of its columns is."""
    notes = []
    for key, header, _ in columns:
        if key == 'tokens_per_s':
            notes.append('- tokens/s: mean over the logged training steps but the first of `tokens_per_s` (the '
                         'training step alone: train.py leaves an eval out of its time). '
                         + ('Runs ran one after another' if jobs == 1 else f"{jobs} runs trained at once")
                         + ' on a shared machine: compare speeds with care.')
        elif key in COLUMN_NOTES:
            notes.append(f"- {header}: {COLUMN_NOTES[key]}")
    last_val = [header for key, header, _ in columns if key in LAST_VAL_KEYS]
    if last_val:
        notes.append(f"- {', '.join(last_val)}: the last val line, mean over the MoE layers.")
    return notes


def task_columns(stats_by_router):
    """The columns of the task table, for the runs that log them: the exact-match accuracy of
    answers (train.py's eval_answers) and the loss on eval_also's val split, overall, on the
    domains the run does not train on, and per domain. [] when no run logs any of them."""
    all_stats = [s for runs in stats_by_router.values() for s in runs]
    present = lambda key: any(s.get(key) is not None for s in all_stats)
    also = next((s['eval_also'] for s in all_stats if s.get('eval_also')), None)
    columns = [('answer_accuracy', 'exact-match answers', '.3f')] if present('answer_accuracy') else []
    if also:
        columns.append(('also_loss', f"val loss on {also}", '.4f'))
        if present('other_domains_loss'):
            columns.append(('other_domains_loss', 'on the domains not trained on', '.4f'))
        domains = dict.fromkeys(k for s in all_stats for k in s if k.startswith('also_loss:'))
        columns += [(key, f"on {key.split(':', 1)[1]}", '.4f') for key in domains]
    return columns


def table(columns, routers, stats_by_router):
    lines = ['| router | ' + ' | '.join(header for _, header, _ in columns) + ' |',
             '| --- ' * (len(columns) + 1) + '|']
    for router in routers:
        runs = stats_by_router[router]
        lines.append(f"| {router} | " + ' | '.join(cell([s.get(key) for s in runs], spec) for key, _, spec in columns) + ' |')
    return '\n'.join(lines)


def paired_table(routers, seeds, val_loss):
    """Val loss seed by seed, and each row minus the first row at the same seed (mean ± std
    over the seeds both have). Runs with the same seed train on the same batches (train.py
    draws iteration i's batch from (seed, i)), so the paired difference leaves out how easy
    a seed's batches happen to be, which the spread of a row's mean keeps in.
    val_loss: {(row, seed): loss or None}."""
    base = routers[0]
    lines = ['| router | ' + ' | '.join(f"seed {seed}" for seed in seeds) + f" | minus {base}, same seed |",
             '| --- ' * (len(seeds) + 2) + '|']
    for router in routers:
        losses = [val_loss[router, seed] for seed in seeds]
        diffs = [val_loss[router, seed] - val_loss[base, seed] for seed in seeds
                 if val_loss[router, seed] is not None and val_loss[base, seed] is not None]
        if router == base:
            paired = 'baseline'
        elif not diffs:
            paired = 'n/a'
        else:
            m, sd = mean_std(diffs)
            paired = f"{m:+.4f}" + (f" ± {sd:.4f}" if sd is not None else '') + f" ({sum(d < 0 for d in diffs)} of {len(diffs)} lower)"
        lines.append(f"| {router} | " + ' | '.join('n/a' if v is None else f"{v:.4f}" for v in losses) + f" | {paired} |")
    return '\n'.join(lines)


def task_section(routers, stats_by_router):
    """The task table's lines for results.md, or none when no run logs a task metric."""
    columns = task_columns(stats_by_router)
    if not columns:
        return []
    return ['The task, at the last val line: exact-match answers is the fraction of greedy answers '
            'that are exactly right (train.py eval_answers; mean over the domains with answers); '
            '"val loss on" a dataset is the cross-entropy on the val split of train.py\'s eval_also, '
            'over all its tokens, over the tokens of the domains the run does not train on, and per domain:', '',
            table(columns, routers, stats_by_router), '']


def zero_token_section(iterations, routers, stats_by_router):
    """results.md's table of zero-token experts at compare's zero_token_at iterations."""
    if not iterations:
        return []
    columns = [(f"zero_token_at:{i}", f"iter {i}", '.2f') for i in iterations]
    return ['Zero-token experts over training: zero_token_experts of the logged training step at '
            '(or last before) each iteration, mean over the MoE layers:', '',
            table(columns, routers, stats_by_router), '']


def cpu_name():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown CPU'


def minutes(seconds):
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def results_markdown(config, runs, stats, walls, argv, wall_now, n_trained, plots):
    """results.md. stats: {run name: run_stats}; walls: {run name: wall s from done.json}."""
    routers, seeds = config['routers'], config['seeds']
    stats_by_router = {r: [stats[name] for name, router, *_ in runs if router == r] for r in routers}
    first, second = main_columns(list(stats.values()))
    try:
        torch_version = importlib.metadata.version('torch')
    except importlib.metadata.PackageNotFoundError:
        torch_version = 'not installed'
    out = [
        '# Router comparison', '',
        f"{len(routers)} setting{'s' * (len(routers) != 1)} × {len(seeds)} seed{'s' * (len(seeds) != 1)} "
        f"({', '.join(map(str, seeds))}), one run each, "
        f"same model and data. A cell is the mean ± sample standard deviation over the seeds "
        f"(the value alone for one seed); n/a: the runs do not log it (the dense twin has no router).", '',
        'The numbers every comparison is read by, and those that matter for these runs (idle experts when '
        'a run ends with one, dropped assignments when a run drops any, pair co-activation and expert '
        'overlap when a run sends a token to two experts or more, experts per token when a run gives each '
        'token as many as it needs); the rest are under "More numbers of each run" below:', '',
        table(first, routers, stats_by_router), '',
        *column_notes(first, config['jobs']), '',
        'Val loss seed by seed, and minus the first row\'s at the same seed (the runs of one seed '
        'train on the same batches, so this difference is not blurred by how easy a seed\'s '
        'batches are):', '',
        paired_table(routers, seeds, {(router, seed): stats[name]['val_loss'] for name, router, seed, _, _ in runs}), '',
        'More numbers of each run:', '',
        table(second, routers, stats_by_router), '',
        *column_notes(second, config['jobs']), '',
        *task_section(routers, stats_by_router),
        *zero_token_section(config['zero_token_at'], routers, stats_by_router),
        '## How this was made', '',
        f"Command: `{shell_join(['python', *argv])}`", '',
        'The train.py command of each row (its other seeds differ only in `--seed` and `--out_dir`; '
        "every run's own is in its `run.json`):", '',
    ]
    for router in routers:
        command = next(c for _, r, _, _, c in runs if r == router)
        out.append(f"- {router}: `{shell_join(['python', 'train.py', *command[2:]])}`")
    threads = child_env(config['jobs']).get('OMP_NUM_THREADS')
    out += [
        '',
        f"Machine: {platform.platform()}, {cpu_name()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, torch {torch_version}"
        + (f", OMP_NUM_THREADS={threads}" if threads else '')
        + (f", {config['jobs']} runs at once" if config['jobs'] > 1 else '') + '.', '',
        f"Wall time: {minutes(wall_now)} for this command ({n_trained} runs trained, "
        f"{len(runs) - n_trained} already finished); training summed over all {len(runs)} runs: "
        f"{minutes(sum(walls.values()))}.", '',
        '## Plots', '',
    ]
    if plots is None:
        out.append('Skipped: matplotlib is not installed. `pip install matplotlib`, then run the same '
                   'command again (finished runs are not retrained), or '
                   f"`python plot.py {config['compare_dir']}/*-s* --out={config['compare_dir']}`.")
    else:
        written, skipped = plots
        per_run = [p for p, _, _ in plot.PICTURES if any(os.path.basename(w) == p for w in written)]
        out.append("`loss.png`: the losses of all runs; `curves.png` (and `zero_token_layers.png`, per layer): each "
                   "row's mean over its seeds vs iteration. "
                   f"In each run's folder: {', '.join(f'`{p}`' for p in per_run)}. "
                   f"Redraw with `python plot.py {config['compare_dir']}/*-s* --out={config['compare_dir']}`.")
        for picture, needs in dict.fromkeys((picture, needs) for _, picture, needs in skipped):
            n = sum(1 for _, p, _ in skipped if p == picture)
            out.append(f"Not drawn: `{picture}` for {n} run{'s' * (n != 1)} (no {needs}).")
    return '\n'.join(out) + '\n'


def main(argv, prog='compare.py'):
    t0 = time.time()
    try:
        config = load_config(argv)
    except ConfigError as e:
        fail(e)
    runs = plan_runs(config)
    walls = {}
    todo = []
    for name, router, seed, out_dir, command in runs:
        done = read_json(os.path.join(out_dir, 'done.json'))
        if done is None:
            todo.append((name, router, seed, out_dir, command))
        elif not same_run(done, command):
            fail(f"{out_dir} holds a finished run of another train.py command (see its done.json); "
                 f"delete that folder or set another --compare_dir")
        else:
            print(f"skipping {name}: finished ({os.path.join(out_dir, 'done.json')})")
            walls[name] = done.get('wall_s', 0.0)
    env = child_env(config['jobs'])
    bases = resume_bases(config)
    unfinished = {out_dir for _, _, _, out_dir, _ in todo}
    n_trained = 0
    bar = tqdm(total=len(todo), desc='runs', unit='run', disable=None)  # no bar when stderr is not a terminal
    # each run is its own train.py process; the threads here only wait for them. A run that
    # resumes another waits until that one has finished (then it starts as a copy of it).
    pool = ThreadPoolExecutor(max_workers=config['jobs'])
    waiting = [run for run in todo if bases.get(run[0]) in unfinished]
    running = {}
    errors = []

    def submit(run):
        name, out_dir = run[0], run[3]
        if name in bases:
            start_from_base(out_dir, bases[name])
        running[pool.submit(train_run, *run, env=env)] = run

    try:
        for run in todo:
            if run not in waiting:
                submit(run)
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                run = running.pop(future)
                name = run[0]
                if future.cancelled():  # queued when an earlier run failed: never started
                    continue
                try:
                    walls[name] = future.result()
                except (RuntimeError, OSError) as e:
                    if not errors:  # runs not started yet never start; the ones training finish
                        for queued in running:
                            queued.cancel()
                        waiting.clear()
                    errors.append(str(e))
                    still = [r[0] for f, r in running.items() if f.running()]
                    if still:
                        tqdm.write(f"run {name} failed; waiting for {', '.join(still)} to finish (Ctrl-C stops them)")
                    continue
                unfinished.discard(run[3])
                n_trained += 1
                bar.update(1)
                bar.set_postfix_str(name)
                for ready in [r for r in waiting if bases[r[0]] not in unfinished]:
                    waiting.remove(ready)
                    try:
                        submit(ready)
                    except RuntimeError as e:
                        errors.append(str(e))
    except KeyboardInterrupt:
        active = [r[0] for f, r in running.items() if f.running()]
        for future in running:
            future.cancel()
        bar.close()
        # Ctrl-C reached the train.py processes too: each saves and exits
        print(f"interrupted during {', '.join(active) or 'the runs'}; run the same command again to continue",
              file=sys.stderr)
        sys.exit(130)
    pool.shutdown()
    bar.close()
    if errors:
        fail(errors[0] + (f" (and {len(errors) - 1} more failed run{'s' * (len(errors) > 2)})" if len(errors) > 1 else ''))

    try:
        lines = {name: plot.read_metrics(out_dir) for name, _, _, out_dir, _ in runs}
    except plot.MetricsError as e:
        fail(e)
    stats = {name: run_stats(run_lines, config['zero_token_at']) for name, run_lines in lines.items()}
    try:
        plot.pyplot()
        has_matplotlib = True
    except ImportError:
        has_matplotlib = False
        print("matplotlib is not installed: no plots (pip install matplotlib)")
    plots = plot.plot_runs([r[3] for r in runs], config['compare_dir'], list(lines.values())) if has_matplotlib else None
    results = os.path.join(config['compare_dir'], 'results.md')
    with open(results, 'w') as f:
        f.write(results_markdown(config, runs, stats, walls, [prog, *argv], time.time() - t0, n_trained, plots))
    if plots:
        print(f"{len(plots[0])} plots written")
    print(f"wrote {results}")


if __name__ == '__main__':
    main(sys.argv[1:], sys.argv[0])
