"""What train.py refuses before training (token ids outside the vocabulary, .bin files that
are not whole uint16 ids) and what it does with a non-finite loss: stop with one line and
keep the last checkpoint, or skip the step and count it. End to end through forkrun's
runner; the router-level finiteness tests are in test_routers.py."""

import pickle

import numpy as np
import torch

from dataset import DATA, seed_for
from model import GPTConfig
from routers import build_router
from test_checkpoint import TINY, assert_one_line_error, records

VOCAB = sorted('abcdefgh ijk\n')  # 13 symbols, as the tiny dataset


def make_dataset(path, train, val, vocab_size=len(VOCAB), meta=True):
    path.mkdir()
    np.asarray(train, dtype=np.uint16).tofile(path / 'train.bin')
    np.asarray(val, dtype=np.uint16).tofile(path / 'val.bin')
    if meta:
        stoi = {c: i for i, c in enumerate(VOCAB[:vocab_size])}
        with open(path / 'meta.pkl', 'wb') as f:
            pickle.dump({'vocab_size': vocab_size, 'stoi': stoi, 'itos': {i: c for c, i in stoi.items()}}, f)
    return path


# -----------------------------------------------------------------------------
# data that does not fit


def test_token_ids_outside_the_vocabulary_are_refused_before_training(runner, tmp_path):
    ids = np.arange(5000) % 13
    bad = ids.copy()
    bad[4321] = 20
    for split, (train, val) in {'train': (bad, ids), 'val': (ids, bad)}.items():
        data = make_dataset(tmp_path / f'bad_{split}', train, val)
        result = runner.run([*TINY, f'--data_dir={data}', f'--out_dir={tmp_path / "out"}'])
        assert_one_line_error(result, str(data / f'{split}.bin'), 'token id 20', 'vocabulary has 13 ids',
                              str(data / 'meta.pkl'))
    # no meta.pkl: GPT-2's padded vocabulary, 50304
    data = make_dataset(tmp_path / 'no_meta', ids, np.full(5000, 60000), meta=False)
    result = runner.run([*TINY, f'--data_dir={data}', f'--out_dir={tmp_path / "out"}'])
    assert_one_line_error(result, str(data / 'val.bin'), 'token id 60000', 'no meta.pkl: vocab_size=50304')
    assert not (tmp_path / 'out').exists()


def test_a_bin_file_with_an_odd_number_of_bytes_is_refused(runner, tmp_path):
    data = make_dataset(tmp_path / 'data', np.arange(5000) % 13, np.arange(5000) % 13)
    with open(data / 'train.bin', 'ab') as f:
        f.write(b'\x00')
    result = runner.run([*TINY, f'--data_dir={data}', f'--out_dir={tmp_path / "out"}'])
    assert_one_line_error(result, str(data / 'train.bin'), '10001 bytes, an odd number')
    assert not (tmp_path / 'out').exists()


# -----------------------------------------------------------------------------
# non-finite losses


def test_a_non_finite_loss_stops_with_one_line_and_keeps_the_last_checkpoint(runner, tiny_data, tmp_path):
    out_dir = tmp_path / 'out'
    args = [*TINY, f'--data_dir={tiny_data}', f'--out_dir={out_dir}']
    result = runner.run([*args, '--max_iters=4', '--eval_interval=4'])
    assert result.returncode == 0, result.stderr
    ckpt_before = (out_dir / 'ckpt.pt').read_bytes()
    # a learning rate of 1e10: step 4 still sees finite weights, its update makes step 5 NaN
    result = runner.run([*args, '--init_from=resume', '--max_iters=20', '--eval_interval=2', '--learning_rate=1e10'])
    assert_one_line_error(result, 'non-finite loss at iter 5: loss nan, aux nan, z nan',
                          'first non-finite router logits in layer 0',
                          f'{out_dir / "ckpt.pt"} (iter 4) is kept', code=1)
    assert (out_dir / 'ckpt.pt').read_bytes() == ckpt_before
    assert [r['iter'] for r in records(out_dir) if r['split'] == 'train'] == [0, 1, 2, 3, 4]


def poisoned_expert_setup(tmp_path, runner):
    """A hash-routed model, and data in which one rare token (the only one hashed to expert
    `bad`) appears in some training batches. The checkpoint's expert `bad` is then set to
    inf: any batch with the rare token gives a NaN loss, every other batch is fine."""
    config = GPTConfig(router='hash', n_exp=4, vocab_size=len(VOCAB), n_layer=1, n_head=2, n_embd=16, block_size=16)
    expert_of = build_router(config).expert_of_token.tolist()
    bad = min(set(expert_of), key=expert_of.count)
    rare = expert_of.index(bad)
    common = [t for t in range(len(VOCAB)) if expert_of[t] != bad]
    rng = np.random.default_rng(1)
    train = rng.choice(common, 20_000)
    train[rng.choice(20_000, 200, replace=False)] = rare
    data = make_dataset(tmp_path / 'data', train, rng.choice(common, 4_000))
    out_dir = tmp_path / 'out'
    args = [*TINY, '--router=hash', f'--data_dir={data}', f'--out_dir={out_dir}', '--eval_interval=2',
            '--always_save_checkpoint=True']
    result = runner.run([*args, '--max_iters=2'])
    assert result.returncode == 0, result.stderr
    ckpt = torch.load(out_dir / 'ckpt.pt', weights_only=True)
    for name in ('transformer.h.0.ffn.experts.w_fc', 'transformer.h.0.ffn.experts.w_proj'):
        ckpt['model'][name][bad] = float('inf')
    torch.save(ckpt, out_dir / 'ckpt.pt')

    def has_rare(it):  # train.py's sampling (one process, no accumulation): does step it see the rare token?
        generator = torch.Generator().manual_seed(seed_for(1337, it, DATA))
        offsets = torch.randint(len(train) - 16, (1, 4), generator=generator)[0]
        return any(rare in train[i:i + 16] for i in offsets.tolist())

    return args, out_dir, has_rare, bad


def test_skip_nonfinite_skips_exactly_the_bad_steps_and_counts_them(runner, tmp_path):
    args, out_dir, has_rare, bad = poisoned_expert_setup(tmp_path, runner)
    ckpt_before = (out_dir / 'ckpt.pt').read_bytes()
    bad_steps = [it for it in range(2, 14) if has_rare(it)]
    assert 2 <= len(bad_steps) <= 10, bad_steps  # the data makes some steps bad, not all

    # without --skip_nonfinite: one line at the first bad step; the router's logits were fine
    result = runner.run([*args, '--init_from=resume', '--max_iters=14', '--eval_interval=100'])
    assert_one_line_error(result, f'non-finite loss at iter {bad_steps[0]}: loss nan',
                          'router logits finite in every layer', '(iter 2) is kept', code=1)
    assert (out_dir / 'ckpt.pt').read_bytes() == ckpt_before

    # with it: those steps are skipped (no update, no train line), the others train
    (out_dir / 'ckpt.pt').write_bytes(ckpt_before)
    with open(out_dir / 'metrics.jsonl', 'w') as f:  # the log as the poisoned checkpoint's run left it
        f.write('')
    result = runner.run([*args, '--init_from=resume', '--max_iters=14', '--skip_nonfinite=True'])
    assert result.returncode == 0, result.stderr
    skipped = [int(line.split()[4].rstrip(':')) for line in result.stdout.splitlines() if 'step skipped' in line]
    assert skipped == bad_steps
    train = [r for r in records(out_dir) if r['split'] == 'train']
    assert [r['iter'] for r in train] == [it for it in range(2, 14) if it not in bad_steps]
    for r in train:
        assert np.isfinite(r['loss']) and r['skipped_steps'] == sum(it <= r['iter'] for it in bad_steps)
    ckpt = torch.load(out_dir / 'ckpt.pt', weights_only=True)  # the val loss stayed finite: saved at 14
    assert ckpt['iter_num'] == 14 and ckpt['skipped_steps'] == len(bad_steps)
    for name, value in ckpt['model'].items():  # nothing but the poisoned expert went non-finite
        if name.endswith(('experts.w_fc', 'experts.w_proj')):
            assert torch.isinf(value[bad]).all()
            value = torch.cat([value[:bad], value[bad + 1:]])
        assert not torch.is_tensor(value) or torch.isfinite(value).all(), name
    val = [r for r in records(out_dir) if r['split'] == 'val']
    assert all(np.isfinite(r['loss']) for r in val)
