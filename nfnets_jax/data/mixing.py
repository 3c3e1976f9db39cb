"""MixUp and CutMix on the halves of a doubled batch (REFERENCE section 4).

A host draws `2 * B` examples per step. Example `i` of the first half is mixed with example
`i` of the second half, giving `B` outputs; with both methods enabled the first `B // 2`
outputs use MixUp and the rest CutMix. Labels are mixed with the same ratio as the pixels
(for CutMix the ratio is recomputed from the clipped box), so every target vector sums to 1.
Label smoothing is not applied here (the trainer applies it after mixing).
"""

from nfnets_jax.data import tf_runtime


def sample_beta(seed, shape, alpha: float):
    """Stateless Beta(alpha, alpha) samples, float32."""
    tf = tf_runtime.import_tf()
    seeds = tf.random.experimental.stateless_split(seed, 2)
    x = tf.random.stateless_gamma(shape, seeds[0], alpha=alpha)
    y = tf.random.stateless_gamma(shape, seeds[1], alpha=alpha)
    return x / tf.maximum(x + y, 1e-12)


def mixup(images_a, images_b, labels_a, labels_b, seed, alpha: float):
    """MixUp with one ratio per example: lam * a + (1 - lam) * b.

    Args:
      images_a, images_b: float32 [N, H, W, C].
      labels_a, labels_b: float32 [N, num_classes] target vectors.
      seed: int [2] stateless seed.
      alpha: Beta distribution parameter (0.2 in the reference).

    Returns:
      (images, labels, lam) with lam the float32 [N] weight of `a`.
    """
    tf = tf_runtime.import_tf()
    lam = sample_beta(seed, tf.shape(images_a)[:1], alpha)
    images = lam[:, None, None, None] * images_a + (1.0 - lam[:, None, None, None]) * images_b
    labels = lam[:, None] * labels_a + (1.0 - lam[:, None]) * labels_b
    return images, labels, lam


def cutmix_boxes(seed, n, height, width):
    """Samples CutMix boxes: keep-ratio lam ~ U(0, 1), box side sqrt(1 - lam), random centre.

    Returns:
      int32 [n, 4] boxes (y1, x1, y2, x2), clipped to the image.
    """
    tf = tf_runtime.import_tf()
    seeds = tf.random.experimental.stateless_split(seed, 3)
    lam = tf.random.stateless_uniform([n], seeds[0])
    ratio = tf.sqrt(1.0 - lam)
    cut_h = tf.cast(tf.cast(height, tf.float32) * ratio, tf.int32)
    cut_w = tf.cast(tf.cast(width, tf.float32) * ratio, tf.int32)
    cy = tf.random.stateless_uniform([n], seeds[1], 0, height, dtype=tf.int32)
    cx = tf.random.stateless_uniform([n], seeds[2], 0, width, dtype=tf.int32)
    y1 = tf.clip_by_value(cy - cut_h // 2, 0, height)
    y2 = tf.clip_by_value(cy + cut_h // 2, 0, height)
    x1 = tf.clip_by_value(cx - cut_w // 2, 0, width)
    x2 = tf.clip_by_value(cx + cut_w // 2, 0, width)
    return tf.stack([y1, x1, y2, x2], axis=1)


def cutmix(images_a, images_b, labels_a, labels_b, seed):
    """CutMix: paste a random box of `b` into `a`; labels weighted by pixel areas.

    Returns:
      (images, labels, lam) with lam the float32 [N] fraction of pixels from `a`.
    """
    tf = tf_runtime.import_tf()
    shape = tf.shape(images_a)
    n, height, width = shape[0], shape[1], shape[2]
    boxes = cutmix_boxes(seed, n, height, width)
    rows = tf.range(height)[None, :, None]
    cols = tf.range(width)[None, None, :]
    inside = (
        (rows >= boxes[:, 0, None, None])
        & (rows < boxes[:, 2, None, None])
        & (cols >= boxes[:, 1, None, None])
        & (cols < boxes[:, 3, None, None])
    )
    images = tf.where(inside[..., None], images_b, images_a)
    box_area = tf.cast((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), tf.float32)
    lam = 1.0 - box_area / tf.cast(height * width, tf.float32)
    labels = lam[:, None] * labels_a + (1.0 - lam[:, None]) * labels_b
    return images, labels, lam


def mix_doubled_batch(images, labels, seed, *, mixup_alpha: float, use_cutmix: bool):
    """Mixes a doubled batch of 2B examples into B examples.

    Args:
      images: float32 [2B, H, W, C].
      labels: float32 [2B, num_classes] one-hot.
      seed: int [2] stateless seed for this batch.
      mixup_alpha: MixUp Beta parameter; 0 disables MixUp.
      use_cutmix: enable CutMix.

    Returns:
      (images [B, H, W, C], labels [B, num_classes]).
    """
    tf = tf_runtime.import_tf()
    if not (mixup_alpha > 0 or use_cutmix):
        raise ValueError("mix_doubled_batch needs mixup_alpha > 0 or use_cutmix.")
    half = images.shape[0] // 2
    images_a, images_b = images[:half], images[half:]
    labels_a, labels_b = labels[:half], labels[half:]
    mixup_seed, cutmix_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if mixup_alpha > 0 and not use_cutmix:
        return mixup(images_a, images_b, labels_a, labels_b, mixup_seed, mixup_alpha)[:2]
    if use_cutmix and not mixup_alpha > 0:
        return cutmix(images_a, images_b, labels_a, labels_b, cutmix_seed)[:2]
    m = half // 2
    mixed_images, mixed_labels, _ = mixup(
        images_a[:m], images_b[:m], labels_a[:m], labels_b[:m], mixup_seed, mixup_alpha
    )
    cut_images, cut_labels, _ = cutmix(
        images_a[m:], images_b[m:], labels_a[m:], labels_b[m:], cutmix_seed
    )
    return (
        tf.concat([mixed_images, cut_images], axis=0),
        tf.concat([mixed_labels, cut_labels], axis=0),
    )
