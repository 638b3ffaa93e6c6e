"""
Sample from a trained model, optionally showing which expert took each token.

$ python sample.py --out_dir=out
$ python sample.py --out_dir=out --start="12+7=" --show_experts=True
"""

import os
import sys

import torch

from checkpoint import CheckpointError, load_checkpoint, load_model_state
from configurator import ConfigError, apply_overrides
from dataset import load_meta
from model import GPT, GPTConfig
from routers import ROUTERS
from system import autocast_context, device_type_of, pick_device, pick_dtype

# -----------------------------------------------------------------------------
out_dir = 'out'  # where train.py wrote ckpt.pt
start = '\n'  # prompt, or "FILE:prompt.txt" to read it from a file
num_samples = 3
max_new_tokens = 300
temperature = 0.8  # < 1 sharper, > 1 more random
top_tokens = 200  # sample among the top_tokens most likely tokens only (nanoGPT's top_k)
show_experts = False  # print, under each generated token, the top expert of every MoE layer (and, for
                      # topp, remoe and null experts, how many experts it took there)
seed = 1337
device = 'auto'  # 'auto' = cuda > mps > cpu
dtype = 'auto'
compile = False
# -----------------------------------------------------------------------------


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


defaults = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
try:
    overrides, _ = apply_overrides(defaults, sys.argv[1:])
except ConfigError as e:
    fail(e)
globals().update(overrides)

try:
    device = pick_device(device)
    dtype = pick_dtype(dtype, device_type_of(device))
except ValueError as e:
    fail(e)
ctx = autocast_context(device_type_of(device), dtype)
torch.manual_seed(seed)

ckpt_path = os.path.join(out_dir, 'ckpt.pt')
if not os.path.exists(ckpt_path):
    fail(f"no checkpoint at {ckpt_path}; train first (python train.py) or pass --out_dir")
try:  # weights_only: a checkpoint that would need code to load is refused, and nothing in it runs
    checkpoint = load_checkpoint(ckpt_path, device)
    try:
        gptconf = GPTConfig(**checkpoint['model_args'])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt_path} describes a model this code cannot build: {e}") from None
    model = GPT(gptconf)
    # the routers' state included (GatePro's step count, DeepSeek-V3's bias)
    load_model_state(model, checkpoint['model'], ckpt_path)
except CheckpointError as e:
    fail(e)
model.eval()
model.to(device)
if compile:
    model = torch.compile(model)

if start.startswith('FILE:'):  # read before the prompt's characters are checked against the dataset's
    try:
        with open(start[5:], 'r', encoding='utf-8') as f:
            start = f.read()
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read the prompt file {start[5:]}: {getattr(e, 'strerror', None) or e}; check --start=FILE:path")

# the tokenizer: the dataset's meta.pkl (characters or a tiktoken encoding name)
train_config = checkpoint.get('config') if isinstance(checkpoint.get('config'), dict) else {}
repo_dir = os.path.dirname(os.path.abspath(__file__))
data_dir = train_config.get('data_dir') or os.path.join(repo_dir, 'data', train_config.get('dataset', ''))
try:
    meta = load_meta(data_dir)
except ValueError as e:
    fail(e)
if meta is not None and 'stoi' in meta:
    stoi, itos = meta['stoi'], meta['itos']
    unknown = sorted(set(c for c in start if c not in stoi))
    if unknown:
        fail(f"the prompt has characters the dataset never saw: {''.join(unknown)!r}; change --start")
    encode = lambda s: [stoi[c] for c in s]
    decode = lambda ids: ''.join(itos[i] for i in ids)
else:
    import tiktoken
    enc = tiktoken.get_encoding(meta.get('encoding', 'gpt2') if meta else 'gpt2')
    encode = lambda s: enc.encode(s, allowed_special={'<|endoftext|>'})
    decode = lambda ids: enc.decode(ids)

start_ids = encode(start)
if not start_ids:
    fail("the prompt --start is empty; give at least one token")
x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...]


def expert_char(e):
    # one character per expert so the rows line up under the text: 0-9, a-z, A-Z, then '+'
    symbols = '0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'
    return '.' if e < 0 else (symbols[e] if e < len(symbols) else '+')


def newline_mark():
    # a newline would break the rows apart, and '|' is a character of the datasets: show it
    # as an arrow, unless the terminal cannot print one
    try:
        '\u21b5'.encode(sys.stdout.encoding or 'ascii')
        return '\u21b5'
    except (UnicodeEncodeError, LookupError):
        return '~'


def count_char(n):
    # how many experts a token took, one character: 0-9, then '+'
    return str(n) if n <= 9 else '+'


def show_routing(tokens, experts, counts=None, width=80):
    """Print the text in rows of `width` characters, each followed by one row per MoE layer
    with the expert that processed the character above it and, when counts are given (a
    router that gives a token as many experts as it needs), a row per layer with how many
    experts it took there. A newline shows as newline_mark()."""
    layers = sorted(experts[0]) if experts else []
    text = ''.join(t.replace('\n', newline_mark()) for t in tokens)
    rows = {layer: ''.join(expert_char(e[layer]) * len(t) for t, e in zip(tokens, experts)) for layer in layers}
    count_rows = {layer: ''.join(count_char(c[layer]) * len(t) for t, c in zip(tokens, counts)) for layer in layers} \
        if counts else {}
    for i in range(0, len(text), width):
        print(text[i:i + width])
        for layer in layers:
            print(rows[layer][i:i + width] + f'   <- layer {layer}')
            if layer in count_rows:
                print(count_rows[layer][i:i + width] + f'   <- layer {layer}: experts per token')
        print()


# a token takes as many experts as it needs (topp, remoe) or may send slots to null experts:
# the number it took is worth a row of its own
varies = gptconf.use_moe and (ROUTERS[gptconf.router].variable_k or gptconf.n_null_exp > 0)
if show_experts:
    print(f"(a newline shows as {newline_mark()}; under each character, the expert that gave it the largest weight "
          f"in each layer: 0-9, a-z, A-Z for experts 0 to 61, '+' beyond; '.' = no expert"
          + ("; under that, how many experts it took in the layer: 0-9, '+' beyond" if varies else '') + ")")
with torch.no_grad(), ctx:
    for _ in range(num_samples):
        y, experts, counts = model.generate(x, max_new_tokens, temperature=temperature, top_tokens=top_tokens,
                                            return_experts=True, return_expert_counts=True)
        if not show_experts:
            print(decode(y[0].tolist()))
        else:
            # experts[i] is the routing of the token fed in at step i (the prompt's last token,
            # then each generated token but the last): so it belongs to token len(prompt)-1+i.
            fed = y[0, len(start_ids) - 1:-1].tolist()
            print(f"prompt {start!r}; from its last token on, each token with its top expert per MoE layer"
                  + (" and how many experts it took" if varies else '') + ":")
            first_row = lambda steps: [{k: int(v[0]) for k, v in step.items()} for step in steps]
            show_routing([decode([t]) for t in fed], first_row(experts), first_row(counts) if varies else None)
        print('---------------')
