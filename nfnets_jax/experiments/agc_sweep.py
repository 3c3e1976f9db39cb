"""The paper's AGC finding at small scale: batch size x learning rate x clipping threshold.

Brock et al. 2021 (section 4, Figure 2): normalizer-free ResNets without AGC become unstable
as the batch size and learning rate grow; AGC keeps them stable, and the best clipping
threshold shrinks as the batch grows. `run_sweep` trains one small model with the project's
trainer (`nfnets_jax.train.train_and_evaluate`) at every point of a grid and records, per
run, the final and best test top-1, whether (and at which step) the loss became non-finite,
and the AGC clipped fraction over time. `plot` draws the figures from the recorded JSON
alone; `stable_learning_rates` reads the largest stable learning rate per batch size off it.

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
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Sequence
from typing import Any

import ml_collections

import nfnets_jax
from nfnets_jax import configlib, files

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


def _set_periods(config: ml_collections.ConfigDict, sweep: Sweep, num_train: int) -> int:
    """Sets the eval and log periods from the run's length; returns its total steps."""
    steps = int(sweep.num_epochs * num_train / config.batch_size)
    config.eval_every_steps = max(1, math.ceil(steps / max(sweep.evals, 1)))
    config.log_every_steps = max(1, steps // max(sweep.logs, 1))
    return steps


def read_metrics(workdir: str) -> dict[str, list[dict[str, float]]]:
    """metrics.jsonl as {split: [record, ...]} (values as floats, 'nan' / 'inf' too)."""
    path = os.path.join(workdir, "metrics.jsonl")
    splits: dict[str, list[dict[str, float]]] = {}
    if not os.path.exists(path):
        return splits
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            split = record.pop("split")
            splits.setdefault(split, []).append({k: float(v) for k, v in record.items()})
    return splits


def summarize_run(workdir: str, diverged_step: int | None) -> dict[str, Any]:
    """The recorded outcome of a finished (or diverged) run, from its metrics.jsonl."""
    splits = read_metrics(workdir)
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

    shutil.rmtree(workdir, ignore_errors=True)  # An interrupted run starts again.
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
            logged = read_metrics(workdir).get("train", [])
            diverged_step = int(logged[-1]["step"]) + 1 if logged else 1
        steps = diverged_step
        logging.warning("Run %s diverged at step %d.", os.path.basename(workdir), steps)
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
    results = files.read_json(os.path.join(output_dir, RESULTS_FILE))
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
        other cache directory is configured).
    """
    from nfnets_jax.train import recipe as recipe_lib

    os.makedirs(output_dir, exist_ok=True)
    if compilation_cache:
        enable_compilation_cache(os.path.join(output_dir, "xla_cache"))
    results = load_results(output_dir, sweep)
    path = os.path.join(output_dir, RESULTS_FILE)
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
        total = _set_periods(config, sweep, info.num_train)
        logging.warning("Run %d/%d: %s (%d steps).", index + 1, len(points), key, total)
        record = dict(batch_size=batch, lr_multiple=multiple, clipping=clipping, total_steps=total)
        record["peak_learning_rate"] = config.base_learning_rate * batch / 256
        record.update(train_one(config, os.path.join(output_dir, "runs", key)))
        results["runs"][key] = record
        files.write_json(path, results)
    files.write_json(path, results)
    return results


def _top1(run: dict[str, Any], chance: float) -> float:
    """The final top-1 of a run; chance for a diverged one."""
    return chance if run["diverged"] or run["final_top1"] is None else run["final_top1"]


def is_stable(run: dict[str, Any], chance: float, margin: float) -> bool:
    """Stable: the loss stayed finite and the final top-1 is at least chance + margin."""
    return not run["diverged"] and _top1(run, chance) >= chance + margin


def stable_learning_rates(results: dict[str, Any], margin: float = 0.2) -> list[dict[str, Any]]:
    """Per batch size, the largest stable lr multiple (and peak lr) without and with AGC.

    With AGC: any clipping > 0 stable at that multiple. None where no multiple was stable.
    """
    chance = 1.0 / results["meta"]["num_classes"]
    runs = list(results["runs"].values())
    rows = []
    for batch in sorted({r["batch_size"] for r in runs}):
        row: dict[str, Any] = {"batch_size": batch}
        for name, with_agc in (("no_agc", False), ("agc", True)):
            stable = [
                r
                for r in runs
                if r["batch_size"] == batch
                and (r["clipping"] > 0) == with_agc
                and is_stable(r, chance, margin)
            ]
            best = max(stable, key=lambda r: r["lr_multiple"], default=None)
            row[f"{name}_multiple"] = best["lr_multiple"] if best else None
            row[f"{name}_peak_lr"] = best["peak_learning_rate"] if best else None
        rows.append(row)
    return rows


def _grid(results: dict[str, Any]) -> tuple[list[int], list[float], list[float]]:
    """The batch sizes, lr multiples and clippings present in the results."""
    runs = results["runs"].values()
    return tuple(sorted({r[k] for r in runs}) for k in ("batch_size", "lr_multiple", "clipping"))


def _find(results: dict[str, Any], batch: int, multiple: float, clipping: float) -> Any:
    return results["runs"].get(run_key(batch, multiple, clipping))


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table: per batch size and lr multiple, top-1 at each clipping (x = diverged)."""
    batches, multiples, clippings = _grid(results)
    names = ["off" if c == 0 else f"{c:g}" for c in clippings]
    lines = [
        "| batch | lr x | peak lr | " + " | ".join(f"clip {n}" for n in names) + " |",
        "|---" * (3 + len(names)) + "|",
    ]
    for batch in batches:
        for multiple in multiples:
            cells, peak = [], None
            for clipping in clippings:
                run = _find(results, batch, multiple, clipping)
                if run is None:
                    cells.append("-")
                    continue
                peak = run["peak_learning_rate"]
                if run["diverged"]:
                    cells.append(f"x @{run['diverged_step']}/{run['total_steps']}")
                else:
                    cells.append(f"{100 * run['final_top1']:.1f}")
            peak_text = "-" if peak is None else f"{peak:.3g}"
            lines.append(f"| {batch} | {multiple:g} | {peak_text} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_stable(results: dict[str, Any], margin: float = 0.2) -> str:
    """A Markdown table of `stable_learning_rates`."""
    lines = ["| batch | largest stable lr x (no AGC) | with AGC |", "|---|---|---|"]
    for row in stable_learning_rates(results, margin):
        cells = []
        for name in ("no_agc", "agc"):
            multiple = row[f"{name}_multiple"]
            cells.append(
                "none" if multiple is None else f"{multiple:g}x (lr {row[f'{name}_peak_lr']:.3g})"
            )
        lines.append(f"| {row['batch_size']} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def _best_agc(results: dict[str, Any], batch: int, multiple: float, clippings: list[float]):
    """The AGC run (clipping > 0) with the highest final top-1 at a point, or None."""
    chance = 1.0 / results["meta"]["num_classes"]
    runs = [_find(results, batch, multiple, c) for c in clippings if c > 0]
    runs = [r for r in runs if r is not None]
    return max(runs, key=lambda r: (_top1(r, chance), not r["diverged"]), default=None)


def _draw(ax: Any, xs: list[float], runs: list[Any], chance: float, **style: Any) -> None:
    """One line of final top-1; diverged runs drawn at chance as red crosses."""
    points = [(x, r) for x, r in zip(xs, runs) if r is not None]
    ax.plot([x for x, _ in points], [_top1(r, chance) for _, r in points], marker="o", **style)
    bad = [x for x, r in points if r["diverged"]]
    if bad:
        ax.plot(bad, [chance] * len(bad), "x", color="red", markersize=9, mew=2, zorder=5)


def plot(results: dict[str, Any], output_dir: str, dpi: int = 80) -> list[str]:
    """Writes agc_sweep_batch.png and agc_sweep_clipping.png from recorded results.

    (a) batch: final top-1 against batch size, without AGC and with the best clipping per
    batch, one panel per lr multiple. (b) clipping: top-1 against the clipping threshold
    ('off' first), one line per batch size, one panel per lr multiple. Diverged runs are
    red crosses at chance level; (a) labels each AGC point with its clipping. Returns the
    PNG paths.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    chance = 1.0 / results["meta"]["num_classes"]
    batches, multiples, clippings = _grid(results)
    paths = []
    fig, axes = plt.subplots(1, len(multiples), figsize=(3.2 * len(multiples), 3), squeeze=False)
    for ax, multiple in zip(axes[0], multiples):
        plain = [_find(results, b, multiple, 0.0) for b in batches]
        agc = [_best_agc(results, b, multiple, clippings) for b in batches]
        _draw(ax, batches, plain, chance, label="no AGC", color="tab:gray")
        _draw(ax, batches, agc, chance, label="AGC (best clip)", color="tab:blue")
        for batch, run in zip(batches, agc):
            if run is not None:
                y = _top1(run, chance)
                ax.annotate(
                    f"{run['clipping']:g}", (batch, y), (2, -9), "data", "offset points", fontsize=7
                )
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_title(f"lr {multiple:g}x linear scaling", fontsize=9)
        ax.set_xlabel("batch size")
    paths.append(_finish(fig, axes, chance, os.path.join(output_dir, "agc_sweep_batch.png"), dpi))
    fig, axes = plt.subplots(1, len(multiples), figsize=(3.2 * len(multiples), 3), squeeze=False)
    positions = list(range(len(clippings)))
    for ax, multiple in zip(axes[0], multiples):
        for batch in batches:
            runs = [_find(results, batch, multiple, c) for c in clippings]
            _draw(ax, positions, runs, chance, label=f"batch {batch}")
        ax.set_xticks(positions, ["off" if c == 0 else f"{c:g}" for c in clippings], fontsize=7)
        ax.set_title(f"lr {multiple:g}x linear scaling", fontsize=9)
        ax.set_xlabel("clipping threshold")
    paths.append(
        _finish(fig, axes, chance, os.path.join(output_dir, "agc_sweep_clipping.png"), dpi)
    )
    return paths


def _finish(fig: Any, axes: Any, chance: float, path: str, dpi: int) -> str:
    """Common labels, a chance line and the legend; saves and closes the figure."""
    from matplotlib import pyplot as plt

    for ax in axes[0]:
        ax.axhline(chance, color="red", linewidth=0.5, linestyle=":")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final test top-1 (x = diverged)")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with files.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    return path


def plot_from_file(output_dir: str, margin: float = 0.2) -> str:
    """Re-plots a recorded sweep (no training); returns the tables as Markdown."""
    results = load_results(output_dir)
    if not results["runs"]:
        raise ValueError(f"No recorded runs in {os.path.join(output_dir, RESULTS_FILE)}.")
    plot(results, output_dir)
    return format_table(results) + "\n\n" + format_stable(results, margin)
