"""
Tests for GPT-2 scale on one GPU: the web-text datasets (data/fineweb_edu, data/openwebtext,
their shared data/web_text.py) and the recipes config/train_gpt2_{dense,moe8,moe64}.py.
CPU only, never the network.

The datasets are made from tiny files written here, through a small tiktoken encoding
built here (tiktoken.get_encoding("gpt2") would download its BPE file; the one test that
uses it skips unless the file is cached). Expected tokens come from tiktoken itself,
document by document, or by hand.

The recipes' memory formulas (their comments) are typed in again below and checked against
the real model: the parameter count exactly at full size, the optimizer state after a
step, and the activations autograd saves at a reduced width.
"""
import ast
import json
import os
import pickle
import re
import subprocess
import sys
from dataclasses import fields

import numpy as np
import pytest
import tiktoken
import tiktoken.load
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dataset import load_meta, open_dataset
from model import GPT, GPTConfig
from test_checkpoint import records
from test_data import load_prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, above tests/
SCRIPTS = ["fineweb_edu", "openwebtext"]


# byte-level BPE with two merges, GPT-2's pre-tokenizer, and <|endoftext|> as id 258
EOT = 258
ENC = tiktoken.Encoding(
    name="tiny",
    pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    mergeable_ranks={**{bytes([i]): i for i in range(256)}, b"th": 256, b"the": 257},
    special_tokens={"<|endoftext|>": EOT})

DOCS = [
    "Hello, web.",
    "the the",
    "",  # an empty document is one separator
    "Text that says <|endoftext|> is only text.",
    "Écoles\nand lines\n\n",
    "3 + 4 = 7",
    "last one",
]


def expected_splits(docs, val_every):
    """The oracle: tiktoken's tokens of each document, then the separator; document i to
    val when i % val_every == 0."""
    split = {"train": [], "val": []}
    for i, doc in enumerate(docs):
        split["val" if i % val_every == 0 else "train"] += ENC.encode_ordinary(doc) + [EOT]
    return split


def read_bins(d):
    return {s: np.fromfile(os.path.join(d, f"{s}.bin"), dtype=np.uint16).tolist() for s in ("train", "val")}


def file_bytes(d):
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))}


def write_jsonl(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"id": len(doc), "text": doc}) + "\n")
    return str(path)


def write_txt_folder(path, docs):
    os.makedirs(path)
    for i, doc in enumerate(docs):  # one document per file, read in the order of the names
        with open(os.path.join(path, f"doc{i:02d}.txt"), "w", encoding="utf-8", newline="") as f:
            f.write(doc)
    return str(path)


def make(script, input_path, out_dir, **options):
    options = {"encoding": ENC, "val_every": 3, "batch_docs": 2, "progress": False, **options}
    return load_prepare(script).prepare(input_path=input_path, out_dir=str(out_dir), **options)


# -----------------------------------------------------------------------------
# the tokens written


@pytest.mark.parametrize("script", SCRIPTS)
def test_tokens_are_each_document_then_the_separator(script, tmp_path):
    """train.bin/val.bin hold tiktoken's encode_ordinary of each document followed by
    <|endoftext|>, documents 0, 3, 6 in val (val_every=3), the rest in train, in order; the
    text "<|endoftext|>" inside a document stays text. meta.pkl loads through the project's
    own reader (plain values only) and open_dataset takes the folder."""
    out = tmp_path / "out"
    meta = make(script, write_jsonl(tmp_path / "docs.jsonl", DOCS), out)
    bins = read_bins(out)
    assert bins == expected_splits(DOCS, 3)
    # by hand: "the the" is "the" (257), then " " (32) and "the" (257): GPT-2's pre-tokenizer
    # keeps the space with the word, and the merges make "th" then "the"; then the separator
    assert bins["train"][:len(ENC.encode_ordinary(DOCS[1])) + 1] == ENC.encode_ordinary(DOCS[1]) + [EOT]
    assert ENC.encode_ordinary(DOCS[1]) == [257, 32, 257]
    # by hand: the empty document (index 2) is the separator alone, right after doc 1 in train
    assert bins["train"][4] == EOT
    # one separator per document, and nothing else is 258, though document 3 spells it out
    assert bins["train"].count(EOT) == 4 and bins["val"].count(EOT) == 3
    assert meta == load_meta(str(out))
    assert meta["vocab_size"] == 259 and meta["encoding"] == "tiny" and meta["eot_token"] == EOT
    assert (meta["documents"], meta["train_tokens"], meta["val_tokens"]) == (7, len(bins["train"]), len(bins["val"]))
    assert sorted(os.listdir(out)) == ["meta.pkl", "train.bin", "val.bin"]  # no .tmp, no progress.json left
    data = open_dataset("tiny", str(out), block_size=4, vocab_size=50304)
    assert data.vocab_size == 259 and data.n_tokens == {s: len(bins[s]) for s in bins}


def test_txt_files_are_one_document_each(tmp_path):
    """A folder of .txt files, one document each, read in the order of their names, makes
    the same tokens as the documents in a .jsonl."""
    make("fineweb_edu", write_txt_folder(tmp_path / "txt", DOCS), tmp_path / "out")
    assert read_bins(tmp_path / "out") == expected_splits(DOCS, 3)


def test_parquet_files(tmp_path):
    """The Hugging Face files: a 'text' column among others, two files of a folder read in
    the order of their names (needs pyarrow: skipped without it)."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow
    os.makedirs(tmp_path / "pq")
    pq.write_table(pyarrow.table({"url": ["u"] * 4, "text": DOCS[:4]}), tmp_path / "pq" / "part0.parquet")
    pq.write_table(pyarrow.table({"url": ["u"] * 3, "text": DOCS[4:]}), tmp_path / "pq" / "part1.parquet")
    make("fineweb_edu", str(tmp_path / "pq"), tmp_path / "out")
    assert read_bins(tmp_path / "out") == expected_splits(DOCS, 3)


def test_split_does_not_depend_on_batches_or_processes(tmp_path):
    """Two tokenizer processes and batches of 3 documents write the same bytes as one
    process with batches of 1: the order, and so the split, are the source's."""
    docs = [f"document {i}: " + "the " * (i % 4) for i in range(20)]
    source = write_jsonl(tmp_path / "docs.jsonl", docs)
    make("openwebtext", source, tmp_path / "one", batch_docs=1, num_proc=1)
    make("openwebtext", source, tmp_path / "two", batch_docs=3, num_proc=2)
    assert file_bytes(tmp_path / "one") == file_bytes(tmp_path / "two")
    assert read_bins(tmp_path / "one") == expected_splits(docs, 3)


def test_max_tokens_keeps_whole_documents(tmp_path):
    """max_tokens stops after the document that reaches it: documents of 3 tokens each
    ("ab" is 2 bytes, then the separator) and max_tokens=7 keep 3 documents (3, 6, 9)."""
    source = write_jsonl(tmp_path / "docs.jsonl", ["ab"] * 10)
    meta = make("fineweb_edu", source, tmp_path / "out", max_tokens=7, val_every=2)
    # by hand: documents 0 and 2 to val (6 tokens), document 1 to train (3 tokens)
    assert read_bins(tmp_path / "out") == {"train": [97, 98, EOT], "val": [97, 98, EOT] * 2}
    assert meta["documents"] == 3
    # exactly at a boundary: max_tokens=6 keeps 2 documents
    assert make("fineweb_edu", source, tmp_path / "six", max_tokens=6, val_every=2)["documents"] == 2


def test_an_empty_split_is_an_error(tmp_path):
    """One document goes to val (document 0) and leaves train empty: an error, and no .bin
    file takes its final name."""
    module = load_prepare("fineweb_edu")
    with pytest.raises(module.PrepareError, match="train split is empty"):
        make("fineweb_edu", write_jsonl(tmp_path / "docs.jsonl", ["only one"]), tmp_path / "out")
    assert not {"train.bin", "val.bin", "meta.pkl"} & set(os.listdir(tmp_path / "out"))


def test_download_path_through_the_datasets_library(tmp_path, monkeypatch):
    """The download path (HubDataset) on a local folder, which the datasets library loads
    as it loads a dataset of the Hub: downloaded to its cache (two processes) or streamed,
    the same tokens as local files give. Offline; skipped without the library."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    pytest.importorskip("datasets")
    os.makedirs(tmp_path / "hub")
    write_jsonl(tmp_path / "hub" / "train.jsonl", DOCS)  # the library takes the split from the name
    module = load_prepare("openwebtext")
    for streaming in (False, True):
        out = tmp_path / f"out_{streaming}"
        source = module.HubDataset(str(tmp_path / "hub"), streaming=streaming, num_proc=2)
        module.web_text.prepare(source, str(out), ENC, val_every=3, progress=False)
        assert read_bins(out) == expected_splits(DOCS, 3)


# -----------------------------------------------------------------------------
# an interrupted run, and runs again


class CountingEncoding(tiktoken.Encoding):
    """ENC, counting the documents it encodes."""

    def __init__(self):
        super().__init__(name="tiny", pat_str=ENC._pat_str, mergeable_ranks=ENC._mergeable_ranks,
                         special_tokens=ENC._special_tokens)
        self.calls = 0

    def encode_ordinary(self, text):
        self.calls += 1
        return super().encode_ordinary(text)


def interrupt_after(monkeypatch, web_text, n):
    """The local files' documents, until the n-th is asked for: then Ctrl-C."""
    real_open = web_text.LocalFiles.open

    def open_then_interrupt(self):
        texts, total = real_open(self)

        def interrupted():
            for i, text in enumerate(texts):
                if i == n:
                    raise KeyboardInterrupt
                yield text
        return interrupted(), total
    monkeypatch.setattr(web_text.LocalFiles, "open", open_then_interrupt)


def test_rerun_after_an_interruption_goes_on_and_gives_the_same_files(tmp_path, monkeypatch):
    """Ctrl-C at the 6th document (batches of 2, a checkpoint after each): nothing at the
    names train.py reads, progress.json counts the 4 documents of the 2 whole batches. Bytes
    written after the checkpoint (appended here) are cut off; the rerun encodes the 3
    documents left, and the files equal an uninterrupted run's. A rerun after that
    encodes nothing and leaves the files as they are."""
    source = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    make("fineweb_edu", source, tmp_path / "straight")
    out = tmp_path / "out"
    module = load_prepare("fineweb_edu")
    interrupt_after(monkeypatch, module.web_text, 5)
    with pytest.raises(KeyboardInterrupt):
        make("fineweb_edu", source, out, checkpoint_tokens=1)
    assert sorted(os.listdir(out)) == ["progress.json", "train.bin.tmp", "val.bin.tmp"]
    assert json.load(open(out / "progress.json"))["documents"] == 4
    for name in ("train.bin.tmp", "val.bin.tmp"):
        with open(out / name, "ab") as f:
            f.write(b"\x01\x00" * 5)  # tokens of a batch whose checkpoint never came
    monkeypatch.undo()
    counting = CountingEncoding()
    make("fineweb_edu", source, out, encoding=counting, checkpoint_tokens=1)
    assert counting.calls == len(DOCS) - 4
    assert file_bytes(out) == file_bytes(tmp_path / "straight")
    mtimes = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)}
    again = CountingEncoding()
    make("fineweb_edu", source, out, encoding=again)
    assert again.calls == 0
    assert {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)} == mtimes


def test_other_settings_start_over(tmp_path, monkeypatch):
    """A finished dataset rerun with another val_every, interrupted: its meta.pkl and .bin
    files are gone at once (train.py must not take the folder for a dataset). Rerun with
    that val_every: the files equal a straight run's with it, not a continuation of the
    interrupted one, whose progress was for other settings."""
    source = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    out = tmp_path / "out"
    make("openwebtext", source, out, val_every=3)
    module = load_prepare("openwebtext")
    interrupt_after(monkeypatch, module.web_text, 5)
    with pytest.raises(KeyboardInterrupt):
        make("openwebtext", source, out, val_every=2, checkpoint_tokens=1)
    assert sorted(os.listdir(out)) == ["progress.json", "train.bin.tmp", "val.bin.tmp"]
    with pytest.raises(ValueError, match="not found"):
        open_dataset("out", str(out), block_size=4, vocab_size=50304)
    monkeypatch.undo()
    make("openwebtext", source, out, val_every=4)
    assert read_bins(out) == expected_splits(DOCS, 4)


# -----------------------------------------------------------------------------
# errors a user can fix: one line


def one_line(message):
    return "\n" not in message and "Traceback" not in message


def test_download_without_the_datasets_library_says_what_to_install(monkeypatch):
    module = load_prepare("fineweb_edu")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets raises ImportError
    with pytest.raises(module.PrepareError) as e:
        module.HubDataset(module.HUB_PATH, "sample-10BT").open()
    assert "pip install datasets" in str(e.value) and "--input" in str(e.value) and one_line(str(e.value))


def test_parquet_without_pyarrow_says_what_to_install(monkeypatch, tmp_path):
    path = tmp_path / "part.parquet"
    path.write_bytes(b"PAR1")
    module = load_prepare("fineweb_edu")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(module.PrepareError, match="pip install pyarrow"):
        module.prepare(input_path=str(path), out_dir=str(tmp_path / "out"), encoding=ENC)


def test_a_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    module = load_prepare("openwebtext")
    with pytest.raises(module.PrepareError) as e:
        make("openwebtext", str(path), tmp_path / "out")
    assert f"{path}, line 2" in str(e.value) and "'text'" in str(e.value)


def test_no_bpe_file_is_one_line(monkeypatch):
    module = load_prepare("fineweb_edu")

    def offline(name):
        raise ConnectionError("Max retries exceeded\nwith url: openaipublic...")
    monkeypatch.setattr(module.web_text.tiktoken, "get_encoding", offline)
    with pytest.raises(module.PrepareError) as e:
        module.web_text.gpt2_encoding()
    assert "BPE file" in str(e.value) and one_line(str(e.value))


@pytest.mark.parametrize("script", SCRIPTS)
def test_cli_errors_are_one_line(script, tmp_path):
    """No network: the Hugging Face libraries are told to stay offline, so the download
    fails at once (or datasets is missing); either way one line naming --input. A missing
    --input path is one line too. Nothing is written."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    prepare_py = os.path.join(ROOT, "data", script, "prepare.py")
    for args, fragment in ([[], "--input"], [["--input", str(tmp_path / "missing")], "input not found"]):
        r = subprocess.run([sys.executable, prepare_py, "--out_dir", str(tmp_path / "out"), *args],
                           capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 1, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], r.stderr
    assert not os.path.exists(tmp_path / "out")


def test_gpt2_tokens_when_the_bpe_file_is_cached(tmp_path, monkeypatch):
    """With GPT-2's own encoding (encoding=None): the tokens are tiktoken's GPT-2 tokens of
    each document, then 50256. Skipped unless tiktoken has the BPE file cached: reading it
    from the network is made to fail here."""
    def no_network(url):
        raise ConnectionError("the tests do not use the network")
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    try:
        gpt2 = tiktoken.get_encoding("gpt2")
    except Exception:
        pytest.skip("tiktoken's GPT-2 BPE file is not cached")
    module = load_prepare("fineweb_edu")
    meta = module.prepare(input_path=write_jsonl(tmp_path / "docs.jsonl", DOCS), out_dir=str(tmp_path / "out"),
                          val_every=3, progress=False)
    expected = {"train": [], "val": []}
    for i, doc in enumerate(DOCS):
        expected["val" if i % 3 == 0 else "train"] += gpt2.encode_ordinary(doc) + [50256]
    assert read_bins(tmp_path / "out") == expected
    assert meta["vocab_size"] == 50257 and meta["encoding"] == "gpt2"


# -----------------------------------------------------------------------------
# the recipes: config/train_gpt2_*.py

RECIPES = ["train_gpt2_dense", "train_gpt2_moe8", "train_gpt2_moe64"]
GPT2_VOCAB = 50257  # what meta.pkl of the web-text datasets says
H100_TFLOPS = 989  # H100 SXM, dense bf16 (system.PEAK_TFLOPS)


@pytest.fixture
def one_thread():
    """Models this small gain nothing from a second thread, and on a busy machine every op
    would wait for it (ten times slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def recipe_path(name):
    return os.path.join(ROOT, "config", f"{name}.py")


def recipe(name):
    """The recipe's settings, as configurator.py reads a config file."""
    namespace = {"__file__": recipe_path(name)}
    exec(open(recipe_path(name)).read(), namespace)
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and isinstance(v, (int, float, bool, str, type(None)))}


def model_config(settings, **shape):
    keys = {f.name for f in fields(GPTConfig)}
    return GPTConfig(**{**{k: v for k, v in settings.items() if k in keys}, "vocab_size": GPT2_VOCAB, **shape})


def memory(c, batch_size):
    """The formulas in config/train_gpt2_dense.py's comments, typed in again (bytes; c: a GPTConfig)."""
    d, L, V, T, E, k, h = c.n_embd, c.n_layer, c.vocab_size, c.block_size, c.n_exp, c.top_k, c.expert_hidden
    if c.use_moe:
        ffn_params = 2 * E * d * h + E * d + 2 * d * c.n_shared_exp * h
        ffn_bytes = 8 * d + 6 * k * d + 4 * k * h  # per token and layer
    else:
        ffn_params = 8 * d * d
        ffn_bytes = 22 * d
    P = V * d + T * d + d + L * (4 * d * d + 2 * d + ffn_params)
    N = batch_size * T
    layer_bytes = 14 * d + ffn_bytes
    activations = layer_bytes * N * L
    head = 12 * N * V
    return dict(P=P, states=16 * P, bf16_weights=2 * P, layer_bytes=layer_bytes, activations=activations,
                head=head, total=18 * P + activations + head)


def test_recipes_are_twins_of_the_published_recipe():
    """The three recipes differ in their feed-forward blocks alone (and where they write),
    and the rest is the recipe their comments cite: GPT-2 small, 524,288 tokens an
    iteration, lr 6e-4 to 6e-5 after 700 warm-up steps, 18,865 steps, AdamW (0.9, 0.95),
    weight decay 0.1, clipping at 1.0."""
    dense, moe8, moe64 = (recipe(name) for name in RECIPES)
    own = {"n_exp", "top_k", "router", "out_dir", "wandb_run_name"}
    for moe in (moe8, moe64):
        assert {k: v for k, v in moe.items() if k not in own} == {k: v for k, v in dense.items() if k not in own}
    cited = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, learning_rate=6e-4, min_lr=6e-5,
                 warmup_iters=700, max_iters=18865, lr_decay_iters=18865, beta1=0.9, beta2=0.95, weight_decay=0.1,
                 grad_clip=1.0, dropout=0.0, dataset="fineweb_edu")
    assert {k: dense[k] for k in cited} == cited
    assert (dense["n_exp"], moe8["n_exp"], moe8["top_k"], moe64["n_exp"], moe64["top_k"]) == (1, 8, 2, 64, 8)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_figures_are_the_formulas_and_the_model(name):
    """At full size (on the meta device: no memory used), the parameter count of the real
    model equals the formula and the figure in the comments; every memory figure, the
    tokens per iteration, the FLOPs a token and the H100 estimate in the comments are the
    formulas' values; the MoE computes what the dense MLP does."""
    settings = recipe(name)
    c = model_config(settings)
    with torch.device("meta"):
        model = GPT(c)
    m = memory(c, settings["batch_size"])
    assert sum(p.numel() for p in model.parameters()) == m["P"]
    text = open(recipe_path(name)).read()
    GB = 1e9
    for figure in (f"P = {m['P']:,}", f"16 P = {m['states'] / GB:.2f} GB", f"2 P = {m['bf16_weights'] / GB:.2f} GB",
                   f"= {m['activations'] / GB:.2f} GB", f"12 N V = {m['head'] / GB:.2f} GB",
                   f"at most {m['total'] / GB:.1f} GB"):
        assert figure in text, figure
    if c.use_moe:
        assert f"{model.get_num_active_params(non_embedding=False):,} of them active per token" in text
        assert f"= {m['layer_bytes'] // c.n_embd}d bytes per token and layer" in text
        assert c.top_k * c.expert_hidden == 4 * c.n_embd  # the dense MLP's compute per token
        # a logging step also keeps each layer's expert outputs (bf16) for the metrics
        kept = 2 * c.top_k * c.n_embd * settings["batch_size"] * c.block_size * c.n_layer
        if "2kd * N * L =" in text:
            assert f"2kd * N * L = {kept / GB:.2f} GB" in text
            assert f"({(m['total'] + kept) / GB:.1f} GB on a logging step)" in text
    if name == "train_gpt2_moe8":  # the top-1 variant it names has its own figures
        switch = model_config({**settings, "router": "switch", "top_k": 1})
        s = memory(switch, settings["batch_size"])
        assert (f"(switch: P = {s['P']:,}, {s['layer_bytes'] // c.n_embd}d bytes per token and layer, "
                f"at most {s['total'] / GB:.1f} GB)") in text
    tokens_per_iter = settings["batch_size"] * settings["block_size"] * settings["gradient_accumulation_steps"]
    assert tokens_per_iter == 524_288 and "524,288 tokens an iteration" in open(recipe_path("train_gpt2_dense")).read()
    # the FLOPs of train.py's MFU (PaLM): 6 per active parameter, 12*L*d*T for attention
    flops = 6 * model.get_num_active_params() + 12 * c.n_layer * c.n_embd * c.block_size
    assert f"{flops / 1e6:.1f}M FLOPs a token" in text
    total_flops = settings["max_iters"] * tokens_per_iter * flops
    assert f"{total_flops:.2e}".replace("e+", "e") + " FLOPs" in text
    mfu = int(re.search(r"assumed (\d+)% MFU", text).group(1)) / 100
    hours = total_flops / (mfu * H100_TFLOPS * 1e12) / 3600
    assert f"about {hours:.1f} h on one H100 SXM" in text
    assert "not measured yet" in text


class LiveStorages(TorchDispatchMode):
    """The largest total of tensor storages alive at once among those created while it is on."""

    def __init__(self):
        super().__init__()
        self.sizes, self.peak = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for ref in [ref for ref in self.sizes if ref.expired()]:
            del self.sizes[ref]
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.sizes.setdefault(StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes())
        self.peak = max(self.peak, sum(self.sizes.values()))
        return out


def saved_for_backward(model, x):
    """Bytes of the distinct tensors autograd saves in one forward (the weights excluded),
    in bf16 autocast: the activations."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, x)
    return sum(saved.values())


@pytest.mark.parametrize("name", RECIPES)
def test_memory_formula_at_reduced_width(name, one_thread):
    """The recipe's experts and router at n_embd 128, 2 layers, block 64, vocabulary 512:
    - P: the formula, exactly;
    - after one AdamW step, its two moments are 8 P bytes (fp32) and the gradients 4 P;
    - activations: what autograd saves per token and layer (bf16 autocast on the CPU,
      measured at 1 and 2 layers and 2 and 4 sequences, so the weights' bf16 copies and the
      head cancel out) is the formula's, plus at most 8% (router scores, indices, LayerNorm
      statistics, which the formula leaves out);
    - loosely: the most memory one forward+backward holds at once beyond the weights and
      optimizer state lies between half the formula's bound and the bound (gradients 4 P,
      bf16 weights 2 P, activations, head): the bound adds up what is alive at different moments."""
    settings = recipe(name)
    shape = dict(n_embd=128, n_head=2, block_size=64, vocab_size=512, expert_impl="auto")
    saved = {}
    for n_layer in (1, 2):
        torch.manual_seed(0)
        model = GPT(model_config(settings, n_layer=n_layer, **shape))
        for batch in (2, 4):
            saved[n_layer, batch] = saved_for_backward(model, torch.randint(0, 512, (batch, 64)))
    per_token_and_layer = (saved[2, 4] - saved[2, 2] - saved[1, 4] + saved[1, 2]) / (2 * 64)
    c = model.config
    m = memory(c, batch_size=4)
    assert sum(p.numel() for p in model.parameters()) == m["P"]
    assert 1.0 <= per_token_and_layer / m["layer_bytes"] <= 1.08, (per_token_and_layer, m["layer_bytes"])

    x = torch.randint(0, 512, (4, 64))
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95))
    with LiveStorages() as live:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, x)[1]
        loss.backward()
    bound = 4 * m["P"] + m["bf16_weights"] + m["activations"] + m["head"]
    assert 0.5 * bound <= live.peak <= bound, (live.peak, bound)
    assert sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()) == 4 * m["P"]
    optimizer.step()
    moments = [t for state in optimizer.state.values() for key, t in state.items() if key in ("exp_avg", "exp_avg_sq")]
    assert all(t.dtype == torch.float32 for t in moments)
    assert sum(t.numel() * t.element_size() for t in moments) == 8 * m["P"]


def compared_runs(name):
    """The --key=value settings of each command in the recipe's comments that runs it."""
    runs = []
    for line in open(recipe_path(name)):
        command = re.match(rf"#\s+python train.py config/{name}.py(.*)", line)
        if command:
            settings = {}
            for key, value in re.findall(r"--(\w+)=(\S+)", command.group(1).split("#")[0]):
                try:
                    settings[key] = ast.literal_eval(value)
                except (SyntaxError, ValueError):
                    settings[key] = value
            runs.append(settings)
    return runs


@pytest.mark.parametrize("name", ["train_gpt2_moe8", "train_gpt2_moe64"])
def test_routers_named_in_the_recipes_build_and_train(name, one_thread):
    """Every run the recipe names (its routers, and the variants) builds at a reduced width
    with the recipe's experts, trains a step to a finite loss, spends the dense MLP's
    compute per token, and has the parameters of the formula."""
    runs = compared_runs(name)
    assert len(runs) >= 4 and {run.get("router", "topk") for run in runs} >= {"topk", "aux_free", "gatepro"}
    for run in runs:
        settings = {**recipe(name), **run}
        torch.manual_seed(0)
        model = GPT(model_config(settings, n_layer=2, n_embd=64, n_head=2, block_size=32, vocab_size=64))
        c = model.config
        assert c.n_exp == recipe(name)["n_exp"], run
        assert (c.top_k + c.n_shared_exp) * c.expert_hidden == 4 * c.n_embd, run  # the dense MLP's compute
        assert sum(p.numel() for p in model.parameters()) == memory(c, 1)["P"], run
        optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95))
        x = torch.randint(0, 64, (2, 32))
        _, lm_loss, router_losses, _ = model(x, x)
        (lm_loss + sum(router_losses.values())).backward()
        optimizer.step()
        assert torch.isfinite(lm_loss), run


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_two_steps(name, runner, tiny_data, tmp_path):
    """train.py with the recipe, at a reduced width, block and batch, on the tiny dataset
    (its meta.pkl's vocabulary replaces GPT-2's): the experts, top-k and router are the
    recipe's; two steps and an eval are logged."""
    settings = recipe(name)
    result = runner.run([recipe_path(name), '--device=cpu', '--n_layer=2', '--n_head=2', '--n_embd=32',
                         '--block_size=32', '--batch_size=2', '--gradient_accumulation_steps=2', '--max_iters=2',
                         '--eval_interval=2', '--eval_iters=1', '--log_interval=1', f'--data_dir={tiny_data}',
                         f'--out_dir={tmp_path / "out"}'])
    assert result.returncode == 0, result.stderr
    if settings["n_exp"] > 1:
        assert f"router: topk, {settings['n_exp']} experts, top-{settings['top_k']}" in result.stdout
    logged = [(r["iter"], r["split"]) for r in records(tmp_path / "out")]
    assert logged == [(0, "val"), (0, "train"), (1, "train"), (2, "val")]
    assert (tmp_path / "out" / "ckpt.pt").exists()  # always_save_checkpoint
