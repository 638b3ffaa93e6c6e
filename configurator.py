"""
Config overrides for train.py, bench.py and sample.py, nanoGPT style but checked:

    python train.py config/train_shakespeare_char_moe.py --batch_size=32 --router=topk

A bare argument is a Python config file whose top-level assignments override the
defaults; `--key=value` overrides one key (value parsed as a Python literal, else kept
as a string). An unknown key, a missing file or a value of the wrong type raises
ConfigError with a one-line message; the scripts print it and exit without a traceback.
"""

import ast
import difflib
import os
import typing


class ConfigError(Exception):
    pass


def _expected_types(default, annotation=None):
    """The types a key accepts: from its annotation when given (Optional[float] accepts
    float and None), else from the type of its default value."""
    if annotation is not None:
        args = typing.get_args(annotation)
        return tuple(args) if args else (annotation,)
    return (type(default),)


def _type_names(types):
    return ' or '.join(sorted('None' if t is type(None) else t.__name__ for t in types))


def _check(key, value, config, annotations, source):
    if key not in config:
        close = difflib.get_close_matches(key, config.keys(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see the defaults at the top of the script"
        raise ConfigError(f"unknown config key {key!r} in {source}{hint}")
    types = _expected_types(config[key], annotations.get(key))
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # --learning_rate=1 means 1.0
    # bool is a subclass of int: --n_layer=True must not pass as an int
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise ConfigError(f"{key} expects {_type_names(types)}, got {value!r} ({type(value).__name__}) in {source}")
    return value


def apply_overrides(config, argv, annotations=None):
    """Return (new config dict, set of keys the user set) after applying argv.
    config: {key: default value}; annotations: {key: type} for keys whose default is None."""
    annotations = annotations or {}
    config = dict(config)
    user_keys = set()
    for arg in argv:
        if not arg.startswith('--'):
            if not os.path.isfile(arg):
                raise ConfigError(f"config file {arg!r} not found (give a path like config/train_shakespeare_char_moe.py)")
            namespace = {'__file__': arg}  # lets a config file build on another one
            try:
                with open(arg) as f:
                    exec(compile(f.read(), arg, 'exec'), namespace)
            except Exception as e:  # a broken config file is still the user's input
                raise ConfigError(f"could not run config file {arg!r}: {type(e).__name__}: {e}") from None
            for key, value in namespace.items():
                if key.startswith('_') or key == '__builtins__' or callable(value) or isinstance(value, type(os)):
                    continue
                config[key] = _check(key, value, config, annotations, arg)
                user_keys.add(key)
        else:
            if '=' not in arg:
                raise ConfigError(f"argument {arg!r} needs a value: write {arg}=VALUE")
            key, text = arg[2:].split('=', 1)
            try:
                value = ast.literal_eval(text)
            except (SyntaxError, ValueError):
                value = text  # a plain string such as --router=topk
            if key in config and isinstance(config[key], str) and not isinstance(value, str):
                value = text  # --out_dir=123 is the string '123'
            config[key] = _check(key, value, config, annotations, f"--{key}")
            user_keys.add(key)
    return config, user_keys
