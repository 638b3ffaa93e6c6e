"""
Tiny Shakespeare at the character level, in nanoGPT's shakespeare_char format:
train.bin / val.bin hold uint16 character ids, meta.pkl holds vocab_size, stoi, itos.

    python data/shakespeare_char/prepare.py                   # input.txt here, else download
    python data/shakespeare_char/prepare.py --input my.txt    # any local text file, offline
"""
import os
import pickle
import sys

import numpy as np

# the download-or-local-file logic is shared with data/shakespeare/prepare.py
DATA_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if DATA_DIR not in sys.path:
    sys.path.insert(0, DATA_DIR)
from download import TINY_SHAKESPEARE_URL, PrepareError, load_text, parse_args, run_cli, write_atomic  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def prepare(input_path=None, out_dir=None, url=TINY_SHAKESPEARE_URL):
    """Write train.bin, val.bin, meta.pkl into out_dir (default: this folder); return meta."""
    out_dir = out_dir or HERE
    text = load_text(input_path, out_dir, url)
    if len(text) < 2:
        raise PrepareError("input text is too short to split into train and val")
    print(f"length of dataset in characters: {len(text):,}")

    # the vocabulary is every character that occurs, sorted, so ids are stable for a given text
    chars = sorted(set(text))
    if len(chars) > 65536:
        raise PrepareError(f"{len(chars)} distinct characters do not fit in uint16 ids")
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    print(f"vocab size: {len(chars):,}")

    # 90/10 split at the same character index as nanoGPT, so results are comparable
    n = int(len(text) * 0.9)
    os.makedirs(out_dir, exist_ok=True)
    for split, part in (("train", text[:n]), ("val", text[n:])):
        ids = np.array([stoi[c] for c in part], dtype=np.uint16)
        print(f"{split} has {len(ids):,} tokens")
        write_atomic(os.path.join(out_dir, f"{split}.bin"), ids.tobytes())

    meta = {"vocab_size": len(chars), "itos": itos, "stoi": stoi}
    # meta.pkl last: its presence means the dataset is complete
    write_atomic(os.path.join(out_dir, "meta.pkl"), pickle.dumps(meta))
    return meta


def main():
    args = parse_args(__doc__)
    prepare(args.input, args.out_dir, url=args.url)


if __name__ == "__main__":
    run_cli(main)
