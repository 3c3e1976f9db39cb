"""RandAugment (Cubuk et al. 2020) as in the reference release, on TensorFlow image ops.

The policy is the one of the TPU EfficientNet/NFNet reference `distort_image_with_randaugment`:
16 ops; for each of `num_layers` layers one op is drawn uniformly and applied with a
probability drawn uniformly from [0.2, 0.8]; all ops share one `magnitude` (0..10, the
reference's _MAX_LEVEL is 10). Geometric ops fill with grey (128) and use nearest-neighbour
sampling; translations are absolute pixels (100 at magnitude 10) and cutout squares have
half-side `magnitude / 10 * 40` pixels, as in the reference (which was tuned for 224 px).
Randomness is stateless (explicit seeds), so a pipeline is reproducible.
"""

import math

from nfnets_jax.data import tf_runtime

MAX_LEVEL = 10.0
TRANSLATE_CONST = 100.0
CUTOUT_CONST = 40.0
FILL_VALUE = 128

OP_NAMES = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Cutout",
    "SolarizeAdd",
)


def _blend(image1, image2, factor):
    """image1 + factor * (image2 - image1), saturated to uint8 (factor may extrapolate)."""
    tf = tf_runtime.import_tf()
    a = tf.cast(image1, tf.float32)
    b = tf.cast(image2, tf.float32)
    return tf.cast(tf.clip_by_value(a + factor * (b - a), 0.0, 255.0), tf.uint8)


def _grayscale(image):
    tf = tf_runtime.import_tf()
    return tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))


def autocontrast(image):
    """Stretches each channel to the full [0, 255] range."""
    tf = tf_runtime.import_tf()

    def scale_channel(channel):
        lo = tf.cast(tf.reduce_min(channel), tf.float32)
        hi = tf.cast(tf.reduce_max(channel), tf.float32)
        scaled = (tf.cast(channel, tf.float32) - lo) * (255.0 / tf.maximum(hi - lo, 1.0))
        scaled = tf.cast(tf.clip_by_value(scaled, 0.0, 255.0), tf.uint8)
        return tf.where(hi > lo, scaled, channel)

    return tf.stack([scale_channel(image[..., c]) for c in range(3)], axis=-1)


def equalize(image):
    """Per-channel histogram equalisation (PIL ImageOps.equalize semantics)."""
    tf = tf_runtime.import_tf()

    def scale_channel(channel):
        channel = tf.cast(channel, tf.int32)
        histo = tf.histogram_fixed_width(channel, [0, 255], nbins=256)
        nonzero = tf.boolean_mask(histo, histo != 0)
        step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255

        def apply_lut():
            lut = (tf.cumsum(histo) + step // 2) // tf.maximum(step, 1)
            lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
            return tf.gather(lut, channel)

        return tf.cast(tf.cond(step == 0, lambda: channel, apply_lut), tf.uint8)

    return tf.stack([scale_channel(image[..., c]) for c in range(3)], axis=-1)


def invert(image):
    return 255 - image


def posterize(image, bits: int):
    """Keeps the top `bits` bits of every pixel."""
    tf = tf_runtime.import_tf()
    shift = 8 - bits
    return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def solarize(image, threshold: int):
    """Inverts pixels >= threshold."""
    tf = tf_runtime.import_tf()
    return tf.where(image < threshold, image, 255 - image)


def solarize_add(image, addition: int, threshold: int = 128):
    """Adds `addition` (saturating) to pixels below `threshold`."""
    tf = tf_runtime.import_tf()
    added = tf.cast(tf.clip_by_value(tf.cast(image, tf.int32) + addition, 0, 255), tf.uint8)
    return tf.where(image < threshold, added, image)


def color(image, factor: float):
    return _blend(_grayscale(image), image, factor)


def contrast(image, factor: float):
    """Blends with the mean grey level of the image."""
    tf = tf_runtime.import_tf()
    mean = tf.reduce_mean(tf.cast(tf.image.rgb_to_grayscale(image), tf.float32))
    return _blend(tf.fill(tf.shape(image), tf.cast(mean, tf.uint8)), image, factor)


def brightness(image, factor: float):
    tf = tf_runtime.import_tf()
    return _blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor: float):
    """Blends with a smoothed image (3x3 kernel, centre 5, total 13); borders unchanged."""
    tf = tf_runtime.import_tf()
    x = tf.cast(image, tf.float32)[None]
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], padding="VALID")
    smooth = tf.cast(tf.clip_by_value(tf.round(smooth[0]), 0.0, 255.0), tf.uint8)
    mask = tf.pad(tf.ones_like(smooth), [[1, 1], [1, 1], [0, 0]])
    padded = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
    degenerate = tf.where(mask == 1, padded, image)
    return _blend(degenerate, image, factor)


def _transform(image, transform):
    """Projective transform (output -> input coordinates), nearest sampling, grey fill."""
    tf = tf_runtime.import_tf()
    shape = tf.shape(image)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=tf.cast(transform, tf.float32)[None],
        output_shape=shape[:2],
        fill_value=float(FILL_VALUE),
        interpolation="NEAREST",
        fill_mode="CONSTANT",
    )
    return out[0]


def rotate(image, degrees):
    """Rotates counter-clockwise about the centre by `degrees`."""
    tf = tf_runtime.import_tf()
    radians = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
    height = tf.cast(tf.shape(image)[0], tf.float32)
    width = tf.cast(tf.shape(image)[1], tf.float32)
    cos, sin = tf.cos(radians), tf.sin(radians)
    x_offset = ((width - 1) - (cos * (width - 1) - sin * (height - 1))) / 2.0
    y_offset = ((height - 1) - (sin * (width - 1) + cos * (height - 1))) / 2.0
    return _transform(image, tf.stack([cos, -sin, x_offset, sin, cos, y_offset, 0.0, 0.0]))


def shear_x(image, level):
    tf = tf_runtime.import_tf()
    return _transform(image, tf.stack([1.0, level, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]))


def shear_y(image, level):
    tf = tf_runtime.import_tf()
    return _transform(image, tf.stack([1.0, 0.0, 0.0, level, 1.0, 0.0, 0.0, 0.0]))


def translate_x(image, pixels):
    tf = tf_runtime.import_tf()
    return _transform(image, tf.stack([1.0, 0.0, -pixels, 0.0, 1.0, 0.0, 0.0, 0.0]))


def translate_y(image, pixels):
    tf = tf_runtime.import_tf()
    return _transform(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, -pixels, 0.0, 0.0]))


def cutout(image, pad_size: int, seed):
    """Greys out a (2 * pad_size)^2 square (clipped) centred at a random pixel."""
    tf = tf_runtime.import_tf()
    shape = tf.shape(image)
    cy = tf.random.stateless_uniform([], seed, 0, shape[0], dtype=tf.int32)
    cx = tf.random.stateless_uniform([], seed + 1, 0, shape[1], dtype=tf.int32)
    rows = tf.range(shape[0])[:, None]
    cols = tf.range(shape[1])[None, :]
    inside = (
        (rows >= cy - pad_size)
        & (rows < cy + pad_size)
        & (cols >= cx - pad_size)
        & (cols < cx + pad_size)
    )
    return tf.where(inside[..., None], tf.constant(FILL_VALUE, tf.uint8), image)


def _ops(magnitude: float, sign, seed):
    """The 16 reference ops as closures of (image) at the given magnitude."""
    level = magnitude / MAX_LEVEL
    enhance = level * 1.8 + 0.1
    return (
        autocontrast,
        equalize,
        invert,
        lambda im: rotate(im, sign * level * 30.0),
        lambda im: posterize(im, int(level * 4)),
        lambda im: solarize(im, int(level * 256)),
        lambda im: color(im, enhance),
        lambda im: contrast(im, enhance),
        lambda im: brightness(im, enhance),
        lambda im: sharpness(im, enhance),
        lambda im: shear_x(im, sign * level * 0.3),
        lambda im: shear_y(im, sign * level * 0.3),
        lambda im: translate_x(im, sign * level * TRANSLATE_CONST),
        lambda im: translate_y(im, sign * level * TRANSLATE_CONST),
        lambda im: cutout(im, int(level * CUTOUT_CONST), seed),
        lambda im: solarize_add(im, int(level * 110)),
    )


def apply_op(image, op_name: str, magnitude: float, seed=None):
    """Applies one named op (for tests and inspection). image: uint8 [H, W, 3]."""
    tf = tf_runtime.import_tf()
    seed = tf.constant([0, 0], tf.int32) if seed is None else seed
    return _ops(magnitude, 1.0, seed)[OP_NAMES.index(op_name)](image)


def _random_layer(image, magnitude: float, seed):
    """One RandAugment layer: a uniformly drawn op, applied with probability U(0.2, 0.8)."""
    tf = tf_runtime.import_tf()
    s_op, s_prob, s_apply, s_sign, s_op_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 5)
    )
    op_index = tf.random.stateless_uniform([], s_op, 0, len(OP_NAMES), dtype=tf.int32)
    prob = tf.random.stateless_uniform([], s_prob, 0.2, 0.8)
    should_apply = tf.random.stateless_uniform([], s_apply) < prob
    sign = tf.where(tf.random.stateless_uniform([], s_sign) < 0.5, -1.0, 1.0)
    branches = [
        lambda op=op: tf.ensure_shape(op(image), image.shape)
        for op in _ops(magnitude, sign, s_op_seed)
    ]
    return tf.cond(should_apply, lambda: tf.switch_case(op_index, branches), lambda: image)


def randaugment(image, num_layers: int, magnitude: float, seed):
    """RandAugment on one image.

    Args:
      image: float32 [H, W, 3] in [0, 255] (rounded to uint8 for the ops) or uint8.
      num_layers: ops applied in sequence (N).
      magnitude: shared op strength M, 0..10 (values above 10 extrapolate).
      seed: int [2] stateless seed.

    Returns:
      An image of the input's dtype and shape.
    """
    tf = tf_runtime.import_tf()
    in_dtype = image.dtype
    static_shape = image.shape
    if in_dtype != tf.uint8:
        image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
    for layer in range(num_layers):
        image = _random_layer(
            image, magnitude, tf.random.experimental.stateless_fold_in(seed, layer)
        )
        image = tf.ensure_shape(image, static_shape)
    if in_dtype != tf.uint8:
        image = tf.cast(image, in_dtype)
    return image
