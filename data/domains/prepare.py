"""
The project's default dataset: a synthetic, character-level corpus that mixes five
clearly different kinds of text, with every character labelled by its domain.

Why synthetic: `python train.py` must work with no network, and a router study needs
text where "which expert should take this token?" has a known answer. Each line (a
code block may span a few lines) is one document of a single domain; documents are
interleaved at random, so every training batch sees every domain, and the labels let
train.py measure whether experts specialise by domain.

    arithmetic   37+85=122
    lists        sort 5 3 9 1 -> 1 3 5 9
    english      The small fox found a red apple near the river.
    code         for i in range(7): s += i
    records      {"name": "ada", "age": 37, "city": "oslo"}

Writes, into this folder by default:
    train.bin, val.bin                  uint16 token ids (nanoGPT format), 90/10 split
    train_domain.bin, val_domain.bin    uint8 domain id of each token, same length
    meta.pkl                            vocab_size, stoi, itos, domains, seed, answers, only

    python data/domains/prepare.py [--out_dir DIR] [--n_chars N] [--seed S] [--only NAMES]

--only=arithmetic (or a comma list, --only=arithmetic,lists) writes a narrow dataset of
those domains alone, for fine-tuning a model pretrained on all five: the vocabulary and
the domain ids are those of the full dataset, so its checkpoints load as they are.
meta['answers'] names the domains whose lines have a checkable answer, and the text
after which it starts (arithmetic: '37+85=' then '122'): train.py measures the
exact-match accuracy of greedy answers on the val split of these domains.

The output depends only on (n_chars, seed, val_fraction, only): it is byte-identical across
runs, because all randomness comes from one random.Random(seed), never the global one.
"""
import argparse
import json
import os
import pickle
import random

import numpy as np
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))

# The vocabulary is fixed (newline + printable ASCII) rather than read off the generated
# text, so it is the same for every seed and size: checkpoints trained on one sample of
# the corpus can be evaluated on another. Sorted, so '\n' is id 0 and ' ' is id 1.
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]

# ---------------------------------------------------------------------------
# word lists (a few hundred choices in all; small on purpose, so the model can learn them)

NAMES = ["ada", "bob", "mara", "ivan", "lena", "omar", "rosa", "theo", "yuki", "zane",
         "nina", "paul", "kofi", "iris", "hugo", "sara"]
CITIES = ["oslo", "lima", "rome", "kyiv", "doha", "lagos", "quito", "perth", "seoul", "cairo"]
TAGS = ["red", "new", "old", "big", "fast", "cold", "open", "rare"]
CREATURES = ["cat", "dog", "fox", "bird", "farmer", "teacher", "child", "robot", "sailor",
             "baker", "king", "queen", "wolf", "horse", "doctor", "student", "owl", "artist"]
THINGS = ["apple", "book", "letter", "stone", "song", "map", "lamp", "boat", "key",
          "window", "bread", "coin", "box", "story", "door", "cup", "rope", "umbrella"]
PLACES = ["river", "market", "garden", "hill", "house", "bridge", "forest", "station",
          "library", "harbor", "kitchen", "tower"]
ADJECTIVES = ["red", "small", "old", "quiet", "bright", "tired", "happy", "green", "heavy",
              "strange", "warm", "cold", "tall", "gentle", "brave", "empty", "little", "odd"]
# (base, past) pairs: statements use the past, questions use "did" + base
VERBS = [("see", "saw"), ("find", "found"), ("carry", "carried"), ("paint", "painted"),
         ("drop", "dropped"), ("want", "wanted"), ("open", "opened"), ("follow", "followed"),
         ("like", "liked"), ("clean", "cleaned"), ("lose", "lost"), ("build", "built"),
         ("read", "read"), ("wash", "washed"), ("watch", "watched"), ("move", "moved")]
INTRANSITIVE = ["slept", "laughed", "waited", "ran", "sang", "smiled", "left", "rested", "danced"]
ADVERBS = ["slowly", "quickly", "quietly", "often", "loudly", "happily", "again", "today"]
PREPOSITIONS = ["near", "under", "behind", "beside", "across", "into", "over", "by"]
DETERMINERS = ["the", "a", "every", "one", "my", "his", "her", "our"]

VARS = ["x", "y", "n", "s", "i", "k", "total", "count", "acc", "val"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"

# ---------------------------------------------------------------------------
# one generator per domain: rng -> one document (a string ending in "\n")


def arithmetic(rng):
    """An integer equation that is always correct, e.g. 37+85=122 or 84/12=7."""
    op = rng.choice("+-*/")
    if op == "/":  # build the quotient first so division is exact
        b, c = rng.randint(1, 20), rng.randint(0, 50)
        a = b * c
    else:
        # 1 to 3 digits for + and -, at most 2 for *, so lines stay short
        a = rng.randint(0, 10 ** rng.randint(1, 2 if op == "*" else 3) - 1)
        b = rng.randint(0, 10 ** rng.randint(1, 2 if op == "*" else 3) - 1)
        c = a + b if op == "+" else a - b if op == "-" else a * b
    return f"{a}{op}{b}={c}\n"


LIST_OPS = {
    "sort": lambda xs, key: sorted(xs, key=key),
    "rev": lambda xs, key: xs[::-1],
    "max": lambda xs, key: [max(xs, key=key)],
    "min": lambda xs, key: [min(xs, key=key)],
    "len": lambda xs, key: [str(len(xs))],
    "first": lambda xs, key: xs[:1],
    "last": lambda xs, key: xs[-1:],
    "uniq": lambda xs, key: list(dict.fromkeys(xs)),  # drop repeats, keep first occurrences
}


def lists(rng):
    """An operation on a list and its result, e.g. sort 5 3 9 1 -> 1 3 5 9."""
    op = rng.choice(list(LIST_OPS))
    n = rng.randint(2, 8)
    if rng.random() < 0.5:  # numbers, compared as numbers; a small range makes repeats for uniq
        hi = rng.choice([9, 20, 99])
        xs, key = [str(rng.randint(0, hi)) for _ in range(n)], int
    else:  # letters, compared alphabetically
        xs, key = [rng.choice(LETTERS) for _ in range(n)], None
    return f"{op} {' '.join(xs)} -> {' '.join(LIST_OPS[op](xs, key))}\n"


def _noun_phrase(rng, nouns):
    """'the small fox', 'an old key', or a name."""
    if nouns is CREATURES and rng.random() < 0.25:
        return rng.choice(NAMES).capitalize()
    words = [rng.choice(DETERMINERS)]
    if rng.random() < 0.5:
        words.append(rng.choice(ADJECTIVES))
    words.append(rng.choice(nouns))
    if words[0] == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    return " ".join(words)


def _sentence(rng):
    subject = _noun_phrase(rng, CREATURES)
    kind = rng.random()
    if kind < 0.45:  # transitive: subject verb object [place]
        s = f"{subject} {rng.choice(VERBS)[1]} {_noun_phrase(rng, THINGS)}"
        if rng.random() < 0.5:
            s += f" {rng.choice(PREPOSITIONS)} the {rng.choice(PLACES)}"
        end = "."
    elif kind < 0.65:  # intransitive: subject verb [adverb]
        s = f"{subject} {rng.choice(INTRANSITIVE)}"
        if rng.random() < 0.6:
            s += f" {rng.choice(ADVERBS)}"
        end = "."
    elif kind < 0.8:  # description
        s, end = f"{_noun_phrase(rng, THINGS)} was {rng.choice(ADJECTIVES)}", "."
    else:  # question
        s, end = f"did {subject} {rng.choice(VERBS)[0]} {_noun_phrase(rng, THINGS)}", "?"
    return s[0].upper() + s[1:] + end


def english(rng):
    """One to three sentences from a small grammar, e.g. The small fox found a red apple."""
    return " ".join(_sentence(rng) for _ in range(rng.randint(1, 3))) + "\n"


def code(rng):
    """A short, syntactically valid Python statement or block (one to four lines)."""
    v, w = rng.sample(VARS, 2)
    a, b, n = rng.randint(1, 9), rng.randint(0, 9), rng.randint(2, 12)
    f = f"f{rng.randint(0, 9)}"
    op = rng.choice("+-*")
    templates = [
        f"def {f}({v}): return {v}*{a}{op}{b}",
        f"def {f}({v}, {w}):\n    {v} = {v} {op} {w}\n    return {v} * {a}",
        f"for i in range({n}): {v} += i",
        f"for i in range({n}):\n    if i % {a + 1} == 0:\n        {v} = {v} {op} i",
        f"if {v} > {n}: {w} = {v} - {a}",
        f"if {v} > {n}:\n    {w} = {v} {op} {a}\nelse:\n    {w} = {b}",
        f"while {v} > {a}: {v} = {v} // 2",
        f"xs = [i*{a} for i in range({n})]",
        f"{v} = {f}({n}) {op} {b}",
        f"print({f}({v}), {w})",
    ]
    return rng.choice(templates) + "\n"


def records(rng):
    """A one-line JSON record with a random subset of fields, e.g. {"name": "ada", "age": 37}."""
    fields = {
        "id": lambda: rng.randint(1, 9999),
        "name": lambda: rng.choice(NAMES),
        "age": lambda: rng.randint(1, 99),
        "city": lambda: rng.choice(CITIES),
        "score": lambda: round(rng.random() * 100, 1),
        "active": lambda: rng.random() < 0.5,
        "tags": lambda: rng.sample(TAGS, rng.randint(0, 3)),
    }
    keys = rng.sample(list(fields), rng.randint(2, 5))
    return json.dumps({k: fields[k]() for k in keys}) + "\n"


# id order = order here; the weights roughly even out the share of *characters* per
# domain (arithmetic lines are ~10 characters, code blocks ~35), so no domain dominates
DOMAINS = [("arithmetic", arithmetic, 4.0), ("lists", lists, 1.5), ("english", english, 0.55),
           ("code", code, 1.1), ("records", records, 0.65)]
# domain -> the text after which its one correct answer follows, up to the end of the line
ANSWERS = {"arithmetic": "=", "lists": " -> "}

# ---------------------------------------------------------------------------


def pick_domains(only):
    """The ids (in DOMAINS) of the domains named in only, a comma-separated string; None or
    '' = all of them. An unknown name is a ValueError naming the valid ones."""
    names = [name for name, _, _ in DOMAINS]
    if not only:
        return list(range(len(DOMAINS)))
    picked = [name.strip() for name in only.split(",") if name.strip()]
    unknown = [name for name in picked if name not in names]
    if unknown or not picked:
        raise ValueError(f"--only={only!r}: {', '.join(map(repr, unknown)) or 'no name'} is not a domain; "
                         f"choose among {', '.join(names)}")
    return sorted({names.index(name) for name in picked})


def generate(n_chars, seed, progress=True, only=None):
    """Documents and their domain ids until at least n_chars characters; deterministic in seed.
    only: the domains to draw from (see pick_domains), with their usual relative weights."""
    rng = random.Random(seed)
    ids = pick_domains(only)
    generators = [g for _, g, _ in DOMAINS]
    weights = [DOMAINS[d][2] for d in ids]
    docs, labels, total = [], [], 0
    with tqdm(total=n_chars, unit="char", unit_scale=True, disable=not progress, desc="generating") as bar:
        while total < n_chars:
            # draw domains in chunks: one rng.choices call is much cheaper than many
            for d in rng.choices(ids, weights, k=1024):
                doc = generators[d](rng)
                docs.append(doc)
                labels.append(d)
                total += len(doc)
                if total >= n_chars:
                    break
            bar.update(min(total, n_chars) - bar.n)
    return docs, labels


def _write(path, array):
    # write-then-rename, so an interrupted run never leaves a truncated file that looks complete
    tmp = path + ".tmp"
    array.tofile(tmp)
    os.replace(tmp, path)


def prepare(out_dir=None, n_chars=3_000_000, seed=1337, val_fraction=0.1, progress=True, only=None):
    """Generate the corpus and write the five files into out_dir (default: this folder); return meta.
    only: a comma-separated list of domains to keep (see pick_domains); None = all five."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    out_dir = out_dir or HERE
    picked = pick_domains(only)
    docs, labels = generate(n_chars, seed, progress, only)

    # encode all characters at once through a byte -> id lookup table
    stoi = {ch: i for i, ch in enumerate(CHARS)}
    itos = {i: ch for i, ch in enumerate(CHARS)}
    lut = np.full(256, 65535, dtype=np.uint16)  # 65535 marks "not in the vocabulary"
    for ch, i in stoi.items():
        lut[ord(ch)] = i
    text = "".join(docs)
    tokens = lut[np.frombuffer(text.encode("ascii"), dtype=np.uint8)]
    assert (tokens != 65535).all(), "a generator produced a character outside CHARS"

    # each character, newline included, carries the domain of its document
    lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    domain = np.repeat(np.array(labels, dtype=np.uint8), lengths)

    # split at the end of the first document that reaches 90%, so no line is cut in half
    ends = np.cumsum(lengths)
    k = int(np.searchsorted(ends, int(len(tokens) * (1 - val_fraction))))
    cut = int(ends[min(k, len(ends) - 2)]) if len(ends) >= 2 else 0
    if cut == 0:
        raise ValueError(f"n_chars={n_chars} is too small to make both a train and a val split")

    os.makedirs(out_dir, exist_ok=True)
    _write(os.path.join(out_dir, "train.bin"), tokens[:cut])
    _write(os.path.join(out_dir, "val.bin"), tokens[cut:])
    _write(os.path.join(out_dir, "train_domain.bin"), domain[:cut])
    _write(os.path.join(out_dir, "val_domain.bin"), domain[cut:])
    names = [name for name, _, _ in DOMAINS]
    meta = {"vocab_size": len(CHARS), "stoi": stoi, "itos": itos, "domains": names, "seed": seed,
            "answers": {name: marker for name, marker in ANSWERS.items() if names.index(name) in picked},
            "only": [names[d] for d in picked]}
    # meta.pkl last: its presence means the dataset is complete
    tmp = os.path.join(out_dir, "meta.pkl.tmp")
    with open(tmp, "wb") as f:
        pickle.dump(meta, f)
    os.replace(tmp, os.path.join(out_dir, "meta.pkl"))

    if progress:
        counts = np.bincount(domain, minlength=len(DOMAINS)) / len(domain)
        shares = ", ".join(f"{name} {c:.0%}" for d, ((name, _, _), c) in enumerate(zip(DOMAINS, counts)) if d in picked)
        print(f"train has {cut:,} tokens, val has {len(tokens) - cut:,}; vocab {len(CHARS)}; {shares}")
    return meta


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=None, help="where to write the files (default: this folder)")
    parser.add_argument("--n_chars", type=int, default=3_000_000, help="approximate corpus size in characters")
    parser.add_argument("--seed", type=int, default=1337, help="random seed; same seed, same bytes")
    parser.add_argument("--only", default=None,
                        help="a narrow dataset: these domains alone, comma-separated (e.g. arithmetic,lists)")
    args = parser.parse_args()
    try:
        pick_domains(args.only)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    if args.only and args.out_dir is None:
        parser.exit(2, "error: --only writes a narrow dataset: give it its own --out_dir (e.g. "
                       "data/domains_arithmetic), so the full dataset here stays as it is\n")
    prepare(args.out_dir, args.n_chars, args.seed, only=args.only)
