"""
Exercises: a student copy of nanorouter with some functions of the real code emptied, and
the project's own tests to grade them.

$ python lessons/exercise.py 2                  # make ../nanorouter-exercise-2
$ python lessons/exercise.py 2 --out=~/ex2      # or there
$ cd ../nanorouter-exercise-2 && python lessons/exercise.py 2 --check --name=Ada
$ python lessons/exercise.py --gather ~/class    # a teacher's table of the grade files

The copy holds the repository's files (no git history, no runs, no datasets, no
lessons/ANSWERS.md nor the script that checks it): the functions of exercise N keep their
signature and docstring, and their body becomes `raise NotImplementedError("Exercise N: ...")`. Everything else is the
real code, so once a function is written, train.py, compare.py and plot.py run with it.
The copy is a git repository of its own, one commit of the files as given (when git is
installed), so `git diff` shows what the student wrote, and .exercise.json in it says
which exercise it is for.
--check runs the tests that grade exercise N (hand-computed cases from test_*.py) and says,
function by function, pass, or which check failed with what it expected and what it got,
under the hand computation the test wrote above it. It refuses any folder but exercise N's
copy, and writes grade-exercise-N.json there; --gather turns a class's grade files into
one markdown table.

A function is found by name in the source (ast), never by line number, so this script
works on whatever the files hold when it runs.
"""

import ast
import contextlib
import fnmatch
import getpass
import glob
import io
import json
import os
import shutil
import subprocess
import sys
import tokenize
from dataclasses import dataclass
from datetime import datetime
from traceback import extract_tb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# never in a student copy: git history, CI (it checks the answers), the teacher's answers
# with the script and test that check them, the test that keeps wrong versions of the
# exercises (lessons/exercise.py's own test), and, when a copy is copied, its mark (the new
# copy gets its own); .gitignore adds the rest
MARKER = '.exercise.json'
NOT_COPIED = ['.git', '.ci', 'lessons/ANSWERS.md', 'lessons/answers.py', 'tests/test_answers.py',
              'tests/test_lessons.py', MARKER]
# a student's grades stay in the copy that earned them, wherever it is copied to
GRADE_FILES = 'grade-exercise-*.json'
# a student's name in the grade file: --name=NAME, else this variable, else the login name
STUDENT_VARIABLE = 'NANOROUTER_STUDENT'


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
    8: Exercise("top-p's selection and ReMoE's coefficient", '8-dynamic-k.md', {
        'routers.py:top_p_keep': ['test_routers.py::test_top_p_keep_by_hand',
                                  'test_routers.py::test_topp_router_by_hand'],
        'routers.py:remoe_coefficient_step': ['test_routers.py::test_remoe_coefficient_step_by_hand',
                                              'test_routers.py::test_remoe_coefficient_follows_the_sparsity_of_each_step'],
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
    patterns = ignore_patterns(root) + [GRADE_FILES]
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
    """Write the student copy of exercise `number` into the new folder `out`, with its mark
    (MARKER), and make it a git repository of one commit when git works (else a one-line
    note on stderr: the copy works without it). Returns the copied files."""
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
    # --check reads this to refuse the original repository and other exercises' copies
    with open(os.path.join(out, MARKER), 'w') as f:
        json.dump({'exercise': number, 'made': now()}, f)
        f.write('\n')
    problem = commit_copy(out, number)
    if problem:
        print(f"note: {problem}; the copy works without it", file=sys.stderr)
    return files + [MARKER]


def now():
    """The local time with its offset from UTC, to the second: comparable across time zones."""
    return datetime.now().astimezone().isoformat(timespec='seconds')


# variables that would point git at another repository (set when this runs inside a git
# hook, say): the copy's git must only ever see the copy
GIT_REDIRECTS = ('GIT_DIR', 'GIT_WORK_TREE', 'GIT_INDEX_FILE', 'GIT_OBJECT_DIRECTORY', 'GIT_COMMON_DIR')


def commit_copy(out, number):
    """Make the copy a git repository with one commit of its files as given, so that
    `git diff` shows what the student wrote. Returns None, or why not (one line)."""
    git = shutil.which('git')
    if git is None:
        return "git is not on PATH, so the copy is not a git repository"
    env = {name: value for name, value in os.environ.items() if name not in GIT_REDIRECTS}
    # a fixed author, and no signing or hooks of the user's config to stop the commit
    commit = ['-c', 'user.name=nanorouter', '-c', 'user.email=exercise@localhost', '-c', 'commit.gpgsign=false',
              'commit', '-q', '--no-verify', '-m', f"Exercise {number} as given: {EXERCISES[number].title}"]
    for step, command in (('init', ['-c', 'init.defaultBranch=main', 'init', '-q']), ('add', ['add', '-A']),
                          ('commit', commit)):
        try:
            done = subprocess.run([git, *command], cwd=out, env=env, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as e:
            return f"git {step} did not run ({e}), so the copy is not a git repository"
        if done.returncode != 0:
            why = (done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}").splitlines()[-1]
            return f"git {step} failed ({why}), so the copy is not a git repository"
        if step == 'init':  # the grade files stay out of what a student commits (git add -A)
            os.makedirs(os.path.join(out, '.git', 'info'), exist_ok=True)
            with open(os.path.join(out, '.git', 'info', 'exclude'), 'a') as f:
                f.write(f"{GRADE_FILES}\n")
    return None


def copy_problem(number, root=REPO):
    """None when root is the copy of exercise `number`, else why --check refuses it and
    what to do instead, in one line (`problem; fix`)."""
    make = f"python lessons/exercise.py {number}"
    marker = os.path.join(root, MARKER)
    if not os.path.exists(marker):
        if os.path.exists(os.path.join(root, 'lessons', 'ANSWERS.md')):
            return (f"this is the original repository, where every function is already written; "
                    f"make a copy with {make} and check there")
        return f"{root} has no {MARKER}, so it is not a copy made by {make}; make one with {make} and check there"
    try:
        with open(marker) as f:
            made_for = json.load(f)['exercise']
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{marker} is unreadable ({type(e).__name__}: {e}); make a new copy with {make}"
    if made_for != number:
        return (f"this is the copy for exercise {made_for}, not exercise {number}; check it with "
                f"python lessons/exercise.py {made_for} --check, or make exercise {number}'s copy with {make}")
    return None


# -----------------------------------------------------------------------------
# grading


class Reports:
    """A pytest plugin that keeps the outcome of every test it runs."""

    def __init__(self):
        self.results = {}  # node id -> (passed, message)
        self.where = {}  # (node id, phase) -> the lines that say where a test failed

    def pytest_runtest_makereport(self, item, call):
        # read from the exception itself, so whatever --tb style pytest formats with
        if call.excinfo is not None:
            self.where[item.nodeid, call.when] = failing_test_line(call.excinfo.tb)

    def pytest_runtest_logreport(self, report):
        if report.when == 'call' or report.failed:
            passed = report.passed and self.results.get(report.nodeid, (True, ''))[0]
            where = self.where.get((report.nodeid, report.when), [])
            self.results[report.nodeid] = (passed, '' if report.passed else failure_text(report, where))

    def pytest_collectreport(self, report):
        if report.failed:
            self.results[report.nodeid or 'collection'] = (False, str(report.longrepr).strip().splitlines()[-1])


def failure_text(report, where=()):
    """`where` (the test's hand computation and failing line) and pytest's one-line
    explanation (got == expected)."""
    crash = getattr(report.longrepr, 'reprcrash', None)
    if crash is None:
        return str(report.longrepr).strip().splitlines()[-1]
    message = [line for line in crash.message.strip().splitlines() if line.strip() and line.strip() != 'comparison failed']
    return '\n'.join([*where, *message[:8]])


def failing_test_line(tb):
    """The deepest line of a test file (test_*.py) in a traceback, the line that failed
    rather than one in the library, as 'test_file.py:LINE: code', under the hand
    computation the test wrote above it. [] when no test file is in the traceback."""
    frames = [frame for frame in extract_tb(tb)
              if os.path.basename(frame.filename).startswith('test_') and frame.filename.endswith('.py')]
    if not frames:
        return []
    path, lineno = frames[-1].filename, frames[-1].lineno
    try:
        with tokenize.open(path) as f:
            source = f.read()
    except (OSError, SyntaxError, UnicodeDecodeError):
        return [f"{os.path.basename(path)}:{lineno}: {(frames[-1].line or '').strip()}"]
    lines = source.splitlines()
    code = lines[lineno - 1].strip() if 0 < lineno <= len(lines) else ''
    return [*hand_computation(source, lineno), f"{os.path.basename(path)}:{lineno}: {code}"]


def hand_computation(source, lineno, most=8):
    """The nearest block of comment lines above line `lineno` (1-based) inside the function
    that holds it, stripped: the hand computation a test writes for its check. Lines of
    code between them (the check's setup) are passed over; a blank line ends a block; only
    its last `most` lines are kept. [] when there is none."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    holding = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
               and node.lineno <= lineno <= node.end_lineno]
    if not holding:
        return []
    function = max(holding, key=lambda node: node.lineno)  # the innermost
    # from the start of the failing statement, which may span lines
    start = max((node.lineno for node in ast.walk(function) if isinstance(node, ast.stmt) and node is not function
                 and node.lineno <= lineno <= node.end_lineno), default=lineno)
    lines = source.splitlines()
    block = []
    for number in range(start - 1, function.lineno, -1):
        text = lines[number - 1].strip()
        if text.startswith('#'):
            block.insert(0, text)
        elif block:
            break
    return block[-most:]


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


# -----------------------------------------------------------------------------
# grade files, and a class's table of them


def student_name(given=None):
    """--name's value, else $NANOROUTER_STUDENT, else the login name; None if none is known."""
    for name in (given, os.environ.get(STUDENT_VARIABLE)):
        if name and name.strip():
            return ' '.join(name.split())
    try:
        return getpass.getuser() or None
    except (OSError, KeyError, ImportError):  # no login name (some containers)
        return None


def grade_record(number, student, graded, time, attempts=1):
    """What a grade file holds, from grade()'s {target: [(node id, passed, message)]}."""
    functions = {target.split(':')[1]: {'pass': all(passed for _, passed, _ in runs), 'tests': len(runs)}
                 for target, runs in graded.items()}
    return {'student': student, 'exercise': number, 'functions': functions,
            'all_pass': all(f['pass'] for f in functions.values()), 'time': time, 'attempts': attempts}


def write_grade_file(root, number, student, graded):
    """Write root/grade-exercise-N.json for this check, counting the checks of the same
    student before it in this copy. Returns its path."""
    path = os.path.join(root, GRADE_FILES.replace('*', str(number)))
    attempts = 1
    try:
        previous = read_grade(path)
        if previous['student'] == student and previous['exercise'] == number:
            attempts = previous['attempts'] + 1
    except (OSError, ValueError):  # the first check here, or a file to start again
        pass
    record = grade_record(number, student, graded, now(), attempts)
    with open(path + '.tmp', 'w') as f:  # renamed at the end: never half a grade file
        json.dump(record, f, indent=1)
        f.write('\n')
    os.replace(path + '.tmp', path)
    return path


def read_grade(path):
    """A grade file's record; ValueError (one line) if it is not one."""
    with open(path, encoding='utf-8') as f:
        try:
            record = json.load(f)
        except UnicodeDecodeError as e:
            raise ValueError(f"not text ({e.reason})")
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON ({e.msg}, line {e.lineno})")
    kinds = {'student': str, 'exercise': int, 'functions': dict, 'all_pass': bool, 'time': str, 'attempts': int}
    if not isinstance(record, dict):
        raise ValueError("not a grade file (a JSON object)")
    for key, kind in kinds.items():
        if type(record.get(key)) is not kind:  # exactly: to isinstance, true is an int
            raise ValueError(f"no {kind.__name__} {key!r}")
    for name, result in record['functions'].items():
        if not (isinstance(result, dict) and isinstance(result.get('pass'), bool)):
            raise ValueError(f"function {name!r} has no pass: true/false")
    try:
        time = datetime.fromisoformat(record['time'])
    except ValueError:
        raise ValueError(f"time {record['time']!r} is not ISO 8601")
    if time.tzinfo is None:
        raise ValueError(f"time {record['time']!r} has no offset from UTC")
    return record


def grade_files(paths):
    """The grade files under the given folders, files or glob patterns, each once, and a
    note for each path that names nothing."""
    found, notes = [], []
    for arg in paths:
        matches = sorted(glob.glob(os.path.expanduser(arg), recursive=True)) or \
            ([arg] if os.path.exists(arg) else [])
        if not matches:
            notes.append(f"note: {arg} does not exist")
        for match in matches:
            if not os.path.isdir(match):
                found.append(match)  # named on its own: read whatever its name
                continue
            for folder, dirs, names in os.walk(match):
                dirs[:] = sorted(d for d in dirs if d not in ('.git', '__pycache__'))
                found += [os.path.join(folder, n) for n in sorted(names) if fnmatch.fnmatch(n, GRADE_FILES)]
    seen, unique = set(), []
    for path in found:
        if os.path.realpath(path) not in seen:
            seen.add(os.path.realpath(path))
            unique.append(path)
    return unique, notes


def latest_grades(records):
    """One record per (student, exercise): the latest, its 'attempts' the sum over them all
    (a student may have checked in several copies)."""
    groups = {}
    for record in records:
        groups.setdefault((record['student'], record['exercise']), []).append(record)
    latest = []
    for group in groups.values():
        last = max(group, key=lambda record: datetime.fromisoformat(record['time']))
        latest.append({**last, 'attempts': sum(record['attempts'] for record in group)})
    return sorted(latest, key=lambda record: (record['exercise'], record['student'].casefold(), record['student']))


def grade_table(records):
    """Markdown: a table per exercise, a row per student, a column per function."""
    cell = lambda text: str(text).replace('|', '\\|')
    tables = []
    for number in sorted({record['exercise'] for record in records}):
        rows = [record for record in records if record['exercise'] == number]
        functions = list(dict.fromkeys(name for record in rows for name in record['functions']))
        header = ['student', 'exercise', *functions, 'all pass', 'attempts', 'time']
        lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
        for record in rows:
            results = [('pass' if record['functions'][name]['pass'] else 'FAIL') if name in record['functions'] else '-'
                       for name in functions]
            values = [record['student'], number, *results, 'yes' if record['all_pass'] else 'no',
                      record['attempts'], record['time']]
            lines.append('| ' + ' | '.join(cell(value) for value in values) + ' |')
        tables.append('\n'.join(lines))
    return '\n\n'.join(tables)


def gather(paths):
    """Print the table of the grade files under paths (notes on stderr); the exit status."""
    files, notes = grade_files(paths)
    records = []
    for path in files:
        try:
            records.append(read_grade(path))
        except (OSError, ValueError) as e:
            notes.append(f"note: skipped {path}: {e}")
    for note in notes:
        print(note, file=sys.stderr)
    if not records:
        fail(f"no grade files ({GRADE_FILES}) in {' '.join(paths)}; give the folders of the students' copies, "
             f"where python lessons/exercise.py N --check wrote them")
    print(grade_table(latest_grades(records)))
    return 0


USAGE = "python lessons/exercise.py N [--out=DIR] [--check [--name=NAME]], or --gather DIR [DIR ...]"


def main(argv):
    number, check = None, False
    options = {'--out': None, '--name': None}  # --out=VALUE or --out VALUE
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == '--check':
            check = True
        elif arg == '--gather':
            if not args:
                fail(f"--gather needs the folders (or grade files) to read; usage: {USAGE}")
            sys.exit(gather(args))
        elif arg.partition('=')[0] in options and ('=' in arg or args):
            option, equals, value = arg.partition('=')
            options[option] = value if equals else args.pop(0)
        elif arg.isdigit() and number is None:
            number = int(arg)
        else:
            fail(f"unexpected argument {arg!r}; usage: {USAGE}")
    if number not in EXERCISES:
        fail(f"give an exercise number, one of {', '.join(map(str, EXERCISES))}: {USAGE}")
    out, name = options['--out'], options['--name']
    if check:
        problem = copy_problem(number, REPO)
        if problem:
            fail(problem)
        student = student_name(name)
        if student is None:
            fail(f"no student name for the grade file; give --name=NAME or set {STUDENT_VARIABLE}")
        graded = grade(number)
        all_passed = print_grades(number, graded)
        try:
            path = write_grade_file(REPO, number, student, graded)
            print(f"grade of {student} written to {path}")
        except OSError as e:
            print(f"note: the grade file was not written ({e}); the grades above stand", file=sys.stderr)
        sys.exit(0 if all_passed else 1)
    if name is not None:
        fail(f"--name is for --check (the grade file's name); usage: {USAGE}")
    repo_name = os.path.basename(REPO)
    out = os.path.abspath(os.path.expanduser(out or os.path.join(os.path.dirname(REPO), f"{repo_name}-exercise-{number}")))
    try:
        files = make_copy(number, out)
    except ExerciseError as e:
        fail(e)
    names = ', '.join(target.split(':')[1] for target in EXERCISES[number].grading)
    print(f"wrote {out} ({len(files)} files) with exercise {number} to write: {names}")
    if os.path.isdir(os.path.join(out, '.git')):
        print("it is a git repository of one commit, the files as given: git diff there shows what you wrote")
    print(f"read lessons/{EXERCISES[number].lesson} there, then: cd {out} && python lessons/exercise.py {number} --check")


if __name__ == '__main__':
    main(sys.argv[1:])
