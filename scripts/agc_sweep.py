"""The paper's AGC finding at small scale: batch size x learning rate x clipping threshold.

  python scripts/agc_sweep.py --output_dir=/tmp/agc_sweep              # digits, CPU
  python scripts/agc_sweep.py --output_dir=/tmp/agc_sweep --plot_only  # re-plot the JSON
  python scripts/agc_sweep.py --output_dir=/tmp/c10 --dataset=tfds:cifar10 \
      --batch_sizes=256,1024,4096 --num_epochs=10

Trains the --config model (configs/tiny.py: a depth-1 NFNet at 32 px) at every point of the
grid, resumes a killed sweep (finished runs are kept, an interrupted one is redone), writes
results.json and the PNG plots to --output_dir and prints the tables. What is recorded and
how stability is defined: nfnets_jax/experiments/agc_sweep.py and docs/agc_sweep.md.
"""

from absl import app, flags

from nfnets_jax import cli
from nfnets_jax.experiments import agc_sweep, agc_sweep_report

_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "results.json, run workdirs and plots.")
_DATASET = flags.DEFINE_string("dataset", "digits", "digits, tfds:<name> or folder:<path>.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data directory.")
_CONFIG = flags.DEFINE_string("config", agc_sweep.DEFAULT_CONFIG, "Base training config file.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["16", "64", "256"], "Global batch sizes.")
_LR_MULTIPLES = flags.DEFINE_list(
    "lr_multiples", ["1", "4", "16"], "Multiples of the linearly scaled learning rate."
)
_CLIPPINGS = flags.DEFINE_list(
    "clippings", [f"{c:g}" for c in agc_sweep.CLIPPINGS], "AGC thresholds (0 = AGC off)."
)
_BASE_LR = flags.DEFINE_float("base_learning_rate", 0.4, "Learning rate per 256 examples.")
_EPOCHS = flags.DEFINE_float("num_epochs", 3.0, "Epochs per run (the same at every batch).")
_WARMUP = flags.DEFINE_float("warmup_epochs", 0.5, "Linear warmup epochs.")
_MARGIN = flags.DEFINE_float("margin", 0.2, "Stable: top-1 >= chance + margin, no divergence.")
_PLOT_ONLY = flags.DEFINE_bool("plot_only", False, "Only re-plot the recorded results.json.")
flags.mark_flag_as_required("output_dir")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not _PLOT_ONLY.value:
        sweep = agc_sweep.Sweep(
            batch_sizes=[int(b) for b in _BATCH_SIZES.value],
            lr_multiples=[float(m) for m in _LR_MULTIPLES.value],
            clippings=[float(c) for c in _CLIPPINGS.value],
            dataset=_DATASET.value,
            data_dir=_DATA_DIR.value,
            config_file=_CONFIG.value,
            base_learning_rate=_BASE_LR.value,
            num_epochs=_EPOCHS.value,
            warmup_epochs=_WARMUP.value,
        )
        agc_sweep.run_sweep(sweep, _OUTPUT_DIR.value)
    print(agc_sweep_report.plot_from_file(_OUTPUT_DIR.value, _MARGIN.value))


if __name__ == "__main__":
    cli.run(main)
