"""
The numbers of lessons/ANSWERS.md, measured from the lessons' own commands, and checked.

$ python lessons/answers.py              # lessons 1-6, run in the repository (out-lesson*/), checked
$ python lessons/answers.py 1 4          # lessons 1 and 4 only
$ python lessons/answers.py --write      # put the measured numbers into ANSWERS.md (and the lessons)
$ python lessons/answers.py --runs=DIR   # run them in DIR instead of the repository

The lessons' commands run as a student runs them, so finished runs in out-lesson*/ (the
lessons' own, run from the repository) are reused, not trained again.

Each number of ANSWERS.md that a run gives is followed by its name in an HTML comment,
`2.0465<!-- l1.val_loss -->`, invisible where the markdown is shown. MEASURES below says how
each is read from the runs, and how far a class's machine may move it: the tolerance.

Why a tolerance: the runs repeat exactly on one machine, but not across machines. Another
CPU (AVX2 against AVX-512 kernels, another BLAS) or another number of threads rounds a few
sums differently, and 300 steps of training carry the difference on. The tolerances are
set from the largest gaps seen between runs of these lessons on one machine with its
AVX-512 kernels, with ATEN_CPU_CAPABILITY=avx2 (the kernels of a CPU without AVX-512) and
with OMP_NUM_THREADS=2 instead of 1 (TOLERANCES); a written number may also be off by
half a unit of its last digit, its rounding. To see such gaps yourself, run the script
with --runs=DIR under `ATEN_CPU_CAPABILITY=avx2`: it prints each number's gap to ANSWERS.md.

Check mode exits 1 when a number is off by more than its tolerance: the code changed what
a lesson shows, and the answer around that number needs rereading (then --write).
"""

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

LESSONS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(LESSONS_DIR)
ANSWERS = os.path.join(LESSONS_DIR, 'ANSWERS.md')
sys.path.insert(0, REPO)
import compare  # noqa: E402  (the statistics of results.md: one definition for both)
import plot  # noqa: E402  (read_metrics)

# each lesson's command, python compare.py CONFIG, run in the runs' folder
CONFIGS = {1: 'config/lesson_base.py', 2: 'config/lesson2_balance.py', 3: 'config/lesson3_aux_free.py',
           4: 'config/lesson4_capacity.py', 5: 'config/lesson5_gatepro.py', 6: 'config/lesson6_seeds.py',
           8: 'config/lesson8_dynamic_k.py'}
SEEDS = (1337, 1338, 1339)  # lesson 6's


class Runs:
    """The runs of the lessons under one folder, read once each."""

    def __init__(self, root):
        self.root = root
        self.cache = {}

    def lines(self, lesson, row, seed=1337):
        path = os.path.join(self.root, f'out-lesson{lesson}', f'{row}-s{seed}')
        if path not in self.cache:
            self.cache[path] = plot.read_metrics(path)
        return self.cache[path]

    def stats(self, lesson, row, seed=1337):
        """results.md's numbers of one run (compare.run_stats)."""
        return compare.run_stats(self.lines(lesson, row, seed))

    def val(self, lesson, row, iteration=None, seed=1337):
        """The val line of an iteration (default the last)."""
        vals = [line for line in self.lines(lesson, row, seed) if line['split'] == 'val']
        return vals[-1] if iteration is None else next(line for line in vals if line['iter'] == iteration)

    def seeds(self, lesson, row, key):
        """(mean, sample std) of a results.md number over lesson 6's seeds."""
        return compare.mean_std([self.stats(lesson, row, seed)[key] for seed in SEEDS])


def layer(line, index, key):
    return line['layers'][index][key]


def top_share(line, domain, index=0):
    """The share of a domain's tokens whose top-1 expert in layer `index` is that domain's
    most common one (expert_label_counts: expert x domain, each token counted once)."""
    column = [row[line['label_names'].index(domain)] for row in line['layers'][index]['expert_label_counts']]
    return 100 * max(column) / sum(column)


def first_train(runs, lesson, row):
    return next(line for line in runs.lines(lesson, row) if line['split'] == 'train')


def train_at(runs, lesson, row, iteration):
    return next(line for line in runs.lines(lesson, row) if line['split'] == 'train' and line['iter'] == iteration)


def by_label(line, index, key, label):
    """A per-label number of layer `index` (e.g. experts_per_token_by_label) for one label."""
    return line['layers'][index][key][line['label_names'].index(label)]


def no_expert_share(line, index):
    """Percent of the eval's tokens that took no expert in layer `index`."""
    histogram = line['layers'][index]['experts_per_token_histogram']
    return 100 * histogram[0] / sum(histogram)


def paired(runs, each=False):
    """topk's val loss minus ortho_var's, seed by seed (lesson 6): (mean, std), or the list."""
    gaps = [runs.stats(6, 'topk', seed)['val_loss'] - runs.stats(6, 'ortho_var', seed)['val_loss'] for seed in SEEDS]
    return gaps if each else compare.mean_std(gaps)


# How far another machine may move a number, by kind: (share of the value, at least).
# About twice the largest gap seen, over the numbers of that kind, between this machine's
# runs of lessons 1-6 and the same runs with ATEN_CPU_CAPABILITY=avx2 (lessons 1-6) or
# OMP_NUM_THREADS=2 (lessons 1-2); the gaps in the comments.
TOLERANCES = {
    'val_loss': (0, 0.025),  # largest gap 0.011 (lesson 5, gatepro)
    'spread': (0, 0.015),  # a std over 3 seeds; 0.006
    'step0': (0, 0.002),  # before any training: rounding alone; 0
    'step0_pct': (0, 0.2),  # the same, in percent
    'entropy': (0, 0.01),  # 0.004
    'load': (0, 0.01),  # 0.003
    'top_share': (0, 3),  # percentage points; 0.9
    'specialization': (0, 0.01),  # 0.002
    'zero_token': (0.3, 0.1),  # 15% of the value
    'iteration': (0, 150),  # one late step with an idle expert moves it far: 80 -> 200 with 2 threads
    'balance': (0.2, 0.02),  # max_vio, load_cv: 9% of the value
    'dropped': (0, 0.02),  # 0.006
    'coactivation': (0.75, 0.002),  # 37% of the value (lesson 5, gatepro)
    'gate': (0, 0.03),  # 0.010
    'overlap': (0, 0.02),  # 0.003
    'routing_variance': (0.2, 0.001),  # 3% of the value
    'count': (0, 0),
    'experts': (0, 0.05),  # experts per token: 0.016 (lesson 8 with AVX2 kernels; no two-thread run)
}


@dataclass
class Measure:
    lesson: int
    read: Callable  # Runs -> the number
    kind: str  # a key of TOLERANCES

    def tolerance(self, value):
        share, least = TOLERANCES[self.kind]
        return max(least, share * abs(value))


M = Measure
MEASURES = {
    # lesson 1: topk, 8 experts, top-2
    'l1.val_loss': M(1, lambda r: r.stats(1, 'topk')['val_loss'], 'val_loss'),
    'l1.entropy0.layer0': M(1, lambda r: layer(r.val(1, 'topk', 0), 0, 'router_entropy'), 'step0'),
    'l1.entropy0.layer1': M(1, lambda r: layer(r.val(1, 'topk', 0), 1, 'router_entropy'), 'step0'),
    'l1.entropy.layer0': M(1, lambda r: layer(r.val(1, 'topk'), 0, 'router_entropy'), 'entropy'),
    'l1.entropy.layer1': M(1, lambda r: layer(r.val(1, 'topk'), 1, 'router_entropy'), 'entropy'),
    'l1.load_min.layer0': M(1, lambda r: min(layer(r.val(1, 'topk'), 0, 'load')), 'load'),
    'l1.load_max.layer0': M(1, lambda r: max(layer(r.val(1, 'topk'), 0, 'load')), 'load'),
    'l1.load_min.layer1': M(1, lambda r: min(layer(r.val(1, 'topk'), 1, 'load')), 'load'),
    'l1.load_max.layer1': M(1, lambda r: max(layer(r.val(1, 'topk'), 1, 'load')), 'load'),
    'l1.load0_min.layer0': M(1, lambda r: min(layer(r.val(1, 'topk', 0), 0, 'load')), 'step0'),
    'l1.load0_max.layer0': M(1, lambda r: max(layer(r.val(1, 'topk', 0), 0, 'load')), 'step0'),
    'l1.top_share.arithmetic': M(1, lambda r: top_share(r.val(1, 'topk'), 'arithmetic'), 'top_share'),
    'l1.top_share.lists': M(1, lambda r: top_share(r.val(1, 'topk'), 'lists'), 'top_share'),
    'l1.top_share.english': M(1, lambda r: top_share(r.val(1, 'topk'), 'english'), 'top_share'),
    'l1.top_share.code': M(1, lambda r: top_share(r.val(1, 'topk'), 'code'), 'top_share'),
    'l1.top_share.records': M(1, lambda r: top_share(r.val(1, 'topk'), 'records'), 'top_share'),
    'l1.specialization.layer0': M(1, lambda r: layer(r.val(1, 'topk'), 0, 'specialization'), 'specialization'),
    'l1.specialization.layer1': M(1, lambda r: layer(r.val(1, 'topk'), 1, 'specialization'), 'specialization'),
    'l1.specialization': M(1, lambda r: r.stats(1, 'topk')['specialization'], 'specialization'),
    # lesson 2: 16 experts, top-2, with and without the balance loss
    'l2.zero_token_train_mean.noaux': M(2, lambda r: r.stats(2, 'topk-noaux')['zero_token_train_mean'], 'zero_token'),
    'l2.zero_token_train_mean.aux': M(2, lambda r: r.stats(2, 'topk')['zero_token_train_mean'], 'zero_token'),
    'l2.all_experts_iter.aux': M(2, lambda r: r.stats(2, 'topk')['all_experts_iter'], 'iteration'),
    'l2.max_vio.noaux': M(2, lambda r: r.stats(2, 'topk-noaux')['max_vio'], 'balance'),
    'l2.max_vio.aux': M(2, lambda r: r.stats(2, 'topk')['max_vio'], 'balance'),
    'l2.val_loss.noaux': M(2, lambda r: r.stats(2, 'topk-noaux')['val_loss'], 'val_loss'),
    'l2.val_loss.aux': M(2, lambda r: r.stats(2, 'topk')['val_loss'], 'val_loss'),
    'l2.zero_token_experts.noaux': M(2, lambda r: r.stats(2, 'topk-noaux')['zero_token_experts'], 'zero_token'),
    # lesson 3: DeepSeek-V3's bias
    'l3.max_vio50.aux_free': M(3, lambda r: compare.layer_mean(r.val(3, 'aux_free', 50), 'max_vio'), 'balance'),
    'l3.max_vio150.aux_free': M(3, lambda r: compare.layer_mean(r.val(3, 'aux_free', 150), 'max_vio'), 'balance'),
    'l3.max_vio.aux_free': M(3, lambda r: r.stats(3, 'aux_free')['max_vio'], 'balance'),
    'l3.max_vio.frozen': M(3, lambda r: r.stats(3, 'aux_free-frozen')['max_vio'], 'balance'),
    'l3.max_vio.noaux': M(3, lambda r: r.stats(3, 'topk-noaux')['max_vio'], 'balance'),
    'l3.load_cv.aux_free': M(3, lambda r: r.stats(3, 'aux_free')['load_cv'], 'balance'),
    'l3.load_cv.frozen': M(3, lambda r: r.stats(3, 'aux_free-frozen')['load_cv'], 'balance'),
    'l3.load_cv.noaux': M(3, lambda r: r.stats(3, 'topk-noaux')['load_cv'], 'balance'),
    'l3.val_loss.aux_free': M(3, lambda r: r.stats(3, 'aux_free')['val_loss'], 'val_loss'),
    'l3.val_loss.frozen': M(3, lambda r: r.stats(3, 'aux_free-frozen')['val_loss'], 'val_loss'),
    'l3.val_loss.noaux': M(3, lambda r: r.stats(3, 'topk-noaux')['val_loss'], 'val_loss'),
    # lesson 4: switch with capacity factors 1.0, 1.25 and no drops
    'l4.dropped_train_mean.cf1': M(4, lambda r: r.stats(4, 'switch-cf1.0')['dropped_train_mean'], 'dropped'),
    'l4.dropped_train_mean.cf125': M(4, lambda r: r.stats(4, 'switch')['dropped_train_mean'], 'dropped'),
    'l4.dropped0.cf1': M(4, lambda r: 100 * layer(first_train(r, 4, 'switch-cf1.0'), 0, 'dropped_frac'), 'step0_pct'),
    'l4.dropped0.cf125': M(4, lambda r: 100 * layer(first_train(r, 4, 'switch'), 0, 'dropped_frac'), 'step0_pct'),
    'l4.val_loss.cf1': M(4, lambda r: r.stats(4, 'switch-cf1.0')['val_loss'], 'val_loss'),
    'l4.val_loss.cf125': M(4, lambda r: r.stats(4, 'switch')['val_loss'], 'val_loss'),
    'l4.val_loss.nodrop': M(4, lambda r: r.stats(4, 'switch-nodrop')['val_loss'], 'val_loss'),
    # lesson 5: GatePro against top-k
    'l5.coactivation.gatepro': M(5, lambda r: r.stats(5, 'gatepro')['pair_coactivation'], 'coactivation'),
    'l5.coactivation.topk': M(5, lambda r: r.stats(5, 'topk')['pair_coactivation'], 'coactivation'),
    'l5.gate_cos_sim.gatepro': M(5, lambda r: r.stats(5, 'gatepro')['gate_cos_sim'], 'gate'),
    'l5.gate_cos_sim.topk': M(5, lambda r: r.stats(5, 'topk')['gate_cos_sim'], 'gate'),
    'l5.val_loss.gatepro': M(5, lambda r: r.stats(5, 'gatepro')['val_loss'], 'val_loss'),
    'l5.val_loss.topk': M(5, lambda r: r.stats(5, 'topk')['val_loss'], 'val_loss'),
    # lesson 6: topk and ortho_var over three seeds: mean and sample std
    'l6.overlap.ortho_var': M(6, lambda r: r.seeds(6, 'ortho_var', 'expert_overlap')[0], 'overlap'),
    'l6.overlap.topk': M(6, lambda r: r.seeds(6, 'topk', 'expert_overlap')[0], 'overlap'),
    'l6.routing_variance.ortho_var': M(6, lambda r: r.seeds(6, 'ortho_var', 'routing_variance')[0], 'routing_variance'),
    'l6.routing_variance.topk': M(6, lambda r: r.seeds(6, 'topk', 'routing_variance')[0], 'routing_variance'),
    'l6.val_loss.ortho_var': M(6, lambda r: r.seeds(6, 'ortho_var', 'val_loss')[0], 'val_loss'),
    'l6.val_loss.ortho_var.sd': M(6, lambda r: r.seeds(6, 'ortho_var', 'val_loss')[1], 'spread'),
    'l6.val_loss.topk': M(6, lambda r: r.seeds(6, 'topk', 'val_loss')[0], 'val_loss'),
    'l6.val_loss.topk.sd': M(6, lambda r: r.seeds(6, 'topk', 'val_loss')[1], 'spread'),
    'l6.overlap.ortho_var.sd': M(6, lambda r: r.seeds(6, 'ortho_var', 'expert_overlap')[1], 'spread'),
    'l6.overlap.topk.sd': M(6, lambda r: r.seeds(6, 'topk', 'expert_overlap')[1], 'spread'),
    'l6.routing_variance.ortho_var.sd': M(6, lambda r: r.seeds(6, 'ortho_var', 'routing_variance')[1], 'spread'),
    'l6.routing_variance.topk.sd': M(6, lambda r: r.seeds(6, 'topk', 'routing_variance')[1], 'spread'),
    'l6.entropy.ortho_var': M(6, lambda r: r.seeds(6, 'ortho_var', 'router_entropy')[0], 'entropy'),
    'l6.entropy.ortho_var.sd': M(6, lambda r: r.seeds(6, 'ortho_var', 'router_entropy')[1], 'spread'),
    'l6.entropy.topk': M(6, lambda r: r.seeds(6, 'topk', 'router_entropy')[0], 'entropy'),
    'l6.entropy.topk.sd': M(6, lambda r: r.seeds(6, 'topk', 'router_entropy')[1], 'spread'),
    'l6.paired_gap': M(6, lambda r: paired(r)[0], 'val_loss'),
    'l6.paired_gap.sd': M(6, lambda r: paired(r)[1], 'spread'),
    'l6.paired_lower': M(6, lambda r: sum(gap > 0 for gap in paired(r, each=True)), 'count'),
    # lesson 8: top-2, top-p (p = .4) and ReMoE
    'l8.val_loss.topk': M(8, lambda r: r.stats(8, 'topk')['val_loss'], 'val_loss'),
    'l8.val_loss.topp': M(8, lambda r: r.stats(8, 'topp')['val_loss'], 'val_loss'),
    'l8.val_loss.remoe': M(8, lambda r: r.stats(8, 'remoe')['val_loss'], 'val_loss'),
    'l8.ept.topp': M(8, lambda r: r.stats(8, 'topp')['experts_per_token'], 'experts'),
    'l8.ept.remoe': M(8, lambda r: r.stats(8, 'remoe')['experts_per_token'], 'experts'),
    'l8.ept.layer0.topp': M(8, lambda r: layer(r.val(8, 'topp'), 0, 'experts_per_token'), 'experts'),
    'l8.ept.layer1.topp': M(8, lambda r: layer(r.val(8, 'topp'), 1, 'experts_per_token'), 'experts'),
    'l8.ept.layer0.remoe': M(8, lambda r: layer(r.val(8, 'remoe'), 0, 'experts_per_token'), 'experts'),
    'l8.ept.layer1.remoe': M(8, lambda r: layer(r.val(8, 'remoe'), 1, 'experts_per_token'), 'experts'),
    'l8.ept0.topp': M(8, lambda r: compare.layer_mean(first_train(r, 8, 'topp'), 'experts_per_token'), 'step0'),
    'l8.ept50.remoe': M(8, lambda r: compare.layer_mean(train_at(r, 8, 'remoe', 50), 'experts_per_token'), 'experts'),
    'l8.ept100.remoe': M(8, lambda r: compare.layer_mean(train_at(r, 8, 'remoe', 100), 'experts_per_token'), 'experts'),
    'l8.english.layer1.remoe': M(8, lambda r: by_label(r.val(8, 'remoe'), 1, 'experts_per_token_by_label', 'english'),
                                 'experts'),
    'l8.no_expert.layer1.remoe': M(8, lambda r: no_expert_share(r.val(8, 'remoe'), 1), 'top_share'),
}
TAG = re.compile(r'(\d[\d,]*(?:\.\d+)?)(%?)<!-- ([\w.]+) -->')
# the files whose numbers are checked: the answers, and each lesson's "what you should see"
FILES = [ANSWERS, *sorted(os.path.join(LESSONS_DIR, name) for name in os.listdir(LESSONS_DIR)
                          if re.match(r'\d-.*\.md$', name))]


def tagged_numbers(text, where='ANSWERS.md'):
    """[(name, the number as written)] of every tagged number in a file's text, in order (a
    number quoted twice is tagged twice); ValueError when a tag names no measure."""
    found = []
    for match in TAG.finditer(text):
        number, _, name = match.groups()
        if name not in MEASURES:
            raise ValueError(f"{where} tags a number {name}, which lessons/answers.py does not measure; "
                             f"add it to MEASURES or remove the tag")
        found.append((name, number))
    return found


def value_and_rounding(number):
    """A written number's value, and half a unit of its last digit: how far rounding it to
    what is written may have moved it ('0.095' -> (0.095, 0.0005))."""
    return float(number.replace(',', '')), 0.5 * 10 ** -len(number.partition('.')[2])


def read_files():
    texts = {}
    for path in FILES:
        with open(path, encoding='utf-8') as f:
            texts[path] = f.read()
    return texts


def run_lessons(lessons, runs_dir, env=None):
    """Run each lesson's command in runs_dir, as a student runs it in the repository: its
    out-lessonN/ lands there, and compare.py reuses the runs it finds finished (a class's
    runs, when runs_dir is where the class ran the lessons). env: the commands' environment
    (default this process's)."""
    os.makedirs(runs_dir, exist_ok=True)
    for lesson in lessons:
        command = [sys.executable, os.path.join(REPO, 'compare.py'), os.path.join(REPO, CONFIGS[lesson])]
        print(f"lesson {lesson}: python compare.py {CONFIGS[lesson]} (in {runs_dir})", flush=True)
        done = subprocess.run(command, cwd=runs_dir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ['(no output)'])[-1]
            raise RuntimeError(f"lesson {lesson}'s command failed: {tail}")


def measure(lessons, runs_dir):
    """{name: value} of the measures of these lessons, read from runs_dir; ValueError naming
    the measure when its runs do not hold what it reads (runs of another config, say)."""
    runs = Runs(runs_dir)
    measured = {}
    for name, m in MEASURES.items():
        if m.lesson in lessons:
            try:
                measured[name] = m.read(runs)
                if measured[name] is None:  # compare's means give None when no layer logs the field
                    raise KeyError("not logged")
            except (KeyError, IndexError, StopIteration, TypeError, ZeroDivisionError) as e:
                raise ValueError(f"cannot read {name} from the runs in {runs_dir} ({type(e).__name__}: {e}); "
                                 f"delete out-lesson{m.lesson}/ there and run again") from None
    return measured


def differences(measured, texts):
    """[(file, name, written, measured, tolerance, within)] for each tagged occurrence of a
    measured name; ValueError when ANSWERS.md lacks one."""
    rows = []
    for path, text in texts.items():
        where = os.path.relpath(path, REPO)
        for name, number in tagged_numbers(text, where):
            if name in measured:
                written, rounding = value_and_rounding(number)
                tolerance = MEASURES[name].tolerance(measured[name])
                within = abs(measured[name] - written) <= tolerance + rounding
                rows.append((where, name, written, measured[name], tolerance, within))
    missing = set(measured) - {name for name, _ in tagged_numbers(texts[ANSWERS])}
    if missing:
        raise ValueError(f"ANSWERS.md has no number tagged {', '.join(sorted(missing))}; add <!-- NAME --> after it")
    return rows


def write_numbers(text, measured):
    """A file's text with each measured number rewritten, at the decimals it had."""
    def replace(match):
        number, percent, name = match.groups()
        if name not in measured:
            return match.group(0)
        decimals = len(number.partition('.')[2])
        return f"{measured[name]:,.{decimals}f}{percent}<!-- {name} -->"
    return TAG.sub(replace, text)


def main(argv):
    lessons, runs_dir, write = [], REPO, False
    for arg in argv:
        if arg == '--write':
            write = True
        elif arg.startswith('--runs='):
            runs_dir = arg.split('=', 1)[1]
        elif arg.isdigit() and int(arg) in CONFIGS:
            lessons.append(int(arg))
        else:
            print(f"error: unexpected argument {arg!r}; usage: python lessons/answers.py [LESSON ...] "
                  f"[--runs=DIR] [--write] (lessons {min(CONFIGS)}-{max(CONFIGS)})", file=sys.stderr)
            sys.exit(2)
    lessons = lessons or list(CONFIGS)
    runs_dir = os.path.abspath(runs_dir)
    try:
        run_lessons(lessons, runs_dir)
        measured = measure(lessons, runs_dir)
        texts = read_files()
        rows = differences(measured, texts)
    except (RuntimeError, ValueError, OSError, plot.MetricsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"\n{'file':<28} {'number':<34} {'written':>9} {'measured':>9} {'gap':>8} {'tolerance':>9}")
    for where, name, written, value, tolerance, within in rows:
        print(f"{where:<28} {name:<34} {written:>9.4f} {value:>9.4f} {value - written:>+8.4f} {tolerance:>9.4f}"
              f"{'' if within else '   OFF'}")
    off = sorted({row[1] for row in rows if not row[5]})
    if write:
        for path, text in texts.items():
            with open(path, 'w', encoding='utf-8') as f:
                f.write(write_numbers(text, measured))
        print(f"wrote {len(measured)} measured numbers where they are tagged; reread the answers around those that moved")
    elif off:
        print(f"{len(off)} of {len(measured)} numbers are off by more than their tolerance: {', '.join(off)}; "
              f"the lessons show something else now: reread those answers, then python lessons/answers.py --write")
        sys.exit(1)
    else:
        print(f"all {len(measured)} numbers within their tolerance")

if __name__ == '__main__':
    main(sys.argv[1:])
