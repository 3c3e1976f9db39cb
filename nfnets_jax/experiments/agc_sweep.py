"""The paper's AGC finding at small scale: batch size x learning rate x clipping threshold.

Brock et al. 2021 (section 4, Figure 2): normalizer-free ResNets without AGC become unstable
as the batch size and learning rate grow; AGC keeps them stable, and the best clipping
threshold shrinks as the batch grows. `run_sweep` trains one small model with the project's
trainer (`nfnets_jax.train.train_and_evaluate`) at every point of a grid and records, per
run, the final and best test top-1, whether (and at which step) the loss became non-finite,
and the AGC clipped fraction over time. `agc_sweep_report` draws the figures and tables
from the recorded JSON alone and reads the largest stable learning rate per batch size off
it.

Output directory layout:
  results.json         every finished run (written atomically after each run).
  runs/<key>/          each run's workdir (metrics.jsonl, checkpoints, config.json).
  xla_cache/           persistent compilation cache (reruns skip most compilation).
  agc_sweep_*.png      the plots.

Resume: a run present in results.json is never redone. A run that was interrupted (its
workdir exists but it is not in results.json) has its workdir deleted and is trained again
from step 0, so that every recorded run is one uninterrupted training.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import ml_collections

import nfnets_jax
from nfnets_jax import configlib, files, metrics

RESULTS_FILE = "results.json"
CLIPPINGS = (0.0, 0.01, 0.02, 0.04, 0.08, 0.16)  # 0 = AGC off.
DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(nfnets_jax.__file__))), "configs", "tiny.py"
)
_STEP_RE = re.compile(r"at step (\d+)")


@dataclasses.dataclass(frozen=True)
class Sweep:
    """What to train. Every field but the grid is recorded and checked again on resume.

    Attributes:
      batch_sizes: global batch sizes (each must divide by the device count).
      lr_multiples: multiples of the linearly scaled learning rate
        (peak lr = multiple * base_learning_rate * batch / 256).
      clippings: AGC thresholds; 0 trains without AGC.
      dataset, data_dir: any dataset the trainer accepts ('digits', 'tfds:cifar10', ...).
      config_file: the base training config (the model and the rest of the recipe).
      base_learning_rate: per 256 examples, at multiple 1.
      num_epochs: training length, the same number of epochs at every batch size.
      warmup_epochs: linear warmup before the cosine decay.
      evals: evaluations per run (evenly spaced, the last at the end).
      logs: train-metric records per run (the clipped fraction over time).
      seed: the same initialisation and data order for every run.
    """

    batch_sizes: Sequence[int] = (16, 64, 256)
    lr_multiples: Sequence[float] = (1.0, 4.0, 16.0)
    clippings: Sequence[float] = CLIPPINGS
    dataset: str = "digits"
    data_dir: str = ""
    config_file: str = DEFAULT_CONFIG
    base_learning_rate: float = 0.4
    num_epochs: float = 3.0
    warmup_epochs: float = 0.5
    evals: int = 4
    logs: int = 25
    seed: int = 0

    def settings(self) -> dict[str, Any]:
        """The fields that must not change between a sweep and its resumption."""
        fields = dataclasses.asdict(self)
        for name in ("batch_sizes", "lr_multiples", "clippings"):
            fields.pop(name)
        fields["config_file"] = os.path.basename(self.config_file)
        return fields

    def points(self) -> list[tuple[int, float, float]]:
        """(batch size, lr multiple, clipping) of every run, in training order."""
        return [
            (int(b), float(m), float(c))
            for b in self.batch_sizes
            for m in self.lr_multiples
            for c in self.clippings
        ]


def run_key(batch_size: int, lr_multiple: float, clipping: float) -> str:
    """The run's name in results.json and its workdir name."""
    return f"b{batch_size}_lr{lr_multiple:g}x_clip{clipping:g}"


def run_config(
    sweep: Sweep, batch_size: int, lr_multiple: float, clipping: float
) -> ml_collections.ConfigDict:
    """The training config of one grid point (the base config with the sweep's fields)."""
    config = configlib.load_config_file(sweep.config_file)
    config.dataset = sweep.dataset
    config.data_dir = sweep.data_dir
    config.batch_size = batch_size
    config.base_learning_rate = sweep.base_learning_rate * lr_multiple
    config.clipping = clipping
    config.num_epochs = sweep.num_epochs
    config.num_train_steps = 0
    config.warmup_epochs = sweep.warmup_epochs
    config.seed = sweep.seed
    config.eval_ema = False
    config.keep_checkpoints = 1
    config.checkpoint_every_steps = 0  # The trainer still saves at the last step.
    return config


def _set_periods(config: ml_collections.ConfigDict, sweep: Sweep, info: Any) -> Any:
    """Sets the eval and log periods from the run's length; returns the trainer's plan."""
    from nfnets_jax.train import recipe as recipe_lib

    plan = recipe_lib.make_plan(config, info.num_classes, info.num_train)
    config.eval_every_steps = max(1, math.ceil(plan.total_steps / max(sweep.evals, 1)))
    config.log_every_steps = max(1, plan.total_steps // max(sweep.logs, 1))
    return plan


def summarize_run(workdir: str, diverged_step: int | None) -> dict[str, Any]:
    """The recorded outcome of a finished (or diverged) run, from its metrics.jsonl."""
    splits = metrics.read_metrics(workdir)
    evals = [[int(r["step"]), r["top1"]] for r in splits.get("eval", [])]
    train = splits.get("train", [])
    top1s = [t for _, t in evals if math.isfinite(t)]
    return {
        "diverged": diverged_step is not None,
        "diverged_step": diverged_step,
        "final_top1": None if diverged_step is not None or not evals else evals[-1][1],
        "best_top1": max(top1s) if top1s else None,
        "evals": evals,
        "train_loss": [[int(r["step"]), r["loss"]] for r in train],
        "clipped_fraction": [
            [int(r["step"]), r["agc_clipped_fraction"]]
            for r in train
            if "agc_clipped_fraction" in r
        ],
    }


def train_one(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains one grid point from scratch in `workdir`; its summary (divergence caught)."""
    import jax

    from nfnets_jax import train

    files.rmtree(workdir)  # An interrupted run starts again.
    start = time.time()
    diverged_step = None
    try:
        result = train.train_and_evaluate(config, workdir)
        steps = int(result["step"])
        del result  # The host state.
    except train.NonFiniteLossError as err:
        match = _STEP_RE.search(str(err))
        if match:
            diverged_step = int(match.group(1))
        else:  # The step after the last one logged.
            logged = metrics.read_metrics(workdir).get("train", [])
            diverged_step = int(logged[-1]["step"]) + 1 if logged else 1
        steps = diverged_step
        logging.warning("Run %s diverged at step %d.", files.basename(workdir), steps)
    finally:
        # Each run's executables stay cached (and their JIT code mapped) otherwise: ~2,000
        # memory maps per run, and LLVM fails ("Cannot allocate memory") past
        # vm.max_map_count (65,530) after about 30 runs in one process.
        jax.clear_caches()
    summary = summarize_run(workdir, diverged_step)
    summary.update(steps=steps, seconds=round(time.time() - start, 2))
    return summary


def enable_compilation_cache(directory: str) -> None:
    """A persistent XLA cache in `directory`, unless one is configured already."""
    import jax

    if jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def load_results(output_dir: str, sweep: Sweep | None = None) -> dict[str, Any]:
    """results.json ({'meta', 'runs'}), new if absent; checks a resumed sweep's settings.

    Raises:
      ValueError: if `sweep` changes a recorded setting (the runs would not compare).
    """
    results = files.read_json(files.join(output_dir, RESULTS_FILE))
    if results is None:
        return {"meta": {}, "runs": {}}
    if sweep is not None and results["meta"].get("settings") not in (None, sweep.settings()):
        raise ValueError(
            f"{output_dir} holds a sweep with other settings ({results['meta']['settings']}) "
            f"than this one ({sweep.settings()}); use another output directory."
        )
    return results


def run_sweep(sweep: Sweep, output_dir: str, compilation_cache: bool = True) -> dict[str, Any]:
    """Trains every grid point not yet in results.json; returns the results.

    Args:
      sweep: the grid and the recipe.
      output_dir: results.json, the runs' workdirs, the XLA cache.
      compilation_cache: use a persistent XLA cache in `output_dir/xla_cache` (when no
        other cache directory is configured; for a gs:// `output_dir`, in
        ~/.cache/nfnets_jax/xla_cache on this machine).
    """
    from nfnets_jax.train import recipe as recipe_lib

    files.makedirs(output_dir)
    if compilation_cache:
        home = os.path.join(os.path.expanduser("~"), ".cache", "nfnets_jax")
        cache_root = home if files.is_url(output_dir) else output_dir
        enable_compilation_cache(files.join(cache_root, "xla_cache"))
    results = load_results(output_dir, sweep)
    path = files.join(output_dir, RESULTS_FILE)
    points = sweep.points()
    info = recipe_lib.dataset_info(run_config(sweep, *points[0]))
    results["meta"].update(
        settings=sweep.settings(), num_classes=info.num_classes, num_train=info.num_train
    )
    for index, (batch, multiple, clipping) in enumerate(points):
        key = run_key(batch, multiple, clipping)
        if key in results["runs"]:
            continue
        config = run_config(sweep, batch, multiple, clipping)
        plan = _set_periods(config, sweep, info)
        total = plan.total_steps
        logging.warning("Run %d/%d: %s (%d steps).", index + 1, len(points), key, total)
        record = dict(batch_size=batch, lr_multiple=multiple, clipping=clipping, total_steps=total)
        record["peak_learning_rate"] = plan.peak_learning_rate
        record.update(train_one(config, files.join(output_dir, "runs", key)))
        results["runs"][key] = record
        files.write_json(path, results)
    files.write_json(path, results)
    return results
