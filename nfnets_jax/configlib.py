"""Config helpers: load config files, parse config args, validate, compare configs on resume.

Config files are loaded by path (`--config=configs/<file>.py[:arg]`), so they cannot import
each other as modules; `load_config_file` loads `configs/default.py` (or any config file) by
path, and `parse_arg` reads the `key=value,key=value` argument after the colon (values are
checked against the type of each key's default). `check_variant` validates a model variant
without building anything. `resume_changes` compares the config record of a workdir
(`config.json`) with a new one and sorts the differences into those that make the
workdir's checkpoint unusable (model, parameter shapes, optimizer state structure) and the
harmless rest.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

TRUE_STRINGS = ("1", "true", "yes")
FALSE_STRINGS = ("0", "false", "no")

# Fields of `config.model` that leave the parameters and the network unchanged: the
# regularisation rates, and how convolutions and their gradients are computed (same function,
# same parameters). Every other `config.model.*` field defines the model.
MODEL_FIELDS_SAFE_TO_CHANGE = ("drop_rate", "stochdepth_rate", "group_conv", "conv_grad")

# Fields outside `config.model` that define the parameter shapes or the optimizer state
# structure, each with the function of its value that must not change: the classifier size,
# and whether the SAM wrapper, AGC and weight decay are in the optimizer chain (their values,
# e.g. another AGC threshold, may change).
RESUME_STRUCTURE: dict[str, Callable[[Any], Any]] = {
    "config.model_name": lambda v: v,
    "plan.num_classes": lambda v: v,
    "config.sam.enabled": bool,
    "config.clipping": bool,
    "config.weight_decay": bool,
}


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


def model_variants(model_name: str) -> Mapping[str, Any]:
    """The variant table of a model family: 'NFNet' or 'NFResNet'.

    Raises:
      ValueError: for another model name.
    """
    from nfnets_jax import nfnet, nfresnet  # Imported here: config files stay light.

    tables = {"NFNet": nfnet.VARIANTS, "NFResNet": nfresnet.VARIANTS}
    if model_name not in tables:
        raise ValueError(f"Unknown model_name {model_name!r}; valid: {', '.join(tables)}.")
    return tables[model_name]


def check_variant(model_name: str, variant: str) -> None:
    """Raises a ValueError listing the valid variants if `variant` is not one of them."""
    variants = model_variants(model_name)
    if variant not in variants:
        raise ValueError(
            f"Unknown {model_name} variant {variant!r}; valid variants: {', '.join(variants)}."
        )


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> {'a.b.c': leaf}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _structure_of(key: str) -> Callable[[Any], Any] | None:
    """How field `key` of a config record shapes the checkpoint, None if it does not."""
    if key in RESUME_STRUCTURE:
        return RESUME_STRUCTURE[key]
    if key.startswith("config.model."):
        return None if key[len("config.model.") :] in MODEL_FIELDS_SAFE_TO_CHANGE else (lambda v: v)
    return None


def resume_changes(
    saved: Mapping[str, Any],
    new: Mapping[str, Any],
) -> tuple[list[str], list[str]]:
    """Differences between a workdir's config record and the config of a run resuming it.

    Args:
      saved: the record in the workdir's config.json ({"config": ..., "plan": ...}).
      new: the record of the resuming run, in the same (JSON) form.

    Returns:
      (incompatible, harmless): lines 'key: old -> new'. Incompatible changes alter the
      model or its parameter shapes (`config.model_name`, every `config.model.*` field but
      MODEL_FIELDS_SAFE_TO_CHANGE, `plan.num_classes`) or the optimizer state structure
      (SAM, AGC or weight decay switched on or off); harmless ones are every other
      `config.*` difference (logging, evaluation, total steps, data_dir, learning rate...).
    """
    old_flat, new_flat = flatten(saved), flatten(new)
    incompatible, harmless = [], []
    for key in sorted(set(old_flat) | set(new_flat)):
        # An absent field reads as None, which is also what an unset field holds.
        old, value = old_flat.get(key), new_flat.get(key)
        if old == value:
            continue
        line = f"{key}: {old!r} -> {value!r}"
        structure = _structure_of(key)
        if structure is not None and structure(old) != structure(value):
            incompatible.append(line)
        elif key.startswith("config."):
            harmless.append(line)
    return incompatible, harmless
