"""Helpers shared by the config files in configs/: load the default config, parse config args.

Config files are loaded by path (`--config=configs/<file>.py[:arg]`), so they cannot import
each other as modules; `load_config_file` loads `configs/default.py` (or any config file) by
path, and `parse_arg` reads the `key=value,key=value` argument after the colon.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any

import ml_collections


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """Calls `get_config([arg])` of the config file at `path`.

    Args:
      path: a config file defining `get_config`.
      arg: the config argument (the text after ':' on the command line), or None.

    Returns:
      The config it builds.
    """
    path = os.path.abspath(path)
    name = "_nfnets_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)


def sibling(config_file: str, name: str) -> str:
    """The path of config file `name` next to `config_file` (pass `__file__`)."""
    return os.path.join(os.path.dirname(os.path.abspath(config_file)), name)


def _convert(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def parse_arg(arg: str | None, defaults: dict[str, Any], positional: str | None = None,
              ) -> dict[str, Any]:
    """Parses a config argument like 'F3' or 'variant=F3,batch_size=1024'.

    Args:
      arg: the argument text, or None / '' for all defaults.
      defaults: every accepted key with its default value (the value's type is kept).
      positional: the key a bare value (no '=') sets, e.g. 'variant'.

    Returns:
      `defaults` updated with the parsed values.

    Raises:
      ValueError: on an unknown key or a bare value when no positional key is accepted.
    """
    result = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        if "=" in item:
            key, value = item.split("=", 1)
        elif positional is not None:
            key, value = positional, item
        else:
            raise ValueError(f"Config argument {item!r} needs the form key=value.")
        key = key.strip()
        if key not in defaults:
            raise ValueError(
                f"Unknown config argument {key!r}; valid: {', '.join(sorted(defaults))}.")
        value = value.strip()
        default = defaults[key]
        if isinstance(default, bool):
            result[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, int | float) and default is not None:
            result[key] = type(default)(_convert(value))
        else:
            result[key] = value
    return result
