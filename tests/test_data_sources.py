"""Sources: imagenet2012 from a fake manual download, TFDS schemas, class folders."""

import io
import os
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from nfnets_jax.data import pipeline, sources

# The real builder maps sorted validation file names to the first lines of its
# validation_labels.txt, which start with these three synsets.
SYNSETS = ("n01751748", "n09193705", "n02105855")
SMALL = dict(
    global_batch_size=4, image_size=16, process_index=0, process_count=1, local_device_count=2
)


def _jpeg(seed, size=(40, 30)):
    array = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG")
    return buf.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_fake_imagenet(manual_dir, per_class=2):
    """ILSVRC2012_img_train.tar of per-synset tars, and a flat ILSVRC2012_img_val.tar."""
    os.makedirs(manual_dir, exist_ok=True)
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as outer:
        for c, synset in enumerate(SYNSETS):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for i in range(per_class):
                    _add(tar, f"{synset}_{i}.JPEG", _jpeg(10 * c + i))
            _add(outer, f"{synset}.tar", inner.getvalue())
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as tar:
        for i in range(len(SYNSETS)):
            _add(tar, f"ILSVRC2012_val_{i + 1:08d}.JPEG", _jpeg(100 + i))


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    _write_fake_imagenet(os.path.join(data_dir, "downloads", "manual"))
    return data_dir


@pytest.mark.slow
def test_imagenet2012_prepared_from_fake_manual_download(imagenet_dir):
    info = pipeline.dataset_info("imagenet2012", imagenet_dir)
    assert (info.num_classes, info.num_train, info.num_eval) == (1000, 6, 3)
    assert info.eval_split == "validation"
    names = tfds.builder("imagenet2012", data_dir=imagenet_dir).info.features["label"].names
    expected = sorted(names.index(s) for s in SYNSETS)
    augment = dict(random_crop=True, flip=True, mixup_alpha=0.2, cutmix=True)
    batch = next(
        pipeline.train_iterator("imagenet2012", data_dir=imagenet_dir, augment=augment, **SMALL)
    )
    assert batch["images"].shape == (2, 2, 16, 16, 3) and batch["labels"].shape == (2, 2, 1000)
    np.testing.assert_allclose(batch["labels"].sum(-1), 1.0, atol=1e-6)
    assert set(np.nonzero(batch["labels"].sum((0, 1)))[0]) <= set(expected)
    # Without mixing a batch of 6 is one epoch: every example once, a new order each epoch.
    plain = dict(SMALL, global_batch_size=6, augment=None)
    stream = pipeline.train_iterator("imagenet2012", data_dir=imagenet_dir, **plain)
    epochs = [next(stream) for _ in range(3)]
    for b in epochs:
        counts = b["labels"].reshape(6, 1000).sum(0)
        assert sorted(np.nonzero(counts)[0]) == expected and set(counts[expected]) == {2}
    resumed = next(
        pipeline.train_iterator("imagenet2012", data_dir=imagenet_dir, start_step=2, **plain)
    )
    np.testing.assert_array_equal(resumed["images"], epochs[2]["images"])
    seen = []
    for p in range(2):  # two hosts share the validation split
        for b in pipeline.eval_iterator(
            "imagenet2012",
            data_dir=imagenet_dir,
            **dict(SMALL, process_index=p, process_count=2, global_batch_size=4),
        ):
            seen.extend(b["labels"][b["mask"] == 1].tolist())
    assert sorted(seen) == expected


def test_imagenet2012_missing_download_says_what_to_place_where(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        pipeline.dataset_info("imagenet2012", str(tmp_path))
    message = str(err.value)
    manual = os.path.join(str(tmp_path), "downloads", "manual")
    assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
    assert manual in message


@pytest.mark.parametrize("name", ["tfds:mnist", "tfds:imagenette"])
def test_tfds_schema_through_the_pipeline(name, tmp_path):
    # mnist: decoded 1-channel PNG arrays; imagenette: JPEG bytes decoded in the pipeline.
    with tfds.testing.mock_data(num_examples=10):
        info = pipeline.dataset_info(name, str(tmp_path))
        assert (info.num_classes, info.num_train, info.num_eval) == (10, 10, 10)
        batch = next(
            pipeline.train_iterator(
                name, data_dir=str(tmp_path), augment=dict(mixup_alpha=0.2, cutmix=True), **SMALL
            )
        )
        assert batch["images"].shape == (2, 2, 16, 16, 3) and batch["labels"].shape == (2, 2, 10)
        np.testing.assert_allclose(batch["labels"].sum(-1), 1.0, atol=1e-6)
        evals = list(pipeline.eval_iterator(name, data_dir=str(tmp_path), **SMALL))
        assert len(evals) == 3 and sum(b["mask"].sum() for b in evals) == 10


def _write_folder(root, corrupt=None):
    colours = {"blue": (0, 0, 255), "red": (255, 0, 0)}
    for split, count in (("train", 3), ("val", 2)):
        for name, colour in colours.items():
            os.makedirs(os.path.join(root, split, name))
            for i in range(count):
                image = Image.new("RGB", (20 + i, 18), colour)
                ext = "png" if i % 2 else "jpg"
                image.save(os.path.join(root, split, name, f"{i}.{ext}"))
    if corrupt:
        with open(os.path.join(root, corrupt), "wb") as f:
            f.write(b"\xff\xd8\xff\xe0 this is not really a jpeg")


def test_folder_dataset_labels_follow_sorted_class_folders(tmp_path):
    _write_folder(str(tmp_path))
    name = f"folder:{tmp_path}"
    info = pipeline.dataset_info(name)
    assert (info.num_classes, info.num_train, info.num_eval, info.eval_split) == (2, 6, 4, "val")
    batches = list(pipeline.eval_iterator(name, **SMALL))
    images = np.concatenate([b["images"].reshape(-1, 16, 16, 3) for b in batches])
    labels = np.concatenate([b["labels"].ravel() for b in batches])
    blue_minus_red = images[..., 2].mean((1, 2)) - images[..., 0].mean((1, 2))
    np.testing.assert_array_equal(labels, [0, 0, 1, 1])  # 'blue' < 'red'
    assert np.all((blue_minus_red > 0) == (labels == 0))
    augment = dict(randaugment_layers=1, randaugment_magnitude=10, mixup_alpha=0.2)
    train = next(pipeline.train_iterator(name, augment=augment, **SMALL))
    assert train["images"].shape == (2, 2, 16, 16, 3)


def test_folder_dataset_corrupt_image_error_names_the_file(tmp_path):
    _write_folder(str(tmp_path), corrupt=os.path.join("val", "red", "broken.jpg"))
    with pytest.raises(sources.UndecodableImageError, match=r"red/broken\.jpg"):
        list(pipeline.eval_iterator(f"folder:{tmp_path}", **SMALL))
    _write_folder(str(tmp_path / "t"), corrupt=os.path.join("train", "blue", "bad.jpg"))
    with pytest.raises(sources.UndecodableImageError, match=r"blue/bad\.jpg"):
        for _ in zip(range(20), pipeline.train_iterator(f"folder:{tmp_path / 't'}", **SMALL)):
            pass


def test_folder_dataset_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="needs sub-folders train/ and val/"):
        pipeline.dataset_info(f"folder:{tmp_path}")
    _write_folder(str(tmp_path))
    os.makedirs(tmp_path / "val" / "green")
    with pytest.raises(ValueError, match="green.*does not exist in"):
        pipeline.dataset_info(f"folder:{tmp_path}")


def test_folder_without_a_split_never_substitutes_another(tmp_path):
    for cls in ("a", "b"):
        os.makedirs(tmp_path / "val" / cls)
        Image.new("RGB", (8, 8)).save(tmp_path / "val" / cls / "x.png")
    source = sources.load_folder(str(tmp_path))
    assert source.num_examples("val") == 2  # evaluation-only folders still work
    with pytest.raises(ValueError, match="has no split 'train'; available: \\['val'\\]"):
        source.num_examples(source.train_split)


class NfnetsTrainOnlyToy(tfds.core.GeneratorBasedBuilder):
    """A prepared TFDS dataset with a train split only (like tf_flowers)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            supervised_keys=("image", "label"),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 3)),
                    "label": tfds.features.ClassLabel(num_classes=2),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(4):
            yield i, {"image": np.full((8, 8, 3), 60 * i, np.uint8), "label": i % 2}


def test_tfds_missing_split_names_dataset_split_and_available_splits(tmp_path):
    name, data_dir = "tfds:nfnets_train_only_toy", str(tmp_path)
    with pytest.raises(ValueError) as err:  # The default eval split, 'validation', is absent.
        pipeline.dataset_info(name, data_dir)
    assert str(err.value).startswith(
        "TFDS dataset 'tfds:nfnets_train_only_toy' has no split 'validation'; available "
        "splits: train. Evaluate another split: set eval_split"
    )
    with pytest.raises(ValueError, match="has no split 'test'; available splits: train"):
        pipeline.eval_iterator(name, data_dir=data_dir, split="train[:2]+test", **SMALL)
    info = pipeline.dataset_info(name, data_dir, eval_split="train[:2]")
    assert (info.num_classes, info.num_train, info.num_eval) == (2, 4, 2)
