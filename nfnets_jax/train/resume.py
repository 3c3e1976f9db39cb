"""Resuming a workdir: the config record, the resume check, restore-or-create, pretrained init.

A workdir holds `config.json` (the resolved config, the derived plan and the device layout
of the latest start) beside its checkpoints. A run that resumes compares its own record with
it before anything is written: changes that keep the model and the optimizer state
structure are logged; the others raise `ConfigMismatchError`. The record is rewritten only
once the state has been restored (or created), so a start that fails leaves it untouched.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import haiku as hk
import jax
import ml_collections
import numpy as np

from nfnets_jax import files, parallel
from nfnets_jax.checkpoints import workdir as workdir_ckpt
from nfnets_jax.models import registry
from nfnets_jax.train import recipe as recipe_lib
from nfnets_jax.train import steps

CONFIG_RECORD = "config.json"

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


class ConfigMismatchError(ValueError):
    """Raised when resuming a workdir with a config that changes the model or optimizer state."""


def config_record(
    config: ml_collections.ConfigDict,
    plan: recipe_lib.Plan,
    dataset: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What `config.json` holds: the resolved config, the derived plan, the dataset's class
    names and eval margin (`Recipe.dataset`, read by `checkpoints.run_record` to evaluate or
    predict with the workdir) and the device layout, in JSON form (tuples become lists), as
    written and as read back."""
    record = {
        "config": config.to_dict(),
        "plan": dataclasses.asdict(plan),
        "dataset": dict(dataset or {}),
        "devices": jax.device_count(),
        "processes": jax.process_count(),
    }
    return json.loads(json.dumps(record, default=str))


def write_config_record(workdir: str, record: Mapping[str, Any]) -> None:
    """Writes `config.json` atomically (process 0 only; the others have the same record)."""
    if jax.process_index() == 0:
        files.write_json(files.join(workdir, CONFIG_RECORD), record)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> {'a.b.c': leaf}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _structure_of(key: str) -> Callable[[Any], Any] | None:
    """How field `key` of a config record shapes the checkpoint, None if it does not."""
    if key in RESUME_STRUCTURE:
        return RESUME_STRUCTURE[key]
    if key.startswith("config.model."):
        safe = key[len("config.model.") :] in MODEL_FIELDS_SAFE_TO_CHANGE
        return None if safe else (lambda v: v)
    return None


def resume_changes(saved: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[list[str], list[str]]:
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
    old_flat, new_flat = _flatten(saved), _flatten(new)
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


def check_resume_config(
    workdir: str,
    record: Mapping[str, Any],
    checkpoint_step: int | None,
    allow_config_change: bool = False,
) -> None:
    """Compares the workdir's `config.json` with a resuming run's record; writes nothing.

    Call it before anything in the workdir is overwritten.

    Args:
      workdir: the run's working directory.
      record: `config_record` of the new run.
      checkpoint_step: the newest checkpoint in the workdir; None: nothing to resume, no check.
      allow_config_change: log incompatible changes instead of raising (the restore still
        fails if parameter or optimizer state shapes differ).

    Raises:
      ConfigMismatchError: naming each incompatible field with its saved and new values.
    """
    if checkpoint_step is None:
        return
    path = files.join(workdir, CONFIG_RECORD)
    try:
        saved = files.read_json(path)
    except ValueError as e:  # Not JSON: written by something else, or before writes were atomic.
        logging.warning("Cannot read %s (%s).", path, e)
        saved = None
    if saved is None:
        logging.warning(
            "No readable %s next to checkpoint %d: the config cannot be compared; the restore "
            "still checks array shapes.",
            path,
            checkpoint_step,
        )
        return
    incompatible, harmless = resume_changes(saved, record)
    if harmless:
        logging.warning(
            "Resuming checkpoint %d with changed settings: %s.",
            checkpoint_step,
            "; ".join(harmless),
        )
    if not incompatible:
        return
    details = "\n  ".join(incompatible)
    if allow_config_change:
        logging.warning(
            "allow_config_change: resuming checkpoint %d although the model or optimizer "
            "config changed:\n  %s",
            checkpoint_step,
            details,
        )
        return
    raise ConfigMismatchError(
        f"{workdir} holds checkpoint {checkpoint_step} of a run whose config differs in fields "
        f"that change the model or the optimizer state (saved -> new):\n  {details}\n"
        "Resuming would restore incompatible state. Use a new --workdir to start a new run, "
        f"or the saved values (in {path}) to resume this one; --allow_config_change "
        "(allow_config_change=True) resumes anyway, if parameter and optimizer state shapes "
        "still match."
    )


def _check_processes_agree(step: int, checkpointer: workdir_ckpt.Checkpointer) -> None:
    """Every process must resume from the same step (a read error on one host alone would
    otherwise split the replicas); raises, naming each process's step, if they do not."""
    steps_seen = parallel.process_allgather_ints([step])[:, 0]
    if len(set(steps_seen.tolist())) > 1:
        raise RuntimeError(
            f"The processes read different checkpoints of {checkpointer.directory}: step per "
            f"process {steps_seen.tolist()} (this process skipped: "
            f"{checkpointer.unreadable or 'none'}). A read error on some hosts only; check the "
            "shared file system, then restart."
        )


def restore_or_create(
    recipe: recipe_lib.Recipe, checkpointer: workdir_ckpt.Checkpointer
) -> steps.TrainState:
    """The newest readable checkpoint in the workdir, else a fresh state (`init_checkpoint`).

    Unreadable newer checkpoints (truncated or missing files) are skipped, and named in the
    log; the first save moves them to `<step>.unreadable` (see `workdir.Checkpointer`).

    Raises:
      checkpoints.errors.CheckpointReadError: no checkpoint in the workdir can be read.
      ValueError: the newest readable checkpoint does not fit the model.
    """
    state = steps.create_train_state(
        recipe.model, recipe.optimizer, recipe.plan.train_image_size, recipe.seed
    )
    if checkpointer.latest_step() is not None:
        restored = checkpointer.restore(state._asdict())
        step = int(restored["step"])
        _check_processes_agree(step, checkpointer)
        if checkpointer.unreadable:
            logging.warning(
                "Resuming from step %d in %s, the newest readable checkpoint; skipped the "
                "unreadable newer ones: %s.",
                step,
                checkpointer.directory,
                "; ".join(f"step {s}: {why}" for s, why in checkpointer.unreadable.items()),
            )
        else:
            logging.info("Resuming from step %d in %s.", step, checkpointer.directory)
        return steps.TrainState(**restored)
    if recipe.init_checkpoint:
        params = load_pretrained(recipe.init_checkpoint, state.params)
        opt_state = jax.device_get(jax.jit(recipe.optimizer.init)(params))
        state = state._replace(params=params, ema_params=params, opt_state=opt_state)
    return state


def load_pretrained(path: str, fresh_params: hk.Params) -> hk.Params:
    """Released weights for fine-tuning, with a freshly initialised classifier if shapes differ.

    Args:
      path: any checkpoint `checkpoints.loading.load_params` reads (zoo name, file, workdir).
      fresh_params: the initialised params of the model being trained.

    Returns:
      `fresh_params` with every parameter whose path and shape match taken from the file.

    Raises:
      ValueError: if a non-classifier parameter is missing or has another shape.
    """
    from nfnets_jax.checkpoints import loading

    loaded = loading.load_params(path)
    params = {}
    for module, values in fresh_params.items():
        params[module] = {}
        for name, fresh in values.items():
            source = loaded.get(module, {}).get(name)
            if source is not None and np.shape(source) == np.shape(fresh):
                params[module][name] = np.asarray(source, np.float32)
            elif registry.is_classifier_weight(f"{module}/w"):
                params[module][name] = fresh  # A new head for a new label set.
            else:
                raise ValueError(
                    f"Pretrained checkpoint {path} has no parameter {module}/{name} of shape "
                    f"{np.shape(fresh)} (found {None if source is None else np.shape(source)})."
                )
    return params
