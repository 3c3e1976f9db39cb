"""Trains an NFNet from a config file: one CPU, all local GPUs / TPU cores, or a multi-host pod.

  python scripts/train.py --config=configs/quickstart.py --workdir=/tmp/nfnets_quickstart
  python scripts/train.py --config=configs/imagenet_nfnet.py:F3 --workdir=gs://bucket/runs/f3 \
      --config.data_dir=gs://bucket/tfds --distributed

Run the same command with --distributed on every host of a TPU pod slice (JAX finds the
other hosts itself; multi-task `srun` steps of Slurm and `mpirun` jobs need not even that
flag). Elsewhere, multi-process runs pass --coordinator_address, --num_processes and
--process_id. A run always resumes from the newest checkpoint in --workdir: a gs:// bucket
path or a file system every process shares (checked at start-up); resuming with a config
that changes the model or the optimizer state is refused unless --allow_config_change is
given. docs/training.md has the options, docs/tpu.md a pod-slice run from start to end.
"""

import os
import signal
import sys


def _exit_before_training(signum, frame):
    """SIGTERM outside the training loop (imports, start-up, waiting for other hosts): there
    is nothing trained to save, so exit 0 at once. The loop installs its own handler, which
    saves a checkpoint first."""
    del signum, frame
    print("SIGTERM received outside training: nothing to save, exiting.", file=sys.stderr)
    sys.stderr.flush()
    os._exit(0)  # Not SystemExit: raised inside a callback (gc, a thread), it would be lost.


signal.signal(signal.SIGTERM, _exit_before_training)  # Before the imports, which take seconds.

import logging as py_logging  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from nfnets_jax import cli, parallel, train  # noqa: E402
from nfnets_jax.train import recipe  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, e.g. configs/imagenet_nfnet.py:F1.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and TensorBoard events.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0 for multi-process runs (not needed "
    "on TPU pods, Slurm srun steps or Open MPI, where JAX discovers the layout).",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Start jax.distributed with auto-detection of the hosts (TPU pod "
    "slices; multi-task Slurm srun steps and Open MPI jobs are detected without this flag).",
)
_CPU_COLLECTIVES = flags.DEFINE_string(
    "cpu_collectives", None, "CPU collectives for multi-process CPU runs, e.g. 'gloo'."
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Resume the checkpoint in --workdir even if the config "
    "changes the model or optimizer state (array shapes must still match).",
)
_ALLOW_CROSS_REGION = flags.DEFINE_bool(
    "allow_cross_region",
    False,
    "On a Google Cloud VM, go on although a gs:// workdir or data_dir bucket is in another "
    "region (slow reads, egress charges).",
)
flags.mark_flags_as_required(["config", "workdir"])


class _DropLibraryChatter(py_logging.Filter):
    """Keeps orbax's per-save INFO lines out of the training log."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_DropLibraryChatter())
    recipe.validate_config(_CONFIG.value)  # Fail fast, before waiting for other hosts.
    parallel.initialize_distributed(
        _COORDINATOR.value,
        _NUM_PROCESSES.value,
        _PROCESS_ID.value,
        cpu_collectives=_CPU_COLLECTIVES.value,
        auto=_DISTRIBUTED.value,
    )
    results = train.train_and_evaluate(
        _CONFIG.value,
        _WORKDIR.value,
        allow_config_change=_ALLOW_CONFIG_CHANGE.value,
        allow_cross_region=_ALLOW_CROSS_REGION.value,
    )
    for split in ("eval", "eval_ema"):
        if split in results:
            values = results[split]
            logging.info(
                "Final %s (step %d): top-1 %.2f%%, top-5 %.2f%%, loss %.4f.",
                split,
                results["step"],
                100 * values["top1"],
                100 * values["top5"],
                values["loss"],
            )


if __name__ == "__main__":
    cli.run(main)
