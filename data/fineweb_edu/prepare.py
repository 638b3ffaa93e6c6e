"""
FineWeb-Edu as GPT-2 BPE tokens, in nanoGPT's format: train.bin / val.bin hold uint16
token ids, meta.pkl vocab_size (50257) and the encoding's name. FineWeb-Edu
(HuggingFaceFW/fineweb-edu) is the educational part of FineWeb, the web text that llm.c,
modded-nanogpt and nanochat train GPT-2-sized models on. By default its 10B-token sample;
--max_tokens keeps fewer.

    python data/fineweb_edu/prepare.py                        # download the 10BT sample (pip install datasets)
    python data/fineweb_edu/prepare.py --max_tokens=1e9       # the first ~1B tokens only
    python data/fineweb_edu/prepare.py --sample=100BT --streaming   # another sample, streamed, less disk
    python data/fineweb_edu/prepare.py --input=DIR            # local copies (.parquet, .jsonl, .txt), offline

The 10BT sample downloads tens of GB of parquet to the datasets cache (--streaming reads
it from the network instead) and writes about 20 GB of .bin files. Each document ends
with <|endoftext|>; 1 document in 2000 goes to val. Interrupted? Run the same command
again: it goes on from its last checkpoint (data/web_text.py says how).

tiktoken fetches the GPT-2 BPE file from the network the first time and caches it
(see TIKTOKEN_CACHE_DIR), so the very first run needs the network even with --input.
"""
import os
import sys

# the download, local files, tokenizing and writing are shared with data/openwebtext/prepare.py
DATA_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if DATA_DIR not in sys.path:
    sys.path.insert(0, DATA_DIR)
import web_text  # noqa: E402
from web_text import PrepareError, HubDataset, LocalFiles, parse_args, run_cli  # noqa: E402, F401

HERE = os.path.dirname(os.path.abspath(__file__))
HUB_PATH = "HuggingFaceFW/fineweb-edu"
SAMPLES = ("10BT", "100BT", "350BT")  # the dataset's sample-* configurations


def prepare(input_path=None, out_dir=None, sample="10BT", max_tokens=None, encoding=None, revision=None,
            streaming=False, **options):
    """Write train.bin, val.bin, meta.pkl into out_dir (default: this folder); return meta.
    input_path: local files instead of the download; encoding: a tiktoken.Encoding, None
    for GPT-2's; options: web_text.prepare's (val_every, num_proc, ...)."""
    if sample not in SAMPLES:
        raise PrepareError(f"sample={sample!r} must be one of {', '.join(SAMPLES)}")
    if input_path is not None:
        source = LocalFiles(input_path)
    else:
        source = HubDataset(HUB_PATH, f"sample-{sample}", revision, streaming, options.get("num_proc"))
    return web_text.prepare(source, out_dir or HERE, encoding, max_tokens, **options)


def main():
    args = parse_args(__doc__, lambda parser: parser.add_argument(
        "--sample", default="10BT", choices=SAMPLES, help="which sample of FineWeb-Edu to download"))
    prepare(args.input, args.out_dir, args.sample, args.max_tokens, revision=args.revision, streaming=args.streaming,
            val_every=args.val_every, num_proc=args.num_proc)


if __name__ == "__main__":
    run_cli(main)
