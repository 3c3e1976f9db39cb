"""Tests for evaluation: exact counting under pmap, checkpoints of every kind, the script."""

import os

import dill
import jax
import numpy as np
import pytest
from PIL import Image
from tiny_run import run_script

from nfnets_jax import evaluation, predict
from nfnets_jax.checkpoints import errors, loading, released
from nfnets_jax.checkpoints import workdir as workdir_ckpt
from nfnets_jax.models import registry
from nfnets_jax.train import steps

# One worker runs this module (--dist loadgroup): its module-scoped fixtures are built once.
pytestmark = pytest.mark.xdist_group("evaluate")

TINY = dict(depths=(1, 1, 1, 1), widths=(16, 32, 32, 32), group_width=8)
NUM_CLASSES = 7


@pytest.fixture(scope="module")
def tiny_params():
    params = registry.init_params("NFNet", variant="F0", num_classes=NUM_CLASSES, seed=3, **TINY)
    # Non-zero skip gains and a larger classifier so every part of the net matters.
    rng = np.random.default_rng(0)
    for group in params.values():
        if "skip_gain" in group:
            group["skip_gain"] = np.float32(rng.uniform(0.5, 1.0)).reshape(())
    params["NFNet/~/linear"]["w"] = rng.normal(size=params["NFNet/~/linear"]["w"].shape).astype(
        np.float32
    )
    return params


@pytest.fixture(scope="module")
def apply_fn():
    return registry.logits_fn("NFNet", variant="F0", num_classes=NUM_CLASSES, **TINY)


def _batches(images, labels, num_devices, per_device):
    """Split examples into [D, B] batches, padding the last with junk under mask 0."""
    step = num_devices * per_device
    out = []
    for start in range(0, len(labels), step):
        x, y = images[start : start + step], labels[start : start + step]
        n = len(y)
        pad = step - n
        x = np.concatenate([x, np.full((pad, *x.shape[1:]), 9.0, np.float32)])
        y = np.concatenate([y, np.full(pad, 1, np.int32)])  # Junk labels: must not count.
        mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
        out.append(
            {
                "images": x.reshape(num_devices, per_device, *x.shape[1:]),
                "labels": y.reshape(num_devices, per_device),
                "mask": mask.reshape(num_devices, per_device),
            }
        )
    return out


def test_evaluate_counts_every_example_once(tiny_params, apply_fn):
    n, devices = 37, jax.local_device_count()
    assert devices == 8  # conftest's fake CPU devices: the pmap path is exercised.
    rng = np.random.default_rng(1)
    images = rng.normal(size=(n, 32, 32, 3)).astype(np.float32)
    logits = np.asarray(jax.jit(apply_fn)(tiny_params, images))
    ranked = np.argsort(-logits, axis=-1)
    # Labels: the best class for 15 examples, the 4th best for 11, the worst for 11.
    labels = np.concatenate([ranked[:15, 0], ranked[15:26, 3], ranked[26:, -1]]).astype(np.int32)
    result = evaluation.evaluate(apply_fn, tiny_params, _batches(images, labels, devices, 2))
    assert result.count == n
    assert result.top1 == pytest.approx(15 / n)
    assert result.top5 == pytest.approx(26 / n)
    log_probs = jax.nn.log_softmax(logits)
    assert result.loss == pytest.approx(-np.mean(log_probs[np.arange(n), labels]), rel=1e-4)


def test_evaluate_rejects_bad_batches(tiny_params, apply_fn):
    bad = {
        "images": np.zeros((8, 2, 32, 32, 3)),
        "labels": np.zeros((8, 3), np.int32),
        "mask": np.ones((8, 2)),
    }
    with pytest.raises(ValueError, match="labels"):
        evaluation.evaluate(apply_fn, tiny_params, [bad])
    with pytest.raises(KeyError, match="mask"):
        evaluation.evaluate(
            apply_fn, tiny_params, [{"images": bad["images"], "labels": bad["mask"]}]
        )
    with pytest.raises(ValueError, match="No examples"):
        evaluation.evaluate(apply_fn, tiny_params, [])


def _write_folder_dataset(root, per_class=(3, 2, 2)):
    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        for c in range(NUM_CLASSES):
            os.makedirs(root / split / f"class{c}", exist_ok=True)
        for c, count in enumerate(per_class):
            for i in range(count):
                pixels = rng.integers(0, 256, size=(40 + 3 * i, 36, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"class{c}" / f"{i}.png")
    return sorted(str(p) for p in (root / "val").rglob("*.png"))


def test_evaluate_checkpoint_files_end_to_end(tmp_path, tiny_params, apply_fn):
    files = _write_folder_dataset(tmp_path / "data")
    npz = released.save_npz(tiny_params, str(tmp_path / "tiny.npz"))
    pickled = tmp_path / "tiny_haiku.npz"
    pickled.write_bytes(dill.dumps(tiny_params))
    dataset = f"folder:{tmp_path / 'data'}"
    reports = [
        evaluation.evaluate_checkpoint(path, dataset, resolution=32, global_batch_size=16)
        for path in (npz, str(pickled))
    ]
    # Reference: the same preprocessing, one device, no padding.
    logits = np.asarray(jax.jit(apply_fn)(tiny_params, predict.preprocess_files(files, 32)))
    labels = np.array([int(os.path.basename(os.path.dirname(f))[5:]) for f in files])
    want_top1 = np.mean(np.argmax(logits, -1) == labels)
    for report in reports:
        assert report.result.count == len(files) == 7
        assert report.result.top1 == pytest.approx(want_top1)
        assert report.model.startswith("custom(depths=[1, 1, 1, 1]")
        assert report.published_top1 is None
    table = evaluation.format_table(reports)
    assert "top-1" in table and "paper top-1" in table and table.count("\n") == 3
    assert f"{100 * want_top1:.2f}" in table


def test_load_checkpoint_from_workdir_prefers_ema(tmp_path, tiny_params):
    ema = {m: {p: v + 1 for p, v in g.items()} for m, g in tiny_params.items()}
    state = steps.TrainState(
        step=np.int32(5),
        params=tiny_params,
        ema_params=ema,
        opt_state=(),
        rng=np.zeros(2, np.uint32),
    )
    checkpointer = workdir_ckpt.Checkpointer(str(tmp_path / "run"))
    checkpointer.save(5, state)
    checkpointer.close()
    params, kwargs = loading.load(str(tmp_path / "run"))
    np.testing.assert_array_equal(params["NFNet/~/linear"]["w"], ema["NFNet/~/linear"]["w"])
    assert kwargs["depths"] == (1, 1, 1, 1) and kwargs["num_classes"] == NUM_CLASSES
    raw, _ = loading.load(str(tmp_path / "run"), ema=False)
    np.testing.assert_array_equal(raw["NFNet/~/linear"]["w"], tiny_params["NFNet/~/linear"]["w"])


def test_load_checkpoint_names_variant_mismatch(tmp_path, tiny_params):
    path = released.save_npz(tiny_params, str(tmp_path / "tiny.npz"))
    with pytest.raises(errors.CheckpointMismatchError, match="variant F1 with 7 classes"):
        loading.load(path, variant="F1")


def test_evaluate_script(tmp_path, tiny_params, capsys):
    _write_folder_dataset(tmp_path / "data")
    npz = released.save_npz(tiny_params, str(tmp_path / "tiny.npz"))
    run_script(
        "evaluate",
        [
            f"--checkpoint={npz}",
            f"--dataset=folder:{tmp_path / 'data'}",
            "--resolution=32",
            "--batch_size=16",
        ],
    )
    out = capsys.readouterr().out
    assert "paper top-1" in out and npz in out
    row = out.strip().splitlines()[-1].split()
    assert "7" in row  # seven examples counted
