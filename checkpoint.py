"""
Checkpoints that run no code when loaded, are never half-written, and continue a run
exactly; and where a run starts: from scratch, from its own checkpoint (resume), or as a
new run from trained weights (a checkpoint, upcycled when it is dense; GPT-2). Used by
train.py and sample.py.

save_checkpoint    write a temporary file in the same folder, flush, fsync, rename: the
                   checkpoint on disk is always the old one or the new one, never a mix
load_checkpoint    torch.load(weights_only=True): tensors and plain values load, anything
                   that would need code is refused; every problem is a CheckpointError
                   with a one-line message naming the file
load_model_state   load_state_dict, with a one-line error when the shapes do not fit
starting_point     train.py's init_from: the model's arguments, and what to load into it
                   once it is built (Start: the weights, then the optimizer and counters)
load_pretrained    the weights a new run starts from (init_from=PATH or 'gpt2'): a
                   checkpoint of this project, or a Hugging Face GPT-2 folder, read with
                   safetensors (or weights_only), never plain pickle
load_start_weights load_state_dict for a new run: the routers may differ from the source's
rng_state          the torch, CUDA, numpy and Python generators, as tensors and numbers
"""

import contextlib
import json
import os
import pickle
import random
import re
import warnings
from dataclasses import dataclass, fields
from typing import Optional

import numpy as np
import torch

from dataset import check_tokens
from model import GPTConfig, gpt2_state_dict, upcycle_state_dict
from routers import RouterConfig

PLAIN = (bool, int, float, str, type(None))


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; str(e) is one line naming the file."""


# -----------------------------------------------------------------------------
# saving


def check_plain(value, where='checkpoint'):
    """Raise TypeError unless value is tensors and plain values (bool, int, float, str,
    None) in dicts, lists and tuples: what torch.load(weights_only=True) reads back."""
    if isinstance(value, (torch.Tensor, *PLAIN)):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            check_plain(key, f"{where} key")
            check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]")
    else:
        raise TypeError(f"{where} is a {type(value).__name__}: weights_only loading would refuse it; "
                        f"checkpoints hold tensors and plain values only")


def save_checkpoint(checkpoint, path):
    """Write checkpoint to path atomically: torch.save to path + '.tmp' in the same folder,
    flush and fsync it, then os.replace it over path (and fsync the folder, so the rename
    itself survives a power cut). A process killed at any moment leaves path absent, the
    old checkpoint or the new one; at worst a stale .tmp, which the next save overwrites."""
    check_plain(checkpoint)
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # not every OS lets a folder be opened and synced
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -----------------------------------------------------------------------------
# loading


def _first_line(error):
    text = str(error).strip()
    if isinstance(error, EOFError) or not text:
        return f"{type(error).__name__}: the file ends early"
    line = text.splitlines()[0]
    return f"{type(error).__name__}: {line[:160]}"


def load_checkpoint(path, map_location='cpu', required=('model', 'model_args')):
    """The checkpoint dict at path, read with torch.load(weights_only=True): a file that
    would need code to unpickle is refused before any of it runs. Raises CheckpointError
    (one line naming the file) for a refused, truncated or foreign file, or a dict that
    lacks one of the `required` keys."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols: the error below says it all
            warnings.simplefilter('ignore')
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        message = str(e)
        if 'Weights only load failed' not in message:
            raise CheckpointError(f"checkpoint {path} cannot be read: it is truncated or not a checkpoint "
                                  f"({_first_line(e)})") from None
        found = re.search(r'WeightsUnpickler error:\s*([^\n]+)', message)
        reason = found.group(1).split('. ')[0].strip() if found else 'it names a class or function'
        raise CheckpointError(f"checkpoint {path} was refused: loading it would run code ({reason}); a checkpoint "
                              f"may hold only tensors and plain values, and nothing in it was run") from None
    except Exception as e:  # zip errors, EOF, garbage: torch raises many kinds
        raise CheckpointError(f"checkpoint {path} cannot be read: it is truncated or not a checkpoint "
                              f"({_first_line(e)})") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a training checkpoint "
                              f"(a dict with {', '.join(required)}, ...)")
    missing = [key for key in required if key not in checkpoint]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a training checkpoint of this project: "
                              f"it has no {', '.join(repr(k) for k in missing)}")
    for key, kind in (('model', dict), ('model_args', dict), ('optimizer', dict), ('iter_num', int)):
        if key in checkpoint and not isinstance(checkpoint[key], kind):
            raise CheckpointError(f"checkpoint {path} is damaged: {key!r} is a {type(checkpoint[key]).__name__}, "
                                  f"not a {kind.__name__}")
    return checkpoint


def load_model_state(model, state_dict, path):
    """model.load_state_dict(state_dict), or a CheckpointError naming the first thing that
    does not fit (a shape, a missing or an unexpected key)."""
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, ValueError, TypeError, KeyError) as e:
        problems = [line.strip() for line in str(e).splitlines()[1:] if line.strip()] or [str(e)]
        first = problems[0] if len(problems[0]) <= 200 else problems[0][:200] + '...'
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ''
        raise CheckpointError(f"checkpoint {path} does not fit the model it describes: {first}{more}") from None


# -----------------------------------------------------------------------------
# where a run starts

# keys that set parameter shapes: a resumed run takes them from its checkpoint
SHAPE_KEYS = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'n_exp', 'moe_every', 'expert_hidden',
              'n_shared_exp', 'router')


@dataclass
class Start:
    """Where a run starts (starting_point). model_args: GPTConfig's arguments. Once the model
    is built, load_weights puts the starting weights in it, and once the optimizer is,
    load_training_state continues a resumed run's optimizer, loss scaler and generators.
    The counters are a resumed run's (a new run starts them at 0)."""
    init_from: str
    model_args: dict
    source: str = ''  # the file or folder the weights come from
    checkpoint: Optional[dict] = None  # resume: the whole checkpoint
    weights: Optional[dict] = None  # a new run from trained weights: the source's state dict
    upcycle: bool = False  # a dense source into an MoE: every expert a copy of its MLP
    upcycle_noise: float = 0.0
    upcycle_drop_ratio: float = 0.0
    iter_num: int = 0
    best_val_loss: float = 1e9
    skipped_steps: int = 0  # steps skipped for a non-finite loss, over the whole run
    eval_logged: bool = False  # saved right after the eval of iter_num, which is in the log already
    eval_only: bool = False

    @property
    def evaluated(self):
        """iter_num's eval is done: a resumed run does not repeat it (--eval_only does)."""
        return self.eval_logged and not self.eval_only

    def load_weights(self, model, seed):
        """The starting weights into the freshly built model (nothing from scratch); one line
        says where they came from. Raises CheckpointError or ValueError (one line)."""
        if self.checkpoint is not None:
            load_model_state(model, self.checkpoint['model'], self.source)
            print(f"resuming from {self.source} at iter {self.iter_num}")
        elif self.weights is not None:
            state, self.weights = self.weights, None  # free the source's copy once loaded
            try:
                if self.upcycle:  # Komatsuzaki et al. 2022: every expert a copy of its layer's MLP, a fresh gate
                    state = upcycle_state_dict(state, model.config, self.upcycle_noise, self.upcycle_drop_ratio,
                                               torch.Generator().manual_seed(seed))
                # a shorter block_size than the source's: keep its first position embeddings (nanoGPT's crop)
                state['transformer.wpe.weight'] = state['transformer.wpe.weight'][:model.config.block_size]
                fresh = load_start_weights(model, state, self.source)
            except KeyError as e:
                raise CheckpointError(f"{self.source} is damaged: it has no {e}") from None
            print(f"a new run from {self.source}" + (
                f": upcycled, every expert of MoE layers {[i for i, _ in model.moe_layers()]} is a copy of its MLP"
                if self.upcycle else '') + (f"; {len(fresh)} router tensors start fresh" if fresh else ''))

    def open_log(self, path):
        """The run's metrics.jsonl. A new run starts a new one. A resumed run goes on where its
        checkpoint stands: lines logged after it (the run went on past its last save, then was
        killed) would appear twice once the resumed run logs those iterations again, so they
        are moved to metrics.replaced.jsonl beside it (appended, with a torn last line if
        the kill cut one). Returns a line saying what moved, or ''."""
        if self.init_from != 'resume':
            open(path, 'w').close()
            return ''
        if not os.path.exists(path):
            return ''
        with open(path) as f:
            lines = f.read().splitlines(keepends=True)
        keep, moved = [], []
        for line in lines:
            try:
                record = json.loads(line) if line.endswith('\n') else None  # no newline: torn by a kill
            except ValueError:
                record = None
            # the checkpoint covers the training steps before its iteration, and that iteration's
            # eval when it was saved right after it
            covered = isinstance(record, dict) and (record.get('iter', 0) < self.iter_num or (
                record.get('iter') == self.iter_num and record.get('split') == 'val' and self.eval_logged))
            (keep if covered else moved).append(line)
        if not moved:
            return ''
        replaced = os.path.join(os.path.dirname(path), 'metrics.replaced.jsonl')
        with open(replaced, 'a') as f:
            f.writelines(line if line.endswith('\n') else line + '\n' for line in moved)
        tmp = path + '.tmp'
        with open(tmp, 'w') as f:
            f.writelines(keep)
        os.replace(tmp, path)
        return (f"{len(moved)} lines of {path} logged after the checkpoint's iter {self.iter_num} moved to "
                f"{replaced}: this run logs those iterations again")

    def load_training_state(self, optimizer, scaler):
        """A resumed run's optimizer, loss scaler and random generators (nothing otherwise)."""
        checkpoint, self.checkpoint = self.checkpoint, None  # free memory
        if checkpoint is None:
            return
        try:
            optimizer.load_state_dict(checkpoint['optimizer'])
            if scaler.is_enabled() and checkpoint.get('scaler'):
                scaler.load_state_dict(checkpoint['scaler'])
            if 'rng' in checkpoint:
                set_rng_state(checkpoint['rng'])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {self.source} is damaged: its optimizer or RNG state does not fit "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def check_init_from(init_from, upcycle_noise, upcycle_drop_ratio):
    """The settings of where a run starts, checked before anything else is read. Raises
    ValueError (one line)."""
    if init_from not in ('scratch', 'resume', *GPT2_NAMES) and not os.path.exists(init_from):
        raise ValueError(f"init_from={init_from!r} must be 'scratch', 'resume', {', '.join(map(repr, GPT2_NAMES))}, "
                         f"or the path of a checkpoint (ckpt.pt or its folder) or of a Hugging Face GPT-2 folder; "
                         f"{init_from} does not exist")
    if upcycle_noise < 0 or not 0 <= upcycle_drop_ratio <= 1:
        raise ValueError(f"upcycle_noise={upcycle_noise} must be >= 0 and upcycle_drop_ratio={upcycle_drop_ratio} "
                         f"between 0 and 1")


def starting_point(init_from, out_dir, model_args, user_keys, data, device, eval_only=False, upcycle_noise=0.0,
                   upcycle_drop_ratio=0.0, overwrite=False):
    """Where the run starts, as a Start. init_from: 'scratch'; 'resume' (out_dir/ckpt.pt: the
    same run goes on, shape keys from the checkpoint); or a new run from trained weights,
    at iteration 0 with a fresh optimizer, in its own out_dir, on any dataset with the same
    vocabulary: a checkpoint path (a dense one into an MoE is upcycled), a Hugging Face
    GPT-2 folder, or a GPT-2 name. model_args: GPTConfig's arguments from the config;
    user_keys: the keys the user set (the others may come from the checkpoint); data: the
    dataset.Dataset the run trains on. A new run into an out_dir that holds a checkpoint
    would replace it at its first save: refused unless overwrite. Raises CheckpointError
    or ValueError (one line)."""
    model_args = dict(model_args, vocab_size=data.vocab_size)  # no meta.pkl: GPT-2's 50257 padded to 50304
    if init_from == 'resume':
        return _resume(out_dir, model_args, user_keys, data, device, eval_only)
    if init_from == 'scratch':
        start = Start(init_from, model_args)
    else:
        start = _from_trained(init_from, out_dir, model_args, user_keys, data, device, upcycle_noise,
                              upcycle_drop_ratio)
    if not overwrite:
        refuse_to_replace(out_dir)
    return start


def refuse_to_replace(out_dir):
    """Raise ValueError (one line) when out_dir holds a checkpoint, saying what it holds and
    the ways on. Reads the checkpoint's counters only (its tensors are mapped, not read)."""
    path = os.path.join(out_dir, 'ckpt.pt')
    if not os.path.exists(path):
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            held = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        what = f"iter {held['iter_num']}, val loss {held['best_val_loss']:.4f}"
    except Exception:  # damaged or foreign: still not ours to replace
        what = "unreadable"
    raise ValueError(f"out_dir={out_dir} holds a checkpoint ({what}) that a new run would replace; continue it "
                     f"with --init_from=resume, set another --out_dir, or replace it with --overwrite_out_dir=True")


def _resume(out_dir, model_args, user_keys, data, device, eval_only):
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    if not os.path.exists(ckpt_path):
        raise CheckpointError(f"init_from='resume' but {ckpt_path} does not exist; train first or set --out_dir")
    # weights_only: a checkpoint that would need code to load is refused, and nothing in it runs
    checkpoint = load_checkpoint(ckpt_path, device, required=('model', 'optimizer', 'model_args', 'iter_num',
                                                              'best_val_loss'))
    saved = checkpoint['model_args']
    missing = [k for k in (*SHAPE_KEYS, 'vocab_size') if k not in saved]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt_path} is damaged: its model_args have no {', '.join(missing)}")
    # keys that set parameter shapes come from the checkpoint; the rest (coefficients,
    # capacity, dropout, router windows) may change on resume, e.g. to hot-swap a router
    for k in SHAPE_KEYS:
        if k in user_keys and model_args[k] != saved[k]:
            raise ValueError(f"{k}={model_args[k]} differs from the checkpoint's {k}={saved[k]}; "
                             f"drop --{k} to resume, or use another --out_dir")
        model_args[k] = saved[k]
    if saved['vocab_size'] != model_args['vocab_size']:
        raise ValueError(f"checkpoint {ckpt_path} has vocab_size={saved['vocab_size']} but dataset "
                         f"{data.name!r} has vocab_size={model_args['vocab_size']}; resume with the dataset it was "
                         f"trained on")
    # evaluated: saved right after this iteration's eval, which is in metrics.jsonl already
    return Start('resume', model_args, ckpt_path, checkpoint=checkpoint, iter_num=checkpoint['iter_num'],
                 best_val_loss=checkpoint['best_val_loss'], skipped_steps=checkpoint.get('skipped_steps', 0),
                 eval_logged=checkpoint.get('evaluated', True), eval_only=eval_only)


def _from_trained(init_from, out_dir, model_args, user_keys, data, device, upcycle_noise, upcycle_drop_ratio):
    source, source_args, weights = load_pretrained(init_from, device)
    source_dir = source if os.path.isdir(source) else os.path.dirname(source)
    if os.path.realpath(out_dir) == os.path.realpath(source_dir):
        raise ValueError(f"out_dir={out_dir} holds the weights this run starts from, and a new run would overwrite "
                         f"them; set another --out_dir (or --init_from=resume to continue that run)")
    missing = [k for k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size', 'n_exp')
               if k not in source_args]
    if missing:
        raise CheckpointError(f"{source} is damaged: its model_args have no {', '.join(missing)}")
    if data.meta and source_args['vocab_size'] != data.vocab_size:
        raise ValueError(f"{source} has vocab_size={source_args['vocab_size']} but dataset {data.name!r} has "
                         f"vocab_size={data.vocab_size}; start from a model trained on the same vocabulary")
    if not data.meta:  # no vocab_size to compare: the token ids must fit the source's vocabulary
        for split in ('train', 'val'):
            check_tokens(data.path(split), source_args['vocab_size'], f"that of {source}")
    model_args['vocab_size'] = source_args['vocab_size']
    model_defaults = {f.name: f.default for f in fields(GPTConfig)}
    for k in ('n_layer', 'n_head', 'n_embd', 'bias', 'gelu_approximate'):
        value = source_args.get(k, model_defaults[k])
        if k in user_keys and model_args[k] != value:
            raise ValueError(f"{k}={model_args[k]} differs from {k}={value} of {source}: a run from trained weights "
                             f"keeps their shape; drop --{k}")
        model_args[k] = value
    if model_args['block_size'] > source_args['block_size']:
        raise ValueError(f"block_size={model_args['block_size']} is longer than the {source_args['block_size']} "
                         f"positions of {source}; set --block_size={source_args['block_size']} or less")
    # the MoE layout is the source's unless given; a dense source with n_exp > 1 is upcycled
    for k in ('n_exp', 'moe_every', 'expert_hidden', 'n_shared_exp', 'router'):
        if k not in user_keys and k in source_args:
            model_args[k] = source_args[k]
    upcycle = source_args['n_exp'] <= 1 and model_args['n_exp'] > 1
    if upcycle and model_args['bias']:
        raise ValueError(f"{source} has biases (bias=True, as GPT-2): upcycling it would need biases in the experts, "
                         f"which have none; fine-tune it dense (--n_exp=1)")
    if upcycle and 'expert_hidden' not in user_keys:
        model_args['expert_hidden'] = 4 * model_args['n_embd']  # the MLP's width: each expert is a copy
    if (upcycle_noise or upcycle_drop_ratio) and not upcycle:
        raise ValueError(f"upcycle_noise={upcycle_noise}, upcycle_drop_ratio={upcycle_drop_ratio} apply only when "
                         f"upcycling, and {source} is {'an MoE' if source_args['n_exp'] > 1 else 'dense'} with "
                         f"n_exp={source_args['n_exp']} while this run has n_exp={model_args['n_exp']}")
    if source_args['n_exp'] > 1:
        for k in ('n_exp', 'moe_every', 'expert_hidden', 'n_shared_exp'):
            if model_args[k] != source_args.get(k):
                raise ValueError(f"{k}={model_args[k]} differs from {k}={source_args.get(k)} of {source}, an MoE "
                                 f"whose experts keep their shapes; drop --{k}")
        if model_args['router'] == source_args.get('router'):  # the same router: its settings too, unless given
            replaced = RouterConfig.replaced_by(user_keys)
            for f in fields(RouterConfig):
                if f.name not in user_keys and f.name not in replaced and f.name in source_args:
                    model_args[f.name] = source_args[f.name]
    return Start(init_from, model_args, source, weights=weights, upcycle=upcycle, upcycle_noise=upcycle_noise,
                 upcycle_drop_ratio=upcycle_drop_ratio)


# -----------------------------------------------------------------------------
# trained weights: this project's checkpoints, Hugging Face GPT-2

GPT2_NAMES = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')  # OpenAI's GPT-2 sizes on the Hugging Face hub


def is_hf_folder(path):
    return os.path.isdir(path) and os.path.exists(os.path.join(path, 'config.json'))


def load_hf_folder(folder):
    """(config dict, {name: tensor}) of a Hugging Face model folder (what save_pretrained
    writes): config.json, and model.safetensors (or its shards) read with safetensors,
    which runs no code; a folder with only pytorch_model.bin is read with weights_only."""
    import json
    config_path = os.path.join(folder, 'config.json')
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_path} cannot be read: {_first_line(e)}") from None
    index = os.path.join(folder, 'model.safetensors.index.json')
    files = ['model.safetensors']
    if not os.path.exists(os.path.join(folder, 'model.safetensors')) and os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)['weight_map'].values()))
    if os.path.exists(os.path.join(folder, files[0])):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError(f"{folder} holds safetensors weights: pip install safetensors "
                                  f"(it comes with transformers)") from None
        state = {}
        for name in files:
            try:
                state.update(load_file(os.path.join(folder, name)))
            except Exception as e:  # safetensors raises its own error types for damaged files
                raise CheckpointError(f"{os.path.join(folder, name)} cannot be read: {_first_line(e)}") from None
        return config, state
    bin_path = os.path.join(folder, 'pytorch_model.bin')
    if not os.path.exists(bin_path):
        raise CheckpointError(f"{folder} has a config.json but no model.safetensors or pytorch_model.bin")
    return config, load_checkpoint(bin_path, required=())


def download_gpt2(name):
    """The local folder of OpenAI's GPT-2 `name` (GPT2_NAMES) from the Hugging Face hub,
    downloaded on first use (huggingface_hub's cache), config and safetensors weights only."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"init_from={name!r} needs the Hugging Face libraries: "
                              f"pip install transformers") from None
    try:
        return snapshot_download(f'openai-community/{name}', allow_patterns=['config.json', 'model.safetensors'])
    except Exception as e:  # no network, no such repository, a full disk: huggingface_hub has many errors
        raise CheckpointError(f"GPT-2 {name!r} could not be downloaded from the Hugging Face hub "
                              f"({_first_line(e)})") from None


def load_pretrained(init_from, map_location='cpu'):
    """(source, model_args, state_dict) for init_from: a checkpoint of this project (its
    ckpt.pt, or the folder holding one), a Hugging Face GPT-2 folder (config.json), or one
    of GPT2_NAMES. source names the file or folder the weights came from. Raises
    CheckpointError (one line)."""
    if init_from in GPT2_NAMES or is_hf_folder(init_from):
        folder = download_gpt2(init_from) if init_from in GPT2_NAMES else init_from
        try:
            model_args, state = gpt2_state_dict(*load_hf_folder(folder))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{folder}: {e}") from None
        return folder, model_args, state
    path = os.path.join(init_from, 'ckpt.pt') if os.path.isdir(init_from) else init_from
    if not os.path.exists(path):
        raise CheckpointError(f"init_from={init_from!r}: {path} does not exist (a ckpt.pt, the folder holding one, "
                              f"or a Hugging Face GPT-2 folder with a config.json)")
    checkpoint = load_checkpoint(path, map_location)
    return path, checkpoint['model_args'], checkpoint['model']


def load_start_weights(model, state_dict, source):
    """Load the weights a new run starts from: like load_model_state, except that the
    routers may differ from the source's (another router, or none in a dense source
    being upcycled). Router tensors that the model has and the source lacks, or holds
    with another shape, keep their fresh initialisation; the source's other router tensors
    are dropped; and the routers' per-run state starts again at 0: GatePro's step count,
    and the L_v / L_o coefficients a loss target set at the first step (a new run sets
    them again on its own first step). Returns the names of the router tensors that stayed
    fresh."""
    own = model.state_dict()
    is_router = lambda name: '.ffn.router.' in name
    # GatePro's step count: a buffer 'iter_num' (an '_extra_state' in older checkpoints);
    # the calibrated coefficients: 'var_loss_scale', 'ortho_loss_scale'
    per_run_names = ('_extra_state', '.iter_num', '.var_loss_scale', '.ortho_loss_scale')
    per_run = lambda name: name.endswith(per_run_names)
    state = {name: tensor for name, tensor in state_dict.items()
             if not is_router(name) or (name in own and not per_run(name) and own[name].shape == tensor.shape)}
    fresh = [name for name in own if is_router(name) and name not in state]
    state.update({name: own[name] for name in fresh})
    load_model_state(model, state, source)
    return fresh


# -----------------------------------------------------------------------------
# randomness


def rng_state():
    """Every global generator's state, as tensors and plain values (weights_only loads it)."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    state = {
        'torch': torch.get_rng_state(),
        'numpy': {'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos), 'has_gauss': int(has_gauss),
                  'cached_gaussian': float(cached_gaussian)},
        'python': {'version': version, 'state': torch.tensor(python_state, dtype=torch.int64),
                   'gauss_next': gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what rng_state returned (CUDA's only when this machine has as many GPUs)."""
    torch.set_rng_state(state['torch'].cpu())
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    p = state['python']
    random.setstate((p['version'], tuple(p['state'].tolist()), p['gauss_next']))
    if 'cuda' in state and torch.cuda.is_available() and torch.cuda.device_count() == len(state['cuda']):
        torch.cuda.set_rng_state_all([s.cpu() for s in state['cuda']])
