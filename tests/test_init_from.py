"""Starting from trained weights (train.py's init_from=PATH / 'gpt2'): sparse upcycling,
fine-tuning a checkpoint on a narrow dataset, GPT-2's weights from a Hugging Face folder,
and the exact-match answer accuracy reported at eval."""

import contextlib
import importlib.util
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch

from checkpoint import load_pretrained, load_start_weights
from dataset import Dataset
from evals import ExtraEvals, answer_prompts, exact_match, loss_by_domain
from model import GPT, GPTConfig, upcycle_state_dict
from test_checkpoint import assert_one_line_error

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, above tests/
TINY = ['--device=cpu', '--n_layer=2', '--n_head=2', '--n_embd=32', '--batch_size=4', '--block_size=16',
        '--eval_iters=2', '--log_interval=5', '--warmup_iters=2']


def records(out_dir):
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def load_domains_prepare():
    path = os.path.join(REPO, 'data', 'domains', 'prepare.py')
    spec = importlib.util.spec_from_file_location('prepare_domains', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config(**overrides):
    args = dict(block_size=16, vocab_size=13, n_layer=2, n_head=2, n_embd=32, n_exp=1, expert_impl='plain')
    return GPTConfig(**{**args, **overrides})


# -----------------------------------------------------------------------------
# upcycling, in-process


def upcycled_pair(**moe):
    """A dense model with random weights and the MoE upcycled from it."""
    torch.manual_seed(0)
    dense = GPT(tiny_config()).eval()
    config = tiny_config(n_exp=4, expert_hidden=128, **moe)
    upcycled = GPT(config).eval()
    load_start_weights(upcycled, upcycle_state_dict(dense.state_dict(), config), 'dense')
    return dense, upcycled


@pytest.mark.parametrize('moe', [
    dict(router='topk'),  # top-2, renormalize=True
    dict(router='topk', top_k=4),
    dict(router='gatepro'),
    dict(router='aux_free'),  # weights s_i / sum of the picked s_j: they sum to 1
    dict(router='hash'),  # top-1, weight 1
    dict(router='topk', moe_every=2),  # layer 0 stays the dense MLP itself
])
def test_upcycled_model_computes_what_the_dense_one_did(moe):
    dense, upcycled = upcycled_pair(**moe)
    idx = torch.randint(0, 13, (3, 16))
    with torch.no_grad():
        expected, _, _, _ = dense(idx, idx)
        got, _, _, routings = upcycled(idx, idx)
    assert routings  # the experts really ran
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('moe', [
    dict(router='switch'),  # top-1 with the raw softmax weight p < 1: the output is scaled by p
    dict(router='topk', renormalize=False),  # OLMoE's weights sum to less than 1
    dict(router='topk', capacity_factor=0.5, eval_capacity_factor=0.5),  # dropped tokens lose their MLP
])
def test_upcycling_is_not_exact_when_weights_do_not_sum_to_one(moe):
    dense, upcycled = upcycled_pair(**moe)
    idx = torch.randint(0, 13, (3, 16))
    with torch.no_grad():
        expected = dense(idx, idx)[0]
        got = upcycled(idx, idx)[0]
    assert (got - expected).abs().max() > 1e-3


def test_upcycle_copies_each_mlp_and_drop_upcycling_reinitialises_its_ratio():
    torch.manual_seed(0)
    dense_state = GPT(tiny_config()).state_dict()
    config = tiny_config(n_exp=3, expert_hidden=128)
    w_fc = dense_state['transformer.h.1.ffn.c_fc.weight'].t()  # [d, h] = [32, 128]
    w_proj = dense_state['transformer.h.1.ffn.c_proj.weight'].t()  # [128, 32]
    state = upcycle_state_dict(dense_state, config)
    assert 'transformer.h.1.ffn.c_fc.weight' not in state
    for e in range(3):
        assert torch.equal(state['transformer.h.1.ffn.experts.w_fc'][e], w_fc)
        assert torch.equal(state['transformer.h.1.ffn.experts.w_proj'][e], w_proj)
    # Drop-Upcycling with ratio 0.25: int(0.25 * 128) = 32 hidden units of each expert are new,
    # the same units in w_fc (columns) and w_proj (rows); the other 96 are the MLP's
    state = upcycle_state_dict(dense_state, config, drop_ratio=0.25, generator=torch.Generator().manual_seed(1))
    dropped = []
    for e in range(3):
        fc_changed = (state['transformer.h.1.ffn.experts.w_fc'][e] != w_fc).any(dim=0)
        proj_changed = (state['transformer.h.1.ffn.experts.w_proj'][e] != w_proj).any(dim=1)
        assert int(fc_changed.sum()) == 32 and torch.equal(fc_changed, proj_changed)
        dropped.append(fc_changed)
    assert not torch.equal(dropped[0], dropped[1])  # each expert drops its own units
    # noise: every copy moves a little, by about noise * std(W)
    state = upcycle_state_dict(dense_state, config, noise=0.01, generator=torch.Generator().manual_seed(1))
    delta = state['transformer.h.1.ffn.experts.w_fc'][0] - w_fc
    assert 0.5 < float(delta.std() / (0.01 * w_fc.std())) < 1.5


def test_upcycling_noise_follows_each_matrixs_own_spread():
    """noise > 0 adds to each copied matrix Gaussian noise of std noise * std(that matrix):
    W_fc's copies by W_fc's spread, W_proj's by W_proj's. Were one std used for both, the
    experts of a layer whose two matrices differ in scale (as GPT-2's scaled c_proj init
    makes them) would get noise far too large or too small in one of them. The two
    matrices here differ 100-fold in spread, so a shared std is off by 100x."""
    config = tiny_config(n_exp=4, expert_hidden=128)
    dense_state = GPT(tiny_config()).state_dict()
    g = torch.Generator().manual_seed(0)
    for layer in range(2):
        prefix = f'transformer.h.{layer}.ffn.'
        dense_state[prefix + 'c_fc.weight'] = 0.5 * torch.randn(128, 32, generator=g)  # [h, d], std ~0.5
        dense_state[prefix + 'c_proj.weight'] = 3.0 + 50.0 * torch.randn(32, 128, generator=g)  # std ~50, mean 3
    state = upcycle_state_dict(dense_state, config, noise=0.1, generator=torch.Generator().manual_seed(1))
    for layer in range(2):
        prefix = f'transformer.h.{layer}.ffn.'
        for name, dense_name in (('w_fc', 'c_fc'), ('w_proj', 'c_proj')):
            w = dense_state[prefix + dense_name + '.weight'].t()
            delta = state[prefix + 'experts.' + name] - w  # [4, ...]: the noise each copy got
            # expected std: 0.1 * std(W). The sample std of n = 4 * 32 * 128 = 16384 normal draws
            # has a relative standard error of 1 / sqrt(2n) ~ 0.0055, so 5% is ~9 standard errors
            # wide: never a false alarm, while a borrowed std (100x off) is far outside it
            assert abs(float(delta.std()) / (0.1 * float(w.std())) - 1) < 0.05, (layer, name)
            # noise, not a shift: its mean is ~0 (standard error 0.1 * std / sqrt(n) ~ 0.0008 * std)
            assert abs(float(delta.mean())) < 0.01 * float(w.std()), (layer, name)
            # each expert gets its own draw: the copies' noises are uncorrelated (|r| ~ 1/sqrt(4096) = 0.016)
            r = torch.corrcoef(delta.flatten(1)[:2])[0, 1]
            assert abs(float(r)) < 0.1, (layer, name)
    # Drop-Upcycling: the re-initialised units are drawn from N(mean(W), std(W)^2) of their own
    # matrix: W_proj's fresh rows have W_proj's mean 3 and spread 50, W_fc's columns W_fc's
    state = upcycle_state_dict(dense_state, config, drop_ratio=0.5, generator=torch.Generator().manual_seed(2))
    w_fc = dense_state['transformer.h.1.ffn.c_fc.weight'].t()
    w_proj = dense_state['transformer.h.1.ffn.c_proj.weight'].t()
    fresh_fc, fresh_proj = [], []
    for e in range(4):
        units = (state['transformer.h.1.ffn.experts.w_fc'][e] != w_fc).any(dim=0)  # the 64 new hidden units
        fresh_fc.append(state['transformer.h.1.ffn.experts.w_fc'][e][:, units])
        fresh_proj.append(state['transformer.h.1.ffn.experts.w_proj'][e][units])
    fresh_fc, fresh_proj = torch.cat(fresh_fc, 1), torch.cat(fresh_proj, 0)  # 4 * 64 * 32 = 8192 values each
    # n = 8192: the std's relative standard error is 1 / sqrt(2n) ~ 0.008 (5% is ~6 of them);
    # the mean's standard error std / sqrt(n) ~ 0.011 std, so 0.05 std is ~4.5 of them
    for fresh, w in ((fresh_fc, w_fc), (fresh_proj, w_proj)):
        assert abs(float(fresh.std()) / float(w.std()) - 1) < 0.05
        assert abs(float(fresh.mean() - w.mean())) < 0.05 * float(w.std())


def test_upcycling_refuses_what_it_cannot_copy():
    state = GPT(tiny_config(bias=True)).state_dict()
    with pytest.raises(ValueError, match='biases in the experts'):
        upcycle_state_dict(state, tiny_config(bias=True, n_exp=4, expert_hidden=128))
    state = GPT(tiny_config()).state_dict()
    with pytest.raises(ValueError, match='expert_hidden must be 128, got expert_hidden=64'):
        upcycle_state_dict(state, tiny_config(n_exp=4, expert_hidden=64))


def test_a_new_router_starts_fresh_but_keeps_a_gate_that_fits():
    torch.manual_seed(0)
    source = GPT(tiny_config(n_exp=4, router='gatepro'))
    source.step_finished(41, {0: torch.ones(4), 1: torch.ones(4)})  # GatePro counted 42 steps
    model = GPT(tiny_config(n_exp=4, router='gatepro'))
    load_start_weights(model, source.state_dict(), 'source')
    router = model.transformer.h[0].ffn.router
    assert torch.equal(router.gate.weight, source.transformer.h[0].ffn.router.gate.weight)
    assert router.iter_num == 0  # a new run's windows count from its own iteration 0
    noisy = GPT(tiny_config(n_exp=4, router='noisy_topk'))
    fresh_noise = noisy.transformer.h[0].ffn.router.noise.weight.clone()
    fresh = load_start_weights(noisy, source.state_dict(), 'source')
    assert fresh == ['transformer.h.0.ffn.router.noise.weight', 'transformer.h.1.ffn.router.noise.weight']
    assert torch.equal(noisy.transformer.h[0].ffn.router.noise.weight, fresh_noise)
    assert torch.equal(noisy.transformer.h[1].ffn.router.gate.weight, source.transformer.h[1].ffn.router.gate.weight)


# -----------------------------------------------------------------------------
# through train.py: upcycling, fine-tuning, refusals


@pytest.fixture(scope='module')
def dense_run(runner, tiny_data, tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp('dense'))
    result = runner.run([*TINY, f'--data_dir={tiny_data}', f'--out_dir={out_dir}', '--n_exp=1', '--max_iters=10',
                         '--eval_interval=10', '--learning_rate=1e-2'])
    assert result.returncode == 0, result.stderr
    return out_dir


def test_upcycled_run_starts_at_the_dense_loss_and_trains(runner, tiny_data, dense_run, tmp_path):
    dense_dir, moe_dir = str(tmp_path / 'dense_again'), str(tmp_path / 'moe')
    source_bytes = open(os.path.join(dense_run, 'ckpt.pt'), 'rb').read()
    result = runner.run([*TINY, f'--data_dir={tiny_data}', f'--init_from={dense_run}', f'--out_dir={dense_dir}',
                         '--eval_only=True'])
    assert result.returncode == 0, result.stderr
    result = runner.run([*TINY, f'--data_dir={tiny_data}', f'--init_from={dense_run}/ckpt.pt', f'--out_dir={moe_dir}',
                         '--n_exp=4', '--max_iters=4', '--eval_interval=4', '--always_save_checkpoint=True'])
    assert result.returncode == 0, result.stderr
    assert 'upcycled, every expert of MoE layers [0, 1] is a copy of its MLP' in result.stdout
    dense, moe = records(dense_dir), records(moe_dir)
    assert dense[0]['iter'] == moe[0]['iter'] == 0 and moe[0]['layers']  # a new run, with MoE layers
    # iteration 0, the same eval batches: the upcycled top-2 model is the dense model
    assert moe[0]['loss'] == pytest.approx(dense[0]['loss'], abs=1e-5)
    assert moe[0]['train_loss'] == pytest.approx(dense[0]['train_loss'], abs=1e-5)
    assert [r['iter'] for r in moe if r['split'] == 'train'] == [0]  # it trained, from iteration 0
    checkpoint = torch.load(os.path.join(moe_dir, 'ckpt.pt'), weights_only=True)
    assert checkpoint['iter_num'] == 4 and checkpoint['model_args']['n_exp'] == 4
    assert checkpoint['model_args']['expert_hidden'] == 128  # the dense MLP's width, 4 * n_embd
    assert open(os.path.join(dense_run, 'ckpt.pt'), 'rb').read() == source_bytes  # the source is untouched


@pytest.fixture(scope='module')
def domains_data(tmp_path_factory):
    prepare = load_domains_prepare().prepare
    full, narrow = tmp_path_factory.mktemp('domains'), tmp_path_factory.mktemp('arithmetic')
    prepare(out_dir=str(full), n_chars=40_000, progress=False)
    prepare(out_dir=str(narrow), n_chars=10_000, progress=False, only='arithmetic')
    return str(full), str(narrow)


def test_fine_tune_an_moe_on_one_domain(runner, domains_data, tmp_path):
    full, narrow = domains_data
    pretrained, finetuned = str(tmp_path / 'pretrained'), str(tmp_path / 'finetuned')
    result = runner.run([*TINY, f'--data_dir={full}', f'--out_dir={pretrained}', '--n_exp=4', '--router=gatepro',
                         '--top_k=2', '--max_iters=4', '--eval_interval=4', '--eval_answers=4'])
    assert result.returncode == 0, result.stderr
    assert 'exact-match answers (greedy, val): arithmetic ' in result.stdout and '% of 4, lists ' in result.stdout
    # n_exp, router and top_k come from the checkpoint: nothing to repeat; the dataset is new
    result = runner.run([*TINY, f'--data_dir={narrow}', f'--init_from={pretrained}', f'--out_dir={finetuned}',
                         '--max_iters=2', '--eval_interval=2', '--eval_answers=4', '--gatepro_penalty=1e-4',
                         f'--eval_also={full}'])
    assert result.returncode == 0, result.stderr
    log = records(finetuned)
    # eval_also: the full mixture's val split, per domain; the other domains are all but arithmetic
    also = log[-1]['eval_also']
    assert also['dataset'] == full and set(also['domain_loss']) == {'arithmetic', 'lists', 'english', 'code', 'records'}
    others = [v for k, v in also['domain_loss'].items() if k != 'arithmetic']
    assert min(others) <= also['other_domains_loss'] <= max(others)
    assert f"val loss on {full}: " in result.stdout
    assert [r['iter'] for r in log] == [0, 0, 2]  # val 0, train 0, val 2: a new run, a new log
    assert set(log[0]['answer_accuracy']) == {'arithmetic'}  # the narrow dataset asks arithmetic only
    assert all(0.0 <= value <= 1.0 for value in log[0]['answer_accuracy'].values())
    assert 'gatepro, 4 experts, top-2' in result.stdout
    checkpoint = torch.load(os.path.join(finetuned, 'ckpt.pt'), weights_only=True)
    assert checkpoint['model_args']['gatepro_penalty'] == 1e-4  # a router knob may change
    assert checkpoint['model_args']['router'] == 'gatepro' and checkpoint['iter_num'] == 2
    # a loss target replaces the coefficient the source trained with (its var_loss_coef = 0.0),
    # and a coefficient replaces the source's target: neither is "both given"
    targeted, fixed = str(tmp_path / 'targeted'), str(tmp_path / 'fixed')
    result = runner.run([*TINY, f'--data_dir={narrow}', f'--init_from={pretrained}', f'--out_dir={targeted}',
                         '--max_iters=1', '--eval_interval=1', '--eval_answers=0', '--var_loss_target=1e-3',
                         '--ortho_loss_target=1e-4'])
    assert result.returncode == 0, result.stderr
    assert 'var_loss_target 0.001' in result.stdout and 'ortho_loss_target 0.0001' in result.stdout
    result = runner.run([*TINY, f'--data_dir={narrow}', f'--init_from={targeted}', f'--out_dir={fixed}',
                         '--max_iters=1', '--eval_interval=1', '--eval_answers=0', '--var_loss_coef=0.2'])
    assert result.returncode == 0, result.stderr
    assert 'var_loss_coef 0.2' in result.stdout and 'ortho_loss_target 0.0001' in result.stdout


@pytest.mark.parametrize('args, fragments', [
    (['--n_layer=3'], ["n_layer=3 differs from n_layer=2 of", "drop --n_layer"]),
    (['--block_size=32'], ["block_size=32 is longer than the 16 positions of", "--block_size=16 or less"]),
    (['--n_exp=4', '--bias=True'], ["bias=True differs from bias=False"]),
    (['--n_exp=4', '--expert_hidden=64'], ["expert_hidden must be 128, got expert_hidden=64"]),
    (['--n_exp=4', '--n_shared_exp=1'], ["n_shared_exp=1: upcycling copies the MLP"]),
    (['--upcycle_noise=0.1'], ["upcycle_noise=0.1, upcycle_drop_ratio=0.0 apply only when upcycling",
                               "dense with n_exp=1 while this run has n_exp=1"]),
    (['--upcycle_drop_ratio=2'], ["upcycle_drop_ratio=2.0 between 0 and 1"]),
])
def test_a_start_that_does_not_fit_is_one_line(runner, tiny_data, dense_run, tmp_path, args, fragments):
    out_dir = tmp_path / 'out'
    result = runner.run([*TINY, f'--data_dir={tiny_data}', f'--init_from={dense_run}', f'--out_dir={out_dir}', *args])
    assert_one_line_error(result, *fragments)
    assert not out_dir.exists()  # nothing written


def test_refusals_that_name_the_source(runner, tiny_data, domains_data, dense_run, tmp_path):
    full, _ = domains_data
    result = runner.run([*TINY, f'--data_dir={full}', f'--init_from={dense_run}', f'--out_dir={tmp_path}/a'])
    assert_one_line_error(result, f"{dense_run}/ckpt.pt has vocab_size=13 but dataset", "vocab_size=96")
    result = runner.run([*TINY, f'--data_dir={tiny_data}', f'--init_from={dense_run}', f'--out_dir={dense_run}'])
    assert_one_line_error(result, f"out_dir={dense_run} holds the weights this run starts from", "another --out_dir")
    result = runner.run([*TINY, f'--data_dir={tiny_data}', f'--init_from={tmp_path}/nothing'])
    assert_one_line_error(result, "must be 'scratch', 'resume', 'gpt2'", "does not exist")
    # a narrow dataset not made yet: the error says how to make one
    result = runner.run([*TINY, '--dataset=domains_poetry', f'--init_from={dense_run}', f'--out_dir={tmp_path}/c'])
    assert_one_line_error(result, "no data/domains_poetry/prepare.py makes it",
                          "python data/domains/prepare.py --only=NAMES --out_dir=data/domains_poetry")
    # an MoE source keeps its experts: another n_exp cannot use them
    moe_dir = str(tmp_path / 'moe')
    result = runner.run([*TINY, f'--data_dir={tiny_data}', f'--out_dir={moe_dir}', '--n_exp=4', '--max_iters=1',
                         '--eval_interval=1', '--always_save_checkpoint=True'])
    assert result.returncode == 0, result.stderr
    result = runner.run([*TINY, f'--data_dir={tiny_data}', f'--init_from={moe_dir}', '--n_exp=8',
                         f'--out_dir={tmp_path}/b'])
    assert_one_line_error(result, "n_exp=8 differs from n_exp=4 of", "experts keep their shapes")


# -----------------------------------------------------------------------------
# narrow datasets


def test_narrow_domains_dataset_keeps_the_vocabulary(domains_data, tmp_path):
    full, narrow = domains_data
    full_meta, narrow_meta = (pickle.load(open(os.path.join(d, 'meta.pkl'), 'rb')) for d in (full, narrow))
    for key in ('vocab_size', 'stoi', 'itos', 'domains'):
        assert narrow_meta[key] == full_meta[key]
    assert narrow_meta['only'] == ['arithmetic'] and narrow_meta['answers'] == {'arithmetic': '='}
    assert full_meta['answers'] == {'arithmetic': '=', 'lists': ' -> '}
    labels = np.fromfile(os.path.join(narrow, 'train_domain.bin'), dtype=np.uint8)
    assert set(labels.tolist()) == {0}  # domain ids of the full dataset: arithmetic is 0
    text = ''.join(narrow_meta['itos'][int(i)] for i in np.fromfile(os.path.join(narrow, 'train.bin'), dtype=np.uint16))
    for line in text.splitlines():  # every line an equation that holds
        left, right = line.split('=')
        assert eval(left.replace('/', '//')) == int(right), line
    prepare = load_domains_prepare()
    assert prepare.pick_domains('lists, code') == [1, 3]
    with pytest.raises(ValueError, match="'poetry' is not a domain; choose among arithmetic, lists"):
        prepare.pick_domains('arithmetic,poetry')


# -----------------------------------------------------------------------------
# the answer accuracy, on hand-made cases


def test_loss_by_domain_by_hand():
    # tokens of domains a, a, b, c with losses 1, 2, 3, 4; trained on a only
    out = loss_by_domain(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0, 0, 1, 2]), ['a', 'b', 'c', 'd'], ['a'])
    assert out['loss'] == 2.5  # (1 + 2 + 3 + 4) / 4
    assert out['domain_loss'] == {'a': 1.5, 'b': 3.0, 'c': 4.0}  # d has no token: absent, not 0 or NaN
    assert out['other_domains_loss'] == 3.5  # (3 + 4) / 2: the tokens of b and c, not the mean of a domain mean
    # trained on every domain present: nothing is "other"
    assert 'other_domains_loss' not in loss_by_domain(torch.tensor([1.0, 3.0]), torch.tensor([0, 1]), ['a', 'b'], ['a', 'b'])


class FixedPrediction(torch.nn.Module):
    """A stand-in model whose every prediction is the same distribution probs over the
    vocabulary, whatever its input: the loss of a predicted token t is exactly -log probs[t]."""

    def __init__(self, probs):
        super().__init__()
        self.log_probs = torch.tensor(probs).log()

    def forward(self, idx, targets=None):
        return self.log_probs.expand(*idx.shape, -1), None, [], []


def test_eval_also_labels_each_loss_with_the_domain_of_the_predicted_token(tmp_path):
    """eval_also's loss per domain puts the loss of predicting token i+1 under the domain of
    token i+1, the token predicted, not under that of token i, the one it is predicted from:
    at a document boundary the first token of the new document counts for its own domain.
    A stream where every token of domain a is 0 and every token of domain b is 1, in
    documents of 3 and 2 tokens, under a model that always predicts probs: each domain's
    loss is then exactly -log of its own token's probability, wherever the batches start;
    read at the inputs' positions, each document's first token would count for the other
    domain, and both domains' means would move."""
    tokens = np.array([0, 0, 0, 1, 1] * 40, dtype=np.uint16)  # a a a b b, 200 tokens
    tokens.tofile(tmp_path / 'val.bin')
    tokens.astype(np.uint8).tofile(tmp_path / 'val_domain.bin')  # domain id = token id here
    with open(tmp_path / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': 3, 'domains': ['a', 'b']}, f)
    # the run trains on a narrow dataset of domain a alone (prepare.py --only=a writes meta['only'])
    data = Dataset('narrow', str(tmp_path), {'vocab_size': 3, 'only': ['a']}, 3, 'vocab_size in meta.pkl', {})
    evals = ExtraEvals(data, eval_answers=0, eval_also=str(tmp_path), block_size=8, batch_size=4, eval_iters=3,
                       device='cpu', ctx=contextlib.nullcontext(), verbose=False)
    out = evals.also_loss(FixedPrediction([0.5, 0.3, 0.2]), torch.Generator().manual_seed(0))
    # domain a's tokens are all 0: -log 0.5 = 0.6931; domain b's all 1: -log 0.3 = 1.2040
    assert out['domain_loss'] == pytest.approx({'a': -math.log(0.5), 'b': -math.log(0.3)}, rel=1e-6)
    # b is the domain the run does not train on: its tokens alone
    assert out['other_domains_loss'] == pytest.approx(-math.log(0.3), rel=1e-6)
    # the overall mean, over the same batches drawn here: 12 rows of 8 predicted tokens each
    g = torch.Generator().manual_seed(0)
    targets = np.concatenate([tokens[i + 1:i + 9] for _ in range(3)
                              for i in torch.randint(len(tokens) - 8, (4,), generator=g).tolist()])
    assert out['loss'] == pytest.approx(np.mean(-np.log(np.array([0.5, 0.3, 0.2])[targets])), rel=1e-6)
    assert out['dataset'] == str(tmp_path)


def test_eval_also_that_does_not_fit_is_one_line(runner, tiny_data, domains_data, tmp_path):
    full, _ = domains_data
    result = runner.run([*TINY, f'--data_dir={tiny_data}', f'--out_dir={tmp_path / "x"}', f'--eval_also={full}'])
    assert result.returncode != 0 and 'it has vocab_size=96 but dataset' in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_answer_prompts_finds_the_answers_by_hand():
    stoi = {ch: i for i, ch in enumerate(load_domains_prepare().CHARS)}
    # three documents: arithmetic (0), lists (1), arithmetic (0); the last one has no newline
    docs = [('12+3=15\n', 0), ('max 4 9 -> 9\n', 1), ('7*2=14', 0)]
    text = ''.join(doc for doc, _ in docs)
    tokens = [stoi[ch] for ch in text]
    labels = [label for doc, label in docs for _ in doc]
    newline = stoi['\n']
    prompts, answers = answer_prompts(tokens, labels, 0, [stoi['=']], newline, n=10, context=4)
    # '12+3=' ends at index 5: prompt text[1:5] = '2+3=', answer '15'; the last '=' has no newline after it
    assert [''.join(load_domains_prepare().CHARS[i] for i in row) for row in prompts.tolist()] == ['2+3=']
    assert answers == [[stoi['1'], stoi['5']]]
    # lists: the marker ' -> ' in the second document, answer '9'; context 6 reaches into the first line
    prompts, answers = answer_prompts(tokens, labels, 1, [stoi[c] for c in ' -> '], newline, n=10, context=6)
    assert prompts.tolist() == [[stoi[c] for c in ' 4 9 -> '[-6:]]] and answers == [[stoi['9']]]
    # a context longer than what precedes the first answer: that match is skipped
    assert answer_prompts(tokens, labels, 0, [stoi['=']], newline, n=10, context=6)[1] == []
    # a context exactly as long as what precedes it (5 tokens, '12+3='): the whole start is the prompt
    prompts, answers = answer_prompts(tokens, labels, 0, [stoi['=']], newline, n=10, context=5)
    assert prompts.tolist() == [[stoi[c] for c in '12+3=']] and answers == [[stoi['1'], stoi['5']]]


def test_exact_match_by_hand():
    stop = 0
    generated = [[5, 1, 0, 7],  # answer [5, 1], then the newline: right
                 [5, 1, 1, 0],  # right digits, but it goes on: wrong
                 [5, 0, 9, 9],  # stops early: wrong
                 [0, 3, 3, 3]]  # answer [] (empty), newline at once: right
    answers = [[5, 1], [5, 1], [5, 1], []]
    assert exact_match(generated, answers, stop) == 2 / 4
    assert exact_match([], [], stop) == 0.0


# -----------------------------------------------------------------------------
# GPT-2 from a Hugging Face folder (a tiny random one: nothing is downloaded)


@pytest.fixture(scope='module')
def hf_gpt2(tmp_path_factory):
    transformers = pytest.importorskip('transformers', reason="transformers is optional: pip install transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=32)  # vocab 50257, gelu_new
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # GPT-2's init leaves every GELU input near 0, where tanh and exact agree: spread them
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    folder = tmp_path_factory.mktemp('hf_gpt2')
    hf.save_pretrained(str(folder))
    return hf, str(folder)


def test_gpt2_folder_gives_gpt2_logits(hf_gpt2, tmp_path):
    hf, folder = hf_gpt2
    assert os.path.exists(os.path.join(folder, 'model.safetensors'))
    source, model_args, state = load_pretrained(folder)
    assert source == folder and model_args['vocab_size'] == 50257 and model_args['gelu_approximate'] == 'tanh'
    model = GPT(GPTConfig(**model_args)).eval()
    load_start_weights(model, state, source)
    idx = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        expected = hf(idx).logits
        got = model(idx, idx)[0]
        exact_gelu = GPT(GPTConfig(**{**model_args, 'gelu_approximate': 'none'})).eval()
        exact_gelu.load_state_dict(model.state_dict())
        other = exact_gelu(idx, idx)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (other - expected).abs().max() > 1e-5  # GPT-2's tanh GELU is not the exact one
    # a folder with only pytorch_model.bin is read with weights_only
    bin_folder = tmp_path / 'bin'
    bin_folder.mkdir()
    (bin_folder / 'config.json').write_text(open(os.path.join(folder, 'config.json')).read())
    torch.save(hf.state_dict(), bin_folder / 'pytorch_model.bin')
    _, _, bin_state = load_pretrained(str(bin_folder))
    assert torch.equal(bin_state['transformer.h.1.attn.c_attn.weight'], state['transformer.h.1.attn.c_attn.weight'])


def test_train_py_starts_from_a_gpt2_folder(runner, hf_gpt2, tmp_path):
    hf, folder = hf_gpt2
    # GPT-2 BPE ids without meta.pkl; one repeated token, so every eval batch is the same sequence
    data = tmp_path / 'data'
    data.mkdir()
    for split in ('train', 'val'):
        np.full(200, 464, dtype=np.uint16).tofile(data / f'{split}.bin')
    out_dir = tmp_path / 'out'
    result = runner.run(['--device=cpu', f'--data_dir={data}', f'--init_from={folder}', f'--out_dir={out_dir}',
                         '--block_size=16', '--batch_size=2', '--eval_iters=1', '--eval_only=True'])
    assert result.returncode == 0, result.stderr
    assert f'a new run from {folder}' in result.stdout and 'router:' not in result.stdout  # dense
    idx = torch.full((1, 17), 464)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(hf(idx[:, :16]).logits[0], idx[0, 1:]).item()
    assert records(out_dir)[0]['loss'] == pytest.approx(expected, abs=1e-5)
    # GPT-2 has biases: upcycling it is refused in one line, before anything is written
    result = runner.run(['--device=cpu', f'--data_dir={data}', f'--init_from={folder}', f'--out_dir={tmp_path}/moe',
                         '--block_size=16', '--n_exp=4'])
    assert_one_line_error(result, "has biases (bias=True, as GPT-2): upcycling it would need biases in the experts")
    assert not (tmp_path / 'moe').exists()


def test_answer_accuracy_in_train_py_by_hand(runner, tmp_path):
    """A model trained on two lines over and over, '123+456=579' and 'max 7 8 9 -> 9',
    answers both; the val split asks the same arithmetic (right: 100%) but claims the max
    is 7 (so the model's answer 9 is wrong: 0%). The prompts, block_size // 2 = 8 tokens,
    '123+456=' and ' 8 9 -> ', lie inside their lines, which the model has seen."""
    prepare = load_domains_prepare()
    stoi = {ch: i for i, ch in enumerate(prepare.CHARS)}
    for split, lists_line in (('train', 'max 7 8 9 -> 9\n'), ('val', 'max 7 8 9 -> 7\n')):
        docs = [('123+456=579\n', 0), (lists_line, 1)] * (200 if split == 'train' else 20)
        np.array([stoi[ch] for doc, _ in docs for ch in doc], dtype=np.uint16).tofile(tmp_path / f'{split}.bin')
        np.array([label for doc, label in docs for _ in doc], dtype=np.uint8).tofile(tmp_path / f'{split}_domain.bin')
    with open(tmp_path / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': len(prepare.CHARS), 'stoi': stoi, 'itos': dict(enumerate(prepare.CHARS)),
                     'domains': [name for name, _, _ in prepare.DOMAINS], 'answers': prepare.ANSWERS}, f)
    out_dir = tmp_path / 'out'
    result = runner.run([*TINY, f'--data_dir={tmp_path}', f'--out_dir={out_dir}', '--n_exp=1', '--max_iters=80',
                         '--eval_interval=80', '--learning_rate=1e-2', '--eval_answers=5', '--batch_size=8'])
    assert result.returncode == 0, result.stderr
    assert records(out_dir)[-1]['answer_accuracy'] == {'arithmetic': 1.0, 'lists': 0.0}
    assert 'exact-match answers (greedy, val): arithmetic 100.0% of 5, lists 0.0% of 5' in result.stdout
