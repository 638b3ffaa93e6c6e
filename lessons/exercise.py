"""
Exercises: a student copy of nanorouter with some functions of the real code emptied, and
the project's own tests to grade them.

$ python lessons/exercise.py 2                  # make ../nanorouter-exercise-2
$ python lessons/exercise.py 2 --out=~/ex2      # or there
$ cd ../nanorouter-exercise-2 && python lessons/exercise.py 2 --check

The copy holds the repository's files (no git history, no runs, no datasets, no
lessons/ANSWERS.md): the functions of exercise N keep their signature and docstring, and
their body becomes `raise NotImplementedError("Exercise N: ...")`. Everything else is the
real code, so once a function is written, train.py, compare.py and plot.py run with it.
--check runs the tests that grade exercise N (hand-computed cases from test_*.py) and says,
function by function, pass, or which check failed with what it expected and what it got.

A function is found by name in the source (ast), never by line number, so this script
works on whatever the files hold when it runs.
"""

import ast
import contextlib
import fnmatch
import io
import os
import shutil
import sys
import tokenize
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# never in a student copy: git history, the teacher's answers, and the test that keeps
# wrong versions of the exercises (lessons/exercise.py's own test); .gitignore adds the rest
NOT_COPIED = ['.git', 'lessons/ANSWERS.md', 'tests/test_lessons.py']


@dataclass
class Exercise:
    title: str
    lesson: str  # the lesson's file in lessons/
    grading: dict  # 'file.py:function' (or 'file.py:Class.method') -> ['test_file.py::test_name', ...]


EXERCISES = {
    1: Exercise("follow a token: the router's entropy and what an expert is about", '1-follow-a-token.md', {
        'metrics.py:router_entropy': ['tests/test_metrics.py::test_router_entropy_by_hand'],
        'metrics.py:normalized_mutual_information': ['tests/test_metrics.py::test_normalized_mutual_information_by_hand'],
    }),
    2: Exercise("the Switch balance loss and the z-loss", '2-balance.md', {
        'routers.py:switch_aux_loss': ['test_routers.py::test_switch_aux_loss_by_hand',
                                       'test_routers.py::test_aux_loss_uses_full_softmax_not_topk_weights'],
        'routers.py:z_loss': ['test_routers.py::test_z_loss_by_hand'],
    }),
    3: Exercise("DeepSeek-V3's bias update and its sequence-wise loss", '3-aux-free.md', {
        'routers.py:AuxFreeRouter.step_finished': ['test_routers.py::test_aux_free_bias_update_by_hand',
                                                   'test_routers.py::test_aux_free_bias_updates_drive_max_vio_down'],
        'routers.py:sequence_balance_loss': ['test_routers.py::test_sequence_balance_loss_by_hand',
                                             'test_routers.py::test_aux_free_sequence_loss_counts_the_topk_without_bias'],
    }),
    4: Exercise("expert capacity and which assignments it drops", '4-capacity.md', {
        'routers.py:expert_capacity': ['test_routers.py::test_expert_capacity_by_hand'],
        'routers.py:capacity_keep_mask': ['test_routers.py::test_capacity_keep_mask_by_hand'],
    }),
    5: Exercise("GatePro: partners, the penalty, and pair co-activation", '5-gatepro.md', {
        'routers.py:gatepro_partners': ['test_routers.py::test_gatepro_partners_by_hand',
                                        'test_routers.py::test_gatepro_partner_matches_brute_force_cosine'],
        'routers.py:gatepro_penalize': ['test_routers.py::test_gatepro_penalize_by_hand',
                                        'test_routers.py::test_gatepro_chooses_the_topk_of_the_penalised_logits',
                                        'test_routers.py::test_gatepro_literal_small_penalty_only_breaks_near_ties'],
        'metrics.py:pair_coactivation': ['test_routers.py::test_pair_coactivation_by_hand'],
    }),
    6: Exercise("the orthogonality loss, the variance loss and the routing variance", '6-ortho-var.md', {
        'routers.py:ortho_loss': ['test_routers.py::test_ortho_loss_by_hand',
                                  'test_routers.py::test_ortho_loss_pairs_outputs_of_the_same_token'],
        'routers.py:variance_loss': ['test_routers.py::test_variance_loss_by_hand'],
        'metrics.py:routing_variance': ['tests/test_metrics.py::test_routing_variance_by_hand'],
    }),
}


class ExerciseError(Exception):
    pass


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# -----------------------------------------------------------------------------
# finding a function's body in the source


def find_function(tree, qualname):
    """The FunctionDef of 'name' or 'Class.name' at the top level of a module's ast."""
    body = tree.body
    *classes, name = qualname.split('.')
    for class_name in classes:
        found = [node for node in body if isinstance(node, ast.ClassDef) and node.name == class_name]
        if not found:
            raise ExerciseError(f"class {class_name} not found")
        body = found[0].body
    found = [node for node in body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name]
    if not found:
        raise ExerciseError(f"function {qualname} not found")
    return found[0]


def body_lines(source, qualname):
    """(first, last, indent): the 1-based lines of the function's body after its docstring
    (comments included), and the indentation of the body. What a stub replaces."""
    node = find_function(ast.parse(source), qualname)
    lines = source.splitlines()
    first_stmt = node.body[0]
    has_doc = isinstance(first_stmt, ast.Expr) and isinstance(first_stmt.value, ast.Constant) \
        and isinstance(first_stmt.value.value, str)
    # without a docstring, the comments between the signature and the code go too
    first = first_stmt.end_lineno + 1 if has_doc else header_end(source, node) + 1
    indent = lines[first_stmt.lineno - 1][:first_stmt.col_offset]
    if has_doc and len(node.body) == 1:
        raise ExerciseError(f"{qualname} has only a docstring: nothing to replace")
    if first_stmt.lineno == node.lineno:
        raise ExerciseError(f"{qualname}: a body on the line of the def cannot be replaced")
    last = node.end_lineno
    # comment lines at the body's indentation right after the last statement belong to it
    while last < len(lines) and lines[last].strip().startswith('#') and lines[last].startswith(indent):
        last += 1
    return first, last, indent


def header_end(source, node):
    """The line of the ':' that ends the def's signature (a signature may span lines)."""
    depth, seen_def = 0, False
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.start[0] < node.lineno:
            continue
        if not seen_def:
            seen_def = tok.type == tokenize.NAME and tok.string == 'def'
            continue
        if tok.type == tokenize.OP and tok.string in '([{':
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ')]}':
            depth -= 1
        elif tok.type == tokenize.OP and tok.string == ':' and depth == 0:
            return tok.start[0]
    raise ExerciseError(f"no end of the signature of {node.name}")


def function_body(source, qualname):
    """The body of a function (after its docstring), dedented, as a string."""
    first, last, indent = body_lines(source, qualname)
    return '\n'.join(line[len(indent):] if line.startswith(indent) else line.lstrip()
                     for line in source.splitlines()[first - 1:last]) + '\n'


def replace_body(source, qualname, body):
    """source with the function's body (after its docstring) replaced by `body` (dedented code)."""
    first, last, indent = body_lines(source, qualname)
    lines = source.splitlines(keepends=True)
    new = [indent + line + '\n' if line.strip() else '\n' for line in body.rstrip('\n').split('\n')]
    return ''.join(lines[:first - 1] + new + lines[last:])


def stub_body(number, qualname):
    lesson = EXERCISES[number].lesson
    return f'raise NotImplementedError("Exercise {number}: write {qualname} (lessons/{lesson})")\n'


# -----------------------------------------------------------------------------
# the student copy


def ignore_patterns(root):
    """The patterns of root/.gitignore: the files that are made, never written by hand."""
    try:
        with open(os.path.join(root, '.gitignore')) as f:
            return [line.strip() for line in f if line.strip() and not line.startswith('#')]
    except OSError:
        return []


def ignored(relpath, is_dir, patterns):
    """gitignore's rules as this repository uses them: 'name/' matches a folder of that name
    anywhere, a pattern with a '/' matches the path from the root, any other the name."""
    name = os.path.basename(relpath)
    for pattern in patterns:
        if pattern.endswith('/'):
            if is_dir and fnmatch.fnmatch(name, pattern[:-1]):
                return True
        elif '/' in pattern:
            if fnmatch.fnmatch(relpath, pattern.lstrip('/')):
                return True
        elif fnmatch.fnmatch(name, pattern):
            return True
    return False


def repository_files(root, skip=()):
    """Relative paths of the files a student gets: the tree under root (no git needed, so
    a copy can be copied again), less .gitignore's matches and NOT_COPIED. skip: absolute
    folders left out (the copy being written, when it is inside root)."""
    patterns = ignore_patterns(root)
    skip = {os.path.realpath(s) for s in skip}
    files = []
    for folder, dirs, names in os.walk(root):
        rel_folder = os.path.relpath(folder, root)
        rel = lambda name: os.path.normpath(os.path.join(rel_folder, name)).replace(os.sep, '/')
        dirs[:] = sorted(d for d in dirs if rel(d) not in NOT_COPIED and not ignored(rel(d), True, patterns)
                         and os.path.realpath(os.path.join(folder, d)) not in skip)
        files += [rel(n) for n in sorted(names) if rel(n) not in NOT_COPIED and not ignored(rel(n), False, patterns)]
    return files


def make_copy(number, out, root=REPO):
    """Write the student copy of exercise `number` into the new folder `out`."""
    if os.path.exists(out):
        raise ExerciseError(f"{out} exists; give a new folder with --out=DIR (nothing was written)")
    exercise = EXERCISES[number]
    sources = {}
    for target in exercise.grading:
        path, qualname = target.split(':')
        if path not in sources:
            with open(os.path.join(root, path)) as f:
                sources[path] = f.read()
        sources[path] = replace_body(sources[path], qualname, stub_body(number, qualname))
    files = repository_files(root, skip=[out])
    for rel in files:
        dest = os.path.join(out, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if rel in sources:
            with open(dest, 'w') as f:
                f.write(sources[rel])
        else:
            shutil.copy2(os.path.join(root, rel), dest)
    return files


# -----------------------------------------------------------------------------
# grading


class Reports:
    """A pytest plugin that keeps the outcome of every test it runs."""

    def __init__(self):
        self.results = {}  # node id -> (passed, message)

    def pytest_runtest_logreport(self, report):
        if report.when == 'call' or report.failed:
            passed = report.passed and self.results.get(report.nodeid, (True, ''))[0]
            self.results[report.nodeid] = (passed, '' if report.passed else failure_text(report))

    def pytest_collectreport(self, report):
        if report.failed:
            self.results[report.nodeid or 'collection'] = (False, str(report.longrepr).strip().splitlines()[-1])


def failure_text(report):
    """The failing line of the test and pytest's one-line explanation (got == expected)."""
    crash = getattr(report.longrepr, 'reprcrash', None)
    if crash is None:
        return str(report.longrepr).strip().splitlines()[-1]
    entries = getattr(getattr(report.longrepr, 'reprtraceback', None), 'reprentries', [])
    where = []
    for entry in entries:  # the line in the test file (the assert), not in the library
        location = getattr(entry, 'reprfileloc', None)
        if location is not None and os.path.basename(location.path).startswith('test_'):
            lines = getattr(entry, 'lines', [])
            failing = [i for i, line in enumerate(lines) if line.startswith('>')]
            if not failing:
                continue
            # the comment lines just above the failing line: the test's hand computation
            above = []
            for line in reversed(lines[:failing[-1]]):
                if not line.strip().startswith('#'):
                    break
                above.insert(0, line.strip())
            where = [*above[-4:], f"{os.path.basename(location.path)}:{location.lineno}: {lines[failing[-1]][1:].strip()}"]
    message = [line for line in crash.message.strip().splitlines() if line.strip() and line.strip() != 'comparison failed']
    return '\n'.join(where + message[:8])


def run_tests(node_ids, root=REPO, traceback='long'):
    """Run pytest on node ids ('test_file.py::test_name') of the code under root, in this
    process, quietly. Returns {node id: (passed, message)}; traceback='line' is faster and
    gives shorter messages."""
    import pytest  # only when grading: making a copy needs nothing but the standard library
    reports = Reports()
    here = os.getcwd()
    os.chdir(root)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the report below replaces pytest's
            pytest.main(['-q', '-p', 'no:cacheprovider', '-p', 'no:unraisableexception', f'--tb={traceback}',
                         '--rootdir', root, *node_ids], plugins=[reports])
    finally:
        os.chdir(here)
    return reports.results


def grade(number, root=REPO, targets=None, traceback='long'):
    """Run the grading tests of exercise `number` (of its `targets` only, default all) on
    the code under root. Returns {target: [(test node id, passed, message)]}."""
    grading = {t: tests for t, tests in EXERCISES[number].grading.items() if targets is None or t in targets}
    return by_function(grading, run_tests(sorted({test for tests in grading.values() for test in tests}), root, traceback))


def by_function(grading, results):
    """{target: [(node id, passed, message)]} from run_tests' results, for {target: [test]}."""
    graded = {}
    for target, tests in grading.items():
        graded[target] = []
        for test in tests:
            runs = [(node, *result) for node, result in results.items() if node.split('[')[0] == test]
            graded[target] += runs or [(test, False, 'test not found (was it renamed?)')]
    return graded


def print_grades(number, graded):
    print(f"\nExercise {number}: {EXERCISES[number].title}")
    all_passed = True
    for target, runs in graded.items():
        failed = [(node, message) for node, passed, message in runs if not passed]
        name = target.split(':')[1]
        if not failed:
            print(f"  {name}: pass ({len(runs)} test{'s' * (len(runs) != 1)})")
            continue
        all_passed = False
        print(f"  {name}: FAIL, {len(failed)} of {len(runs)} tests")
        for node, message in failed[:3]:
            print(f"    {node}")
            for line in message.splitlines():
                print(f"      {line}")
        if len(failed) > 3:
            print(f"    ... and {len(failed) - 3} more")
    print("all pass" if all_passed else "not yet: fix the functions marked FAIL and check again")
    return all_passed


def main(argv):
    number, out, check = None, None, False
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == '--check':
            check = True
        elif arg.startswith('--out='):
            out = arg.split('=', 1)[1]
        elif arg == '--out' and args:
            out = args.pop(0)
        elif arg.isdigit() and number is None:
            number = int(arg)
        else:
            fail(f"unexpected argument {arg!r}; usage: python lessons/exercise.py N [--out=DIR] [--check]")
    if number not in EXERCISES:
        fail(f"give an exercise number, one of {', '.join(map(str, EXERCISES))}: "
             f"python lessons/exercise.py N [--out=DIR] [--check]")
    if check:
        sys.exit(0 if print_grades(number, grade(number)) else 1)
    repo_name = os.path.basename(REPO)
    out = os.path.abspath(os.path.expanduser(out or os.path.join(os.path.dirname(REPO), f"{repo_name}-exercise-{number}")))
    try:
        files = make_copy(number, out)
    except ExerciseError as e:
        fail(e)
    names = ', '.join(target.split(':')[1] for target in EXERCISES[number].grading)
    print(f"wrote {out} ({len(files)} files) with exercise {number} to write: {names}")
    print(f"read lessons/{EXERCISES[number].lesson} there, then: cd {out} && python lessons/exercise.py {number} --check")


if __name__ == '__main__':
    main(sys.argv[1:])
