"""
What the web-text datasets share (data/fineweb_edu, data/openwebtext): documents from a
Hugging Face dataset or from local files, GPT-2 BPE through tiktoken, and train.bin /
val.bin written as the documents come, so the corpus is never held in memory.

The format is nanoGPT's: uint16 token ids, one stream per split. Every document is
followed by GPT-2's <|endoftext|> (id 50256), as in nanoGPT's openwebtext/prepare.py;
text inside a document that reads "<|endoftext|>" is encoded as plain characters
(encode_ordinary), so the separators are the only such ids. Document i, counted from 0
in the source's order, goes to val when i % val_every == 0, else to train: the split
depends on the order of the documents alone, is the same on every run, and samples the
whole source rather than its head.

Local files (--input PATH, a file or a folder searched for them; offline):
    .parquet   a 'text' column (the Hugging Face files, read with pyarrow: pip install pyarrow)
    .jsonl     one JSON object per line, with a 'text' field
    .txt       one document per file (OpenWebText is distributed as such files)
A folder's files are read in the order of their sorted paths.

Interrupted? Run the same command again. The tokens go to train.bin.tmp and val.bin.tmp;
every checkpoint_tokens tokens the files are synced to disk and progress.json records how
many documents they hold. A rerun with the same settings cuts the .tmp files back to that
point and goes on from the next document (a run with other settings starts over). The
.tmp files become train.bin and val.bin only at the end, and meta.pkl, written last, marks
a finished dataset: a rerun then does nothing. So a half-written .bin is never at the
name train.py reads.
"""
import argparse
import collections
import contextlib
import itertools
import json
import multiprocessing
import os
import pickle
import signal
import sys

import numpy as np
import tiktoken
from tqdm import tqdm

from download import PrepareError, gpt2_encoding, one_line, write_atomic

SPLITS = ("train", "val")
VAL_EVERY = 2000  # 1 document in 2000 to val: nanoGPT's OpenWebText split (test_size=0.0005)
BATCH_DOCS = 512  # documents per batch handed to a tokenizer process
CHECKPOINT_TOKENS = 2**26  # sync the .tmp files and record the progress every ~64M tokens (128 MB)
LOCAL_SUFFIXES = (".parquet", ".jsonl", ".txt")


# -----------------------------------------------------------------------------
# where the documents come from: identity() says which documents (a rerun with another
# identity starts over), open() returns (an iterator of texts, their number or None)


class LocalFiles:
    """The documents of local .parquet, .jsonl and .txt files: path is one such file or a
    folder, searched with its subfolders."""

    def __init__(self, path):
        if os.path.isfile(path):
            self.files = [path]
        elif os.path.isdir(path):
            self.files = sorted(os.path.join(root, name) for root, _, names in os.walk(path)
                                for name in names if name.endswith(LOCAL_SUFFIXES))
            if not self.files:
                raise PrepareError(f"no .parquet, .jsonl or .txt files in {path}")
        else:
            raise PrepareError(f"input not found: {path}")
        for f in self.files:
            if not f.endswith(LOCAL_SUFFIXES):
                raise PrepareError(f"{f} is not a .parquet, .jsonl or .txt file")

    def identity(self):
        return ["local files", [[os.path.abspath(f), os.path.getsize(f)] for f in self.files]]

    def open(self):
        if any(f.endswith(".parquet") for f in self.files):
            require_pyarrow(self.files[0])
        return (text for path in self.files for text in read_file(path)), None


def require_pyarrow(path):
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise PrepareError(f"reading .parquet files ({path}) needs pyarrow: pip install pyarrow "
                           f"(or give .jsonl or .txt files)") from None


def read_file(path):
    """The texts of one local file, one at a time."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        parquet = pq.ParquetFile(path)
        if "text" not in parquet.schema_arrow.names:
            raise PrepareError(f"{path} has no 'text' column (it has {', '.join(parquet.schema_arrow.names)})")
        for batch in parquet.iter_batches(batch_size=BATCH_DOCS, columns=["text"]):
            yield from batch.column(0).to_pylist()
    elif path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    text = record["text"]
                except (ValueError, KeyError, TypeError):
                    raise PrepareError(f"{path}, line {n}: not a JSON object with a 'text' field") from None
                yield text
    else:
        with open(path, encoding="utf-8") as f:
            yield f.read()


class HubDataset:
    """The 'train' split of a Hugging Face dataset, through the datasets library (pip
    install datasets), downloaded to its cache first, or streamed with streaming=True."""

    def __init__(self, path, name=None, revision=None, streaming=False, num_proc=None):
        self.path, self.name, self.revision, self.streaming, self.num_proc = path, name, revision, streaming, num_proc

    def identity(self):  # streamed or downloaded, the documents are the same
        return ["Hugging Face dataset", self.path, self.name, self.revision]

    def open(self):
        try:
            import datasets
        except ImportError:
            raise PrepareError(f"downloading {self.path} needs the Hugging Face datasets library: pip install "
                               f"datasets (or pass local copies of its files with --input PATH)") from None
        print(f"loading {self.path}" + (f" ({self.name})" if self.name else "")
              + (", streaming" if self.streaming else ", downloading to the datasets cache first"))
        try:
            ds = datasets.load_dataset(self.path, name=self.name, split="train", revision=self.revision,
                                       streaming=self.streaming, num_proc=None if self.streaming else self.num_proc)
        except Exception as e:  # offline, no such dataset, a script-based dataset, ...: all one line
            raise PrepareError(f"could not load {self.path} ({one_line(e)}); pass local copies of its files "
                               f"with --input PATH") from None
        if hasattr(ds, "select_columns"):
            ds = ds.select_columns(["text"])  # skip decoding the other columns (url, scores, ...)
        return self.texts(ds), None if self.streaming else len(ds)

    def texts(self, ds):
        try:
            for row in ds:
                yield row["text"]
        except OSError as e:  # a connection lost while streaming
            raise PrepareError(f"reading {self.path} failed ({one_line(e)}); run the same command again to go on "
                               f"from the last checkpoint") from None


# -----------------------------------------------------------------------------
# tokenizing: batches of documents, in order, in num_proc processes


_worker_encoding = None


def _start_worker(encoding):
    global _worker_encoding
    _worker_encoding = encoding
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle


def encode_documents(texts, encoding=None):
    """(tokens, lengths): every text's GPT-2 tokens followed by <|endoftext|>, one uint16
    array for the batch, and each document's length in it (separator included)."""
    enc = encoding or _worker_encoding
    ids = [enc.encode_ordinary(text or "") for text in texts]  # a missing text (None) is an empty document
    lengths = np.array([len(x) + 1 for x in ids], dtype=np.int64)
    eot = [enc.eot_token]
    tokens = np.fromiter(itertools.chain.from_iterable(x + eot for x in ids), dtype=np.uint16, count=lengths.sum())
    return tokens, lengths


def tokenized(texts, enc, batch_docs, num_proc):
    """encode_documents of each batch of batch_docs texts, in the texts' order. With
    num_proc > 1 the batches are encoded in a process pool, at most 2 * num_proc batches
    ahead of the one being written (Pool.imap would read the whole source ahead)."""
    batches = iter(lambda: list(itertools.islice(texts, batch_docs)), [])
    if num_proc <= 1:
        for batch in batches:
            yield encode_documents(batch, enc)
        return
    with multiprocessing.Pool(num_proc, initializer=_start_worker, initargs=(enc,)) as pool:
        pending = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(encode_documents, (batch,)))
            if len(pending) > 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# -----------------------------------------------------------------------------
# writing


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module, name):  # meta.pkl holds plain values only: run nothing from it
        raise pickle.UnpicklingError(f"{module}.{name}")


def finished_meta(out_dir, settings):
    """meta.pkl of out_dir when it was written with these settings and both .bin files are
    whole, else None."""
    try:
        with open(os.path.join(out_dir, "meta.pkl"), "rb") as f:
            meta = _PlainUnpickler(f).load()
        whole = all(os.path.getsize(os.path.join(out_dir, f"{s}.bin")) == 2 * meta[f"{s}_tokens"] for s in SPLITS)
        return meta if whole and meta["settings"] == settings else None
    except Exception:  # missing, foreign or damaged: not a finished dataset of these settings
        return None


def read_progress(path, settings, tmp_paths):
    """The state progress.json recorded, when it is for these settings and the .tmp files
    hold at least what it counts; else None (start over)."""
    try:
        with open(path) as f:
            state = json.load(f)
        whole = all(os.path.getsize(tmp_paths[s]) >= 2 * state["tokens"][s] for s in SPLITS)
        if state["settings"] == settings and whole:
            return state
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def prepare(source, out_dir, encoding=None, max_tokens=None, val_every=VAL_EVERY, num_proc=1,
            batch_docs=BATCH_DOCS, checkpoint_tokens=CHECKPOINT_TOKENS, progress=True):
    """Write train.bin, val.bin and meta.pkl of source's documents into out_dir; return meta.
    encoding: a tiktoken.Encoding with an <|endoftext|> token, None for GPT-2's.
    max_tokens: stop after the document that brings the total (both splits, separators
    included) to max_tokens; None = every document. See the module's docstring for the
    split, the separator and what a rerun after an interruption does."""
    if val_every < 2:
        raise PrepareError(f"val_every={val_every} must be >= 2 (1 document in val_every goes to val)")
    if max_tokens is not None and max_tokens < 1:
        raise PrepareError(f"max_tokens={max_tokens} must be >= 1")
    settings = {"source": source.identity(), "encoding": encoding.name if encoding else "gpt2",
                "max_tokens": max_tokens, "val_every": val_every}
    settings = json.loads(json.dumps(settings))  # as progress.json will give it back (lists, not tuples)
    meta = finished_meta(out_dir, settings)
    if meta is not None:
        print(f"{out_dir} already holds this dataset ({meta['train_tokens']:,} train and {meta['val_tokens']:,} "
              f"val tokens); delete its meta.pkl to make it again")
        return meta
    texts, n_documents = source.open()
    enc = encoding if encoding is not None else gpt2_encoding()
    if enc.n_vocab > 65536:
        raise PrepareError(f"encoding {enc.name!r} has {enc.n_vocab:,} tokens; ids would not fit in uint16")
    if "<|endoftext|>" not in enc.special_tokens_set:
        raise PrepareError(f"encoding {enc.name!r} has no <|endoftext|> token to separate the documents")

    os.makedirs(out_dir, exist_ok=True)
    final = {s: os.path.join(out_dir, f"{s}.bin") for s in SPLITS}
    tmp = {s: final[s] + ".tmp" for s in SPLITS}
    progress_path = os.path.join(out_dir, "progress.json")
    state = read_progress(progress_path, settings, tmp)
    if state is not None:
        for s in SPLITS:  # what was written after the last checkpoint is written again
            os.truncate(tmp[s], 2 * state["tokens"][s])
        print(f"going on after {state['documents']:,} documents ({sum(state['tokens'].values()):,} tokens) "
              f"written before")
    else:
        # meta.pkl first: without it the folder is not a finished dataset, whatever else is there
        for path in (os.path.join(out_dir, "meta.pkl"), *final.values(), progress_path):
            if os.path.exists(path):
                os.remove(path)
        for s in SPLITS:
            open(tmp[s], "wb").close()
        state = {"settings": settings, "documents": 0, "tokens": {s: 0 for s in SPLITS}}
    documents, tokens = state["documents"], dict(state["tokens"])

    files = {s: open(tmp[s], "ab") for s in SPLITS}

    def checkpoint():
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
        write_atomic(progress_path, json.dumps({"settings": settings, "documents": documents,
                                                "tokens": tokens}).encode())

    done = max_tokens is not None and sum(tokens.values()) >= max_tokens
    since_checkpoint = 0
    bar = tqdm(total=n_documents, initial=documents, unit="docs", unit_scale=True,
               disable=None if progress else True, desc="tokenizing")
    remaining = itertools.islice(texts, documents, None)  # a rerun skips the documents already written
    with contextlib.ExitStack() as stack:
        for f in files.values():
            stack.enter_context(f)
        stack.enter_context(bar)
        batches = stack.enter_context(contextlib.closing(tokenized(remaining, enc, batch_docs, num_proc)))
        for batch_tokens, lengths in (batches if not done else ()):
            if max_tokens is not None:  # whole documents, up to the one that reaches max_tokens
                ends = sum(tokens.values()) + np.cumsum(lengths)
                keep = int(np.searchsorted(ends, max_tokens)) + 1
                done = keep <= len(lengths)
                lengths = lengths[:keep]
                batch_tokens = batch_tokens[:lengths.sum()]
            to_val = (documents + np.arange(len(lengths))) % val_every == 0
            token_to_val = np.repeat(to_val, lengths)
            for s, mask in (("train", ~token_to_val), ("val", token_to_val)):
                files[s].write(batch_tokens[mask].tobytes())
                tokens[s] += int(mask.sum())
            documents += len(lengths)
            bar.update(len(lengths))
            bar.set_postfix(tokens=f"{sum(tokens.values()):,}")
            since_checkpoint += len(batch_tokens)
            if since_checkpoint >= checkpoint_tokens:
                checkpoint()
                since_checkpoint = 0
            if done:
                break
        checkpoint()  # everything on disk before the files take their final names

    for s in SPLITS:
        if tokens[s] == 0:
            raise PrepareError(f"the {s} split is empty: {documents} documents with val_every={val_every}; "
                               f"give more documents or a smaller --val_every")
    for s in SPLITS:
        os.replace(tmp[s], final[s])
    meta = {"vocab_size": enc.n_vocab, "encoding": enc.name, "eot_token": enc.eot_token, "documents": documents,
            "train_tokens": tokens["train"], "val_tokens": tokens["val"], "settings": settings}
    write_atomic(os.path.join(out_dir, "meta.pkl"), pickle.dumps(meta))  # last: the dataset is complete
    os.remove(progress_path)
    print(f"{documents:,} documents: train has {tokens['train']:,} tokens, val {tokens['val']:,} ({out_dir})")
    return meta


# -----------------------------------------------------------------------------
# the command line both scripts share


def parse_args(description, add_arguments=None):
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=None,
                        help="a local .parquet, .jsonl or .txt file, or a folder of them, instead of downloading")
    parser.add_argument("--out_dir", default=None, help="where to write the files (default: the script's folder)")
    parser.add_argument("--max_tokens", type=float, default=None,
                        help="stop after about this many tokens (whole documents), e.g. 1e9; default: all")
    parser.add_argument("--val_every", type=int, default=VAL_EVERY, help="1 document in this many goes to val")
    parser.add_argument("--num_proc", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="tokenizer processes (default: half the cores)")
    parser.add_argument("--streaming", action="store_true",
                        help="stream the download instead of saving it to the datasets cache first (less disk)")
    parser.add_argument("--revision", default=None, help="the dataset's revision (a branch, tag or commit)")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    if args.max_tokens is not None:
        args.max_tokens = int(args.max_tokens)
    return args


def run_cli(main):
    """Run main(); a PrepareError becomes 'error: ...' on stderr and exit code 1, Ctrl-C one
    line saying how to go on."""
    try:
        main()
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to go on from the last checkpoint", file=sys.stderr)
        sys.exit(130)
