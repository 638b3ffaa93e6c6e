"""
Tests for data/*/prepare.py. CPU only, no network, a few seconds in all.

The prepare scripts are loaded by path, as train.py does. The Shakespeare tests use
small texts written here; the BPE test builds a tiny tiktoken encoding because
tiktoken.get_encoding("gpt2") would download its BPE file.
"""
import importlib.util
import json
import os
import pickle
import re
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import tiktoken

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, above tests/


def load_prepare(name):
    path = os.path.join(ROOT, "data", name, "prepare.py")
    spec = importlib.util.spec_from_file_location(f"prepare_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name, *args):
    # no proxy variables: a request to 127.0.0.1 must fail locally, never reach a proxy
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.run([sys.executable, os.path.join(ROOT, "data", name, "prepare.py"), *args],
                          capture_output=True, text=True, env=env, timeout=60)


def read_dir(d):
    meta = pickle.load(open(os.path.join(d, "meta.pkl"), "rb"))
    bins = {s: np.fromfile(os.path.join(d, f"{s}.bin"), dtype=np.uint16) for s in ("train", "val")}
    return meta, bins


def file_bytes(d):
    """The .bin and .pkl files in d, by name."""
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d)) if f.endswith((".bin", ".pkl"))}


# ---------------------------------------------------------------------------
# domains: the default, synthetic dataset

DOMAIN_FILES = ["meta.pkl", "train.bin", "train_domain.bin", "val.bin", "val_domain.bin"]


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    out = tmp_path_factory.mktemp("domains")
    meta = load_prepare("domains").prepare(out_dir=str(out), n_chars=50_000, seed=1337, progress=False)
    data = {}
    for split in ("train", "val"):
        ids = np.fromfile(out / f"{split}.bin", dtype=np.uint16)
        dom = np.fromfile(out / f"{split}_domain.bin", dtype=np.uint8)
        data[split] = (ids, dom)
    return out, meta, data


def split_lines(meta, ids, dom):
    """(line text without newline, domain name) for every line; checks each line has one label."""
    text = "".join(meta["itos"][int(i)] for i in ids)
    assert text.endswith("\n")
    lines, start = [], 0
    for line in text.split("\n")[:-1]:
        end = start + len(line) + 1  # + its newline, which belongs to the same line
        labels = set(dom[start:end].tolist())
        assert len(labels) == 1, f"line {line!r} has several domain labels {labels}"
        lines.append((line, meta["domains"][labels.pop()]))
        start = end
    return lines


def test_domains_files_and_shapes(domains):
    out, meta, data = domains
    assert sorted(os.listdir(out)) == DOMAIN_FILES
    assert meta == pickle.load(open(out / "meta.pkl", "rb"))
    assert set(meta) >= {"vocab_size", "stoi", "itos", "domains", "seed"}
    assert meta["seed"] == 1337 and len(meta["domains"]) >= 4
    assert len(meta["stoi"]) == len(meta["itos"]) == meta["vocab_size"]
    total = 0
    for split, (ids, dom) in data.items():
        assert len(ids) == len(dom) > 0, split
        assert ids.max() < meta["vocab_size"]
        assert dom.max() < len(meta["domains"])
        total += len(ids)
    assert 50_000 <= total < 50_300  # whole documents, so it stops just past n_chars
    # 90/10 split, at a line boundary: val starts right after a newline
    assert abs(len(data["val"][0]) / total - 0.1) < 0.01
    assert data["train"][0][-1] == meta["stoi"]["\n"]


def test_domains_round_trip_and_labels(domains):
    _, meta, data = domains
    for split, (ids, dom) in data.items():
        text = "".join(meta["itos"][int(i)] for i in ids)
        assert [meta["stoi"][c] for c in text] == ids.tolist()
        split_lines(meta, ids, dom)  # asserts one label per line, newline included
    counts = np.bincount(data["train"][1], minlength=len(meta["domains"]))
    assert (counts > 0).all(), "every domain appears in train"
    # domains are interleaved and mixed roughly evenly by characters, none negligible
    assert (counts / counts.sum() > 0.1).all(), counts
    switches = np.count_nonzero(np.diff(data["train"][1].astype(int)))
    assert switches > 1000


def check_list_line(line):
    op, items, result = re.fullmatch(r"([a-z]+) ([a-z0-9 ]+) -> ([a-z0-9 ]+)", line).groups()
    xs = items.split()
    key = int if xs[0].isdigit() else str
    expected = {
        "sort": sorted(xs, key=key), "rev": xs[::-1], "max": [max(xs, key=key)], "min": [min(xs, key=key)],
        "len": [str(len(xs))], "first": xs[:1], "last": xs[-1:],
        "uniq": [x for i, x in enumerate(xs) if x not in xs[:i]],
    }[op]
    assert result.split() == expected, line


def check_arithmetic_line(line):
    a, op, b, c = re.fullmatch(r"(\d+)([-+*/])(\d+)=(-?\d+)", line).groups()
    a, b, c = int(a), int(b), int(c)
    assert c == {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else None}[op], line
    assert op != "/" or a % b == 0, line


def check_english_line(line):
    sentence = r"[A-Z][a-z]*( [A-Za-z]+)*[.?]"
    assert re.fullmatch(f"{sentence}( {sentence})*", line), line


def check_record_line(line):
    assert isinstance(json.loads(line), dict) and line.startswith("{"), line


@pytest.mark.parametrize("split", ["train", "val"])
def test_domains_are_what_they_claim(domains, split):
    """Each domain's lines parse as that domain and are correct (sums add up, sorts are sorted)."""
    _, meta, data = domains
    assert meta["domains"] == ["arithmetic", "lists", "english", "code", "records"]
    by_domain = {name: [] for name in meta["domains"]}
    code_runs, run = [], []  # consecutive code lines, which together must be valid Python
    for line, name in split_lines(meta, *data[split]):
        by_domain[name].append(line)
        if name == "code":
            run.append(line)
        elif run:
            code_runs.append("\n".join(run) + "\n")
            run = []
    code_runs.append("\n".join(run) + "\n")
    checks = {"arithmetic": check_arithmetic_line, "lists": check_list_line,
              "english": check_english_line, "records": check_record_line}
    for name, check in checks.items():
        assert by_domain[name], name
        for line in by_domain[name]:
            check(line)
    for source in code_runs:
        compile(source, "<generated code>", "exec")
    assert any(line.startswith("    ") for line in by_domain["code"])  # multi-line blocks exist

    # and the character mix differs the way it should
    def frac(name, chars):
        text = "".join(by_domain[name])
        return sum(c in chars for c in text) / len(text)
    assert frac("arithmetic", "0123456789+-*/=") == 1.0
    assert frac("english", "abcdefghijklmnopqrstuvwxyz") > 0.7
    assert frac("english", "0123456789") == 0.0
    assert frac("code", "():=[]") > 0.03


def test_domains_deterministic(domains, tmp_path):
    out, _, _ = domains
    prepare = load_prepare("domains").prepare
    prepare(out_dir=str(tmp_path / "same"), n_chars=50_000, seed=1337, progress=False)
    assert file_bytes(tmp_path / "same") == file_bytes(out)
    # through the command line, in a fresh process (catches any dependence on hash seeds)
    r = run_script("domains", "--out_dir", str(tmp_path / "cli"), "--n_chars", "50000", "--seed", "1337")
    assert r.returncode == 0, r.stderr
    assert file_bytes(tmp_path / "cli") == file_bytes(out)
    prepare(out_dir=str(tmp_path / "other"), n_chars=50_000, seed=7, progress=False)
    assert file_bytes(tmp_path / "other")["train.bin"] != file_bytes(out)["train.bin"]


def test_domains_too_small(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        load_prepare("domains").prepare(out_dir=str(tmp_path), n_chars=1, progress=False)


def test_domains_only_keeps_the_mixture_weights_of_its_domains(tmp_path):
    """--only=lists,english,records draws documents of those three domains in the proportions
    the full mixture gives them, renormalised: a narrow dataset is the full one with the
    other domains left out, not a new mixture. Weights made equal, or taken from the wrong
    domains (e.g. the first three of the list instead of the picked ones), would change the
    shares. These three lines have no newline inside (unlike code's blocks), so each
    newline ends one document and counts it for the domain its label names."""
    prepare = load_prepare("domains")
    meta = prepare.prepare(out_dir=str(tmp_path), n_chars=400_000, seed=1337, progress=False,
                           only="lists,english,records")
    assert meta["only"] == ["lists", "english", "records"]
    ids = np.concatenate([np.fromfile(tmp_path / f"{split}.bin", dtype=np.uint16) for split in ("train", "val")])
    dom = np.concatenate([np.fromfile(tmp_path / f"{split}_domain.bin", dtype=np.uint8) for split in ("train", "val")])
    docs = np.bincount(dom[ids == meta["stoi"]["\n"]], minlength=5)  # documents per domain id
    assert docs[[0, 3]].sum() == 0  # arithmetic and code: none
    n = docs.sum()
    assert n > 8000  # ~40 characters a document
    # the full mixture's weights (DOMAINS: lists 1.5, english 0.55, records 0.65), renormalised
    # over the three picked: 1.5 / 2.7 = 0.556, 0.55 / 2.7 = 0.204, 0.65 / 2.7 = 0.241.
    # Equal weights would give 0.333 each; the weights of the first three domains
    # (arithmetic 4.0, lists 1.5, english 0.55) 0.661, 0.248, 0.091
    weights = {name: w for name, _, w in prepare.DOMAINS}
    assert (weights["lists"], weights["english"], weights["records"]) == (1.5, 0.55, 0.65)
    expected = {"lists": 1.5 / 2.7, "english": 0.55 / 2.7, "records": 0.65 / 2.7}
    for name, share in expected.items():
        # each document's domain is an independent draw: the share's standard error is
        # sqrt(p (1 - p) / n) <= 0.5 / sqrt(8000) = 0.0056, so 0.03 is over 5 of them, while
        # the wrong mixtures above miss lists' or records' share by 0.1 or more
        assert abs(docs[meta["domains"].index(name)] / n - share) < 0.03, (name, docs / n)


def test_domains_only_ignores_the_order_and_repeats_of_names(tmp_path):
    """--only names a set of domains: 'records,lists,records' is the dataset 'lists,records'
    byte for byte. A name given twice must not count its mixture weight twice (the domains
    are drawn by weight from the list of picked ids), nor the order change the draws."""
    prepare = load_prepare("domains")
    assert prepare.pick_domains("records, lists, records") == [1, 4]  # ids in DOMAINS' order, once each
    prepare.prepare(out_dir=str(tmp_path / "a"), n_chars=20_000, progress=False, only="records,lists,records")
    prepare.prepare(out_dir=str(tmp_path / "b"), n_chars=20_000, progress=False, only="lists,records")
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")


def test_domains_val_is_never_empty(tmp_path):
    """A val_fraction smaller than the last document: the split is still at a document's end
    and val gets that last document, never nothing (an empty val.bin fails every eval)."""
    meta = load_prepare("domains").prepare(out_dir=str(tmp_path), n_chars=3_000, val_fraction=0.001, progress=False)
    val = np.fromfile(tmp_path / "val.bin", dtype=np.uint16)
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    val_domain = np.fromfile(tmp_path / "val_domain.bin", dtype=np.uint8)
    newline = meta["stoi"]["\n"]
    assert len(val) > 0 and train[-1] == newline and val[-1] == newline
    # the last document alone, so a single domain label (0.001 of 3,000 characters is 3: less than any document)
    assert len(set(val_domain.tolist())) == 1


# ---------------------------------------------------------------------------
# Shakespeare, characters and BPE, from local files

TEXT = "".join(f"LINE {i}:\nO Romeo, Romeo! wherefore art thou Romeo? {i * i}\n\n" for i in range(200)) + "Cæsar ends.\n"


@pytest.fixture
def input_file(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


def test_shakespeare_char_local_file(input_file, tmp_path):
    out = tmp_path / "out"
    meta = load_prepare("shakespeare_char").prepare(input_path=input_file, out_dir=str(out))
    meta2, bins = read_dir(out)
    assert meta == meta2
    assert meta["vocab_size"] == len(set(TEXT)) == len(meta["itos"])
    assert len(bins["train"]) == int(len(TEXT) * 0.9)
    assert len(bins["train"]) + len(bins["val"]) == len(TEXT)
    decoded = "".join(meta["itos"][int(i)] for i in np.concatenate([bins["train"], bins["val"]]))
    assert decoded == TEXT


def test_shakespeare_char_cli_and_cached_input(input_file, tmp_path):
    r = run_script("shakespeare_char", "--input", input_file, "--out_dir", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    # without --input, an input.txt already in the output folder is used (no download)
    r = run_script("shakespeare_char", "--out_dir", str(tmp_path), "--url", "http://127.0.0.1:9/input.txt")
    assert r.returncode == 0, r.stderr
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path)


def tiny_encoding(**special):
    # byte-level "BPE" with no merges: every byte is its own token; no download needed
    return tiktoken.Encoding(name="tiny", pat_str=r"""\S+|\s+""",
                             mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens=special)


def test_shakespeare_bpe_local_file(input_file, tmp_path):
    enc = tiny_encoding()
    meta = load_prepare("shakespeare").prepare(input_path=input_file, out_dir=str(tmp_path / "out"), encoding=enc)
    meta2, bins = read_dir(tmp_path / "out")
    assert meta == meta2 == {"vocab_size": 256, "encoding": "tiny"}
    n = int(len(TEXT) * 0.9)
    assert enc.decode(bins["train"].tolist()) == TEXT[:n]
    assert enc.decode(bins["val"].tolist()) == TEXT[n:]


def test_shakespeare_bpe_vocab_too_big(input_file, tmp_path):
    module = load_prepare("shakespeare")
    with pytest.raises(module.PrepareError, match="uint16"):
        module.prepare(input_path=input_file, out_dir=str(tmp_path), encoding=tiny_encoding(**{"<|big|>": 70_000}))


def test_shakespeare_bpe_no_bpe_file(monkeypatch):
    module = load_prepare("shakespeare")

    def offline(name):
        raise ConnectionError("Max retries exceeded\nwith url: openaipublic...")
    monkeypatch.setattr(module.tiktoken, "get_encoding", offline)
    with pytest.raises(module.PrepareError) as e:
        module.gpt2_encoding()
    assert "BPE file" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------
# errors a user can fix: one line on stderr, no traceback, non-zero exit


@pytest.mark.parametrize("name", ["shakespeare_char", "shakespeare"])
def test_missing_input_file(name, tmp_path):
    missing = str(tmp_path / "no_such_file.txt")
    r = run_script(name, "--input", missing, "--out_dir", str(tmp_path))
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and missing in r.stderr


@pytest.mark.parametrize("name", ["shakespeare_char", "shakespeare"])
def test_download_failure_cli(name, tmp_path):
    # port 9 (discard) on localhost: the connection is refused at once, nothing leaves the machine
    r = run_script(name, "--out_dir", str(tmp_path), "--url", "http://127.0.0.1:9/input.txt")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "--input" in r.stderr
    assert not os.path.exists(tmp_path / "input.txt")


def test_download_failure_in_process(monkeypatch, tmp_path):
    module = load_prepare("shakespeare_char")

    def offline(url, timeout=15):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(sys.modules["download"], "fetch", offline)
    with pytest.raises(module.PrepareError, match="--input"):
        module.prepare(out_dir=str(tmp_path))
