"""
Tiny Shakespeare as GPT-2 BPE tokens (tiktoken), in nanoGPT's format:
train.bin / val.bin hold uint16 token ids. Unlike nanoGPT we also write meta.pkl
(vocab_size = encoding.n_vocab, the encoding's name), so train.py takes the vocab
size from here instead of falling back to its padded default of 50304.

    python data/shakespeare/prepare.py                   # input.txt here, else download
    python data/shakespeare/prepare.py --input my.txt    # any local text file

tiktoken fetches the GPT-2 BPE file from the network the first time and caches it
(see TIKTOKEN_CACHE_DIR), so the very first run needs the network even with --input.
"""
import os
import pickle
import sys

import numpy as np
import tiktoken

# the download-or-local-file logic is shared with data/shakespeare_char/prepare.py
DATA_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if DATA_DIR not in sys.path:
    sys.path.insert(0, DATA_DIR)
import download  # noqa: E402
from download import TINY_SHAKESPEARE_URL, PrepareError, load_text, parse_args, run_cli, write_atomic  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def gpt2_encoding():
    return download.gpt2_encoding(", or use data/shakespeare_char which works offline with --input PATH")


def prepare(input_path=None, out_dir=None, encoding=None, url=TINY_SHAKESPEARE_URL):
    """
    Write train.bin, val.bin, meta.pkl into out_dir (default: this folder); return meta.
    encoding: any tiktoken.Encoding; None means GPT-2's.
    """
    out_dir = out_dir or HERE
    text = load_text(input_path, out_dir, url)
    if len(text) < 2:
        raise PrepareError("input text is too short to split into train and val")
    enc = encoding if encoding is not None else gpt2_encoding()
    if enc.n_vocab > 65536:
        raise PrepareError(f"encoding {enc.name!r} has {enc.n_vocab:,} tokens; ids would not fit in uint16")

    # split the text 90/10 first and encode each part on its own, as nanoGPT does;
    # encode_ordinary treats text like "<|endoftext|>" as plain characters
    n = int(len(text) * 0.9)
    os.makedirs(out_dir, exist_ok=True)
    for split, part in (("train", text[:n]), ("val", text[n:])):
        ids = np.array(enc.encode_ordinary(part), dtype=np.int64)
        if len(ids) and ids.max() >= 65536:  # belt and braces: n_vocab should already guarantee this
            raise PrepareError(f"token id {ids.max()} does not fit in uint16")
        print(f"{split} has {len(ids):,} tokens")
        write_atomic(os.path.join(out_dir, f"{split}.bin"), ids.astype(np.uint16).tobytes())

    meta = {"vocab_size": enc.n_vocab, "encoding": enc.name}
    # meta.pkl last: its presence means the dataset is complete
    write_atomic(os.path.join(out_dir, "meta.pkl"), pickle.dumps(meta))
    return meta


def main():
    args = parse_args(__doc__)
    prepare(args.input, args.out_dir, url=args.url)


if __name__ == "__main__":
    run_cli(main)
