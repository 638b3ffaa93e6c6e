"""Fixtures shared by the end-to-end tests: a tiny dataset, and a runner that starts
train.py / sample.py runs without paying torch's import for each (forkrun.py)."""

import os
import pickle
import sys

import numpy as np
import pytest

from forkrun import REPO, ForkRunner

sys.path.insert(0, REPO)  # the project's modules, whether pytest runs from the repository or from tests/


# Tests marked slow (the numbers of lessons 2-8, about 7 minutes on 2 cores) run only when asked:
#   python -m pytest -q --run-slow tests/test_answers.py
def pytest_addoption(parser):
    parser.addoption('--run-slow', action='store_true', help="also run the tests marked slow")


def pytest_configure(config):
    config.addinivalue_line('markers', "slow: minutes of training; skipped unless --run-slow")


def pytest_collection_modifyitems(config, items):
    if not config.getoption('--run-slow'):
        for item in items:
            if 'slow' in item.keywords:
                item.add_marker(pytest.mark.skip(reason="slow: run with --run-slow"))


@pytest.fixture(scope='session')
def runner():
    if not hasattr(os, 'fork'):
        pytest.skip("forkrun needs os.fork (Linux, macOS)")
    r = ForkRunner()
    yield r
    r.close()


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    """A small learnable character dataset (13 symbols, 20k train and 4k val tokens): a
    Markov chain whose next symbol is the following one in the alphabet 90% of the time."""
    path = tmp_path_factory.mktemp('tiny_data')
    rng = np.random.default_rng(0)
    chars = sorted('abcdefgh ijk\n')
    steps = np.where(rng.random(24_000) < 0.9, 1, rng.integers(0, len(chars), 24_000))
    ids = (np.cumsum(steps) % len(chars)).astype(np.uint16)
    stoi = {c: i for i, c in enumerate(chars)}
    ids[:20_000].tofile(path / 'train.bin')
    ids[20_000:].tofile(path / 'val.bin')
    with open(path / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': len(chars), 'stoi': stoi, 'itos': {i: c for c, i in stoi.items()}}, f)
    return str(path)
