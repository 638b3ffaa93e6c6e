"""
Train a Mixture-of-Experts GPT and watch what its routers do.

On one device (cuda > mps > cpu, picked automatically):
$ python train.py
$ python train.py config/train_shakespeare_char_moe.py --router=topk --n_exp=16

With DDP on 4 GPUs of one node, or on 2 nodes of 8 GPUs each (the same command on both
nodes, node_rank 0 and 1, master_addr the address of node 0); add --device=cpu for CPUs (gloo):
$ torchrun --standalone --nproc_per_node=4 train.py config/train_shakespeare_char_moe.py
$ torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 train.py

Ctrl-C saves a checkpoint and exits (single process); --init_from=resume continues it, and
any checkpoint, exactly where the run that wrote it stood.

Every setting below is a config key. A bare argument is a config file (config/*.py),
--key=value overrides one key; an unknown key or a value of the wrong type is an error.
The model keys are the fields of GPTConfig in model.py, and the routing keys (router,
n_exp, top_k, loss coefficients, each router's knobs) those of RouterConfig in routers.py.
"""

import json
import math
import os
import sys
import time
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import (DATA, EVAL, GPT2_NAMES, NOISE, CheckpointError, Interrupt, load_checkpoint, load_model_state,
                        load_pretrained, load_start_weights, nonfinite_report, rng_state, save_checkpoint, seed_for,
                        set_rng_state)
from configurator import ConfigError, apply_overrides
from ddp import all_reduce_stats, replicas_differ, share_loss_scales
from fast_experts import describe_impl
from metrics import (CHARACTER_CLASSES, RoutingStats, answer_prompts, character_class, exact_match, loss_by_domain,
                     format_routing_table)
from model import GPT, GPTConfig, upcycle_state_dict
from routers import RouterConfig
from system import (PTDTYPES, autocast_context, check_tokens, device_type_of, keep_freed_memory_on_cpu, load_meta,
                    peak_flops, pick_device, pick_dtype)


def fail(message):
    """Bad input ends here: one line on stderr, exit code 2, nothing written."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def stop(message, code=1):
    """A run that cannot go on (a non-finite loss): one line on stderr, exit code 1."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


# -----------------------------------------------------------------------------
# default config: a small MoE on the generated 'domains' dataset, ~2 minutes on a 2-core CPU
# I/O
out_dir = 'out'
eval_interval = 150
log_interval = 25
eval_iters = 20
eval_only = False  # if True, evaluate once and exit
eval_answers = 32  # val questions per domain with checkable answers (domains: arithmetic, lists), answered
# greedily at each eval and scored by exact match; 0 = off
always_save_checkpoint = False  # if False, save only when val loss improves
init_from = 'scratch'  # 'scratch', 'resume' (from out_dir/ckpt.pt), or a new run from trained weights: a
# checkpoint (ckpt.pt or its folder; a dense one with n_exp > 1 is upcycled), a Hugging Face GPT-2 folder, or
# 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' (downloaded; pip install transformers)
upcycle_noise = 0.0  # upcycling: Gaussian noise on each expert's copy of the MLP, times the std of the weights
upcycle_drop_ratio = 0.0  # upcycling: Drop-Upcycling's share of hidden units re-initialised per expert (paper: 0.5)
save_on_interrupt = True  # Ctrl-C saves a checkpoint at the end of the step and exits (a second Ctrl-C: at once)
skip_nonfinite = False  # a non-finite loss: False = stop (the last checkpoint is kept), True = skip that step
# wandb logging (imported only when enabled)
wandb_log = False
wandb_project = 'nanorouter'
wandb_run_name = 'run'
# data
dataset = 'domains'  # a folder of data/ with train.bin, val.bin, meta.pkl
eval_also = ''  # another dataset (a folder of data/, or a path) whose val split each eval measures too, e.g.
# 'domains' while fine-tuning on one of its domains: its loss on each domain shows what the model forgets
data_dir = ''  # '' = data/<dataset>; set to read the .bin files from elsewhere
gradient_accumulation_steps = 1
batch_size = 16
block_size = 128
# model (more keys: every field of GPTConfig and RouterConfig, see below)
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
bias = False
n_exp = 8
router = 'topk'  # top_k and the loss coefficients: the router's defaults (routers.py)
# AdamW
learning_rate = 2e-3
max_iters = 600
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.99  # small batches: a shorter second-moment memory, as nanoGPT's shakespeare_char
grad_clip = 1.0  # clip gradients at this norm, 0 = off
# learning rate schedule: linear warmup, cosine decay to min_lr
decay_lr = True
warmup_iters = 30
lr_decay_iters = 600  # usually = max_iters
min_lr = 2e-4
# system
backend = 'nccl'  # DDP backend on CUDA; CPU runs use gloo
device = 'auto'  # 'auto' = cuda > mps > cpu; or 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # 'auto' = bfloat16 on CUDA when supported, else float16 on CUDA, float32 elsewhere
compile = False  # torch.compile the model
seed = 1337
# -----------------------------------------------------------------------------
# every GPTConfig field is a config key; the values set above win over GPTConfig's defaults
model_keys = [f.name for f in fields(GPTConfig)]
for f in fields(GPTConfig):
    globals().setdefault(f.name, f.default)
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (int, float, bool, str, type(None)))
               and k not in ('model_keys',)]
annotations = {f.name: f.type for f in fields(GPTConfig)}
try:
    overrides, user_keys = apply_overrides({k: globals()[k] for k in config_keys}, sys.argv[1:], annotations)
except ConfigError as e:
    fail(e)
globals().update(overrides)
config = {k: globals()[k] for k in config_keys}  # logged and checkpointed
# -----------------------------------------------------------------------------
# check the settings before anything is written
pretrained = init_from not in ('scratch', 'resume')  # a new run from trained weights
if pretrained and init_from not in GPT2_NAMES and not os.path.exists(init_from):
    fail(f"init_from={init_from!r} must be 'scratch', 'resume', {', '.join(map(repr, GPT2_NAMES))}, or the path "
         f"of a checkpoint (ckpt.pt or its folder) or of a Hugging Face GPT-2 folder; {init_from} does not exist")
if upcycle_noise < 0 or not 0 <= upcycle_drop_ratio <= 1:
    fail(f"upcycle_noise={upcycle_noise} must be >= 0 and upcycle_drop_ratio={upcycle_drop_ratio} between 0 and 1")
for key in ('batch_size', 'block_size', 'gradient_accumulation_steps', 'eval_iters', 'log_interval', 'eval_interval'):
    if config[key] < 1:
        fail(f"{key}={config[key]} must be >= 1")

# devices and DDP
ddp = int(os.environ.get('RANK', -1)) != -1
try:
    device = pick_device(device)
    dtype = pick_dtype(dtype, device_type_of(device))
except ValueError as e:
    fail(e)
if ddp:
    init_process_group(backend=backend if device.startswith('cuda') else 'gloo')
    ddp_rank = int(os.environ['RANK'])
    ddp_local_rank = int(os.environ['LOCAL_RANK'])
    ddp_world_size = int(os.environ['WORLD_SIZE'])
    if device.startswith('cuda'):
        device = f'cuda:{ddp_local_rank}'
        torch.cuda.set_device(device)
    master_process = ddp_rank == 0
    seed_offset = ddp_rank  # the initial weights (DDP copies rank 0's); the batches and noise: see train_offsets
    if gradient_accumulation_steps % ddp_world_size != 0:
        fail(f"gradient_accumulation_steps={gradient_accumulation_steps} must be a multiple of the "
             f"{ddp_world_size} DDP processes")
    gradient_accumulation_steps //= ddp_world_size
else:
    master_process = True
    seed_offset = 0
    ddp_rank = 0
    ddp_world_size = 1
device_type = device_type_of(device)
if device_type == 'cpu':
    keep_freed_memory_on_cpu()  # else glibc returns big freed blocks to the OS every step (system.py)
tokens_per_iter = gradient_accumulation_steps * ddp_world_size * batch_size * block_size
torch.manual_seed(seed + seed_offset)
if device_type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
ctx = autocast_context(device_type, dtype)

# -----------------------------------------------------------------------------
# data: nanoGPT's format, uint16 token ids in train.bin / val.bin, meta.pkl beside them
repo_dir = os.path.dirname(os.path.abspath(__file__))
data_dir = data_dir or os.path.join(repo_dir, 'data', dataset)
if not os.path.exists(os.path.join(data_dir, 'meta.pkl')) and not os.path.exists(os.path.join(data_dir, 'train.bin')):
    if dataset == 'domains' and data_dir == os.path.join(repo_dir, 'data', 'domains'):
        # the default dataset is generated, not downloaded: make it on first use
        if master_process:
            import importlib.util
            spec = importlib.util.spec_from_file_location('prepare_domains', os.path.join(data_dir, 'prepare.py'))
            prepare_module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(prepare_module)
            print(f"dataset 'domains' not found, generating it in {data_dir}")
            prepare_module.prepare(out_dir=data_dir)
        if ddp:
            torch.distributed.barrier()
    else:
        custom_dir = data_dir != os.path.join(repo_dir, 'data', dataset)
        if os.path.exists(os.path.join(repo_dir, 'data', dataset, 'prepare.py')):
            hint = f"run: python data/{dataset}/prepare.py" + (f" --out_dir={data_dir}" if custom_dir else '')
        else:  # a folder without a script, e.g. a narrow dataset that data/domains/prepare.py --only writes
            hint = (f"no data/{dataset}/prepare.py makes it (one or a few domains: python data/domains/prepare.py "
                    f"--only=NAMES --out_dir={os.path.relpath(data_dir)})")
        fail(f"dataset {dataset!r} not found: {os.path.join(data_dir, 'train.bin')} is missing; {hint}")
try:
    meta = load_meta(data_dir)
except ValueError as e:
    fail(e)
meta_vocab_size = meta['vocab_size'] if meta else None
# every token id must fit the vocabulary (else an IndexError deep in the embedding)
vocab_source = (f"vocab_size in {os.path.join(data_dir, 'meta.pkl')}" if meta
                else f"no meta.pkl: vocab_size={config['vocab_size']}")
n_tokens = {}
for split in ('train', 'val'):
    try:
        n_tokens[split] = check_tokens(os.path.join(data_dir, f'{split}.bin'), meta_vocab_size or config['vocab_size'],
                                       vocab_source)
    except ValueError as e:
        fail(e)
    if n_tokens[split] <= block_size + 1:
        fail(f"block_size={block_size} is longer than the {split} split of {dataset!r} ({n_tokens[split]} tokens); "
             f"lower --block_size")

# a label per token for the specialization metric: its domain where the dataset has them
# (domains: val_domain.bin), else its character class (letter, digit, ...); none for BPE
label_names, class_of_token = None, None
if meta and 'domains' in meta and os.path.exists(os.path.join(data_dir, 'val_domain.bin')):
    label_names = list(meta['domains'])
elif meta and 'itos' in meta:
    label_names = CHARACTER_CLASSES
    class_of_token = torch.tensor([character_class(meta['itos'][i]) for i in range(meta['vocab_size'])])

# a task metric where the dataset has checkable answers (meta['answers'], domains: arithmetic
# '37+85=' -> '122'): a fixed set of val prompts per domain, answered greedily at each eval
answer_sets = {}
if meta and meta.get('answers') and label_names is not None and class_of_token is None and eval_answers > 0:
    val_tokens = torch.from_numpy(np.fromfile(os.path.join(data_dir, 'val.bin'), dtype=np.uint16).astype(np.int64))
    val_domains = torch.from_numpy(np.fromfile(os.path.join(data_dir, 'val_domain.bin'), dtype=np.uint8))
    for name, marker in meta['answers'].items():
        prompts, answers = answer_prompts(val_tokens, val_domains, label_names.index(name),
                                          [meta['stoi'][ch] for ch in marker], meta['stoi']['\n'], eval_answers,
                                          max(1, block_size // 2))
        if answers:
            answer_sets[name] = (prompts, answers)
    val_tokens = val_domains = None
elif meta and 'domains' in meta and 'answers' not in meta and eval_answers > 0 and master_process:
    print(f"{os.path.join(data_dir, 'meta.pkl')} names no checkable answers (written before they were): run "
          f"data/domains/prepare.py again for the exact-match answer accuracy")

# eval_also: a second val split, with the same vocabulary, measured at each eval; where it has
# domain labels, its loss per domain, and on the domains this run does not train on
also_dir, also_domains, trained_domains = None, None, None
if eval_also:
    also_dir = eval_also if os.path.isdir(eval_also) else os.path.join(repo_dir, 'data', eval_also)
    if not os.path.exists(os.path.join(also_dir, 'val.bin')):
        fail(f"eval_also={eval_also!r}: {os.path.join(also_dir, 'val.bin')} is missing; prepare that dataset first")
    try:
        also_meta = load_meta(also_dir)
        if also_meta and meta and also_meta['vocab_size'] != meta_vocab_size:
            raise ValueError(f"it has vocab_size={also_meta['vocab_size']} but dataset {dataset!r} has "
                             f"{meta_vocab_size}; evaluate on a dataset with the same vocabulary")
        check_tokens(os.path.join(also_dir, 'val.bin'), meta_vocab_size or config['vocab_size'], vocab_source)
    except ValueError as e:
        fail(f"eval_also={eval_also!r}: {e}")
    if also_meta and 'domains' in also_meta and os.path.exists(os.path.join(also_dir, 'val_domain.bin')):
        also_domains = list(also_meta['domains'])
        # the domains this run trains on: a narrow dataset names them (prepare.py --only)
        trained_domains = list(meta.get('only') or also_domains) if meta else also_domains


# Batches are drawn from generators seeded per iteration (checkpoint.seed_for), never from
# the global one: the batches of iteration i depend only on (seed, i). A training step draws
# its whole global batch, gradient_accumulation_steps * ddp_world_size micro-batches, the
# same on every rank, and rank r takes its rows: so a DDP run trains on exactly the batches
# one process draws with gradient accumulation, and a resumed run on those of the
# uninterrupted run. The eval batches of iteration i come from their own stream.
eval_generator = torch.Generator()


def train_offsets(it):
    """[gradient_accumulation_steps, batch_size] start offsets of this rank's micro-batches
    at iteration it: its slice of the step's global batch."""
    generator = torch.Generator().manual_seed(seed_for(seed, it, DATA))
    offsets = torch.randint(n_tokens['train'] - block_size, (ddp_world_size * gradient_accumulation_steps, batch_size),
                            generator=generator)
    return offsets[ddp_rank * gradient_accumulation_steps:(ddp_rank + 1) * gradient_accumulation_steps]


def get_batch(split, ix=None, with_labels=False):
    """x, y for the sequences starting at offsets ix [batch_size]; ix=None draws them from
    eval_generator (train.py seeds it before each evaluation). with_labels: also each input
    token's label (label_names), for the specialization metric."""
    # a fresh memmap every batch: numpy memmaps keep growing memory if reused (nanoGPT's note)
    data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r')
    if ix is None:
        ix = torch.randint(len(data) - block_size, (batch_size,), generator=eval_generator)
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
    if with_labels:  # evaluation only: no need for pinned memory
        labels = token_labels(split, ix, x)
        return x.to(device), y.to(device), None if labels is None else labels.to(device)
    if device_type == 'cuda':
        x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    else:
        x, y = x.to(device), y.to(device)
    return x, y


def token_labels(split, ix, x):
    """[B, T] label of each input token (see label_names), or None."""
    if label_names is None:
        return None
    if class_of_token is not None:
        return class_of_token[x]
    domains = np.memmap(os.path.join(data_dir, f'{split}_domain.bin'), dtype=np.uint8, mode='r')
    return torch.stack([torch.from_numpy(domains[i:i + block_size].astype(np.int64)) for i in ix])


# -----------------------------------------------------------------------------
# model
iter_num = 0
best_val_loss = 1e9
skipped_steps = 0  # steps skipped for a non-finite loss (skip_nonfinite=True), over the whole run
evaluated_at = None  # a resumed checkpoint written right after the eval of this iteration: not evaluated again
saved_iter = None  # the iteration of the checkpoint on disk that this run resumed from or wrote
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
model_args = {k: config[k] for k in model_keys}
model_args['vocab_size'] = meta_vocab_size or config['vocab_size']  # no meta.pkl: GPT-2's 50257 padded to 50304
if init_from == 'resume':
    if not os.path.exists(ckpt_path):
        fail(f"init_from='resume' but {ckpt_path} does not exist; train first or set --out_dir")
    try:  # weights_only: a checkpoint that would need code to load is refused, and nothing in it runs
        checkpoint = load_checkpoint(ckpt_path, device, required=('model', 'optimizer', 'model_args', 'iter_num',
                                                                  'best_val_loss'))
    except CheckpointError as e:
        fail(e)
    shape_keys = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'n_exp', 'moe_every', 'expert_hidden',
                  'n_shared_exp', 'router')
    missing = [k for k in (*shape_keys, 'vocab_size') if k not in checkpoint['model_args']]
    if missing:
        fail(f"checkpoint {ckpt_path} is damaged: its model_args have no {', '.join(missing)}")
    # keys that set parameter shapes come from the checkpoint; the rest (coefficients,
    # capacity, dropout, router windows) may change on resume, e.g. to hot-swap a router
    for k in shape_keys:
        if k in user_keys and config[k] != checkpoint['model_args'][k]:
            fail(f"{k}={config[k]} differs from the checkpoint's {k}={checkpoint['model_args'][k]}; "
                 f"drop --{k} to resume, or use another --out_dir")
        model_args[k] = checkpoint['model_args'][k]
    if checkpoint['model_args']['vocab_size'] != model_args['vocab_size']:
        fail(f"checkpoint {ckpt_path} has vocab_size={checkpoint['model_args']['vocab_size']} but dataset "
             f"{dataset!r} has vocab_size={model_args['vocab_size']}; resume with the dataset it was trained on")
elif pretrained:
    # a new run from trained weights: iteration 0, a fresh optimizer, its own out_dir and log;
    # any dataset with the same vocabulary, and the router may differ
    try:
        source, source_args, source_state = load_pretrained(init_from, device)
    except CheckpointError as e:
        fail(e)
    source_dir = source if os.path.isdir(source) else os.path.dirname(source)
    if os.path.realpath(out_dir) == os.path.realpath(source_dir):
        fail(f"out_dir={out_dir} holds the weights this run starts from, and a new run would overwrite them; "
             f"set another --out_dir (or --init_from=resume to continue that run)")
    missing = [k for k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size', 'n_exp')
               if k not in source_args]
    if missing:
        fail(f"{source} is damaged: its model_args have no {', '.join(missing)}")
    if meta and source_args['vocab_size'] != meta_vocab_size:
        fail(f"{source} has vocab_size={source_args['vocab_size']} but dataset {dataset!r} has "
             f"vocab_size={meta_vocab_size}; start from a model trained on the same vocabulary")
    if not meta:  # no vocab_size to compare: the token ids must fit the source's vocabulary
        for split in ('train', 'val'):
            try:
                check_tokens(os.path.join(data_dir, f'{split}.bin'), source_args['vocab_size'], f"that of {source}")
            except ValueError as e:
                fail(e)
    model_args['vocab_size'] = source_args['vocab_size']
    model_defaults = {f.name: f.default for f in fields(GPTConfig)}
    for k in ('n_layer', 'n_head', 'n_embd', 'bias', 'gelu_approximate'):
        value = source_args.get(k, model_defaults[k])
        if k in user_keys and config[k] != value:
            fail(f"{k}={config[k]} differs from {k}={value} of {source}: a run from trained weights keeps "
                 f"their shape; drop --{k}")
        model_args[k] = value
    if block_size > source_args['block_size']:
        fail(f"block_size={block_size} is longer than the {source_args['block_size']} positions of {source}; "
             f"set --block_size={source_args['block_size']} or less")
    # the MoE layout is the source's unless given; a dense source with n_exp > 1 is upcycled
    for k in ('n_exp', 'moe_every', 'expert_hidden', 'n_shared_exp', 'router'):
        if k not in user_keys and k in source_args:
            model_args[k] = source_args[k]
    upcycle = source_args['n_exp'] <= 1 and model_args['n_exp'] > 1
    if upcycle and model_args['bias']:
        fail(f"{source} has biases (bias=True, as GPT-2): upcycling it would need biases in the experts, which "
             f"have none; fine-tune it dense (--n_exp=1)")
    if upcycle and 'expert_hidden' not in user_keys:
        model_args['expert_hidden'] = 4 * model_args['n_embd']  # the MLP's width: each expert is a copy
    if (upcycle_noise or upcycle_drop_ratio) and not upcycle:
        fail(f"upcycle_noise={upcycle_noise}, upcycle_drop_ratio={upcycle_drop_ratio} apply only when upcycling, "
             f"and {source} is {'an MoE' if source_args['n_exp'] > 1 else 'dense'} with n_exp={source_args['n_exp']} "
             f"while this run has n_exp={model_args['n_exp']}")
    if source_args['n_exp'] > 1:
        for k in ('n_exp', 'moe_every', 'expert_hidden', 'n_shared_exp'):
            if model_args[k] != source_args.get(k):
                fail(f"{k}={model_args[k]} differs from {k}={source_args.get(k)} of {source}, an MoE whose "
                     f"experts keep their shapes; drop --{k}")
        if model_args['router'] == source_args.get('router'):  # the same router: its settings too, unless given
            # a loss target given replaces the source's coefficient of that loss, and a coefficient its target
            partner = {'var_loss_coef': 'var_loss_target', 'ortho_loss_coef': 'ortho_loss_target'}
            partner.update({target: coef for coef, target in partner.items()})
            replaced = {partner[k] for k in user_keys if k in partner}
            for f in fields(RouterConfig):
                if f.name not in user_keys and f.name not in replaced and f.name in source_args:
                    model_args[f.name] = source_args[f.name]
try:
    gptconf = GPTConfig(**model_args)
except ValueError as e:
    fail(e)
model = GPT(gptconf)
if init_from == 'resume':
    try:
        load_model_state(model, checkpoint['model'], ckpt_path)
    except CheckpointError as e:
        fail(e)
    iter_num = saved_iter = checkpoint['iter_num']
    best_val_loss = checkpoint['best_val_loss']
    skipped_steps = checkpoint.get('skipped_steps', 0)
    if checkpoint.get('evaluated', True) and not eval_only:
        evaluated_at = iter_num  # saved right after this iteration's eval, which is in metrics.jsonl already
    print(f"resuming from {ckpt_path} at iter {iter_num}")
if pretrained:
    try:
        if upcycle:  # Komatsuzaki et al. 2022: every expert a copy of its layer's MLP, a fresh gate (model.py)
            source_state = upcycle_state_dict(source_state, gptconf, upcycle_noise, upcycle_drop_ratio,
                                              torch.Generator().manual_seed(seed))
        # a shorter block_size than the source's: keep its first position embeddings (nanoGPT's crop)
        source_state['transformer.wpe.weight'] = source_state['transformer.wpe.weight'][:gptconf.block_size]
        fresh = load_start_weights(model, source_state, source)
    except KeyError as e:
        fail(f"{source} is damaged: it has no {e}")
    except ValueError as e:  # CheckpointError included
        fail(e)
    print(f"a new run from {source}" + (f": upcycled, every expert of MoE layers {[i for i, _ in model.moe_layers()]} "
                                        f"is a copy of its MLP" if upcycle else '')
          + (f"; {len(fresh)} router tensors start fresh" if fresh else ''))
    source_state = None  # free memory
model.to(device)

scaler = torch.amp.GradScaler(device_type if device_type == 'cuda' else 'cpu', enabled=(dtype == 'float16'))
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2))
if init_from == 'resume':
    try:
        optimizer.load_state_dict(checkpoint['optimizer'])
        if scaler.is_enabled() and checkpoint.get('scaler'):
            scaler.load_state_dict(checkpoint['scaler'])
        if 'rng' in checkpoint:
            set_rng_state(checkpoint['rng'])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        fail(f"checkpoint {ckpt_path} is damaged: its optimizer or RNG state does not fit "
             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
checkpoint = None  # free memory

if master_process:
    os.makedirs(out_dir, exist_ok=True)
    metrics_path = os.path.join(out_dir, 'metrics.jsonl')
    if init_from != 'resume':
        open(metrics_path, 'w').close()  # a new run starts a new log
    print(f"tokens per iteration: {tokens_per_iter:,}  device: {device}  dtype: {dtype}")
    print(f"parameters: {model.get_num_params() / 1e6:.2f}M total, {model.get_num_active_params() / 1e6:.2f}M active per token")
    if gptconf.use_moe:
        print(f"router: {gptconf.describe()}; MoE layers {[i for i, _ in model.moe_layers()]}")
        capability = torch.cuda.get_device_capability(device) if device_type == 'cuda' else None
        impl, why = describe_impl(gptconf.expert_impl, device_type, capability, PTDTYPES[dtype], gptconf.n_embd,
                                  gptconf.expert_hidden)
        print(f"experts: {impl} ({why})")
# MFU against the GPU's own peak where system.PEAK_TFLOPS knows it
peak, peak_source = peak_flops(torch.cuda.get_device_name(device) if device_type == 'cuda' else device_type)
if master_process:
    print(f"mfu: against {peak_source}")

raw_model = model
if compile:
    print("compiling the model... (takes a ~minute)")
    model = torch.compile(model)
if ddp:
    # broadcast_buffers=False: rank 0 evaluates alone, and a forward that broadcasts buffers
    # would be a collective the other ranks never join; the router buffers (DeepSeek-V3's
    # bias, the hash map) are the same on every rank by construction, checked at the end
    model = DDP(model, device_ids=[ddp_local_rank] if device_type == 'cuda' else None, broadcast_buffers=False)
    for buffer in raw_model.buffers():  # once, at the start: DDP copied rank 0's parameters only
        torch.distributed.broadcast(buffer, 0)


@torch.no_grad()
def estimate_loss():
    """Mean cross-entropy (router losses excluded) on eval_iters batches of each split,
    and the routing statistics of the val batches."""
    out = {}
    model.eval()
    for split in ('train', 'val'):
        losses = torch.zeros(eval_iters)
        stats = RoutingStats(label_names)
        # a progress bar while a human waits at a terminal; none in logs or on other ranks
        for k in tqdm(range(eval_iters), desc=f"eval {split}", leave=False, disable=None if master_process else True):
            X, Y, labels = get_batch(split, with_labels=True)
            measure = split == 'val'  # the log reports the routing of the val batches only
            with ctx:
                lm_loss, router_losses, routings = model(X, Y, keep_expert_out=measure)[1:]  # logits not kept
            losses[k] = lm_loss.item()
            if measure:
                stats.add(routings, router_losses, labels=labels)
        out[split] = losses.mean().item()
    model.train()
    return out, stats


@torch.no_grad()
def estimate_also_loss():
    """eval_also's val split, eval_iters batches: the mean cross-entropy and, where it has
    domain labels, the mean per domain (of the token predicted) and over the domains this
    run does not train on (metrics.loss_by_domain)."""
    data = np.memmap(os.path.join(also_dir, 'val.bin'), dtype=np.uint16, mode='r')
    labels = np.memmap(os.path.join(also_dir, 'val_domain.bin'), dtype=np.uint8, mode='r') if also_domains else None
    loss_batches, label_batches = [], []
    model.eval()
    for _ in range(eval_iters):
        ix = torch.randint(len(data) - block_size, (batch_size,), generator=eval_generator)
        x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix]).to(device)
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix]).to(device)
        with ctx:
            logits = model(x, y)[0]
        loss_batches.append(F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), reduction='none'))
        if labels is not None:
            label_batches.append(torch.stack([torch.from_numpy(labels[i + 1:i + 1 + block_size].astype(np.int64))
                                              for i in ix]).view(-1))
    model.train()
    token_loss = torch.cat(loss_batches).cpu()  # one read-back for the whole evaluation
    if labels is None:
        return {'dataset': eval_also, 'loss': token_loss.double().mean().item()}
    return {'dataset': eval_also, **loss_by_domain(token_loss, torch.cat(label_batches), also_domains, trained_domains)}


@torch.no_grad()
def answer_accuracy():
    """{domain: exact-match accuracy} of the greedy answers to answer_sets' prompts, decoded
    in one batch per domain (on the uncompiled model: every step has another length)."""
    accuracy = {}
    raw_model.eval()
    for name, (prompts, answers) in answer_sets.items():
        with ctx:  # top_tokens=1: the most likely token at every step, greedy decoding
            out = raw_model.generate(prompts.to(device), max(map(len, answers)) + 1, top_tokens=1)
        accuracy[name] = exact_match(out[:, prompts.size(1):].tolist(), answers, meta['stoi']['\n'])
    raw_model.train()
    return accuracy


def get_lr(it):
    # linear warmup, cosine decay to min_lr, then min_lr
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


def log_json(record):
    with open(metrics_path, 'a') as f:
        f.write(json.dumps(record) + '\n')


if wandb_log and master_process:
    import wandb
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)

# -----------------------------------------------------------------------------
# checkpoints (checkpoint.py): weights_only-loadable values, written atomically


def save(evaluated):
    """Save the state at the top of iteration iter_num. evaluated: this iteration's eval is
    done and logged (a resumed run then skips it); False for a save on Ctrl-C."""
    global saved_iter
    save_checkpoint({
        'model': raw_model.state_dict(),  # router buffers (DeepSeek-V3's bias) and GatePro's step count included
        'optimizer': optimizer.state_dict(),
        'scaler': scaler.state_dict(),
        'model_args': asdict(gptconf),
        'iter_num': iter_num,
        'best_val_loss': best_val_loss,
        'config': config,
        'evaluated': evaluated,
        'skipped_steps': skipped_steps,
        'rng': rng_state(),
    }, ckpt_path)
    saved_iter = iter_num


interrupt = Interrupt()
if save_on_interrupt and not ddp:  # under torchrun, Ctrl-C reaches torchrun too, and it ends the workers
    interrupt.install()

# -----------------------------------------------------------------------------
# training loop: iterations iter_num .. max_iters - 1 train; iteration max_iters is only
# evaluated (and saved when it improves), so a run never ends on a step it did not save
t0 = time.time()
local_iter_num = 0
loss_scales_pending = True  # until every *_loss_scale buffer is calibrated and shared (DDP only)
running_mfu = -1.0
while True:
    if interrupt.requested:
        # the top of an iteration: a resumed run continues exactly from here
        save(evaluated=False)
        print(f"interrupted at iter {iter_num}: checkpoint saved to {ckpt_path}; continue with --init_from=resume "
              f"--out_dir={out_dir}", file=sys.stderr)
        sys.exit(130)
    lr = get_lr(iter_num) if decay_lr else learning_rate
    for param_group in optimizer.param_groups:
        param_group['lr'] = lr

    if (iter_num % eval_interval == 0 or iter_num == max_iters) and master_process and iter_num != evaluated_at:
        eval_generator.manual_seed(seed_for(seed, iter_num, EVAL))  # the eval batches of this iteration
        losses, val_stats = estimate_loss()
        accuracy = answer_accuracy()
        also = estimate_also_loss() if also_dir else None
        val_stats = val_stats.to_host()[0]  # the eval's routing numbers, read back in one transfer
        layers = val_stats.summary(tables=True)
        print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        if accuracy:
            print("exact-match answers (greedy, val): " + ', '.join(
                f"{name} {value:.1%} of {len(answer_sets[name][1])}" for name, value in accuracy.items()))
        if also:
            print(f"val loss on {eval_also}: {also['loss']:.4f}" + (', by domain: ' + ', '.join(
                f"{name} {value:.4f}" for name, value in also['domain_loss'].items()) if 'domain_loss' in also else ''))
        if layers:
            print(format_routing_table(layers))
        log_json({'iter': iter_num, 'split': 'val', 'loss': losses['val'], 'train_loss': losses['train'],
                  'lr': lr, 'losses': val_stats.loss_summary(), 'layers': layers, 'label_names': label_names,
                  'answer_accuracy': accuracy, **({'eval_also': also} if also else {})})
        if wandb_log:
            wandb.log({'iter': iter_num, 'train/loss': losses['train'], 'val/loss': losses['val'], 'lr': lr})
        if not math.isfinite(losses['val']):
            print(f"val loss {losses['val']}: checkpoint not saved")  # never overwrite a good one with it
        elif losses['val'] < best_val_loss or always_save_checkpoint:
            best_val_loss = min(best_val_loss, losses['val'])
            if iter_num > 0:
                print(f"saving checkpoint to {out_dir}")
                save(evaluated=True)
    if eval_only or iter_num >= max_iters:
        break

    # forward, backward, update; gradient accumulation simulates a larger batch
    log_step = iter_num % log_interval == 0  # on every rank: under DDP the logged metrics are the global batch's
    step_stats = RoutingStats()  # the routing of this step's batch: counts always, the rest on log steps
    step_lm_loss = torch.zeros((), device=device)
    step_loss = torch.zeros((), device=device)  # everything trained on, router losses included
    bad_layers = {}  # MoE layer -> its router's logits were not finite in some micro-step
    offsets = train_offsets(iter_num)
    X, Y = get_batch('train', offsets[0])
    for micro_step in range(gradient_accumulation_steps):
        if ddp:
            # synchronise gradients only on the last micro-step
            model.require_backward_grad_sync = (micro_step == gradient_accumulation_steps - 1)
        # dropout and router noise from a seed of (iteration, micro-step of the global batch)
        torch.manual_seed(seed_for(seed, iter_num, NOISE, ddp_rank * gradient_accumulation_steps + micro_step))
        with ctx:  # the logits are not kept: at GPT-2's vocabulary they are the largest tensor of the step
            lm_loss, router_losses, routings = model(X, Y, keep_expert_out=log_step)[1:]
            loss = (lm_loss + sum(router_losses.values())) / gradient_accumulation_steps
        step_stats.add(routings, router_losses, full=log_step)
        step_lm_loss += lm_loss.detach() / gradient_accumulation_steps
        step_loss += loss.detach()
        for layer, routing in routings.items():
            bad = ~torch.isfinite(routing.logits).all()
            bad_layers[layer] = bad if layer not in bad_layers else bad_layers[layer] | bad
        if micro_step + 1 < gradient_accumulation_steps:
            X, Y = get_batch('train', offsets[micro_step + 1])  # prefetch while the GPU works on backward
        scaler.scale(loss).backward()
        del routings, router_losses  # else they stay alive through the next micro-step's forward
    grad_norm = None
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    # a non-finite loss (on any rank), or gradient outside fp16's loss scaling, must not reach the weights
    check = step_loss if grad_norm is None or scaler.is_enabled() else step_loss + grad_norm
    if ddp:
        check = check.clone()
        torch.distributed.all_reduce(check)
    finite = bool(torch.isfinite(check))  # one sync per step
    if finite:
        scaler.step(optimizer)
        scaler.update()
    elif not master_process and not skip_nonfinite:
        sys.exit(1)  # rank 0 says why
    elif master_process:
        report = nonfinite_report(iter_num, step_lm_loss.item(), step_stats.loss_summary(),
                                  [layer for layer in sorted(bad_layers) if bad_layers[layer]],
                                  None if grad_norm is None else grad_norm.item())
        if not skip_nonfinite:  # nothing is saved: the checkpoint on disk is the last good one
            kept = f"{ckpt_path} (iter {saved_iter}) is kept" if saved_iter is not None else "no checkpoint was written"
            stop(f"{report}; training stopped, {kept}; --skip_nonfinite=True skips such steps")
    optimizer.zero_grad(set_to_none=True)
    if not finite:
        skipped_steps += 1
        if grad_norm is not None and scaler.is_enabled():
            scaler.update()  # the scaler saw the inf in unscale_: it lowers the scale
        if master_process:
            print(f"{report}; step skipped ({skipped_steps} so far)")
    # the routers learn how the step went (DeepSeek-V3's bias, GatePro's step count)
    if ddp and log_step:
        all_reduce_stats(step_stats, device)  # the metrics, losses and counts of the global batch
        torch.distributed.all_reduce(step_lm_loss)
        step_lm_loss /= ddp_world_size
    load_counts = step_stats.load_counts()
    if not finite:  # a skipped step routed nothing: GatePro still counts it, DeepSeek-V3's bias stays
        load_counts = {layer: torch.zeros_like(counts) for layer, counts in load_counts.items()}
    elif ddp and load_counts and not log_step:
        all_counts = torch.stack([load_counts[layer] for layer in sorted(load_counts)])
        torch.distributed.all_reduce(all_counts)  # the load of the whole global batch
        load_counts = dict(zip(sorted(load_counts), all_counts))
        step_stats.set_load_counts(load_counts)  # the log's load metrics count the global batch too
    raw_model.step_finished(iter_num, load_counts)
    if ddp and loss_scales_pending:  # the loss targets' coefficients: rank 0's on every rank
        loss_scales_pending = share_loss_scales(raw_model)

    t1 = time.time()
    dt = t1 - t0
    t0 = t1
    if log_step and master_process and finite:
        host_stats, host = step_stats.to_host(lm_loss=step_lm_loss)  # the step's numbers, read back in one transfer
        router_losses = host_stats.loss_summary()
        lm_loss = host['lm_loss']
        if local_iter_num >= 5:  # let the training loop settle a bit
            mfu = raw_model.estimate_mfu(batch_size * gradient_accumulation_steps, dt, peak)
            running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
        loss_parts = ''.join(f", {name} {value:.4f}" for name, value in router_losses.items())
        mfu_text = f"{running_mfu * 100:.2f}%" if running_mfu >= 0 else '-'
        print(f"iter {iter_num}: loss {lm_loss:.4f}{loss_parts}, lr {lr:.2e}, time {dt * 1000:.1f}ms, "
              f"{tokens_per_iter / dt:,.0f} tok/s, mfu {mfu_text}")
        log_json({'iter': iter_num, 'split': 'train', 'loss': lm_loss, 'lr': lr, 'losses': router_losses,
                  'layers': host_stats.summary(), 'time_ms': dt * 1000, 'tokens_per_s': tokens_per_iter / dt,
                  'mfu': running_mfu, 'skipped_steps': skipped_steps})
        if wandb_log:
            wandb.log({'iter': iter_num, 'train/loss': lm_loss, 'lr': lr, 'mfu': running_mfu * 100,
                       **{f'router/{k}': v for k, v in router_losses.items()}})
    iter_num += 1
    local_iter_num += 1

if ddp:
    # every rank must end with the same model: DDP syncs gradients, the routers' own state
    # (DeepSeek-V3's bias, GatePro's count) is updated from the all-reduced counts
    differ = replicas_differ(raw_model)
    if master_process:
        if differ:
            print(f"error: the {ddp_world_size} DDP ranks ended with different values of {', '.join(differ[:5])}"
                  + (f" and {len(differ) - 5} more" if len(differ) > 5 else ''), file=sys.stderr)
        else:
            print(f"DDP: all {ddp_world_size} ranks hold the same weights and router state")
    torch.distributed.barrier()  # leave together: a rank that tears gloo down while another
    destroy_process_group()      # still talks to it can abort the process at exit
    if differ:
        sys.exit(1)
