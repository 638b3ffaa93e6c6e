"""Tests of lessons/exercise.py: the exercises are graded for real. For every exercise, a
student copy is made; its stubs fail their grading tests, the reference bodies (taken
from this repository's source) pass them, other exercises' grading tests pass with the
stubs in place, and every plausible wrong body below fails at least one of its tests.

The grading runs in ONE subprocess (python test_lessons.py SPEC), in the copies' own
folders, importing their code fresh for every variant: the copies' code is what runs."""

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timedelta

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, above tests/
sys.path.insert(0, os.path.join(REPO, 'lessons'))
import exercise  # noqa: E402  (lessons/ is not a package)

# Plausible wrong bodies, per exercise: (function, what is wrong, body).
MUTANTS = {
    1: [
        ('metrics.py:router_entropy', 'in bits, not nats',
         'probs = F.softmax(logits.float(), dim=-1)\nreturn -(probs * torch.log2(probs.clamp(min=1e-30))).sum(dim=-1)'),
        ('metrics.py:router_entropy', 'sign lost',
         'log_probs = F.log_softmax(logits.float(), dim=-1)\nreturn (log_probs.exp() * log_probs).sum(dim=-1)'),
        ('metrics.py:router_entropy', 'mean over experts instead of the sum',
         'log_probs = F.log_softmax(logits.float(), dim=-1)\nreturn -(log_probs.exp() * log_probs).mean(dim=-1)'),
        ('metrics.py:normalized_mutual_information', 'I without the normalisation',
         'joint = counts.double() / counts.sum().clamp(min=1)\n'
         'p_a, p_b = joint.sum(dim=1), joint.sum(dim=0)\n'
         'nonzero = joint > 0\n'
         'return float((joint[nonzero] * (joint[nonzero] / (p_a[:, None] * p_b[None, :])[nonzero]).log()).sum())'),
        ('metrics.py:normalized_mutual_information', 'divided by sqrt(H_A H_B), not their mean',
         'joint = counts.double() / counts.sum().clamp(min=1)\n'
         'p_a, p_b = joint.sum(dim=1), joint.sum(dim=0)\n'
         'nonzero = joint > 0\n'
         'mutual = (joint[nonzero] * (joint[nonzero] / (p_a[:, None] * p_b[None, :])[nonzero]).log()).sum()\n'
         'entropy = lambda p: -(p[p > 0] * p[p > 0].log()).sum()\n'
         'denominator = (entropy(p_a) * entropy(p_b)).sqrt()\n'
         'return float(mutual / denominator) if denominator > 0 else 0.0'),
    ],
    2: [
        ('routers.py:switch_aux_loss', 'missing the factor E',
         'counts = expert_counts(expert_idx, n_exp).to(probs.dtype)\n'
         'return torch.sum(counts / counts.sum().clamp(min=1) * probs.mean(dim=0))'),
        ('routers.py:switch_aux_loss', 'f from the probabilities, not the assignments',
         'P = probs.mean(dim=0)\nreturn n_exp * torch.sum(P * P)'),
        ('routers.py:switch_aux_loss', 'f divided by the tokens, not the assignments',
         'counts = expert_counts(expert_idx, n_exp).to(probs.dtype)\n'
         'return n_exp * torch.sum(counts / probs.size(0) * probs.mean(dim=0))'),
        ('routers.py:z_loss', 'not squared', 'return torch.logsumexp(logits, dim=-1).mean()'),
        ('routers.py:z_loss', 'the square of the mean', 'return torch.logsumexp(logits, dim=-1).mean().square()'),
        ('routers.py:z_loss', 'max instead of logsumexp', 'return logits.max(dim=-1).values.square().mean()'),
        ('routers.py:z_loss', 'summed over the tokens, not averaged',
         'return torch.logsumexp(logits, dim=-1).square().sum()'),
    ],
    3: [
        ('routers.py:AuxFreeRouter.step_finished', 'wrong sign',
         'load = load_counts.to(self.expert_bias.device, torch.float32)\n'
         'self.expert_bias += self.update_rate * torch.sign(load - load.mean())'),
        ('routers.py:AuxFreeRouter.step_finished', 'sets the bias instead of adding to it',
         'load = load_counts.to(self.expert_bias.device, torch.float32)\n'
         'self.expert_bias.copy_(self.update_rate * torch.sign(load.mean() - load))'),
        ('routers.py:AuxFreeRouter.step_finished', 'a step proportional to the gap, not its sign',
         'load = load_counts.to(self.expert_bias.device, torch.float32)\n'
         'self.expert_bias += self.update_rate * (load.mean() - load)'),
        ('routers.py:AuxFreeRouter.step_finished', 'an expert at the mean load counted as underloaded',
         'load = load_counts.to(self.expert_bias.device, torch.float32)\n'
         'self.expert_bias += self.update_rate * torch.where(load > load.mean(), -1.0, 1.0)'),
        ('routers.py:sequence_balance_loss', 'f without E / k',
         'N, n_exp = scores.shape\n'
         'chosen = torch.zeros_like(scores).scatter_(1, topk_idx, 1.0).view(-1, seq_len, n_exp)\n'
         'P = (scores / scores.sum(dim=-1, keepdim=True)).view(-1, seq_len, n_exp).mean(dim=1)\n'
         'return (chosen.mean(dim=1) * P).sum(dim=-1).mean()'),
        ('routers.py:sequence_balance_loss', 'over the whole batch, not per sequence',
         'N, n_exp = scores.shape\n'
         'k = topk_idx.size(1)\n'
         'chosen = torch.zeros_like(scores).scatter_(1, topk_idx, 1.0)\n'
         'f = chosen.sum(dim=0) * n_exp / (k * N)\n'
         'P = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=0)\n'
         'return (f * P).sum()'),
        ('routers.py:sequence_balance_loss', 'P from the raw scores, not normalised per token',
         'N, n_exp = scores.shape\n'
         'k = topk_idx.size(1)\n'
         'chosen = torch.zeros_like(scores).scatter_(1, topk_idx, 1.0).view(-1, seq_len, n_exp)\n'
         'f = chosen.sum(dim=1) * n_exp / (k * seq_len)\n'
         'return (f * scores.view(-1, seq_len, n_exp).mean(dim=1)).sum(dim=-1).mean()'),
    ],
    4: [
        ('routers.py:expert_capacity', 'k assignments per token forgotten',
         'return max(1, int(capacity_factor * n_tokens / n_exp))'),
        ('routers.py:expert_capacity', 'rounded up', 'return max(1, -int(-capacity_factor * n_tokens * top_k // n_exp))'),
        ('routers.py:expert_capacity', 'rounded to nearest', 'return max(1, round(capacity_factor * n_tokens * top_k / n_exp))'),
        ('routers.py:expert_capacity', 'no minimum of 1', 'return int(capacity_factor * n_tokens * top_k / n_exp)'),
        ('routers.py:capacity_keep_mask', 'off by one: keeps capacity + 1',
         'order = torch.argsort(expert_idx, stable=True)\n'
         'counts = expert_counts(expert_idx, n_exp)\n'
         'group_start = torch.cumsum(counts, 0) - counts\n'
         'position_sorted = torch.arange(expert_idx.numel()) - group_start[expert_idx[order]]\n'
         'keep = torch.empty_like(expert_idx, dtype=torch.bool)\n'
         'keep[order] = position_sorted <= capacity\n'
         'return keep'),
        ('routers.py:capacity_keep_mask', 'keeps the last pairs of each expert, not the first',
         'flipped = expert_idx.flip(0)\n'
         'order = torch.argsort(flipped, stable=True)\n'
         'counts = expert_counts(flipped, n_exp)\n'
         'group_start = torch.cumsum(counts, 0) - counts\n'
         'position_sorted = torch.arange(flipped.numel()) - group_start[flipped[order]]\n'
         'keep = torch.empty_like(flipped, dtype=torch.bool)\n'
         'keep[order] = position_sorted < capacity\n'
         'return keep.flip(0)'),
        ('routers.py:capacity_keep_mask', 'the first pairs overall, not per expert',
         'return torch.arange(expert_idx.numel()) < capacity'),
        ('routers.py:capacity_keep_mask', 'drops every pair of an expert over capacity',
         'return expert_counts(expert_idx, n_exp)[expert_idx] <= capacity'),
    ],
    5: [
        ('routers.py:gatepro_partners', 'an expert is its own partner', 'return gate_similarity(gate_weight).argmax(dim=1)'),
        ('routers.py:gatepro_partners', 'least similar instead of most',
         'similarity = gate_similarity(gate_weight)\n'
         'similarity.fill_diagonal_(float("inf"))\n'
         'return similarity.argmin(dim=1)'),
        ('routers.py:gatepro_partners', 'dot products, not cosines',
         'w = gate_weight.detach().float()\n'
         'similarity = w @ w.t()\n'
         'similarity.fill_diagonal_(-float("inf"))\n'
         'return similarity.argmax(dim=1)'),
        ('routers.py:gatepro_partners', '|cos|: opposite rows counted as similar',
         'similarity = gate_similarity(gate_weight).abs()\n'
         'similarity.fill_diagonal_(-float("inf"))\n'
         'return similarity.argmax(dim=1)'),
        ('routers.py:gatepro_penalize', 'ties counted as losses',
         'logits = logits.float()\n'
         'return logits - penalty * (logits <= logits[:, gatepro_partners(gate_weight)]).float()'),
        ('routers.py:gatepro_penalize', 'the winners penalised',
         'logits = logits.float()\n'
         'return logits - penalty * (logits > logits[:, gatepro_partners(gate_weight)]).float()'),
        ('routers.py:gatepro_penalize', 'penalty added',
         'logits = logits.float()\n'
         'return logits + penalty * (logits < logits[:, gatepro_partners(gate_weight)]).float()'),
        ('metrics.py:pair_coactivation', 'pairs across tokens: the product of the two loads',
         'selected = torch.zeros(n_tokens, partner.numel(), dtype=torch.bool)\n'
         'selected[token_idx, expert_idx] = True\n'
         'p = selected.float().mean(dim=0)\n'
         'return (p * p[partner]).mean()'),
        ('metrics.py:pair_coactivation', "over the tokens that picked i, not all tokens",
         'selected = torch.zeros(n_tokens, partner.numel(), dtype=torch.bool)\n'
         'selected[token_idx, expert_idx] = True\n'
         'both = (selected & selected[:, partner]).float().sum(dim=0)\n'
         'return (both / selected.float().sum(dim=0).clamp(min=1)).mean()'),
        ('metrics.py:pair_coactivation', 'tokens without an expert left out',
         'n = int(token_idx.max()) + 1\n'
         'selected = torch.zeros(n, partner.numel(), dtype=torch.bool)\n'
         'selected[token_idx, expert_idx] = True\n'
         'return (selected & selected[:, partner]).float().mean()'),
    ],
    6: [
        ('routers.py:ortho_loss', 'pairs across tokens (a wrong reshape)',
         'out = expert_out.float().transpose(0, 1)\n'
         'gram = out @ out.transpose(1, 2)\n'
         'sq_norm = gram.diagonal(dim1=1, dim2=2)\n'
         'proj_sq = (gram / (sq_norm.unsqueeze(1) + eps)).square() * sq_norm.unsqueeze(1)\n'
         'off_diagonal = 1.0 - torch.eye(out.size(1))\n'
         'return (proj_sq * off_diagonal).sum(dim=(1, 2)).mean()'),
        ('routers.py:ortho_loss', 'j = k counted too',
         'out = expert_out.float()\n'
         'gram = out @ out.transpose(1, 2)\n'
         'sq_norm = gram.diagonal(dim1=1, dim2=2)\n'
         'proj_sq = (gram / (sq_norm.unsqueeze(1) + eps)).square() * sq_norm.unsqueeze(1)\n'
         'return proj_sq.sum(dim=(1, 2)).mean()'),
        ('routers.py:ortho_loss', 'squared cosines instead of projections',
         'out = torch.nn.functional.normalize(expert_out.float(), dim=-1)\n'
         'cos_sq = (out @ out.transpose(1, 2)).square()\n'
         'return (cos_sq * (1.0 - torch.eye(out.size(1)))).sum(dim=(1, 2)).mean()'),
        ('routers.py:ortho_loss', 'eps left out',
         'out = expert_out.float()\n'
         'gram = out @ out.transpose(1, 2)\n'
         'sq_norm = gram.diagonal(dim1=1, dim2=2)\n'
         'proj_sq = (gram / sq_norm.unsqueeze(1)).square() * sq_norm.unsqueeze(1)\n'
         'return (proj_sq * (1.0 - torch.eye(out.size(1)))).sum(dim=(1, 2)).mean()'),
        ('routers.py:variance_loss', 'unbiased variance',
         'return -F.softmax(logits.float(), dim=-1).var(dim=-1, unbiased=True).mean()'),
        ('routers.py:variance_loss', 'sign lost', 'return F.softmax(logits.float(), dim=-1).var(dim=-1, unbiased=False).mean()'),
        ('routers.py:variance_loss', 'variance of the logits, not of the softmax',
         'return -logits.float().var(dim=-1, unbiased=False).mean()'),
        ('metrics.py:routing_variance', 'unbiased variance', 'return F.softmax(logits.float(), dim=-1).var(dim=-1)'),
        ('metrics.py:routing_variance', 'standard deviation', 'return F.softmax(logits.float(), dim=-1).std(dim=-1, unbiased=False)'),
    ],
    8: [
        ('routers.py:top_p_keep', 'a candidate counted in its own sum: the one that reaches p is dropped',
         'return sorted_probs.cumsum(dim=-1) < top_p'),
        ('routers.py:top_p_keep', 'a prefix that reaches p exactly takes one more (> p, not >= p)',
         'mass_before = F.pad(sorted_probs.cumsum(dim=-1)[:, :-1], (1, 0))\nreturn mass_before <= top_p'),
        ('routers.py:top_p_keep', 'one expert past p',
         'mass_before = F.pad(sorted_probs.cumsum(dim=-1)[:, :-2], (2, 0))\nreturn mass_before < top_p'),
        ('routers.py:remoe_coefficient_step', 'the sign reversed',
         'return coef * multiplier ** torch.sign(sparsity - target_sparsity)'),
        ('routers.py:remoe_coefficient_step', 'a step proportional to the gap, not its sign',
         'return coef * multiplier ** (target_sparsity - sparsity)'),
        ('routers.py:remoe_coefficient_step', 'added, not multiplied',
         'return coef + multiplier * torch.sign(target_sparsity - sparsity)'),
    ],
}


def reference_sources(number):
    """{file: source} of this repository for the files exercise `number` changes."""
    return {path: open(os.path.join(REPO, path)).read()
            for path in {target.split(':')[0] for target in exercise.EXERCISES[number].grading}}


def with_bodies(stub_sources, number, bodies):
    """The copy's sources with the given {target: body} and every other target of the
    exercise back to its reference body."""
    reference = reference_sources(number)
    sources = dict(stub_sources)
    for target in exercise.EXERCISES[number].grading:
        path, qualname = target.split(':')
        body = bodies.get(target, exercise.function_body(reference[path], qualname))
        sources[path] = exercise.replace_body(sources[path], qualname, body)
    return sources


def variants(number, copy):
    """[(name, target or None, {file: source})]: the stubs, the reference, each mutant."""
    stub = {path: open(os.path.join(copy, path)).read() for path in reference_sources(number)}
    out = [('stub', None, stub), ('reference', None, with_bodies(stub, number, {}))]
    for target, what, body in MUTANTS[number]:
        out.append((f"{target} {what}", target, with_bodies(stub, number, {target: body})))
    return out


def drive(spec_path):
    """In the subprocess: for each copy and variant, write the sources, forget the copy's
    modules, grade. Prints one JSON line of results."""
    with open(spec_path) as f:
        spec = json.load(f)
    copies = tuple(job['copy'] + os.sep for job in spec)
    results = []
    for job in spec:
        number, copy = job['number'], job['copy']
        sys.path[:] = [p for p in sys.path if not (p + os.sep).startswith(copies)]  # pytest puts the copy first
        for name, target, sources in job['variants']:
            for path, source in sources.items():
                with open(os.path.join(copy, path), 'w') as f:
                    f.write(source)
                # a .pyc of the same size and second as the last variant would pass for it
                stale = importlib.util.cache_from_source(os.path.join(copy, path))
                if os.path.exists(stale):
                    os.remove(stale)
            for module in list(sys.modules):  # the copies' modules, imported again from the new files
                if (getattr(sys.modules[module], '__file__', None) or '').startswith(copies):
                    del sys.modules[module]
            if name == 'stub':  # and the other exercises' grading tests, which must not need these stubs
                own = exercise.EXERCISES[number].grading
                others = {test for n, ex in exercise.EXERCISES.items() if n != number
                          for tests in ex.grading.values() for test in tests}
                ran = exercise.run_tests(sorted(others | {t for tests in own.values() for t in tests}), copy, 'line')
                row = {'graded': exercise.by_function(own, ran),
                       'others': {node: result for node, result in ran.items() if node.split('[')[0] in others}}
            else:
                row = {'graded': exercise.grade(number, copy, [target] if target else None, traceback='line')}
            results.append({'number': number, 'variant': name, **row})
    print(json.dumps(results))


@pytest.fixture(scope='module')
def graded(tmp_path_factory):
    spec = []
    for number in exercise.EXERCISES:
        copy = str(tmp_path_factory.mktemp(f'exercise{number}') / 'copy')
        exercise.make_copy(number, copy)
        spec.append({'number': number, 'copy': copy, 'variants': variants(number, copy)})
    spec_path = tmp_path_factory.mktemp('spec') / 'spec.json'
    spec_path.write_text(json.dumps(spec))
    result = subprocess.run([sys.executable, __file__, str(spec_path)], capture_output=True, text=True, cwd=REPO,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    return {(row['number'], row['variant']): row for row in rows}


@pytest.mark.parametrize('number', sorted(exercise.EXERCISES))
def test_stubs_fail_and_the_reference_passes(graded, number):
    stub = graded[number, 'stub']['graded']
    for target, runs in stub.items():
        assert runs and all(not passed for _, passed, _ in runs), f"{target}: a stub passed {runs}"
        assert any('NotImplementedError' in message and f'Exercise {number}' in message for _, _, message in runs)
    reference = graded[number, 'reference']['graded']
    for target, runs in reference.items():
        assert runs and all(passed for _, passed, _ in runs), f"{target}: the reference failed {runs}"


@pytest.mark.parametrize('number', sorted(exercise.EXERCISES))
def test_other_exercises_grading_tests_do_not_need_these_stubs(graded, number):
    others = graded[number, 'stub']['others']
    assert others and all(passed for passed, _ in others.values()), \
        {node: message for node, (passed, message) in others.items() if not passed}


@pytest.mark.parametrize('number', sorted(exercise.EXERCISES))
def test_every_wrong_body_fails_a_grading_test(graded, number):
    for target, what, _ in MUTANTS[number]:
        runs = graded[number, f"{target} {what}"]['graded'][target]
        assert runs and not all(passed for _, passed, _ in runs), f"{target} with '{what}' passed every grading test"


# wrong bodies whose failing check has a line of setup between it and its hand computation:
# the grader must still show the computation
HINTED = [(2, 'routers.py:switch_aux_loss', 'f divided by the tokens, not the assignments'),
          (2, 'routers.py:z_loss', 'summed over the tokens, not averaged')]


def test_a_failing_check_shows_the_nearest_hand_computation(graded):
    for number, target, what in HINTED:
        failed = [message for _, passed, message in graded[number, f"{target} {what}"]['graded'][target] if not passed]
        assert failed, (target, what)
        for message in failed:
            lines = message.splitlines()
            at = [i for i, line in enumerate(lines) if line.startswith('test_routers.py:')]
            assert at, message
            lineno = int(lines[at[0]].split(':')[1])
            # the oracle: the first line above the failing one that is a comment or a def
            source = open(os.path.join(REPO, 'test_routers.py')).read().splitlines()
            nearest = next(line.strip() for line in reversed(source[:lineno - 1])
                           if line.strip().startswith(('#', 'def ')))
            assert nearest.startswith('#'), f"no hand computation above test_routers.py:{lineno}"
            assert at[0] > 0 and lines[at[0] - 1] == nearest, message


def test_hand_computation_is_the_nearest_comment_block_of_the_test():
    source = ('def helper():\n'                  # 1
              '    # not this: another function\n'  # 2
              '    return 1\n'                   # 3
              '\n'                               # 4
              'def test_something():\n'          # 5
              '    # an older computation\n'     # 6
              '\n'                               # 7
              '    # a = 2, b = 3\n'             # 8
              '    # -> a * b = 6\n'             # 9
              '    a, b = 2, 3\n'                # 10
              '    assert a * b == 6\n'          # 11
              '    assert f(\n'                  # 12
              '        # inside the call\n'      # 13
              '        a) == 7\n'                # 14
              '    for i in range(2):\n'         # 15
              '        # in the loop\n'          # 16
              '        assert i < 2\n'           # 17
              '\n'                               # 18
              'def test_bare():\n'               # 19
              '    assert False\n')              # 20
    block = ['# a = 2, b = 3', '# -> a * b = 6']  # lines 8-9; the blank line 7 ends it
    assert exercise.hand_computation(source, 10) == block  # right above
    assert exercise.hand_computation(source, 11) == block  # the setup line 10 in between
    assert exercise.hand_computation(source, 14) == block  # from the statement's first line, 12
    assert exercise.hand_computation(source, 17) == ['# in the loop']
    assert exercise.hand_computation(source, 20) == []  # nothing from the functions above
    assert exercise.hand_computation(source, 11, most=1) == ['# -> a * b = 6']


def test_every_exercise_has_mutants_for_each_function():
    for number, ex in exercise.EXERCISES.items():
        assert set(ex.grading) == {target for target, _, _ in MUTANTS[number]}, number


@pytest.mark.parametrize('number', sorted(exercise.EXERCISES))
def test_the_copy_holds_no_solution(tmp_path, number):
    copy = str(tmp_path / 'copy')
    files = exercise.make_copy(number, copy)
    assert 'routers.py' in files and 'lessons/exercise.py' in files and 'lessons/README.md' in files
    for rel in files:
        assert not rel.startswith(('.git/', 'out')) and not rel.endswith(('.bin', '.pt', '.pyc')), rel
    assert not os.path.exists(os.path.join(copy, 'lessons', 'ANSWERS.md'))
    # the script and test that check the answers would fail without them
    assert not os.path.exists(os.path.join(copy, 'lessons', 'answers.py'))
    assert not os.path.exists(os.path.join(copy, 'tests', 'test_answers.py'))
    assert not os.path.exists(os.path.join(copy, 'tests', 'test_lessons.py'))  # its wrong bodies are near-solutions
    # a line that, in this repository, only the reference body has is nowhere in the copy
    reference = reference_sources(number)
    code = {rel: open(os.path.join(copy, rel)).read() for rel in files if rel.endswith('.py')}
    original = [open(os.path.join(REPO, rel)).read() for rel in code]
    for target in exercise.EXERCISES[number].grading:
        path, qualname = target.split(':')
        for line in exercise.function_body(reference[path], qualname).splitlines():
            line = line.strip()
            if line and not line.startswith('#') and sum(text.count(line) for text in original) == 1:
                assert not [rel for rel, text in code.items() if line in text], f"{target}: {line!r} in the copy"


def test_exercise_cli(tmp_path):
    first = tmp_path / 'ex2'
    made = subprocess.run([sys.executable, 'lessons/exercise.py', '2', f'--out={first}'], cwd=REPO,
                          capture_output=True, text=True)
    assert made.returncode == 0 and f'wrote {first}' in made.stdout
    # a copy of that copy, for exercise 4, made and checked by the copies' own script
    copy = tmp_path / 'ex4'
    made = subprocess.run([sys.executable, 'lessons/exercise.py', '4', f'--out={copy}'], cwd=first,
                          capture_output=True, text=True)
    assert made.returncode == 0 and f'wrote {copy}' in made.stdout
    check = subprocess.run([sys.executable, 'lessons/exercise.py', '4', '--check', '--name=Ada'], cwd=copy,
                           capture_output=True, text=True)
    assert check.returncode == 1
    assert 'expert_capacity: FAIL' in check.stdout and 'capacity_keep_mask: FAIL' in check.stdout
    assert 'NotImplementedError: Exercise 4: write expert_capacity' in check.stdout
    assert f"written to {copy / 'grade-exercise-4.json'}" in check.stdout
    grade = json.loads((copy / 'grade-exercise-4.json').read_text())
    assert (grade['student'], grade['exercise'], grade['all_pass'], grade['attempts']) == ('Ada', 4, False, 1)
    # exercise 4 grades each function with one test
    assert grade['functions'] == {'expert_capacity': {'pass': False, 'tests': 1},
                                  'capacity_keep_mask': {'pass': False, 'tests': 1}}
    table = subprocess.run([sys.executable, 'lessons/exercise.py', '--gather', str(tmp_path)], cwd=REPO,
                           capture_output=True, text=True)
    assert table.returncode == 0 and f"| Ada | 4 | FAIL | FAIL | no | 1 | {grade['time']} |" in table.stdout
    # the original and another exercise's copy are refused in one line, nothing run or written
    grades_here = glob.glob(os.path.join(REPO, 'grade-exercise-*.json'))
    for folder, says in ((REPO, 'this is the original repository'), (first, 'the copy for exercise 2, not exercise 4')):
        refused = subprocess.run([sys.executable, 'lessons/exercise.py', '4', '--check'], cwd=folder,
                                 capture_output=True, text=True)
        assert refused.returncode == 2 and refused.stderr.count('\n') == 1 and says in refused.stderr, refused.stderr
        assert refused.stdout == ''
    assert glob.glob(os.path.join(REPO, 'grade-exercise-*.json')) == grades_here
    assert not glob.glob(str(first / 'grade-exercise-*.json'))
    # a folder that exists is never written into
    again = subprocess.run([sys.executable, 'lessons/exercise.py', '4', f'--out={copy}'], cwd=REPO,
                           capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr.count('\n') == 1 and 'exists' in again.stderr
    bad = subprocess.run([sys.executable, 'lessons/exercise.py', '9'], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and 'one of 1, 2, 3, 4, 5, 6' in bad.stderr


def test_check_refuses_the_original_repository_and_other_copies(tmp_path, monkeypatch, capsys):
    def refused(argv):
        with pytest.raises(SystemExit) as stop:
            exercise.main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith('error: ') and err.count('\n') == 1, err
        return err

    monkeypatch.setattr(exercise, 'grade', lambda *a, **k: pytest.fail('graded a folder --check must refuse'))
    grades_here = glob.glob(os.path.join(REPO, 'grade-exercise-*.json'))
    err = refused(['2', '--check'])
    assert 'this is the original repository' in err and 'make a copy with python lessons/exercise.py 2' in err
    assert glob.glob(os.path.join(REPO, 'grade-exercise-*.json')) == grades_here
    copy = tmp_path / 'ex4'
    exercise.make_copy(4, str(copy))
    mark = json.loads((copy / '.exercise.json').read_text())
    made = datetime.fromisoformat(mark['made'])
    assert mark['exercise'] == 4 and abs(datetime.now().astimezone() - made) < timedelta(minutes=1)
    assert exercise.copy_problem(4, str(copy)) is None
    monkeypatch.setattr(exercise, 'REPO', str(copy))  # as if run by the copy's own script
    err = refused(['2', '--check'])
    assert 'copy for exercise 4, not exercise 2' in err and 'python lessons/exercise.py 4 --check' in err
    (copy / '.exercise.json').write_text('{"exercise": ')
    assert 'is unreadable' in refused(['4', '--check'])
    (copy / '.exercise.json').unlink()
    assert 'has no .exercise.json' in refused(['4', '--check'])
    assert not glob.glob(str(copy / 'grade-exercise-*.json'))


def test_student_name_is_name_then_variable_then_login(monkeypatch):
    monkeypatch.setattr(exercise.getpass, 'getuser', lambda: 'login')
    monkeypatch.delenv('NANOROUTER_STUDENT', raising=False)
    assert exercise.student_name(None) == 'login'
    monkeypatch.setenv('NANOROUTER_STUDENT', ' Grace\n Hopper ')
    assert exercise.student_name(None) == 'Grace Hopper'
    assert exercise.student_name('Ada') == 'Ada'

    def no_login():
        raise OSError('no login name')
    monkeypatch.setattr(exercise.getpass, 'getuser', no_login)
    monkeypatch.delenv('NANOROUTER_STUDENT')
    assert exercise.student_name('') is None


def test_grade_file_holds_the_check_and_counts_attempts(tmp_path):
    # switch_aux_loss: one of its two tests failed; z_loss: its one test passed
    graded = {'routers.py:switch_aux_loss': [('t::a', True, ''), ('t::b', False, 'assert 2.0 == 1.0')],
              'routers.py:z_loss': [('t::c', True, '')]}
    path = exercise.write_grade_file(str(tmp_path), 2, 'Ada', graded)
    assert path == str(tmp_path / 'grade-exercise-2.json') and os.listdir(tmp_path) == ['grade-exercise-2.json']
    record = json.loads((tmp_path / 'grade-exercise-2.json').read_text())
    time = datetime.fromisoformat(record.pop('time'))
    assert time.tzinfo is not None and abs(datetime.now().astimezone() - time) < timedelta(minutes=1)
    assert record == {'student': 'Ada', 'exercise': 2, 'all_pass': False, 'attempts': 1,
                      'functions': {'switch_aux_loss': {'pass': False, 'tests': 2},
                                    'z_loss': {'pass': True, 'tests': 1}}}
    exercise.write_grade_file(str(tmp_path), 2, 'Ada', graded)
    assert json.loads((tmp_path / 'grade-exercise-2.json').read_text())['attempts'] == 2
    exercise.write_grade_file(str(tmp_path), 2, 'Bob', graded)  # another student starts again
    assert json.loads((tmp_path / 'grade-exercise-2.json').read_text())['attempts'] == 1


def test_gather_makes_a_table_of_the_latest_grade_per_student(tmp_path, capsys):
    def grade_file(folder, number, student, functions, time, attempts):
        (tmp_path / folder).mkdir(parents=True)
        record = {'student': student, 'exercise': number, 'time': time, 'attempts': attempts,
                  'functions': {name: {'pass': passed, 'tests': 1} for name, passed in functions.items()},
                  'all_pass': all(functions.values())}
        (tmp_path / folder / f'grade-exercise-{number}.json').write_text(json.dumps(record))

    # Ada checked exercise 2 in two copies: 10:00+01:00 is 09:00 UTC, before 09:30+00:00 (though
    # its text sorts after), so the second copy's grade is her latest, after 2 + 1 = 3 checks
    grade_file('ada1', 2, 'Ada', {'switch_aux_loss': False, 'z_loss': True}, '2025-03-01T10:00:00+01:00', 2)
    grade_file('ada2/deeper', 2, 'Ada', {'switch_aux_loss': True, 'z_loss': True}, '2025-03-01T09:30:00+00:00', 1)
    grade_file('bob', 2, 'Bob', {'switch_aux_loss': True, 'z_loss': False}, '2025-03-01T11:00:00+01:00', 3)
    grade_file('ada4', 4, 'Ada', {'expert_capacity': True, 'capacity_keep_mask': True}, '2025-03-02T08:00:00+00:00', 1)
    (tmp_path / 'cut').mkdir()
    (tmp_path / 'cut' / 'grade-exercise-2.json').write_text('{"student": ')
    (tmp_path / 'cut' / 'grade-exercise-3.json').write_text(json.dumps({'student': 'Eve', 'exercise': 3}))
    grade_file('naive', 5, 'Eve', {'gatepro_partners': True}, '2025-03-01T10:00:00', 1)  # no UTC offset
    with pytest.raises(SystemExit) as stop:
        exercise.main(['--gather', str(tmp_path)])
    out, err = capsys.readouterr()
    assert stop.value.code == 0
    assert out == ('| student | exercise | switch_aux_loss | z_loss | all pass | attempts | time |\n'
                   '| --- | --- | --- | --- | --- | --- | --- |\n'
                   '| Ada | 2 | pass | pass | yes | 3 | 2025-03-01T09:30:00+00:00 |\n'
                   '| Bob | 2 | pass | FAIL | no | 3 | 2025-03-01T11:00:00+01:00 |\n'
                   '\n'
                   '| student | exercise | expert_capacity | capacity_keep_mask | all pass | attempts | time |\n'
                   '| --- | --- | --- | --- | --- | --- | --- |\n'
                   '| Ada | 4 | pass | pass | yes | 1 | 2025-03-02T08:00:00+00:00 |\n')
    skipped = sorted(err.splitlines())
    assert len(skipped) == 3 and all(line.startswith('note: skipped ') for line in skipped), err
    assert 'cut/grade-exercise-2.json: not JSON' in skipped[0] and 'cut/grade-exercise-3.json' in skipped[1]
    assert 'naive/grade-exercise-5.json: time' in skipped[2] and 'no offset' in skipped[2]
    # a file, a pattern, and the same file twice (counted once: Bob's attempts stay 3)
    with pytest.raises(SystemExit):
        exercise.main(['--gather', str(tmp_path / 'bob'), str(tmp_path / 'bob' / 'grade-exercise-2.json'),
                       str(tmp_path / 'ada[12]*')])
    out = capsys.readouterr().out
    assert '| Ada | 2 | pass | pass | yes | 3 |' in out and '| Bob | 2 | pass | FAIL | no | 3 |' in out
    assert 'expert_capacity' not in out
    (tmp_path / 'empty').mkdir()
    with pytest.raises(SystemExit) as stop:
        exercise.main(['--gather', str(tmp_path / 'empty')])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith('error: no grade files') and err.count('\n') == 1


@pytest.mark.skipif(shutil.which('git') is None, reason='needs git')
def test_the_copy_is_a_git_repository_of_one_commit_and_copies_again(tmp_path):
    def git(folder, *args):
        return subprocess.run(['git', '-C', str(folder), *args], capture_output=True, text=True, check=True).stdout

    copy = tmp_path / 'ex2'
    files = exercise.make_copy(2, str(copy))
    assert git(copy, 'rev-list', '--count', 'HEAD').strip() == '1' and git(copy, 'status', '--porcelain') == ''
    assert sorted(git(copy, 'ls-files').splitlines()) == sorted(files) and '.exercise.json' in files
    assert git(copy, 'log', '-1', '--format=%an <%ae>').strip() == 'nanorouter <exercise@localhost>'
    assert 'raise NotImplementedError("Exercise 2: write z_loss' in git(copy, 'show', 'HEAD:routers.py')
    # a student's grade and history stay in their copy when it is copied for another exercise
    (copy / 'grade-exercise-2.json').write_text('{}')
    assert git(copy, 'status', '--porcelain') == ''  # and out of what git add -A would commit
    second = tmp_path / 'ex3'
    files = exercise.make_copy(3, str(second), root=str(copy))
    assert not [rel for rel in files if rel.startswith('.git/') or rel.startswith('grade-exercise')]
    assert not (second / 'grade-exercise-2.json').exists()
    assert json.loads((second / '.exercise.json').read_text())['exercise'] == 3
    assert git(second, 'rev-list', '--count', 'HEAD').strip() == '1' and git(second, 'status', '--porcelain') == ''
    assert sorted(git(second, 'ls-files').splitlines()) == sorted(files)
    assert exercise.copy_problem(3, str(second)) is None
    assert 'copy for exercise 3' in exercise.copy_problem(2, str(second))


def test_a_copy_without_git_says_so_in_one_line_and_works(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    monkeypatch.setenv('PATH', str(bin_dir))  # no git on PATH
    exercise.make_copy(2, str(tmp_path / 'a'))
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'git is not on PATH' in err
    assert not (tmp_path / 'a' / '.git').exists() and exercise.copy_problem(2, str(tmp_path / 'a')) is None
    (bin_dir / 'git').write_text('#!/bin/sh\necho "fatal: disk full" >&2\nexit 128\n')  # a git that fails
    (bin_dir / 'git').chmod(0o755)
    exercise.make_copy(2, str(tmp_path / 'b'))
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'git init failed (fatal: disk full)' in err
    assert (tmp_path / 'b' / 'routers.py').exists() and exercise.copy_problem(2, str(tmp_path / 'b')) is None


@pytest.mark.parametrize('name', sorted(n for n in os.listdir(os.path.join(REPO, 'config')) if n.startswith('lesson')))
def test_lesson_configs_plan_their_runs(name):
    import compare
    config = compare.load_config([os.path.join(REPO, 'config', name)])
    runs = compare.plan_runs(config)
    assert len(runs) == len(config['routers']) * len(config['seeds'])
    assert config['compare_dir'].startswith('out-lesson')  # gitignored, never copied to a student
    assert all('--max_iters=300' in command for *_, command in runs)


def test_every_lesson_names_a_file_that_exists():
    for number, ex in exercise.EXERCISES.items():
        assert os.path.isfile(os.path.join(REPO, 'lessons', ex.lesson)), ex.lesson
        with open(os.path.join(REPO, 'lessons', ex.lesson)) as f:
            text = f.read()
        assert f'python lessons/exercise.py {number} --check' in text
        for target in ex.grading:  # the lesson names every function the exercise empties
            assert f"`{target.split(':')[1]}`" in text, (ex.lesson, target)


def test_replace_body_keeps_signature_docstring_and_decorators():
    source = ('class A:\n'
              '    @staticmethod\n'
              '    def f(x,\n'
              '          y):  # a comment\n'
              '        # why\n'
              '        return x + y\n'
              '        # trailing\n'
              '\n'
              'def g(x):\n'
              '    """Doc."""\n'
              '    return x\n')
    stubbed = exercise.replace_body(source, 'A.f', 'raise NotImplementedError("no")')
    assert stubbed == ('class A:\n'
                       '    @staticmethod\n'
                       '    def f(x,\n'
                       '          y):  # a comment\n'
                       '        raise NotImplementedError("no")\n'
                       '\n'
                       'def g(x):\n'
                       '    """Doc."""\n'
                       '    return x\n')
    assert exercise.function_body(source, 'g') == 'return x\n'
    assert exercise.replace_body(source, 'g', 'return 2 * x').endswith('    """Doc."""\n    return 2 * x\n')
    with pytest.raises(exercise.ExerciseError, match='function h not found'):
        exercise.function_body(source, 'h')


if __name__ == '__main__':
    drive(sys.argv[1])
