"""Tests of lessons/exercise.py: the exercises are graded for real. For every exercise, a
student copy is made; its stubs fail their grading tests, the reference bodies (taken
from this repository's source) pass them, other exercises' grading tests pass with the
stubs in place, and every plausible wrong body below fails at least one of its tests.

The grading runs in ONE subprocess (python test_lessons.py SPEC), in the copies' own
folders, importing their code fresh for every variant: the copies' code is what runs."""

import importlib.util
import json
import os
import subprocess
import sys

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
    assert not os.path.exists(os.path.join(copy, 'test_lessons.py'))  # its wrong bodies are near-solutions
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
    copy = tmp_path / 'ex4'
    made = subprocess.run([sys.executable, 'lessons/exercise.py', '4', f'--out={copy}'], cwd=REPO,
                          capture_output=True, text=True)
    assert made.returncode == 0 and f'wrote {copy}' in made.stdout
    check = subprocess.run([sys.executable, 'lessons/exercise.py', '4', '--check'], cwd=copy, capture_output=True,
                           text=True)
    assert check.returncode == 1
    assert 'expert_capacity: FAIL' in check.stdout and 'capacity_keep_mask: FAIL' in check.stdout
    assert 'NotImplementedError: Exercise 4: write expert_capacity' in check.stdout
    # a folder that exists is never written into
    again = subprocess.run([sys.executable, 'lessons/exercise.py', '4', f'--out={copy}'], cwd=REPO,
                           capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr.count('\n') == 1 and 'exists' in again.stderr
    bad = subprocess.run([sys.executable, 'lessons/exercise.py', '9'], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and 'one of 1, 2, 3, 4, 5, 6' in bad.stderr


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
