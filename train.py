"""
Train a Mixture-of-Experts GPT and watch what its routers do.

On one device (cuda > mps > cpu, picked automatically):
$ python train.py
$ python train.py config/train_shakespeare_char_moe.py --router=topk --n_exp=16

With DDP on 4 GPUs of one node:
$ torchrun --standalone --nproc_per_node=4 train.py config/train_shakespeare_char_moe.py

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
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from configurator import ConfigError, apply_overrides
from metrics import CHARACTER_CLASSES, RoutingStats, character_class, format_routing_table
from model import GPT, GPTConfig
from system import autocast_context, device_type_of, keep_freed_memory_on_cpu, load_meta, pick_device, pick_dtype


def fail(message):
    """Bad input ends here: one line on stderr, exit code 2, nothing written."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# -----------------------------------------------------------------------------
# default config: a small MoE on the generated 'domains' dataset, ~2 minutes on a 2-core CPU
# I/O
out_dir = 'out'
eval_interval = 150
log_interval = 25
eval_iters = 20
eval_only = False  # if True, evaluate once and exit
always_save_checkpoint = False  # if False, save only when val loss improves
init_from = 'scratch'  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
# wandb logging (imported only when enabled)
wandb_log = False
wandb_project = 'nanorouter'
wandb_run_name = 'run'
# data
dataset = 'domains'  # a folder of data/ with train.bin, val.bin, meta.pkl
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
if init_from not in ('scratch', 'resume'):
    fail(f"init_from={init_from!r} must be 'scratch' or 'resume'")
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
    seed_offset = ddp_rank
    if gradient_accumulation_steps % ddp_world_size != 0:
        fail(f"gradient_accumulation_steps={gradient_accumulation_steps} must be a multiple of the "
             f"{ddp_world_size} DDP processes")
    gradient_accumulation_steps //= ddp_world_size
else:
    master_process = True
    seed_offset = 0
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
        fail(f"dataset {dataset!r} not found: {os.path.join(data_dir, 'train.bin')} is missing; "
             f"run: python data/{dataset}/prepare.py" + (f" --out_dir={data_dir}" if custom_dir else ''))
for split in ('train', 'val'):
    n_tokens = os.path.getsize(os.path.join(data_dir, f'{split}.bin')) // 2
    if n_tokens <= block_size + 1:
        fail(f"block_size={block_size} is longer than the {split} split of {dataset!r} ({n_tokens} tokens); "
             f"lower --block_size")
meta = load_meta(data_dir)
meta_vocab_size = meta['vocab_size'] if meta else None
# a label per token for the specialization metric: its domain where the dataset has them
# (domains: val_domain.bin), else its character class (letter, digit, ...); none for BPE
label_names, class_of_token = None, None
if meta and 'domains' in meta and os.path.exists(os.path.join(data_dir, 'val_domain.bin')):
    label_names = list(meta['domains'])
elif meta and 'itos' in meta:
    label_names = CHARACTER_CLASSES
    class_of_token = torch.tensor([character_class(meta['itos'][i]) for i in range(meta['vocab_size'])])


def get_batch(split, with_labels=False):
    # a fresh memmap every batch: numpy memmaps keep growing memory if reused (nanoGPT's note)
    data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r')
    ix = torch.randint(len(data) - block_size, (batch_size,))
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
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
model_args = {k: config[k] for k in model_keys}
model_args['vocab_size'] = meta_vocab_size or config['vocab_size']  # no meta.pkl: GPT-2's 50257 padded to 50304
if init_from == 'resume':
    if not os.path.exists(ckpt_path):
        fail(f"init_from='resume' but {ckpt_path} does not exist; train first or set --out_dir")
    checkpoint = torch.load(ckpt_path, map_location=device, weights_only=False)
    # keys that set parameter shapes come from the checkpoint; the rest (coefficients,
    # capacity, dropout, router windows) may change on resume, e.g. to hot-swap a router
    for k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'n_exp', 'moe_every',
              'expert_hidden', 'n_shared_exp', 'router'):
        if k in user_keys and config[k] != checkpoint['model_args'][k]:
            fail(f"{k}={config[k]} differs from the checkpoint's {k}={checkpoint['model_args'][k]}; "
                 f"drop --{k} to resume, or use another --out_dir")
        model_args[k] = checkpoint['model_args'][k]
    if checkpoint['model_args']['vocab_size'] != model_args['vocab_size']:
        fail(f"checkpoint {ckpt_path} has vocab_size={checkpoint['model_args']['vocab_size']} but dataset "
             f"{dataset!r} has vocab_size={model_args['vocab_size']}; resume with the dataset it was trained on")
try:
    gptconf = GPTConfig(**model_args)
except ValueError as e:
    fail(e)
model = GPT(gptconf)
if init_from == 'resume':
    model.load_state_dict(checkpoint['model'])
    iter_num = checkpoint['iter_num']
    best_val_loss = checkpoint['best_val_loss']
    print(f"resuming from {ckpt_path} at iter {iter_num}")
model.to(device)

scaler = torch.amp.GradScaler(device_type if device_type == 'cuda' else 'cpu', enabled=(dtype == 'float16'))
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2))
if init_from == 'resume':
    optimizer.load_state_dict(checkpoint['optimizer'])
checkpoint = None  # free memory

if master_process:
    os.makedirs(out_dir, exist_ok=True)
    metrics_path = os.path.join(out_dir, 'metrics.jsonl')
    if init_from == 'scratch':
        open(metrics_path, 'w').close()  # a new run starts a new log
    print(f"tokens per iteration: {tokens_per_iter:,}  device: {device}  dtype: {dtype}")
    print(f"parameters: {model.get_num_params() / 1e6:.2f}M total, {model.get_num_active_params() / 1e6:.2f}M active per token")
    if gptconf.use_moe:
        print(f"router: {gptconf.describe()}; MoE layers {[i for i, _ in model.moe_layers()]}")

raw_model = model
if compile:
    print("compiling the model... (takes a ~minute)")
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[ddp_local_rank] if device_type == 'cuda' else None)


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
            with ctx:
                _, lm_loss, router_losses, routings = model(X, Y, keep_expert_out=True)
            losses[k] = lm_loss.item()
            stats.add(routings, router_losses, labels=labels)
        out[split] = losses.mean().item()
    model.train()
    return out, stats


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
# training loop
X, Y = get_batch('train')
t0 = time.time()
local_iter_num = 0
running_mfu = -1.0
while True:
    lr = get_lr(iter_num) if decay_lr else learning_rate
    for param_group in optimizer.param_groups:
        param_group['lr'] = lr

    if iter_num % eval_interval == 0 and master_process:
        losses, val_stats = estimate_loss()
        layers = val_stats.summary(tables=True)
        print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        if layers:
            print(format_routing_table(layers))
        log_json({'iter': iter_num, 'split': 'val', 'loss': losses['val'], 'train_loss': losses['train'],
                  'lr': lr, 'losses': val_stats.loss_summary(), 'layers': layers, 'label_names': label_names})
        if wandb_log:
            wandb.log({'iter': iter_num, 'train/loss': losses['train'], 'val/loss': losses['val'], 'lr': lr})
        if losses['val'] < best_val_loss or always_save_checkpoint:
            best_val_loss = min(best_val_loss, losses['val'])
            if iter_num > 0:
                checkpoint = {
                    'model': raw_model.state_dict(),  # router buffers (e.g. DeepSeek-V3 bias) included
                    'optimizer': optimizer.state_dict(),
                    'model_args': asdict(gptconf),
                    'iter_num': iter_num,
                    'best_val_loss': best_val_loss,
                    'config': config,
                }
                print(f"saving checkpoint to {out_dir}")
                # write then rename: an interrupted save never corrupts the last good checkpoint
                torch.save(checkpoint, ckpt_path + '.tmp')
                os.replace(ckpt_path + '.tmp', ckpt_path)
    if iter_num == 0 and eval_only:
        break

    # forward, backward, update; gradient accumulation simulates a larger batch
    log_step = iter_num % log_interval == 0 and master_process
    step_stats = RoutingStats()  # the routing of this step's batch: counts always, the rest on log steps
    step_lm_loss = torch.zeros((), device=device)
    for micro_step in range(gradient_accumulation_steps):
        if ddp:
            # synchronise gradients only on the last micro-step
            model.require_backward_grad_sync = (micro_step == gradient_accumulation_steps - 1)
        with ctx:
            logits, lm_loss, router_losses, routings = model(X, Y, keep_expert_out=log_step)
            loss = (lm_loss + sum(router_losses.values())) / gradient_accumulation_steps
        step_stats.add(routings, router_losses, full=log_step)
        step_lm_loss += lm_loss.detach() / gradient_accumulation_steps
        X, Y = get_batch('train')  # prefetch while the GPU works on backward
        scaler.scale(loss).backward()
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    # the routers learn how the step went (DeepSeek-V3's bias, GatePro's step count)
    load_counts = step_stats.load_counts()
    if ddp and load_counts:
        all_counts = torch.stack([load_counts[layer] for layer in sorted(load_counts)])
        torch.distributed.all_reduce(all_counts)  # the load of the whole global batch
        load_counts = dict(zip(sorted(load_counts), all_counts))
        step_stats.set_load_counts(load_counts)  # the log's load metrics count the global batch too
    raw_model.step_finished(iter_num, load_counts)

    t1 = time.time()
    dt = t1 - t0
    t0 = t1
    if log_step:
        router_losses = step_stats.loss_summary()
        lm_loss = step_lm_loss.item()
        if local_iter_num >= 5:  # let the training loop settle a bit
            mfu = raw_model.estimate_mfu(batch_size * gradient_accumulation_steps, dt)
            running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
        loss_parts = ''.join(f", {name} {value:.4f}" for name, value in router_losses.items())
        mfu_text = f"{running_mfu * 100:.2f}%" if running_mfu >= 0 else '-'
        print(f"iter {iter_num}: loss {lm_loss:.4f}{loss_parts}, lr {lr:.2e}, time {dt * 1000:.1f}ms, "
              f"{tokens_per_iter / dt:,.0f} tok/s, mfu {mfu_text}")
        log_json({'iter': iter_num, 'split': 'train', 'loss': lm_loss, 'lr': lr, 'losses': router_losses,
                  'layers': step_stats.summary(), 'time_ms': dt * 1000, 'tokens_per_s': tokens_per_iter / dt,
                  'mfu': running_mfu})
        if wandb_log:
            wandb.log({'iter': iter_num, 'train/loss': lm_loss, 'lr': lr, 'mfu': running_mfu * 100,
                       **{f'router/{k}': v for k, v in router_losses.items()}})
    iter_num += 1
    local_iter_num += 1
    if iter_num > max_iters:
        break

if ddp:
    destroy_process_group()
