"""Tests for image classification (scripts/predict.py) and the ImageNet class names."""

import importlib.util
import os

import numpy as np
import pytest
from PIL import Image
from tiny_run import run_script

from nfnets_jax import predict
from nfnets_jax.checkpoints import labels, released
from nfnets_jax.models import registry

TINY = dict(depths=(1, 1, 1, 1), widths=(16, 32, 32, 32), group_width=8)
GOLDFISH, SHARK = 1, 2


@pytest.fixture(scope="module")
def imagenet_tiny(tmp_path_factory):
    """A tiny 1000-class model whose classifier bias prefers goldfish, then the shark."""
    params = registry.init_params("NFNet", variant="F0", num_classes=1000, seed=0, **TINY)
    params["NFNet/~/linear"]["b"][GOLDFISH] = 9.0
    params["NFNet/~/linear"]["b"][SHARK] = 8.0
    root = tmp_path_factory.mktemp("predict")
    paths = []
    rng = np.random.default_rng(0)
    for i, ext in enumerate(("png", "jpg")):
        path = str(root / f"image{i}.{ext}")
        Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return params, released.save_npz(params, str(root / "tiny.npz")), paths


def test_imagenet_names():
    names, wnids = labels.imagenet_names(), labels.imagenet_wnids()
    assert len(names) == len(wnids) == 1000 and len(set(wnids)) == 1000
    assert wnids == sorted(wnids)  # The standard (tfds, timm) label order.
    assert names[0].startswith("tench") and labels.imagenet_names(short=True)[1] == "goldfish"
    tfds_spec = importlib.util.find_spec("tensorflow_datasets")
    if tfds_spec is not None:
        path = os.path.join(
            os.path.dirname(tfds_spec.origin), "datasets", "imagenet2012", "labels.txt"
        )
        if os.path.exists(path):
            with open(path) as f:
                assert f.read().split() == wnids


def test_class_names_prefer_labels_then_recorded_then_imagenet():
    assert predict.class_names(2, recorded=("cat", "dog")) == ["cat", "dog"]
    assert predict.class_names(3, recorded=("cat", "dog")) == ["class 0", "class 1", "class 2"]
    wnids = [f"n{i:08d}" for i in range(1000)]  # imagenet2012's TFDS names
    assert predict.class_names(1000, recorded=wnids)[1].startswith("goldfish")


def test_classify_files(imagenet_tiny):
    params, _, paths = imagenet_tiny
    apply_fn = registry.logits_fn("NFNet", variant="F0", num_classes=1000, **TINY)
    predictions = predict.classify_files(
        apply_fn, params, paths, labels.imagenet_names(), resolution=32, top_k=5
    )
    assert [p.path for p in predictions] == paths
    for prediction in predictions:
        assert len(prediction.top) == 5
        assert [t[0] for t in prediction.top[:2]] == [GOLDFISH, SHARK]
        assert prediction.top[0][1].startswith("goldfish")
        probs = [t[2] for t in prediction.top]
        assert probs == sorted(probs, reverse=True) and 0.5 < probs[0] < 1.0
    with pytest.raises(ValueError, match="Cannot decode image"):
        bad = paths[0] + ".txt"
        with open(bad, "w") as f:
            f.write("not an image")
        predict.classify_files(apply_fn, params, [bad], labels.imagenet_names(), 32)


def test_predict_script(imagenet_tiny, capsys):
    _, npz, paths = imagenet_tiny
    argv = [f"--checkpoint={npz}", "--resolution=32", "--top_k=3", *paths]
    assert run_script("predict", argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == paths[0] and lines[4] == paths[1]
    assert "goldfish, Carassius auratus  [1]" in lines[1] and lines[1].strip().startswith("1.")
    assert "great white shark" in lines[2] and lines[3].strip().startswith("3.")
