"""Decoding untrusted image bytes inside a TensorFlow graph with a bound on memory.

Every format `tf.io.decode_image` reads (JPEG, PNG, GIF, BMP, WebP) declares its
size in a header; decoders allocate from that declaration. `image_size` reads it
without decoding so that a request can be refused *before* the decoder runs:
a 10 KB lossless WebP or PNG can declare 16383 x 16383 pixels (0.8 GB decoded).

GIF needs more: giflib decodes every frame of an animation into memory before TF
keeps the first one, and a frame may be larger than the screen it is declared
on. `gif_first_frame` walks the GIF blocks and cuts the file after the first
image, so only that frame is decoded and its own size is the one checked.

Animated WebP is refused by TF's decoder itself. Anything else (not one of the
five formats, a header too short to read) has no known size and is refused.

Reference: the GIF89a specification (block layout), RFC 9649 (WebP container).
"""

import tensorflow as tf

from keras_bit.io import DEFAULT_MAX_PIXELS  # noqa: F401 (re-exported: the decoders' default bound)

FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WebP")
_GIF_IMAGE, _GIF_EXTENSION, _GIF_TRAILER = 0x2C, 0x21, b"\x3b"
# Sub-blocks walked to find the end of a GIF's first image: 2**18 covers 66 MB of image data in full 255-byte
# sub-blocks (a 40-megapixel frame compresses to less) and bounds the walk to a few seconds of CPU.
_GIF_MAX_BLOCKS = 2**18


def _prefix(raw, magic, offset=0):
    """Whether the header bytes `raw` (see `_header_bytes`) hold `magic` at `offset`."""
    return tf.reduce_all(tf.equal(raw[offset:offset + len(magic)], tf.constant(list(magic), tf.uint8)))


def _uint(raw, offset, size, big_endian=False):
    """The unsigned integer at `raw[offset:offset + size]` (int64; `raw` is a uint8 vector long enough)."""
    part = tf.cast(raw[offset:offset + size], tf.int64)
    weights = tf.constant([256**i for i in range(size)], tf.int64)
    return tf.reduce_sum(part * (weights[::-1] if big_endian else weights))


def _header_bytes(data, length=32):
    """The first `length` bytes as uint8, zero-padded (reading past a short header yields 0, never an error)."""
    raw = tf.io.decode_raw(tf.strings.substr(data, 0, tf.minimum(tf.strings.length(data), length)), tf.uint8)
    return tf.pad(raw, [[0, length - tf.shape(raw)[0]]])


def _webp_sizes(raw):
    """`(height, width)` of a lossy ('VP8 '), lossless ('VP8L') and extended ('VP8X') WebP header."""
    # 'VP8 ': 14-bit width and height after the key frame's start code.
    lossy = tf.stack([_uint(raw, 28, 2) % 16384, _uint(raw, 26, 2) % 16384])
    # 'VP8L': 14-bit width-1 and height-1 packed after the 0x2f signature byte.
    bits = _uint(raw, 21, 4)
    lossless = tf.stack([(bits // 16384) % 16384 + 1, bits % 16384 + 1])
    # 'VP8X': 24-bit canvas width-1 and height-1.
    extended = tf.stack([_uint(raw, 27, 3) + 1, _uint(raw, 24, 3) + 1])
    return {b"VP8 ": lossy, b"VP8L": lossless, b"VP8X": extended}


def _abs_int32(value):
    """|value| for the two's-complement 32-bit integer stored unsigned in `value` (BMP heights)."""
    return tf.where(value >= 2**31, 2**32 - value, value)


def image_size(data):
    """`(height, width)` declared by a JPEG, PNG, GIF, BMP or WebP file, or `(-1, -1)` when unknown.

    Only headers are read (JPEG: `tf.image.extract_jpeg_shape`, which stops
    at the frame header and raises InvalidArgumentError for a broken one). A
    GIF's size is the larger of its screen and its first frame (see
    `gif_first_frame`).
    """
    return _inspect(data)[0]


def _inspect(data):
    """`(size, gif_end)`: `image_size(data)`, and for a GIF the end of its first image (else 0)."""
    raw = _header_bytes(data)
    length = tf.strings.length(data)
    none = tf.constant(0, tf.int64)
    webp = tf.logical_and(tf.logical_and(_prefix(raw, b"RIFF"), _prefix(raw, b"WEBP", 8)), length >= 30)
    cases = [
        (_prefix(raw, b"\xff\xd8\xff"), lambda: (tf.cast(tf.image.extract_jpeg_shape(data)[:2], tf.int64), none)),
        (tf.logical_and(_prefix(raw, b"\x89PNG\r\n\x1a\n"), length >= 24),
         lambda: (tf.stack([_uint(raw, 20, 4, True), _uint(raw, 16, 4, True)]), none)),
        (_prefix(raw, b"GIF8"), lambda: gif_first_frame(data)[::-1]),
        # TF's BMP decoder reads int32 width and height at these offsets (height < 0: top-down rows).
        (tf.logical_and(_prefix(raw, b"BM"), length >= 26),
         lambda: (tf.stack([_abs_int32(_uint(raw, 22, 4)), _uint(raw, 18, 4)]), none)),
    ] + [(tf.logical_and(webp, _prefix(raw, chunk, 12)), lambda s=size: (s, none))
         for chunk, size in _webp_sizes(raw).items()]
    result = (tf.constant([-1, -1], tf.int64), none)
    for condition, inspect in reversed(cases):
        result = tf.cond(condition, inspect, lambda r=result: r)
    return result


def gif_first_frame(data):
    """`(end, size)`: the byte offset just after a GIF's first image, and `(height, width)` to budget for it.

    The size is the larger, per axis, of the logical screen (the decoded
    output) and the first frame's descriptor (what giflib allocates for it).
    `end` is 0 and the size `(-1, -1)` when no complete first image is found
    (a truncated or malformed file).
    """
    raw = tf.io.decode_raw(data, tf.uint8)
    n = tf.cast(tf.shape(raw)[0], tf.int64)

    def byte(i):
        i = tf.cast(i, tf.int64)
        return tf.cond(i < n, lambda: tf.cast(raw[tf.minimum(i, n - 1)], tf.int64), lambda: tf.constant(-1, tf.int64))

    def u16(i):
        return byte(i) + 256 * byte(i + 1)

    flags = byte(10)
    table = tf.where(flags >= 128, 3 * 2 ** (flags % 8 + 1), 0)
    screen = tf.stack([u16(8), u16(6)])
    # State: 0 = at a block introducer, 1 = in an extension's sub-blocks, 2 = in the image data's sub-blocks,
    # 3 = done (first image complete), 4 = malformed.
    start = (tf.constant(13, tf.int64) + table, tf.constant(0, tf.int64), tf.constant([0, 0], tf.int64))

    def step(pos, state, frame):
        value = byte(pos)

        def at_block():
            descriptor = tf.stack([u16(pos + 7), u16(pos + 5)])
            local = byte(pos + 9)
            image_data = pos + 10 + tf.where(local >= 128, 3 * 2 ** (local % 8 + 1), 0) + 1  # + LZW code size
            return tf.case([(tf.equal(value, _GIF_EXTENSION), lambda: (pos + 2, tf.constant(1, tf.int64), frame)),
                            (tf.equal(value, _GIF_IMAGE), lambda: (image_data, tf.constant(2, tf.int64), descriptor))],
                           default=lambda: (pos, tf.constant(4, tf.int64), frame))

        def in_sub_blocks():
            # A zero-length sub-block ends the chain; -1 (past the end) is malformed.
            ended = tf.where(tf.equal(state, 2), tf.constant(3, tf.int64), tf.constant(0, tf.int64))
            return tf.case([(tf.equal(value, 0), lambda: (pos + 1, ended, frame)),
                            (value < 0, lambda: (pos, tf.constant(4, tf.int64), frame))],
                           default=lambda: (pos + value + 1, state, frame))

        return tf.cond(tf.equal(state, 0), at_block, in_sub_blocks)

    # At most _GIF_MAX_BLOCKS blocks before the first image's data ends: a crafted file of 1-byte sub-blocks would
    # otherwise cost about 20 us of CPU per byte; a file that needs more is treated as malformed.
    pos, state, frame = tf.while_loop(lambda pos, state, frame: state < 3, step, start, parallel_iterations=1,
                                      maximum_iterations=_GIF_MAX_BLOCKS)
    complete = tf.equal(state, 3)
    return (tf.where(complete, pos, 0),
            tf.where(complete, tf.maximum(screen, frame), tf.constant([-1, -1], tf.int64)))


def decode(data, max_pixels=DEFAULT_MAX_PIXELS, dct_fit=None):
    """uint8 `(height, width, 3)` pixels of one encoded image, refused before decoding when too large.

    Args:
        data: a scalar string tensor holding a JPEG, PNG, GIF, BMP or WebP file.
        max_pixels: largest `height * width` decoded; larger images (and
            files whose size cannot be read) fail with an InvalidArgumentError
            before any pixel is decoded.
        dct_fit: optional `(height, width)`: decode a JPEG at 1/2, 1/4 or 1/8
            of its size inside the DCT when that still covers `dct_fit`
            (faster and smaller, but not the pixels of a full decode followed
            by a resize); `max_pixels` then counts the reduced size (a
            progressive JPEG still buffers full-size DCT coefficients).

    Returns:
        The decoded pixels (a GIF's first frame; animated WebP is refused by TF).
    """
    raw = _header_bytes(data)
    size, gif_end = _inspect(data)
    branch = _dct_branch(raw, size, dct_fit) if dct_fit else tf.constant(0, tf.int64)
    ratio = tf.gather(tf.constant(_DCT_RATIOS, tf.int64), branch)
    decoded = (size + ratio - 1) // ratio
    # Each side is compared first so that the product cannot overflow (a header may declare 2**32 - 1).
    fits = tf.logical_and(tf.reduce_all(decoded <= max_pixels), decoded[0] * decoded[1] <= max_pixels)
    allowed = tf.debugging.Assert(
        tf.logical_and(tf.reduce_all(size >= 0), fits),
        [(f"image_bytes: not a readable {'/'.join(FORMATS)} file, or more than max_pixels={max_pixels} pixels; "
          "(height, width) ="), size])
    with tf.control_dependencies([allowed]):
        data = tf.cond(_prefix(raw, b"GIF8"),
                       lambda: tf.strings.substr(data, 0, tf.cast(gif_end, tf.int32)) + _GIF_TRAILER,
                       lambda: tf.identity(data))
        decoders = [lambda: tf.io.decode_image(data, channels=3, expand_animations=False)]
        decoders += [lambda r=r: tf.io.decode_jpeg(data, channels=3, ratio=r) for r in _DCT_RATIOS[1:]]
        image = tf.switch_case(tf.cast(branch, tf.int32), decoders) if dct_fit else decoders[0]()
    image.set_shape([None, None, 3])
    return image


_DCT_RATIOS = (1, 2, 4, 8)


def _dct_branch(raw, size, fit):
    """Index in `_DCT_RATIOS` of the largest ratio that still decodes a JPEG to at least `fit` (0 otherwise)."""
    fits = [tf.logical_and(size[0] >= r * fit[0], size[1] >= r * fit[1]) for r in _DCT_RATIOS]
    best = tf.reduce_max(tf.where(tf.stack(fits), tf.range(len(_DCT_RATIOS), dtype=tf.int64), 0))
    return tf.where(_prefix(raw, b"\xff\xd8\xff"), best, 0)
