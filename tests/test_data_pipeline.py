"""Train/eval iterators: layout, multi-host coverage, determinism and resumption."""

import itertools
import subprocess
import sys

import jax
import numpy as np
import pytest

from nfnets_jax import parallel
from nfnets_jax.data import pipeline, sources


def _ids_source(n, size=4, seed=0):
    """An in-memory dataset whose label is the example id (so coverage is checkable)."""
    images = np.random.RandomState(seed).randint(0, 256, (n, size, size, 3)).astype(np.uint8)
    ids = np.arange(n, dtype=np.int64)
    return sources.IndexSource(
        name="ids",
        num_classes=n,
        eval_margin=0,
        splits={"train": (images, ids), "test": (images, ids)},
    )


def test_digits_is_builtin_and_offline():
    info = pipeline.dataset_info("digits")
    assert (info.num_classes, info.num_train, info.num_eval) == (10, 1437, 360)
    batch = next(
        pipeline.train_iterator(
            "digits",
            global_batch_size=16,
            image_size=32,
            dtype="bfloat16",
            augment=pipeline.default_augment("digits"),
            seed=0,
            process_index=0,
            process_count=1,
            local_device_count=2,
        )
    )
    assert batch["images"].shape == (2, 8, 32, 32, 3)
    assert batch["images"].dtype == jax.numpy.bfloat16
    assert batch["labels"].shape == (2, 8, 10) and batch["labels"].dtype == np.float32
    np.testing.assert_array_equal(batch["labels"].sum(-1), 1.0)
    assert set(np.unique(batch["labels"])) == {0.0, 1.0}
    images = batch["images"].astype(np.float32)
    # Normalised: black background maps to -mean/std, bright strokes well above 0.
    assert images.min() == pytest.approx(-0.485 / 0.229, abs=0.02) and images.max() > 1.5


@pytest.mark.parametrize(
    "process_count,local_devices,global_batch",
    [(1, 1, 5), (1, 8, 24), (2, 4, 40), (2, 1, 6), (8, 1, 16), (8, 8, 64)],
)
def test_eval_sees_every_example_exactly_once(process_count, local_devices, global_batch):
    n = 37
    source = _ids_source(n)
    seen, batches_per_host = [], set()
    for p in range(process_count):
        batches = list(
            pipeline.eval_iterator(
                source,
                global_batch_size=global_batch,
                image_size=4,
                process_index=p,
                process_count=process_count,
                local_device_count=local_devices,
            )
        )
        batches_per_host.add(len(batches))
        for b in batches:
            assert b["images"].shape == (
                local_devices,
                global_batch // process_count // local_devices,
                4,
                4,
                3,
            )
            assert b["labels"].dtype == np.int32 and b["mask"].shape == b["labels"].shape
            seen.extend(b["labels"][b["mask"] == 1].tolist())
    assert sorted(seen) == list(range(n))
    assert len(batches_per_host) == 1  # hosts stay in lock-step


@pytest.mark.parametrize(
    "process_count,local_devices,global_batch", [(1, 8, 8), (2, 2, 8), (8, 1, 16)]
)
def test_train_shards_are_disjoint_and_reshuffled(process_count, local_devices, global_batch):
    n = 48
    source = _ids_source(n)
    per_host = global_batch // process_count
    steps_per_epoch = n // process_count // per_host
    epochs = []
    for p in range(process_count):
        it = pipeline.train_iterator(
            source,
            global_batch_size=global_batch,
            image_size=4,
            augment=None,
            seed=3,
            process_index=p,
            process_count=process_count,
            local_device_count=local_devices,
        )
        ids = [b["labels"].argmax(-1).ravel() for b in itertools.islice(it, 2 * steps_per_epoch)]
        ids = np.concatenate(ids)
        epochs.append((ids[: n // process_count], ids[n // process_count :]))
    first = [e[0] for e in epochs]
    for ids in first:
        assert len(set(ids.tolist())) == len(ids)  # no repeat within an epoch
    assert sorted(np.concatenate(first).tolist()) == list(range(n))  # disjoint, complete
    for one, two in epochs:
        assert sorted(one.tolist()) == sorted(two.tolist())
        if len(one) > 2:
            assert not np.array_equal(one, two)  # new order each epoch


def _train(source, **kwargs):
    args = dict(
        global_batch_size=12,
        image_size=8,
        seed=0,
        process_index=0,
        process_count=1,
        local_device_count=2,
        augment=dict(
            random_crop=True,
            flip=True,
            randaugment_layers=1,
            randaugment_magnitude=5,
            mixup_alpha=0.2,
            cutmix=True,
        ),
    )
    args.update(kwargs)
    return pipeline.train_iterator(source, **args)


def test_resumed_stream_equals_uninterrupted_stream():
    # 48 examples, 24 drawn per step (doubled batch for mixing): 2 steps per epoch.
    source = _ids_source(48, size=12)
    full = list(itertools.islice(_train(source), 5))
    resumed = list(itertools.islice(_train(source, start_step=3), 2))
    for a, b in zip(full[3:], resumed, strict=True):
        np.testing.assert_array_equal(a["images"], b["images"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
    again = next(_train(source))
    np.testing.assert_array_equal(again["images"], full[0]["images"])
    other_seed = next(_train(source, seed=1))
    assert not np.array_equal(other_seed["images"], full[0]["images"])
    labels = full[1]["labels"]
    np.testing.assert_allclose(labels.sum(-1), 1.0, atol=1e-6)
    assert labels.shape == (2, 6, 48) and (labels.max(-1) < 1).any()  # mixed targets


def test_batch_must_divide_over_devices():
    with pytest.raises(ValueError, match="multiple of process_count"):
        pipeline.train_iterator(
            "digits",
            global_batch_size=10,
            image_size=8,
            process_index=0,
            process_count=2,
            local_device_count=4,
        )


def test_bad_names_are_reported():
    with pytest.raises(ValueError, match="Unknown dataset 'mnist'"):
        pipeline.dataset_info("mnist")
    with pytest.raises(ValueError, match="Unknown augment options"):
        pipeline.train_iterator(
            "digits",
            global_batch_size=8,
            image_size=8,
            augment={"mixup": 0.2},
            process_index=0,
            process_count=1,
            local_device_count=1,
        )
    with pytest.raises(ValueError, match="dtype must be float32 or bfloat16"):
        pipeline.eval_iterator(
            "digits",
            global_batch_size=8,
            image_size=8,
            dtype="float16",
            process_index=0,
            process_count=1,
            local_device_count=1,
        )


def test_prefetch_to_device_feeds_pmap():
    n = jax.local_device_count()
    batches = pipeline.eval_iterator(
        _ids_source(20),
        global_batch_size=2 * n,
        image_size=4,
        process_index=0,
        process_count=1,
        local_device_count=n,
    )
    count = jax.pmap(lambda b: jax.lax.psum(b["mask"].sum(), "d"), axis_name="d")
    total = 0.0
    for batch in parallel.prefetch_to_device(batches, size=2):
        assert isinstance(batch["images"], jax.Array)
        assert len(batch["images"].sharding.device_set) == n
        total += float(count(batch)[0])
    assert total == 20


def test_digits_train_and_eval_preprocessing_agree():
    """1-nearest-neighbour over train batches classifies eval batches well."""

    def features(images):  # first channel, 4x4 average-pooled: [N, 8 * 8]
        x = images.reshape(-1, 32, 32, 3)[..., 0].astype(np.float32)
        return x.reshape(-1, 8, 4, 8, 4).mean((2, 4)).reshape(len(x), -1)

    train = pipeline.train_iterator(
        "digits",
        global_batch_size=479,
        image_size=32,
        augment=pipeline.DIGITS,
        process_index=0,
        process_count=1,
        local_device_count=1,
    )
    batches = list(itertools.islice(train, 3))  # 3 * 479 = 1437: one epoch
    x = np.concatenate([features(b["images"]) for b in batches])
    y = np.concatenate([b["labels"].reshape(-1, 10).argmax(-1) for b in batches])
    evals = list(
        pipeline.eval_iterator(
            "digits",
            global_batch_size=128,
            image_size=32,
            process_index=0,
            process_count=1,
            local_device_count=1,
        )
    )
    x_eval = np.concatenate([features(b["images"]) for b in evals])
    y_eval = np.concatenate([b["labels"].ravel() for b in evals])
    mask = np.concatenate([b["mask"].ravel() for b in evals]) == 1
    x_eval, y_eval = x_eval[mask], y_eval[mask]
    distances = ((x_eval[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    assert np.mean(y[distances.argmin(1)] == y_eval) > 0.95


def test_importing_the_pipeline_does_not_import_tensorflow():
    code = (
        "import sys; import nfnets_jax.data.pipeline, nfnets_jax.parallel, nfnets_jax.agc; "
        "assert 'tensorflow' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
