"""Config-file helpers: load config files by path, parse the config argument.

Config files are loaded by path (`--config=configs/<file>.py[:arg]`), so they cannot import
each other as modules; `load_config_file` loads `configs/default.py` (or any config file) by
path, and `parse_arg` reads the `key=value,key=value` argument after the colon (values are
checked against the type of each key's default). Variants are validated by
`models.registry.variant`; configs of a resumed run are compared by `train.resume`.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import ml_collections

TRUE_STRINGS = ("1", "true", "yes")
FALSE_STRINGS = ("0", "false", "no")


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


def parse_bool(value: str, key: str) -> bool:
    """'1' / 'true' / 'yes' -> True, '0' / 'false' / 'no' -> False (any case), else an error.

    Raises:
      ValueError: naming `key`, the value and the accepted spellings.
    """
    text = value.strip().lower()
    if text in TRUE_STRINGS or text in FALSE_STRINGS:
        return text in TRUE_STRINGS
    raise ValueError(
        f"Config argument {key!r} expects a bool ({'/'.join(TRUE_STRINGS)} or "
        f"{'/'.join(FALSE_STRINGS)}), got {value!r}."
    )


def _coerce(key: str, value: str, default: Any) -> Any:
    """`value` converted to the type of `default`; never truncates or guesses."""
    if isinstance(default, bool):
        return parse_bool(value, key)
    if isinstance(default, int):
        try:
            return int(value)
        except ValueError:
            raise ValueError(
                f"Config argument {key!r} expects an integer, got {value!r}."
            ) from None
    if isinstance(default, float):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"Config argument {key!r} expects a number, got {value!r}.") from None
    return value


def parse_arg(
    arg: str | None,
    defaults: dict[str, Any],
    positional: str | None = None,
) -> dict[str, Any]:
    """Parses a config argument like 'F3' or 'variant=F3,batch_size=1024'.

    Values take the type of their default: bools accept 1/true/yes and 0/false/no (any
    case), ints only integer literals ('0.5' is an error, not 0), floats any number.

    Args:
      arg: the argument text, or None / '' for all defaults.
      defaults: every accepted key with its default value (the value's type is kept).
      positional: the key a bare value (no '=') sets, e.g. 'variant'.

    Returns:
      `defaults` updated with the parsed values.

    Raises:
      ValueError: on an unknown key, a bare value when no positional key is accepted, or a
        value that does not fit its key's type (the message names key, value and type).
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
                f"Unknown config argument {key!r}; valid: {', '.join(sorted(defaults))}."
            )
        result[key] = _coerce(key, value.strip(), defaults[key])
    return result
