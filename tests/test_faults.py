"""Bring your own data, then evaluate and predict the workdir; bad input and start-up faults.

One tiny training run on a folder dataset of real images (scikit-learn's digits 0 and 1 as
PNG files, class folders "one" and "zero") serves the workdir tests.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from tiny_run import REPO, TINY, run_script, tiny_config

from nfnets_jax import configlib, evaluation, train
from nfnets_jax.train import recipe

EVAL_PX = 24  # Neither the train px (32) nor the F0 test px (256): the record must supply it.
pytestmark = pytest.mark.xdist_group("workdir_eval")


def write_folder_dataset(root, per_class=(24, 8)):
    """digits 0 -> zero/, 1 -> one/, as 8x8 grey PNGs: train/ and val/ per class."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for digit, name in ((0, "zero"), (1, "one")):
        images = digits.images[digits.target == digit]
        start = 0
        for split, count in zip(("train", "val"), per_class, strict=True):
            os.makedirs(root / split / name, exist_ok=True)
            for i, image in enumerate(images[start : start + count]):
                pixels = np.round(image * 255 / 16).astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(root / split / name / f"{i}.png")
            start += count
    return root


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    data = write_folder_dataset(tmp_path_factory.mktemp("faces"))
    workdir = str(tmp_path_factory.mktemp("run"))
    # log_every_steps=0 (= never) must not crash: case 4 of the fault list.
    config = tiny_config(dataset=f"folder:{data}", eval_image_size=EVAL_PX, log_every_steps=0)
    results = train.train_and_evaluate(config, workdir)
    return data, workdir, results


def test_workdir_evaluates_as_its_run_did(folder_run):
    data, workdir, results = folder_run
    report = evaluation.evaluate_checkpoint(workdir)
    assert report.resolution == EVAL_PX and report.dataset == f"folder:{data}"
    assert report.result.count == 16
    # The same model, pixels and weights as the trainer's own final (EMA) evaluation.
    assert report.result.top1 == pytest.approx(results["eval_ema"]["top1"], abs=1e-6)
    assert report.notes[0].startswith(f"workdir {workdir}: NFNet F0")
    assert f"evaluated at {EVAL_PX} px" in report.notes[0]
    assert not [n for n in report.notes if n.startswith("warning")]
    with pytest.raises(ValueError, match=r"--variant=F1 but workdir .* trained NFNet F0"):
        evaluation.evaluate_checkpoint(workdir, variant="F1")
    overridden = evaluation.evaluate_checkpoint(workdir, resolution=32)
    assert overridden.resolution == 32
    assert f"warning: resolution=32 differs from the run's eval resolution {EVAL_PX}" in (
        overridden.notes
    )


def test_evaluating_on_a_dataset_with_other_classes_warns(folder_run):
    _, workdir, _ = folder_run
    report = evaluation.evaluate_checkpoint(workdir, dataset="digits")
    assert any("differs from the run's dataset" in n for n in report.notes)
    assert any("the model has 2 classes, dataset digits has 10" in n for n in report.notes)


def test_predict_uses_the_runs_class_names_and_reports_bad_files(folder_run, capsys):
    data, workdir, _ = folder_run
    good = [str(data / "val" / "zero" / "0.png"), str(data / "val" / "one" / "0.png")]
    missing = str(data / "val" / "missing.png")
    argv = [f"--checkpoint={workdir}", "--top_k=2", good[0], missing, good[1]]
    code = run_script("predict", argv)
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].startswith(f"workdir {workdir}: NFNet F0") and f"{EVAL_PX} px" in lines[0]
    assert lines[1] == good[0] and lines[4] == good[1]  # The good files are predicted.
    names = {line.split()[2] for line in lines if line.strip()[:2] in ("1.", "2.")}
    assert names == {"one", "zero"}
    assert f"Cannot read image {missing}" in err and "1 of 3 files" in err
    assert code == 1


def test_evaluate_script_says_what_the_workdir_set(folder_run, capsys):
    _, workdir, _ = folder_run
    code = run_script("evaluate", [f"--checkpoint={workdir}", f"--resolution={EVAL_PX + 8}"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines()[0].startswith(f"workdir {workdir}: NFNet F0")
    assert f"warning: resolution={EVAL_PX + 8} differs" in out


def test_folder_without_class_folders_and_empty_class_folder(tmp_path, caplog):
    from nfnets_jax.data import pipeline

    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "train" / "loose.png")
    with pytest.raises(ValueError, match="has no class sub-folders"):
        pipeline.dataset_info(f"folder:{tmp_path}")
    (tmp_path / "train" / "cat").mkdir()
    (tmp_path / "train" / "dog").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "train" / "cat" / "1.png")
    with caplog.at_level("WARNING"):
        info = pipeline.dataset_info(f"folder:{tmp_path}")
    assert info.num_classes == 2 and info.class_names == ("cat", "dog")
    assert any(
        "dog" in r.getMessage() and "has no images" in r.getMessage() for r in caplog.records
    )
    # The empty val/ split is found at start-up, naming dataset and split.
    with pytest.raises(
        ValueError, match=r"evaluation split 'val' of dataset 'folder:.*no examples"
    ):
        recipe.dataset_info(tiny_config(dataset=f"folder:{tmp_path}"))


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("keep_checkpoints", 0, "keep_checkpoints must be >= 1"),
        ("log_every_steps", -1, r"log_every_steps must be >= 0 \(0 = never\)"),
        ("checkpoint_every_steps", -2, "checkpoint_every_steps must be >= 0"),
        ("batch_size", 0, "batch_size must be > 0, got 0"),
        ("eval_batch_size", -8, "eval_batch_size must be > 0, got -8"),
    ],
)
def test_bad_config_values_are_refused_before_anything_runs(field, value, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(tiny_config(**{field: value}), str(tmp_path))
    assert os.listdir(tmp_path) == []  # Nothing written, no checkpoint deleted.


def test_sigterm_during_start_up_exits_cleanly(tmp_path):
    workdir = str(tmp_path / "run")
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(REPO, "scripts", "train.py"),
            f"--config={TINY}",
            f"--workdir={workdir}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)  # Still importing.
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM received outside training: nothing to save" in err
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))


def test_failed_start_leaves_the_config_record_alone(folder_run, tmp_path):
    import shutil

    data, workdir, _ = folder_run
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    with open(os.path.join(copy, "config.json"), "rb") as f:
        before = f.read()
    config = configlib.load_config_file(TINY)
    config.dataset, config.eval_image_size, config.log_every_steps = f"folder:{data}", EVAL_PX, 0
    config.model.width = 2.0  # Other shapes: the restore fails even with allow_config_change.
    with pytest.raises(ValueError, match="does not fit the model being trained"):
        train.train_and_evaluate(config, copy, allow_config_change=True)
    with open(os.path.join(copy, "config.json"), "rb") as f:
        assert f.read() == before  # The run's true record, still there to resume with.


def test_a_single_class_is_refused_at_start_up(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split / "cat").mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / split / "cat" / "1.png")
    with pytest.raises(ValueError, match=r"has 1 class\(es\); a classifier needs at least 2"):
        recipe.dataset_info(tiny_config(dataset=f"folder:{tmp_path}"))


@pytest.mark.parametrize(
    "script,args,message",
    [
        ("train", [f"--config={TINY}", "--config.keep_checkpoints=0"], "keep_checkpoints must"),
        ("evaluate", ["--checkpoint=/nonexistent/run", "--dataset=digits"], "neither an existing"),
    ],
)
def test_command_line_errors_are_one_line(script, args, message, tmp_path):
    if script == "train":
        args = [*args, f"--workdir={tmp_path / 'run'}"]
    env = {k: v for k, v in os.environ.items() if k != "NFNETS_TRACEBACK"}
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", f"{script}.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_checkpoints_cli_inspects_and_exports_a_training_workdir(folder_run, tmp_path, capsys):
    from nfnets_jax.checkpoints import __main__ as checkpoints_cli
    from nfnets_jax.checkpoints import released
    from nfnets_jax.checkpoints import workdir as workdir_ckpt

    _, workdir, _ = folder_run
    checkpoints_cli.main(["checkpoints", "info", workdir])
    out = capsys.readouterr().out
    assert "2 classes" in out, out
    checkpoints_cli.main(["checkpoints", "to-npz", workdir, str(tmp_path / "run.npz")])
    exported = released.load_npz(str(tmp_path / "run.npz"))
    expected = workdir_ckpt.load_params(workdir)  # EMA parameters of the newest step
    assert sorted(exported) == sorted(expected)
    for module, values in expected.items():
        for name, value in values.items():
            np.testing.assert_array_equal(exported[module][name], value)
