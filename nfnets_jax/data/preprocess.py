"""Per-example decoding, cropping, resizing and normalisation (REFERENCE sections 4 and 5).

All functions are TensorFlow graph code used inside `tf.data` maps; randomness is stateless
(an explicit `[2]` int seed) so a pipeline is reproducible and resumable. Images are either
encoded bytes (a scalar `tf.string`: JPEG is decoded straight into the crop window with
`tf.image.decode_and_crop_jpeg`, other formats are decoded whole then cropped) or uint8
arrays `[H, W, C]`.
"""

from nfnets_jax.data import tf_runtime

MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)

CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RANGE = (3 / 4, 4 / 3)
CROP_MAX_ATTEMPTS = 10


def _to_rgb(image):
    """Makes a decoded uint8 image 3-channel (grayscale tiled, alpha dropped)."""
    tf = tf_runtime.import_tf()
    channels = image.shape[-1]
    if channels == 1:
        return tf.image.grayscale_to_rgb(image)
    if channels == 4:
        return image[..., :3]
    if channels is None:
        image = tf.cond(
            tf.shape(image)[-1] == 1, lambda: tf.tile(image, [1, 1, 3]), lambda: image[..., :3]
        )
        return tf.ensure_shape(image, [None, None, 3])
    return image


def _is_encoded(image) -> bool:
    tf = tf_runtime.import_tf()
    return image.dtype == tf.string


def _decode_whole(image):
    """Decodes any supported image bytes (JPEG, PNG, BMP, GIF first frame) to uint8 RGB."""
    tf = tf_runtime.import_tf()
    decoded = tf.io.decode_image(image, channels=3, expand_animations=False)
    return tf.ensure_shape(decoded, [None, None, 3])


def sample_crop_window(shape, seed):
    """Samples an inception-style crop window.

    Area is uniform in `CROP_AREA_RANGE` of the image, the aspect ratio (width / height)
    log-uniform-ish in `CROP_ASPECT_RANGE` (TF's sampler); after `CROP_MAX_ATTEMPTS` failed
    tries the whole image is used.

    Args:
      shape: int32 [2] tensor, (height, width).
      seed: int [2] stateless seed.

    Returns:
      int32 [4] tensor (offset_y, offset_x, crop_height, crop_width).
    """
    tf = tf_runtime.import_tf()
    shape = tf.cast(shape, tf.int32)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.concat([shape, [3]], axis=0),
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=CROP_ASPECT_RANGE,
        area_range=CROP_AREA_RANGE,
        max_attempts=CROP_MAX_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    return tf.stack([begin[0], begin[1], size[0], size[1]])


def decode_and_crop(image, window):
    """Decodes only the `window` (offset_y, offset_x, h, w) of an image, as uint8 RGB."""
    tf = tf_runtime.import_tf()
    if not _is_encoded(image):
        return _to_rgb(image[window[0] : window[0] + window[2], window[1] : window[1] + window[3]])

    def crop_jpeg():
        return tf.image.decode_and_crop_jpeg(image, window, channels=3)

    def crop_other():
        return tf.image.crop_to_bounding_box(_decode_whole(image), *tf.unstack(window))

    cropped = tf.cond(tf.io.is_jpeg(image), crop_jpeg, crop_other)
    return tf.ensure_shape(cropped, [None, None, 3])


def decode_and_random_crop(image, seed):
    """Decodes an inception-style random crop of an image (each image decoded once).

    JPEG bytes: the window is sampled from the header's shape and only that window is
    decoded. Other encodings are decoded whole, then cropped. Arrays are sliced.
    """
    tf = tf_runtime.import_tf()
    if not _is_encoded(image):
        return decode_and_crop(image, sample_crop_window(tf.shape(image)[:2], seed))

    def crop_jpeg():
        window = sample_crop_window(tf.image.extract_jpeg_shape(image)[:2], seed)
        return tf.image.decode_and_crop_jpeg(image, window, channels=3)

    def crop_other():
        decoded = _decode_whole(image)
        window = sample_crop_window(tf.shape(decoded)[:2], seed)
        return tf.image.crop_to_bounding_box(decoded, *tf.unstack(window))

    cropped = tf.cond(tf.io.is_jpeg(image), crop_jpeg, crop_other)
    return tf.ensure_shape(cropped, [None, None, 3])


def decode(image):
    """Decodes a whole image (bytes or array) to uint8 RGB [H, W, 3]."""
    if _is_encoded(image):
        return _decode_whole(image)
    return _to_rgb(image)


def resize(image, size: int):
    """Bicubic squash-resize to size x size (aspect ratio not kept); float32 in [0, 255]."""
    tf = tf_runtime.import_tf()
    image = tf.cast(image, tf.float32)
    image = tf.image.resize(image, [size, size], method="bicubic", antialias=False)
    return tf.clip_by_value(image, 0.0, 255.0)


def train_image(image, size: int, seed, *, random_crop: bool, flip: bool):
    """Training preprocessing of one image: inception crop, flip, bicubic resize.

    Args:
      image: encoded bytes or uint8 [H, W, C].
      size: output side (train px).
      seed: int [2] stateless seed for this example.
      random_crop: inception-style crop (else the whole image is squash-resized).
      flip: random horizontal flip.

    Returns:
      float32 [size, size, 3] in [0, 255].
    """
    tf = tf_runtime.import_tf()
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if random_crop:
        image = decode_and_random_crop(image, crop_seed)
    else:
        image = decode(image)
    if flip:
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return resize(image, size)


def eval_image(image, size: int, margin: int = 32):
    """Evaluation preprocessing: squash-resize to (size+margin)^2 then centre-crop size^2.

    Args:
      image: encoded bytes or uint8 [H, W, C].
      size: output side (test px).
      margin: extra pixels of the resize before the centre crop (32 in the reference).

    Returns:
      float32 [size, size, 3] in [0, 255].
    """
    image = resize(decode(image), size + margin)
    start = margin // 2
    return image[start : start + size, start : start + size]


def normalize(images, dtype):
    """(x - mean) / std per channel, cast to `dtype` (a tf dtype)."""
    tf = tf_runtime.import_tf()
    images = (tf.cast(images, tf.float32) - tf.constant(MEAN_RGB)) / tf.constant(STDDEV_RGB)
    return tf.cast(images, dtype)
