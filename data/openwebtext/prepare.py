"""
OpenWebText as GPT-2 BPE tokens, as nanoGPT's data/openwebtext/prepare.py makes it:
train.bin / val.bin hold uint16 token ids, each document followed by <|endoftext|>, and
meta.pkl (vocab_size 50257, the encoding's name) beside them. OpenWebText
(Skylion007/openwebtext, about 8M documents and 9B tokens) is the open copy of GPT-2's
WebText that nanoGPT reproduces GPT-2 on.

    python data/openwebtext/prepare.py                      # download (pip install datasets)
    python data/openwebtext/prepare.py --max_tokens=1e9     # the first ~1B tokens only
    python data/openwebtext/prepare.py --input=DIR          # local copies (.parquet, .jsonl, .txt), offline

nanoGPT splits off 0.05% of the documents at random for val; here 1 document in 2000, by
position, the same split size. Interrupted? Run the same command again: it goes on from
its last checkpoint (data/web_text.py says how). If the download fails because the
datasets library no longer runs the dataset's loading script, the Hub's automatic parquet
conversion may load: --revision=refs/convert/parquet.

tiktoken fetches the GPT-2 BPE file from the network the first time and caches it
(see TIKTOKEN_CACHE_DIR), so the very first run needs the network even with --input.
"""
import os
import sys

# the download, local files, tokenizing and writing are shared with data/fineweb_edu/prepare.py
DATA_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if DATA_DIR not in sys.path:
    sys.path.insert(0, DATA_DIR)
import web_text  # noqa: E402
from web_text import PrepareError, HubDataset, LocalFiles, parse_args, run_cli  # noqa: E402, F401

HERE = os.path.dirname(os.path.abspath(__file__))
HUB_PATH = "Skylion007/openwebtext"


def prepare(input_path=None, out_dir=None, max_tokens=None, encoding=None, revision=None, streaming=False,
            **options):
    """Write train.bin, val.bin, meta.pkl into out_dir (default: this folder); return meta.
    input_path: local files instead of the download; encoding: a tiktoken.Encoding, None
    for GPT-2's; options: web_text.prepare's (val_every, num_proc, ...)."""
    if input_path is not None:
        source = LocalFiles(input_path)
    else:
        source = HubDataset(HUB_PATH, None, revision, streaming, options.get("num_proc"))
    return web_text.prepare(source, out_dir or HERE, encoding, max_tokens, **options)


def main():
    args = parse_args(__doc__)
    prepare(args.input, args.out_dir, args.max_tokens, revision=args.revision, streaming=args.streaming,
            val_every=args.val_every, num_proc=args.num_proc)


if __name__ == "__main__":
    run_cli(main)
