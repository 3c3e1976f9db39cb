"""The training loop: `train_and_evaluate(config, workdir)`.

Reads the config once into a `recipe.Recipe`, checks and restores the workdir (`resume`),
then runs the pmapped `steps.train_step`: metrics are read one step late (so the host never
waits for the device), checked for non-finite values, logged every `log_every_steps`;
checkpoints every `checkpoint_every_steps` and at the end; evaluation of raw and EMA weights
every `eval_every_steps` and at the end (the `evaluation` module's loop). SIGTERM makes
every process stop at the same step, save and return.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from nfnets_jax import evaluation, metrics, parallel
from nfnets_jax.checkpoints import workdir as workdir_ckpt
from nfnets_jax.train import recipe as recipe_lib
from nfnets_jax.train import resume, steps, storage

NON_FINITE_MESSAGE = "Non-finite loss"


class NonFiniteLossError(FloatingPointError):
    """Raised when training produces a non-finite loss or gradient."""


def due(step: int, every: int) -> bool:
    """Whether a periodic action with period `every` (0 = never) is due after `step`."""
    return every > 0 and step % every == 0


class StopRequest:
    """Turns SIGTERM into a flag the loop polls (only in the main thread)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopRequest:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # Not the main thread: no handler, the flag stays False.
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        del signum, frame
        logging.warning("SIGTERM received: saving a checkpoint and stopping.")
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class TrainLog:
    """Train metrics, read one step late: non-finite check, interval means, stop requests."""

    def __init__(
        self,
        writer: metrics.MetricWriter,
        progress: metrics.Progress,
        checkpointer: workdir_ckpt.Checkpointer,
    ):
        self.writer, self.progress, self.checkpointer = writer, progress, checkpointer
        self.last: dict[str, float] = {}  # Metrics of the newest step read.
        self.step: int | None = None  # That step.
        self.interval: list[dict[str, float]] = []  # Steps read since the last write.
        self.preempted = False
        self._pending: tuple[int, Any] | None = None

    def push(self, step: int, device_metrics: Any) -> None:
        """Queues `step`'s (device) metrics and reads the previous step's."""
        self.flush()
        self._pending = (step, device_metrics)

    def flush(self) -> None:
        """Reads the queued step's metrics now (before a checkpoint: never save after a NaN)."""
        if self._pending is None:
            return
        step, device_metrics = self._pending
        self._pending = None
        values = {
            k: float(np.asarray(v).reshape(-1)[0])
            for k, v in jax.device_get(device_metrics).items()
        }
        if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
            raise NonFiniteLossError(
                f"{NON_FINITE_MESSAGE} ({values['loss']}, gradient norm {values['grad_norm']}) "
                f"at step {step}: stopping. The last good checkpoint is step "
                f"{self.checkpointer.latest_step()} in {self.checkpointer.directory}; lower "
                "the learning rate or check the data before resuming."
            )
        if self.step is None:
            self.progress.restart(step)  # Throughput and ETA leave the compilation out.
        self.last, self.step = values, step
        self.interval.append(values)
        self.preempted = self.preempted or values["stop_requests"] > 0

    def write_interval(self) -> None:
        """Writes the means over the steps read since the last write."""
        if not self.interval:
            return
        means = {k: float(np.mean([m[k] for m in self.interval])) for k in self.interval[0]}
        self.writer.write(self.step, "train", means)
        self.progress.update(self.step, means["loss"], means["learning_rate"])
        self.interval = []


def _evaluate(
    recipe: recipe_lib.Recipe,
    eval_step: Callable[..., Any],
    state: steps.TrainState,
    step: int,
    writer: metrics.MetricWriter,
) -> dict[str, dict[str, float]]:
    """Raw (and EMA) parameters on the whole eval split, written and logged."""
    weights = {"eval": state.params}
    if recipe.eval_ema:
        weights["eval_ema"] = state.ema_params
    results = {}
    for split, params in weights.items():
        result = evaluation.evaluate_replicated(eval_step, params, recipe.eval_batches())
        results[split] = dataclasses.asdict(result)
        writer.write(step, split, results[split])
        if jax.process_index() == 0:
            logging.info(
                "%s at step %d: top-1 %.4f, top-5 %.4f, loss %.4f",
                split,
                step,
                result.top1,
                result.top5,
                result.loss,
            )
    writer.flush()
    return results


def _start(
    config: ml_collections.ConfigDict,
    workdir: str,
    allow_config_change: bool,
    allow_cross_region: bool = False,
) -> tuple[recipe_lib.Recipe, workdir_ckpt.Checkpointer, steps.TrainState]:
    """Recipe, checkpointer and host state; the config record is written after the restore."""
    workdir = storage.check_workdir(workdir)  # Writable, and one store for every process.
    if not allow_cross_region:
        storage.check_regions({"workdir": workdir, "config.data_dir": config.get("data_dir")})
    recipe = recipe_lib.build_recipe(config)
    checkpointer = workdir_ckpt.Checkpointer(workdir, recipe.keep_checkpoints)
    try:  # Every process checks (same files, same verdict); process 0 writes the record.
        record = resume.config_record(config, recipe.plan, recipe.dataset)
        resume.check_resume_config(workdir, record, checkpointer.latest_step(), allow_config_change)
        host_state = resume.restore_or_create(recipe, checkpointer)
        resume.write_config_record(workdir, record)
    except BaseException:
        checkpointer.close()
        raise
    return recipe, checkpointer, host_state


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    step_hook: Callable[[int], None] | None = None,
    allow_config_change: bool = False,
    allow_cross_region: bool = False,
) -> dict[str, Any]:
    """Trains and evaluates a model; resumes from the newest checkpoint in `workdir`.

    Args:
      config: the training config (see configs/default.py).
      workdir: where checkpoints, TensorBoard events, metrics.jsonl and config.json go: a
        local path (shared by every process of a multi-process run) or a gs:// URL.
      step_hook: called with the step number before each step (for tests and tooling).
      allow_config_change: resume even if the config changes the model or optimizer
        (see `resume.check_resume_config`).
      allow_cross_region: go on when a gs:// workdir or data_dir is in another region than
        this Google Cloud VM (see `storage.check_regions`).

    Returns:
      {"step", "train": last train metrics, "eval": raw-weight eval metrics,
       "eval_ema": EMA eval metrics (if `config.eval_ema`), "state": host TrainState,
       "preempted": whether the run stopped on SIGTERM, "replicas_identical"}.

    Raises:
      NonFiniteLossError: if a step produced a non-finite loss or gradient.
      resume.ConfigMismatchError: if the workdir's checkpoint was written with a config
        that had another model or optimizer state structure.
      ValueError: for an invalid config, a workdir URL of an unsupported scheme, or a
        bucket in another region.
      storage.WorkdirError: the workdir cannot be written, or is not shared between the
        processes.
    """
    with StopRequest() as stop:
        recipe, checkpointer, host_state = _start(
            config, workdir, allow_config_change, allow_cross_region
        )
        step = int(host_state.step)
        state = parallel.replicate(host_state)
        del host_state
        writer = metrics.MetricWriter(workdir)
        progress = metrics.Progress(recipe.plan.total_steps, recipe.batch_size, step)
        log = TrainLog(writer, progress, checkpointer)
        try:
            state, step, results = _run(recipe, state, step, log, stop, step_hook)
        finally:
            writer.close()
            checkpointer.close()
    identical = parallel.replicas_identical(state)
    if not identical:
        logging.error("Replicas diverged: the local copies of the training state differ.")
    results.update(
        step=step,
        train=log.last,
        preempted=log.preempted,
        replicas_identical=identical,
        state=jax.device_get(parallel.unreplicate(state)),
    )
    return results


def _run(
    recipe: recipe_lib.Recipe,
    state: steps.TrainState,
    step: int,
    log: TrainLog,
    stop: StopRequest,
    step_hook: Callable[[int], None] | None,
) -> tuple[steps.TrainState, int, dict[str, Any]]:
    """The steps from `step` to the end (or a stop request); (state, step, eval results)."""
    plan, checkpointer, writer = recipe.plan, log.checkpointer, log.writer
    p_train = parallel.pmap(steps.bind_train_step(recipe), donate_argnums=(0,))
    eval_step = evaluation.make_eval_step(steps.eval_logits_fn(recipe.model, recipe.policy))
    logging.info(
        "Training %d steps (%.1f epochs of %d examples) at global batch %d on %d "
        "devices (%d processes); peak lr %.4g, warmup %d steps.",
        plan.total_steps,
        plan.total_steps / plan.steps_per_epoch,
        plan.num_train_examples,
        recipe.batch_size,
        jax.device_count(),
        jax.process_count(),
        plan.peak_learning_rate,
        plan.warmup_steps,
    )
    results: dict[str, Any] = {}
    if stop.requested and jax.process_count() == 1:
        # Stopped during start-up: nothing was trained, so nothing new to save. (With several
        # processes the request travels with the first step, so that all stop together.)
        logging.warning(
            "Stop requested during start-up: stopping at step %d, nothing to save.", step
        )
        log.preempted = True
        return state, step, results
    train_batches = recipe.train_batches(start_step=step)
    while step < plan.total_steps:
        if step_hook is not None:
            step_hook(step)
        batch = parallel.shard(next(train_batches))
        request = parallel.per_device_value(int(stop.requested))
        state, device_metrics = p_train(state, batch, request)
        step += 1
        log.push(step, device_metrics)
        is_last = step == plan.total_steps
        save = is_last or log.preempted or due(step, recipe.checkpoint_every_steps)
        if save:
            log.flush()  # Never save a state after a non-finite step.
        if save or (log.step is not None and due(log.step, recipe.log_every_steps)):
            log.write_interval()
        if save:
            checkpointer.save(step, jax.device_get(parallel.unreplicate(state)))
        if log.preempted:
            logging.warning(
                "Stopped at step %d on request; checkpoint saved in %s.",
                step,
                checkpointer.directory,
            )
            return state, step, results
        if not is_last and due(step, recipe.eval_every_steps):
            results.update(_evaluate(recipe, eval_step, state, step, writer))
    results.update(_evaluate(recipe, eval_step, state, step, writer))
    return state, step, results
