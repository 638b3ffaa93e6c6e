"""
Train a Mixture-of-Experts GPT and watch what its routers do.

On one device (cuda > mps > cpu, picked automatically):
$ python train.py
$ python train.py config/train_shakespeare_char_moe.py --router=topk --n_exp=16

With DDP on 4 GPUs of one node, or on 2 nodes of 8 GPUs each (the same command on both
nodes, node_rank 0 and 1, master_addr the address of node 0); add --device=cpu for CPUs (gloo):
$ torchrun --standalone --nproc_per_node=4 train.py config/train_shakespeare_char_moe.py
$ torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 train.py

Ctrl-C or SIGTERM saves a checkpoint and exits (130, 143); --init_from=resume continues it,
and any checkpoint, exactly where the run that wrote it stood.

Every setting below is a config key. A bare argument is a config file (config/*.py),
--key=value overrides one key; an unknown key or a value of the wrong type is an error.
The model keys are the fields of GPTConfig in model.py, and the routing keys (router,
n_exp, top_k, loss coefficients, each router's knobs) those of RouterConfig in routers.py.
What each optional part does lives in the file named where it is called: checkpoint.py
(where a run starts, saving), dataset.py (the data and its seeds), evals.py (the evals
beyond the loss), faults.py (Ctrl-C and SIGTERM, a non-finite loss, one run per out_dir),
system.py (device, DDP).
"""

import gc
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, fields

import numpy as np
import torch
from torch.distributed import init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import check_init_from, rng_state, save_checkpoint, starting_point
from configurator import ConfigError, apply_overrides
from dataset import EVAL, NOISE, open_dataset, read_batch, seed_for, train_offsets
from evals import ExtraEvals
from faults import Interrupt, NonFiniteGuard, hold_out_dir
from fast_experts import describe_impl
from metrics import RoutingStats, format_routing_table
from model import GPT, GPTConfig
from routers import ROUTERS
from system import (PTDTYPES, DDPSync, autocast_context, device_type_of, keep_freed_memory_on_cpu, peak_flops,
                    pick_device, pick_dtype)


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
eval_answers = 32  # val questions per domain with checkable answers (domains: arithmetic, lists), answered
# greedily at each eval and scored by exact match; 0 = off
always_save_checkpoint = False  # if False, save only when val loss improves
overwrite_out_dir = False  # a new run into an out_dir holding a checkpoint: False = refuse, True = replace it
init_from = 'scratch'  # 'scratch', 'resume' (from out_dir/ckpt.pt), or a new run from trained weights: a
# checkpoint (ckpt.pt or its folder; a dense one with n_exp > 1 is upcycled), a Hugging Face GPT-2 folder, or
# 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' (downloaded; pip install transformers)
upcycle_noise = 0.0  # upcycling: Gaussian noise on each expert's copy of the MLP, times the std of the weights
upcycle_drop_ratio = 0.0  # upcycling: Drop-Upcycling's share of hidden units re-initialised per expert (paper: 0.5)
save_on_interrupt = True  # Ctrl-C or SIGTERM saves a checkpoint after the step and exits (a second one: at once)
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
config_keys = [k for k, v in globals().items()  # lower case: an imported constant (EVAL) is not a setting
               if not k.startswith('_') and k.islower() and isinstance(v, (int, float, bool, str, type(None)))
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
try:
    check_init_from(init_from, upcycle_noise, upcycle_drop_ratio)
    hold_out_dir(out_dir, create=False)  # only looks: is a live run training into it?
except ValueError as e:
    fail(e)
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
    seed_offset = ddp_rank  # the initial weights (DDP copies rank 0's); the batches and noise: dataset.seed_for
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
try:
    data = open_dataset(dataset, data_dir, block_size, config['vocab_size'], make_default=master_process)
    extra_evals = ExtraEvals(data, eval_answers, eval_also, block_size, batch_size, eval_iters, device, ctx,
                             verbose=master_process)  # exact-match answers, eval_also
except ValueError as e:
    fail(e)
eval_generator = torch.Generator()  # the eval batches: seeded before each eval (dataset.seed_for)


def get_batch(split, ix=None, with_labels=False):
    """x, y for the sequences starting at offsets ix [batch_size] (a training step's come from
    dataset.train_offsets); ix=None draws them from eval_generator. with_labels: also each
    input token's label (data.label_names), for the specialization metric."""
    # a fresh memmap every batch: numpy memmaps keep growing memory if reused (nanoGPT's note)
    tokens = np.memmap(data.path(split), dtype=np.uint16, mode='r')
    if ix is None:
        ix = torch.randint(len(tokens) - block_size, (batch_size,), generator=eval_generator)
    x, y = read_batch(tokens, ix, block_size)
    if with_labels:  # evaluation only: no need for pinned memory
        labels = data.labels(split, ix, x, block_size)
        return x.to(device), y.to(device), None if labels is None else labels.to(device)
    if device_type == 'cuda':
        x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    else:
        x, y = x.to(device), y.to(device)
    return x, y


# -----------------------------------------------------------------------------
# model: from scratch, resumed, or a new run from trained weights (checkpoint.starting_point)
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
try:
    start = starting_point(init_from, out_dir, {k: config[k] for k in model_keys}, user_keys, data, device,
                           eval_only, upcycle_noise, upcycle_drop_ratio, overwrite_out_dir)
    gptconf = GPTConfig(**start.model_args)
    model = GPT(gptconf)
    start.load_weights(model, seed)
except ValueError as e:  # CheckpointError included
    fail(e)
model.to(device)
iter_num, best_val_loss = start.iter_num, start.best_val_loss  # a resumed run's, else 0 and 1e9
saved_iter = iter_num if init_from == 'resume' else None  # the iteration of the checkpoint on disk
evaluated_at = iter_num if start.evaluated else None  # its eval is in metrics.jsonl already: not again

scaler = torch.amp.GradScaler(device_type if device_type == 'cuda' else 'cpu', enabled=(dtype == 'float16'))
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2))
try:
    start.load_training_state(optimizer, scaler)
except ValueError as e:
    fail(e)
nonfinite = NonFiniteGuard(skip_nonfinite, ddp, master_process, ckpt_path, start.skipped_steps)

if master_process:
    os.makedirs(out_dir, exist_ok=True)
    try:
        out_dir_lock = hold_out_dir(out_dir)  # held until this process ends: one live run per out_dir
    except ValueError as e:
        fail(e)
    metrics_path = os.path.join(out_dir, 'metrics.jsonl')
    moved = start.open_log(metrics_path)  # a new log, or a resumed one cut back to where the checkpoint stands
    if moved:
        print(moved)
    print(f"tokens per iteration: {tokens_per_iter:,}  device: {device}  dtype: {dtype}")
    # a variable-k router (or null experts) uses as many experts as each token takes: sized at top_k
    at_top_k = f" (at top_k={gptconf.top_k} experts)" if gptconf.use_moe and (
        ROUTERS[gptconf.router].variable_k or gptconf.n_null_exp) else ''
    print(f"parameters: {model.get_num_params() / 1e6:.2f}M total, {model.get_num_active_params() / 1e6:.2f}M active "
          f"per token{at_top_k}")
    if gptconf.use_moe:
        print(f"router: {gptconf.describe()}; MoE layers {[i for i, _ in model.moe_layers()]}")
        capability = torch.cuda.get_device_capability(device) if device_type == 'cuda' else None
        impl, why = describe_impl(gptconf.expert_impl, device_type, capability, PTDTYPES[dtype], gptconf.n_embd,
                                  gptconf.expert_hidden)
        print(f"experts: {impl} ({why})")
# MFU against the GPU's own peak where system.PEAK_TFLOPS knows it; none on a CPU
peak, peak_source = peak_flops(torch.cuda.get_device_name(device) if device_type == 'cuda' else device_type)
if master_process:
    print(f"iter lines: time and tok/s of the training step alone (an eval's time is on its step line); "
          f"mfu {'against ' if peak else ''}{peak_source}")

raw_model = model
if compile:
    print("compiling the model... (takes a ~minute)")
    model = torch.compile(model)
ddp_sync = DDPSync(ddp, ddp_world_size, device, master_process)  # nothing to do in one process
if ddp:
    # forward_sync_buffers=False: rank 0 evaluates alone, and a forward that broadcasts buffers
    # would be a collective the other ranks never join. DDP gives every rank rank 0's buffers
    # once, here; the router buffers (DeepSeek-V3's bias, the hash map) then stay equal, checked at the end
    model = DDP(model, device_ids=[ddp_local_rank] if device_type == 'cuda' else None, forward_sync_buffers=False)


@torch.no_grad()
def estimate_loss():
    """Mean cross-entropy (router losses excluded) on eval_iters batches of each split,
    and the routing statistics of the val batches."""
    out = {}
    model.eval()
    for split in ('train', 'val'):
        losses = torch.zeros(eval_iters)
        stats = RoutingStats(data.label_names)
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


def evaluate(it, lr):
    """The eval of iteration it: the losses, the routing of the val batches and the extra
    evals, printed and logged. Returns the val loss."""
    eval_generator.manual_seed(seed_for(seed, it, EVAL))  # the eval batches of this iteration
    eval_start = time.time()
    losses, val_stats = estimate_loss()
    extra = extra_evals.run(model, raw_model, eval_generator)  # answers, eval_also (evals.py)
    val_stats = val_stats.to_host()[0]  # the eval's routing numbers, read back in one transfer
    layers = val_stats.summary(tables=True)
    eval_ms = (time.time() - eval_start) * 1000
    print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} (eval {eval_ms / 1000:.1f}s)")
    for line in extra_evals.describe(extra) + ([format_routing_table(layers)] if layers else []):
        print(line)
    log_json({'iter': it, 'split': 'val', 'loss': losses['val'], 'train_loss': losses['train'], 'lr': lr,
              'eval_ms': eval_ms, 'losses': val_stats.loss_summary(), 'layers': layers,
              'label_names': data.label_names, **extra})
    if wandb_log:
        wandb.log({'iter': it, 'train/loss': losses['train'], 'val/loss': losses['val'], 'lr': lr})
    return losses['val']


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
    try:
        with open(metrics_path, 'a') as f:
            f.write(json.dumps(record) + '\n')
    except OSError as e:  # a full disk: stop here, the checkpoint and the log so far are whole
        print(f"error: cannot write {metrics_path}: {e.strerror or e}; training stopped", file=sys.stderr)
        sys.exit(1)


if wandb_log and master_process:
    import wandb
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)


def save(evaluated):
    """Save the state at the top of iteration iter_num (checkpoint.py: weights_only-loadable
    values, written atomically). evaluated: this iteration's eval is done and logged (a
    resumed run then skips it); False for a save on Ctrl-C."""
    global saved_iter
    try:
        save_checkpoint({
            'model': raw_model.state_dict(),  # router buffers (DeepSeek-V3's bias) and GatePro's step count included
            'optimizer': optimizer.state_dict(),
            'scaler': scaler.state_dict(),
            'model_args': asdict(gptconf),
            'iter_num': iter_num,
            'best_val_loss': best_val_loss,
            'config': config,
            'evaluated': evaluated,
            'skipped_steps': nonfinite.skipped_steps,
            'rng': rng_state(),
        }, ckpt_path)
    except OSError as e:  # a full disk, no permission: the previous checkpoint is whole (atomic save)
        kept = f"the checkpoint of iter {saved_iter} is kept" if saved_iter is not None else "none was written before"
        print(f"error: cannot save {ckpt_path}: {e.strerror or e}; {kept}; training stopped: a run that cannot "
              f"save would train on with nothing to go back to", file=sys.stderr)
        sys.exit(1)
    saved_iter = iter_num


def stop_on_signal():
    """Ctrl-C or SIGTERM, on any rank: save at the top of iteration iter_num, where a resumed
    run continues exactly, and exit with 130 (SIGINT) or 143 (SIGTERM), every rank together."""
    if master_process:
        save(evaluated=False)
        print(f"interrupted at iter {iter_num} ({interrupt.name}): checkpoint saved to {ckpt_path}; continue with "
              f"--init_from=resume --out_dir={out_dir}", file=sys.stderr)
    ddp_sync.leave()  # under DDP: wait for rank 0's save, then leave together
    sys.exit(interrupt.exit_code)


interrupt = Interrupt(ddp)
if save_on_interrupt:  # under torchrun only SIGTERM: Ctrl-C reaches torchrun too, and it ends the workers
    interrupt.install((signal.SIGTERM,) if ddp else (signal.SIGINT, signal.SIGTERM))

# -----------------------------------------------------------------------------
# training loop: iterations iter_num .. max_iters - 1 train; iteration max_iters is only
# evaluated (and saved when it improves), so a run never ends on a step it did not save
t0 = run_start = time.time()
local_iter_num = 0
running_mfu = -1.0
while True:
    if interrupt.requested:  # Ctrl-C or SIGTERM (on any rank): save and exit
        stop_on_signal()
    lr = get_lr(iter_num) if decay_lr else learning_rate
    for param_group in optimizer.param_groups:
        param_group['lr'] = lr

    if (iter_num % eval_interval == 0 or iter_num == max_iters) and master_process and iter_num != evaluated_at:
        val_loss = evaluate(iter_num, lr)  # printed and logged
        if not math.isfinite(val_loss):
            print(f"val loss {val_loss}: checkpoint not saved")  # never overwrite a good one with it
        elif val_loss < best_val_loss or always_save_checkpoint:
            best_val_loss = min(best_val_loss, val_loss)
            if iter_num > 0:
                print(f"saving checkpoint to {out_dir}")
                save(evaluated=True)
        t0 = time.time()  # the step's time starts after its eval and save
    if eval_only or iter_num >= max_iters:
        break

    # forward, backward, update; gradient accumulation simulates a larger batch
    log_step = iter_num % log_interval == 0  # on every rank: under DDP the logged metrics are the global batch's
    step_stats = RoutingStats()  # the routing of this step's batch: counts always, the rest on log steps
    step_lm_loss = torch.zeros((), device=device)
    step_loss = torch.zeros((), device=device)  # everything trained on, router losses included
    offsets = train_offsets(seed, iter_num, data.n_tokens['train'], block_size, batch_size,
                            gradient_accumulation_steps, ddp_world_size, ddp_rank)  # this rank's micro-batches
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
        nonfinite.watch(routings)  # which router's logits went non-finite, for the message
        if micro_step + 1 < gradient_accumulation_steps:
            X, Y = get_batch('train', offsets[micro_step + 1])  # prefetch while the GPU works on backward
        scaler.scale(loss).backward()
        del routings, router_losses  # else they stay alive through the next micro-step's forward
    grad_norm = None
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    # a non-finite loss (on any rank), or gradient outside fp16's loss scaling, must not reach the weights
    finite = nonfinite.is_finite(step_loss, grad_norm, scaler, interrupt)  # one sync per step (and the stop flag)
    if finite:
        scaler.step(optimizer)
        scaler.update()
    else:  # stop with one line, keeping the last checkpoint, or skip the step (faults.py)
        nonfinite.skip_or_stop(iter_num, step_lm_loss, step_stats, grad_norm, saved_iter)
        if grad_norm is not None and scaler.is_enabled():
            scaler.update()  # the scaler saw the inf in unscale_: it lowers the scale
    optimizer.zero_grad(set_to_none=True)
    # the routers learn how the step went (DeepSeek-V3's bias, GatePro's step count, ReMoE's L1
    # coefficient from its positive gates), from the global batch
    step_lm_loss = ddp_sync.global_batch(step_stats, step_lm_loss, log_step, finite)
    # a skipped step routed nothing: GatePro still counts it, DeepSeek-V3's bias and ReMoE's coefficient stay
    load_counts = {layer: c if finite else torch.zeros_like(c) for layer, c in step_stats.router_counts().items()}
    raw_model.step_finished(iter_num, load_counts)
    ddp_sync.share_router_state(raw_model)  # the loss targets' coefficients: rank 0's on every rank

    t1 = time.time()
    dt = t1 - t0
    t0 = t1
    if log_step and master_process and finite:
        host_stats, host = step_stats.to_host(lm_loss=step_lm_loss)  # the step's numbers, read back in one transfer
        router_losses = host_stats.loss_summary()
        lm_loss = host['lm_loss']
        step_layers = host_stats.summary()
        if local_iter_num >= 5 and peak:  # let the training loop settle a bit
            # the flops of the experts that ran: each layer's mean experts per token in this step
            ran = {row['layer']: row['experts_per_token'] for row in step_layers if 'experts_per_token' in row}
            mfu = raw_model.estimate_mfu(batch_size * gradient_accumulation_steps, dt, peak, ran or None)
            running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
        loss_parts = ''.join(f", {name} {value:.4f}" for name, value in router_losses.items())
        mfu_text = ''  # none on a CPU
        if peak:
            mfu_text = f", mfu {running_mfu * 100:.2f}%" if running_mfu >= 0 else ", mfu -"
        print(f"iter {iter_num}: loss {lm_loss:.4f}{loss_parts}, lr {lr:.2e}, time {dt * 1000:.1f}ms, "
              f"{tokens_per_iter / dt:,.0f} tok/s{mfu_text}")
        log_json({'iter': iter_num, 'split': 'train', 'loss': lm_loss, 'lr': lr, 'losses': router_losses,
                  'layers': step_layers, 'time_ms': dt * 1000, 'tokens_per_s': tokens_per_iter / dt,
                  'mfu': running_mfu if peak else None, 'skipped_steps': nonfinite.skipped_steps})
        if wandb_log:
            wandb.log({'iter': iter_num, 'train/loss': lm_loss, 'lr': lr, **({'mfu': running_mfu * 100} if peak else {}),
                       **{f'router/{k}': v for k, v in router_losses.items()}})
    iter_num += 1
    local_iter_num += 1

if ddp:  # DDP's reducer holds gloo's work objects: free them while the process group still lives
    del model
    gc.collect()
ddp_sync.finish(raw_model)  # every rank must end with the same model: checked, then the ranks leave together
if master_process and not eval_only:  # what the run left, and where to go from here
    saved = f"checkpoint {ckpt_path} (iter {saved_iter})" if saved_iter is not None else "no checkpoint saved"
    best = f"{best_val_loss:.4f}" if best_val_loss < 1e9 else "none"  # 1e9: no finite eval yet
    print(f"done: iter {iter_num} in {time.time() - run_start:.0f}s; best val loss {best}; {saved}; "
          f"next: python sample.py --out_dir={out_dir}, python plot.py {out_dir}")
