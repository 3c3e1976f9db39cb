"""The AGC sweep (nfnets_jax/experiments/agc_sweep.py): a two-point grid end to end, resume,
divergence records and the plots from a recorded (synthetic) results file."""

import dataclasses
import json
import os

import pytest

from nfnets_jax import files, train
from nfnets_jax.experiments import agc_sweep, agc_sweep_report

# Three steps of 16 examples on digits (1,437 train examples): 3 * 16 / 1437 epochs.
TINY = dict(
    batch_sizes=(16,),
    lr_multiples=(1.0,),
    clippings=(0.0, 0.04),
    num_epochs=48.5 / 1437,
    warmup_epochs=0.0,
    evals=1,
    logs=3,
)


def test_two_point_grid_and_resume(tmp_path, monkeypatch):
    out = str(tmp_path)
    sweep = agc_sweep.Sweep(**TINY)
    results = agc_sweep.run_sweep(sweep, out, compilation_cache=False)
    assert set(results["runs"]) == {"b16_lr1x_clip0", "b16_lr1x_clip0.04"}
    on_disk = files.read_json(os.path.join(out, agc_sweep.RESULTS_FILE))
    assert on_disk["runs"].keys() == results["runs"].keys()
    assert on_disk["meta"]["num_classes"] == 10
    for key, run in on_disk["runs"].items():
        assert run["total_steps"] == run["steps"] == 3
        assert not run["diverged"] and run["diverged_step"] is None
        assert 0.0 <= run["final_top1"] <= run["best_top1"] <= 1.0
        assert [step for step, _ in run["evals"]] == [3]
        assert run["train_loss"] and run["train_loss"][-1][0] == 3
        assert os.path.exists(os.path.join(out, "runs", key, "metrics.jsonl"))
    assert on_disk["runs"]["b16_lr1x_clip0"]["clipped_fraction"] == []
    fractions = on_disk["runs"]["b16_lr1x_clip0.04"]["clipped_fraction"]
    assert fractions and fractions[-1][0] == 3
    assert all(0.0 <= f <= 1.0 for _, f in fractions)
    assert on_disk["runs"]["b16_lr1x_clip0"]["peak_learning_rate"] == pytest.approx(0.4 / 16)

    # Resume: finished runs are kept; an unfinished run's workdir is deleted and redone.
    del on_disk["runs"]["b16_lr1x_clip0.04"]
    files.write_json(os.path.join(out, agc_sweep.RESULTS_FILE), on_disk)
    stale = os.path.join(out, "runs", "b16_lr1x_clip0.04", "stale")
    open(stale, "w").close()
    trained = []
    real_train_one = agc_sweep.train_one

    def counting(config, workdir):
        trained.append(os.path.basename(workdir))
        return real_train_one(config, workdir)

    monkeypatch.setattr(agc_sweep, "train_one", counting)
    resumed = agc_sweep.run_sweep(sweep, out, compilation_cache=False)
    assert trained == ["b16_lr1x_clip0.04"]
    assert not os.path.exists(stale)
    assert resumed["runs"]["b16_lr1x_clip0"] == results["runs"]["b16_lr1x_clip0"]
    assert agc_sweep.run_sweep(sweep, out, compilation_cache=False) == resumed
    assert trained == ["b16_lr1x_clip0.04"]

    with pytest.raises(ValueError, match="other settings"):
        agc_sweep.run_sweep(dataclasses.replace(sweep, seed=1), out, compilation_cache=False)


def test_divergence_is_recorded_with_its_step(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")

    def diverging(config, workdir):
        os.makedirs(workdir)
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": 2, "split": "eval", "top1": 0.3, "loss": 2.0}) + "\n")
            f.write(json.dumps({"step": 4, "split": "train", "loss": "nan"}) + "\n")
        raise train.NonFiniteLossError("Non-finite loss (nan, gradient norm nan) at step 7: ...")

    monkeypatch.setattr(train, "train_and_evaluate", diverging)
    run = agc_sweep.train_one(None, workdir)
    assert run["diverged"] and run["diverged_step"] == run["steps"] == 7
    assert run["final_top1"] is None and run["best_top1"] == 0.3
    assert run["train_loss"][0][0] == 4 and run["train_loss"][0][1] != run["train_loss"][0][1]


def synthetic_results():
    """A 2 x 2 x 3 grid: no AGC diverges at the large batch or the large lr."""
    runs = {}
    for batch in (16, 256):
        for multiple in (1.0, 16.0):
            for clipping in (0.0, 0.01, 0.16):
                diverged = clipping == 0 and (batch == 256 or multiple == 16)
                top1 = (
                    0.5 if clipping == 0 else (0.9 if (clipping == 0.01) == (batch == 256) else 0.7)
                )
                runs[agc_sweep.run_key(batch, multiple, clipping)] = {
                    "batch_size": batch,
                    "lr_multiple": multiple,
                    "clipping": clipping,
                    "peak_learning_rate": 0.4 * multiple * batch / 256,
                    "total_steps": 100,
                    "steps": 12 if diverged else 100,
                    "diverged": diverged,
                    "diverged_step": 12 if diverged else None,
                    "final_top1": None if diverged else top1,
                    "best_top1": 0.2 if diverged else top1,
                    "evals": [],
                    "train_loss": [],
                    "clipped_fraction": [],
                }
    return {"meta": {"num_classes": 10, "settings": {}}, "runs": runs}


def test_plot_and_tables_from_recorded_results(tmp_path):
    out = str(tmp_path)
    files.write_json(os.path.join(out, agc_sweep.RESULTS_FILE), synthetic_results())
    text = agc_sweep_report.plot_from_file(out)
    for name in ("agc_sweep_batch.png", "agc_sweep_clipping.png"):
        path = os.path.join(out, name)
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert 1000 < os.path.getsize(path) < 150_000
    assert "| 256 | 1 | 0.4 | x @12/100 | 90.0 | 70.0 |" in text
    rows = agc_sweep_report.stable_learning_rates(synthetic_results())
    assert rows == [
        {
            "batch_size": 16,
            "no_agc_multiple": 1.0,
            "no_agc_peak_lr": 0.025,
            "agc_multiple": 16.0,
            "agc_peak_lr": 0.4,
        },
        {
            "batch_size": 256,
            "no_agc_multiple": None,
            "no_agc_peak_lr": None,
            "agc_multiple": 16.0,
            "agc_peak_lr": 6.4,
        },
    ]
    # A stricter margin: no-AGC's 50% is not above chance + 0.5.
    assert (
        agc_sweep_report.stable_learning_rates(synthetic_results(), margin=0.5)[0][
            "no_agc_multiple"
        ]
        is None
    )
    with pytest.raises(ValueError, match="No recorded runs"):
        agc_sweep_report.plot_from_file(str(tmp_path / "empty"))
