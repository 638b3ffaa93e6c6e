"""
Checkpoints that run no code when loaded, are never half-written, and continue a run
exactly; and what ends a run early (Ctrl-C, a non-finite loss) without losing the last
good one. Used by train.py and sample.py.

save_checkpoint    write a temporary file in the same folder, flush, fsync, rename: the
                   checkpoint on disk is always the old one or the new one, never a mix
load_checkpoint    torch.load(weights_only=True): tensors and plain values load, anything
                   that would need code is refused; every problem is a CheckpointError
                   with a one-line message naming the file
load_model_state   load_state_dict, with a one-line error when the shapes do not fit
load_pretrained    the weights a new run starts from (train.py's init_from=PATH or 'gpt2'):
                   a checkpoint of this project, or a Hugging Face GPT-2 folder, read with
                   safetensors (or weights_only), never plain pickle
load_start_weights load_state_dict for a new run: the routers may differ from the source's
rng_state          the torch, CUDA, numpy and Python generators, as tensors and numbers
seed_for           the seeds of one iteration: train.py draws each step's batch and
                   reseeds the noise (dropout, router jitter and noise) from (seed,
                   iteration, micro-step), so a resumed run, or a DDP run, draws exactly
                   what one uninterrupted process draws
Interrupt          Ctrl-C: finish the step, save, exit; a second Ctrl-C ends at once
nonfinite_report   which loss part and which router went non-finite
"""

import contextlib
import math
import os
import pickle
import random
import re
import signal
import warnings

import numpy as np
import torch

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
# starting a new run from trained weights

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
    from model import gpt2_state_dict  # model.py imports nothing from here: no cycle
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


DATA, EVAL, NOISE = 0, 1, 2  # the streams seed_for separates


def seed_for(seed, iter_num, stream, index=0):
    """A 64-bit seed for one (iteration, stream, index), mixed from the run's seed by numpy's
    SeedSequence so that nearby iterations get unrelated streams. train.py seeds the
    step's batch (DATA), the eval batches (EVAL) and, per micro-step, torch's global
    generator (NOISE) this way: what a step draws depends on nothing that came before."""
    entropy = [seed % 2**64, iter_num, stream, index]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


# -----------------------------------------------------------------------------
# stopping


class Interrupt:
    """Ctrl-C (SIGINT) while training. The first one only sets `requested`: the training
    loop finishes its step, saves a checkpoint and exits. It also restores the default
    action, so a second Ctrl-C ends the process at once, even inside a long operation
    (the checkpoint on disk stays whole: saves are atomic)."""

    def __init__(self):
        self.requested = False

    def install(self):
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        # os.write, not print: a print here could re-enter a print the loop was in the middle of
        os.write(1, b"\ninterrupt: saving a checkpoint after this step (Ctrl-C again to quit without saving)\n")


def nonfinite_report(iter_num, lm_loss, router_losses, bad_layers, grad_norm=None):
    """One line on a step whose loss (or gradient) is not finite: every loss part, and the
    first MoE layer whose router produced non-finite logits.
    lm_loss: float; router_losses: {name: float}; bad_layers: [layer index] whose router
    logits were not finite this step, in layer order; grad_norm: float or None."""
    losses = {'loss': lm_loss, **router_losses}
    parts = [f"{name} {value:.4g}" for name, value in losses.items()]
    gradient_only = grad_norm is not None and not math.isfinite(grad_norm) and all(map(math.isfinite, losses.values()))
    if grad_norm is not None and not math.isfinite(grad_norm):
        parts.append(f"gradient norm {grad_norm:.4g}")
    where = (f"first non-finite router logits in layer {bad_layers[0]}" if bad_layers
             else "router logits finite in every layer")
    return f"non-finite {'gradient' if gradient_only else 'loss'} at iter {iter_num}: {', '.join(parts)}; {where}"
