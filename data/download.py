"""
Shared input handling for the datasets that come from a text file on the web.

Both Shakespeare scripts need the same three-way choice: a local file the user
named (--input), a cached input.txt next to the output, or a download. The
download is the only step that needs the network, so every way it can fail ends
in a PrepareError whose one-line message says how to work offline instead.
"""
import argparse
import os
import sys
import urllib.error
import urllib.request

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


class PrepareError(Exception):
    """A problem the user can fix (no network, wrong path); shown as one line, no traceback."""


def one_line(exc):
    # exception texts can span lines (tiktoken, HTTP errors); the CLI promises one line
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def gpt2_encoding(hint=""):
    """tiktoken's GPT-2 encoding; a PrepareError (one line, ending with hint) when its BPE
    file is neither cached nor downloadable."""
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken's fetch raises requests/OS/blob errors; all mean "no BPE file"
        raise PrepareError(
            f"could not load tiktoken's 'gpt2' encoding ({one_line(e)}); tiktoken needs the network once "
            f"to download and cache its BPE file (TIKTOKEN_CACHE_DIR){hint}"
        ) from None


def fetch(url, timeout=15):
    """Return the body of url as text. A separate function so tests can replace it."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode("utf-8")


def load_text(input_path, cache_dir, url):
    """
    The dataset's raw text: input_path if given, else cache_dir/input.txt if it
    exists, else downloaded from url (and saved as cache_dir/input.txt so the
    next run is offline).
    """
    if input_path is not None:
        if not os.path.isfile(input_path):
            raise PrepareError(f"input file not found: {input_path}")
        with open(input_path, "r", encoding="utf-8") as f:
            return f.read()
    cached = os.path.join(cache_dir, "input.txt")
    if os.path.isfile(cached):
        with open(cached, "r", encoding="utf-8") as f:
            return f.read()
    print(f"downloading {url}")
    try:
        text = fetch(url)
    except (OSError, ValueError) as e:  # URLError, timeouts and refused connections are all OSError
        raise PrepareError(
            f"could not download {url} ({one_line(e)}); "
            f"pass a local copy of the text with --input PATH"
        ) from None
    os.makedirs(cache_dir, exist_ok=True)
    write_atomic(cached, text.encode("utf-8"))
    return text


def write_atomic(path, data):
    """Write bytes so that an interrupted run never leaves a half-written file behind."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def parse_args(description):
    """The command line both Shakespeare scripts share."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=None, help="local text file to use instead of downloading")
    parser.add_argument("--out_dir", default=None, help="where to write the files (default: the script's folder)")
    parser.add_argument("--url", default=TINY_SHAKESPEARE_URL, help="where to download the text from")
    return parser.parse_args()


def run_cli(main):
    """Run main(); a PrepareError becomes 'error: ...' on stderr and exit code 1."""
    try:
        main()
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
