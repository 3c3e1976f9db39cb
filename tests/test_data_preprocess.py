"""Per-example preprocessing, MixUp/CutMix and RandAugment, checked against properties."""

import io

import numpy as np
import pytest
from PIL import Image

from nfnets_jax.data import augment, mixing, preprocess, tf_runtime

tf = tf_runtime.import_tf()


def _keys_cubic(d, a=-0.5):
    d = np.abs(d)
    near = (a + 2) * d**3 - (a + 3) * d**2 + 1
    far = a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


def _bicubic_matrix(n_in, n_out):
    """Hand-written 1-D bicubic resize: Keys a=-0.5, half-pixel centres, TF's 1/1024 offset
    table, taps outside the image dropped and the remaining weights renormalised."""
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        x = (i + 0.5) * n_in / n_out - 0.5
        x0 = int(np.floor(x))
        t = np.round((x - x0) * 1024) / 1024
        for j, k in enumerate(range(x0 - 1, x0 + 3)):
            if 0 <= k < n_in:
                w[i, k] = _keys_cubic(t - (j - 1))
        w[i] /= w[i].sum()
    return w


def _jpeg(array, quality=95):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def test_eval_preprocessing_matches_hand_computation():
    rng = np.random.RandomState(0)
    image = rng.randint(0, 256, (5, 7, 3)).astype(np.uint8)
    size, margin = 6, 4
    resized = np.einsum(
        "oh,hwc,pw->opc",
        _bicubic_matrix(5, size + margin),
        image.astype(np.float64),
        _bicubic_matrix(7, size + margin),
    )
    expected = np.clip(resized, 0, 255)[2 : 2 + size, 2 : 2 + size]
    expected = (expected - np.array(preprocess.MEAN_RGB)) / np.array(preprocess.STDDEV_RGB)
    got = preprocess.normalize(
        preprocess.eval_image(tf.constant(image), size, margin), tf.float32
    ).numpy()
    assert got.shape == (size, size, 3)
    np.testing.assert_allclose(got, expected, atol=1e-3)
    # The same image as PNG bytes goes through the decoder to the same result.
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    from_png = preprocess.normalize(
        preprocess.eval_image(tf.constant(buf.getvalue()), size, margin), tf.float32
    ).numpy()
    np.testing.assert_allclose(from_png, got, atol=1e-5)


def test_inception_crops_stay_within_area_and_aspect_bounds():
    height, width = 90, 120
    areas, aspects = [], []
    for i in range(300):
        oy, ox, h, w = preprocess.sample_crop_window(
            tf.constant([height, width]), tf.constant([i, 7])
        ).numpy()
        assert 0 <= oy and oy + h <= height and 0 <= ox and ox + w <= width
        # Crop sides are whole pixels: allow one pixel of rounding on each side.
        assert (h + 1) * (w + 1) >= 0.08 * height * width
        assert (w - 1) / (h + 1) <= 4 / 3 and (w + 1) / (h - 1) >= 3 / 4
        areas.append(h * w / (height * width))
        aspects.append(w / h)
    assert min(areas) < 0.25 and max(areas) > 0.75  # the whole range is used
    assert min(aspects) < 0.85 and max(aspects) > 1.2


def test_jpeg_is_decoded_straight_into_the_crop_window():
    rng = np.random.RandomState(1)
    array = np.clip(rng.normal(128, 40, (64, 80, 3)), 0, 255).astype(np.uint8)
    encoded = tf.constant(_jpeg(array))
    window = tf.constant([8, 16, 32, 40])
    cropped = preprocess.decode_and_crop(encoded, window).numpy()
    full = tf.io.decode_jpeg(encoded, channels=3).numpy()
    assert cropped.shape == (32, 40, 3)
    # Chroma upsampling sees different neighbours only on the crop's one-pixel border.
    np.testing.assert_allclose(
        cropped[1:-1, 1:-1].astype(float), full[9:39, 17:55].astype(float), atol=2
    )
    image = preprocess.train_image(encoded, 24, tf.constant([3, 4]), random_crop=True, flip=True)
    assert image.shape == (24, 24, 3) and image.dtype == tf.float32
    assert 0 <= float(tf.reduce_min(image)) and float(tf.reduce_max(image)) <= 255


def test_png_bytes_and_arrays_get_the_same_random_crop():
    array = np.random.RandomState(2).randint(0, 256, (30, 50, 3)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    for s in range(5):
        seed = tf.constant([s, 9])
        from_png = preprocess.train_image(
            tf.constant(buf.getvalue()), 12, seed, random_crop=True, flip=True
        )
        from_array = preprocess.train_image(
            tf.constant(array), 12, seed, random_crop=True, flip=True
        )
        np.testing.assert_array_equal(from_png.numpy(), from_array.numpy())


def test_flip_mirrors_the_image():
    image = tf.constant(np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3))
    outs = {
        preprocess.train_image(image, 4, tf.constant([s, 0]), random_crop=False, flip=True)
        .numpy()
        .tobytes()
        for s in range(16)
    }
    assert len(outs) == 2  # both orientations occur, nothing else


def _two_class_batch(n, num_classes=5):
    images_a = tf.zeros([n, 8, 8, 3])
    images_b = tf.ones([n, 8, 8, 3])
    labels_a = tf.one_hot(tf.zeros([n], tf.int32), num_classes)
    labels_b = tf.one_hot(tf.fill([n], 3), num_classes)
    return images_a, images_b, labels_a, labels_b


def test_mixup_labels_match_pixel_ratio():
    a, b, ya, yb = _two_class_batch(64)
    images, labels, lam = mixing.mixup(a, b, ya, yb, tf.constant([1, 2]), alpha=0.2)
    lam = lam.numpy()
    assert np.all((lam >= 0) & (lam <= 1))
    assert np.mean((lam < 0.1) | (lam > 0.9)) > 0.5  # Beta(0.2, 0.2) is U-shaped
    np.testing.assert_allclose(labels.numpy().sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(labels.numpy()[:, 0], lam, atol=1e-6)
    np.testing.assert_allclose(images.numpy().mean((1, 2, 3)), 1 - lam, atol=1e-6)


def test_cutmix_labels_match_pasted_area():
    a, b, ya, yb = _two_class_batch(64)
    images, labels, lam = mixing.cutmix(a, b, ya, yb, tf.constant([3, 4]))
    lam = lam.numpy()
    np.testing.assert_allclose(labels.numpy().sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(labels.numpy()[:, 3], 1 - lam, atol=1e-6)
    np.testing.assert_allclose(images.numpy().mean((1, 2, 3)), 1 - lam, atol=1e-6)
    assert lam.min() < 0.9 and np.all(images.numpy()[..., 0] == images.numpy()[..., 2])


@pytest.mark.parametrize("mixup_alpha,use_cutmix", [(0.2, True), (0.2, False), (0.0, True)])
def test_doubled_batch_mixing(mixup_alpha, use_cutmix):
    a, b, ya, yb = _two_class_batch(8)
    images, labels = mixing.mix_doubled_batch(
        tf.concat([a, b], 0),
        tf.concat([ya, yb], 0),
        tf.constant([5, 6]),
        mixup_alpha=mixup_alpha,
        use_cutmix=use_cutmix,
    )
    assert images.shape == (8, 8, 8, 3) and labels.shape == (8, 5)
    labels, images = labels.numpy(), images.numpy()
    np.testing.assert_allclose(labels.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(labels[:, 3], images.mean((1, 2, 3)), atol=1e-6)
    if use_cutmix:  # CutMix pixels come from one image or the other, never a blend
        assert np.all(np.isin(images[-4:], [0.0, 1.0]))


def test_randaugment_ops_keep_shape_and_range():
    rng = np.random.RandomState(2)
    # A mid-range image so that AutoContrast has something to stretch.
    image = tf.constant(rng.randint(40, 250, (24, 20, 3)).astype(np.uint8))
    unchanged = []
    for name in augment.OP_NAMES:
        out = augment.apply_op(image, name, 9.0, seed=tf.constant([1, 2]))
        assert out.shape == image.shape and out.dtype == tf.uint8, name
        if np.array_equal(out.numpy(), image.numpy()):
            unchanged.append(name)
    assert not unchanged  # at magnitude 9 every op does something
    np.testing.assert_array_equal(augment.invert(augment.invert(image)), image)
    np.testing.assert_array_equal(augment.posterize(image, 8), image)
    np.testing.assert_array_equal(augment.brightness(image, 1.0), image)
    np.testing.assert_array_equal(augment.rotate(image, 0.0), image)
    np.testing.assert_array_equal(augment.solarize(image, 0), 255 - image.numpy())


def test_randaugment_is_seeded():
    image = tf.constant(np.random.RandomState(3).uniform(0, 255, (16, 16, 3)), tf.float32)
    first = augment.randaugment(image, 3, 10.0, tf.constant([0, 1])).numpy()
    again = augment.randaugment(image, 3, 10.0, tf.constant([0, 1])).numpy()
    np.testing.assert_array_equal(first, again)
    others = [augment.randaugment(image, 3, 10.0, tf.constant([s, 1])).numpy() for s in range(1, 6)]
    assert any(not np.array_equal(first, o) for o in others)
    assert first.dtype == np.float32 and first.shape == (16, 16, 3)
