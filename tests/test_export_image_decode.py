"""Bounded decoding of untrusted bytes: sizes read from headers, decompression bombs refused before decoding."""

import io
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from helpers import encode, uint8_images
from keras_bit.export import image_decode

REFUSED = "not a readable JPEG/PNG/GIF/BMP/WebP file, or more than max_pixels"

FORMATS = {
    "JPEG": {}, "PNG": {}, "GIF": {}, "BMP": {},
    "WEBP-lossy": {"quality": 80}, "WEBP-lossless": {"lossless": True},
}


def _encode(image, name):
    if name.startswith("WEBP"):
        return encode(image, "WEBP", **FORMATS[name])
    if name == "GIF":  # 256 colours: grey pixels survive exactly
        image = np.repeat(image[..., :1], 3, axis=-1)
    return encode(image, name)


def _size(data):
    return tuple(image_decode.image_size(tf.constant(data)).numpy())


def _decode(data, max_pixels=image_decode.DEFAULT_MAX_PIXELS):
    return image_decode.decode(tf.constant(data), max_pixels).numpy()


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_reports_its_size_and_decodes_like_tf(rng, name):
    image = uint8_images(rng, 1, 37, 53)[0]
    data = _encode(image, name)
    assert _size(data) == (37, 53)
    np.testing.assert_array_equal(_decode(data), tf.io.decode_image(data, channels=3, expand_animations=False))
    with pytest.raises(tf.errors.InvalidArgumentError, match=REFUSED + "=1960"):
        _decode(data, max_pixels=37 * 53 - 1)
    assert _decode(data, max_pixels=37 * 53).shape == (37, 53, 3)


def test_extended_webp_and_top_down_bmp(rng):
    image = uint8_images(rng, 1, 21, 34)[0]
    rgba = encode(np.dstack([image, np.full((21, 34), 99, np.uint8)]), "WEBP", quality=90)
    assert rgba[12:16] == b"VP8X"
    assert _size(rgba) == (21, 34)
    bmp = bytearray(encode(image, "BMP"))
    height, = struct.unpack_from("<i", bmp, 22)
    assert height == 21
    struct.pack_into("<i", bmp, 22, -21)  # rows stored top-down: a negative height
    assert _size(bytes(bmp)) == (21, 34)


def _with(data, offset, fmt, *values):
    data = bytearray(data)
    struct.pack_into(fmt, data, offset, *values)
    return bytes(data)


def _jpeg_bomb(data):
    """A JPEG whose frame header (SOF0) declares 60000 x 60000 pixels."""
    sof = data.index(b"\xff\xc0")
    return _with(data, sof + 5, ">HH", 60000, 60000)


def _webp_lossless_bomb():
    """The issue's 16383 x 16383 lossless WebP: a header and almost no data."""
    bits = (16383 - 1) | (16383 - 1) << 14
    payload = b"\x2f" + struct.pack("<I", bits) + b"\x00" * 16
    return b"RIFF" + struct.pack("<I", 4 + 8 + len(payload)) + b"WEBP" + b"VP8L" + struct.pack("<I", len(payload)) \
        + payload


@pytest.mark.parametrize("bomb, declared", [  # (height, width) as the header declares
    (lambda img: _with(encode(img, "PNG"), 16, ">II", 100_000, 100_000), (100_000, 100_000)),
    (lambda img: _jpeg_bomb(encode(img, "JPEG")), (60000, 60000)),
    (lambda img: _with(encode(img, "BMP"), 18, "<ii", 30000, -30000), (30000, 30000)),
    (lambda img: _with(encode(img, "WEBP", quality=80), 26, "<HH", 16383, 16383), (16383, 16383)),
    (lambda img: _webp_lossless_bomb(), (16383, 16383)),
    (lambda img: _with(encode(np.dstack([img, img[..., :1]]), "WEBP", quality=80), 24, "<6B", *[255] * 6),
     (2**24, 2**24)),
    (lambda img: _with(encode(img, "GIF"), 6, "<HH", 65535, 65535), (65535, 65535)),
])
def test_decompression_bombs_are_refused_from_the_header(rng, bomb, declared):
    data = bomb(uint8_images(rng, 1, 16, 16)[0])
    assert _size(data) == declared
    with pytest.raises(tf.errors.InvalidArgumentError, match=REFUSED):
        _decode(data)


def _animated_gif(frames):
    images = [Image.fromarray(np.full((60, 80), 40 * (i % 6), np.uint8)) for i in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, "GIF", save_all=True, append_images=images[1:], duration=50, loop=0)
    return buffer.getvalue()


def test_animated_gif_decodes_the_first_frame_only():
    data = _animated_gif(150)
    first = _decode(data, max_pixels=60 * 80)  # each frame fits; all 150 would be 150x over
    np.testing.assert_array_equal(first, np.zeros((60, 80, 3), np.uint8))
    np.testing.assert_array_equal(first, tf.io.decode_gif(data)[0])
    # What reaches the decoder is the file cut after its first image (plus the trailer): one frame, not 150.
    end = int(image_decode.gif_first_frame(tf.constant(data))[0])
    assert tf.io.decode_gif(data).shape[0] == 150
    cut = tf.io.decode_gif(data[:end] + b"\x3b")
    assert cut.shape[0] == 1
    np.testing.assert_array_equal(cut[0], first)


def test_gif_first_frame_larger_than_its_screen_is_bounded(rng):
    gif = encode(np.repeat(uint8_images(rng, 1, 10, 10)[0][..., :1], 3, axis=-1), "GIF")
    flags = gif[10]
    table = 3 * 2 ** (flags % 8 + 1) if flags & 0x80 else 0
    descriptor = 13 + table
    while gif[descriptor] == 0x21:  # skip extensions (Pillow may write a graphic control block)
        descriptor += 2
        while gif[descriptor]:
            descriptor += gif[descriptor] + 1
        descriptor += 1
    assert gif[descriptor] == 0x2C
    bomb = _with(gif, descriptor + 5, "<HH", 20000, 20000)
    assert _size(bomb) == (20000, 20000)
    with pytest.raises(tf.errors.InvalidArgumentError, match=REFUSED):
        _decode(bomb)


@pytest.mark.parametrize("data", [b"", b"GIF8", b"GIF89a", b"\x89PNG\r\n\x1a\n", b"RIFF\x00\x00\x00\x00WEBP", b"BM",
                                  b"not an image", b"\xff\xd8\xff", b"\x00" * 100])
def test_unreadable_headers_are_refused(data):
    # A JPEG marker with nothing after it fails in libjpeg's header reader; everything else in the size check.
    with pytest.raises(tf.errors.InvalidArgumentError, match="" if data == b"\xff\xd8\xff" else REFUSED):
        _decode(data)


def _pil_bytes(image, fmt, **options):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("variant", ["grey PNG", "RGBA PNG", "palette PNG", "16-bit PNG", "interlaced PNG",
                                     "progressive JPEG", "grey JPEG", "CMYK JPEG", "interlaced GIF",
                                     "RGBA WebP", "palette BMP"])
def test_every_pixel_layout_decodes_like_tf(rng, variant):
    rgb = Image.fromarray(uint8_images(rng, 1, 29, 41)[0])
    kind, fmt = variant.rsplit(" ", 1)
    image = {"grey": rgb.convert("L"), "RGBA": rgb.convert("RGBA"), "palette": rgb.convert("P"),
             "16-bit": rgb.convert("I;16"), "CMYK": rgb.convert("CMYK")}.get(kind, rgb)
    options = {"interlaced": {"interlace": 1} if fmt == "GIF" else {}, "progressive": {"progressive": True}}
    data = _pil_bytes(image, fmt.replace("WebP", "WEBP"), **options.get(kind, {}))
    assert _size(data) == (29, 41)
    np.testing.assert_array_equal(_decode(data), tf.io.decode_image(data, channels=3, expand_animations=False))


def test_truncated_gif_is_refused(rng):
    gif = _animated_gif(2)
    assert _size(gif[:40]) == (-1, -1)
    with pytest.raises(tf.errors.InvalidArgumentError, match=REFUSED):
        _decode(gif[:40])


def test_jpeg_dct_scaling_counts_the_reduced_size(rng):
    image = np.kron(uint8_images(rng, 1, 6, 5)[0], np.ones((100, 100, 1), np.uint8))  # 600 x 500
    jpeg = encode(image, "JPEG")
    scaled = image_decode.decode(tf.constant(jpeg), max_pixels=100_000, dct_fit=(64, 64)).numpy()
    np.testing.assert_array_equal(scaled, tf.io.decode_jpeg(jpeg, channels=3, ratio=4))  # 150 x 125
    with pytest.raises(tf.errors.InvalidArgumentError, match=REFUSED):
        _decode(jpeg, max_pixels=100_000)  # at full size it is 300 000 pixels


MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import tensorflow as tf
    from keras_bit.export import image_decode
    data = tf.constant(open(sys.argv[1], "rb").read())
    image_decode.decode(tf.constant(open(sys.argv[2], "rb").read()))  # warm up every code path once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        image_decode.decode(data)
        print("decoded")
    except tf.errors.InvalidArgumentError:
        print("refused", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """
)


def test_a_real_png_bomb_costs_no_memory(tmp_path, rng):
    # 8000 x 6000 black pixels (48 MP, 144 MB decoded) compress to about 140 KB.
    bomb = tmp_path / "bomb.png"
    Image.new("L", (8000, 6000)).save(bomb, optimize=False)
    assert os.path.getsize(bomb) < 500_000
    small = tmp_path / "small.png"
    small.write_bytes(encode(uint8_images(rng, 1, 20, 20)[0], "PNG"))
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(bomb), str(small)], check=False,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    verdict, grown_mb = proc.stdout.split()
    assert verdict == "refused" and int(grown_mb) < 20, proc.stdout
