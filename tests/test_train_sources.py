"""Array, image-folder and scikit-learn sources, `load`'s checks, few-shot draws and fingerprints."""

import os

import numpy as np
import pytest
from PIL import Image

from keras_bit.train import pipeline, sources
from keras_bit.train.sources import image_check


def _arrays(n_per_class=6, classes=3, size=12, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    images = rng.integers(0, 256, size=(len(labels), size, size, 3), dtype=np.uint8)
    return images, labels


def _image_folder(root, classes=("cat", "dog"), per_class=5, size=(20, 30)):
    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def test_arrays_source_holdout_is_deterministic():
    images, labels = _arrays()
    a = sources.from_arrays(images, labels, seed=3)
    b = sources.from_arrays(images, labels, seed=3)
    assert len(a.train) + len(a.eval) == 18 and len(a.eval) == 4
    np.testing.assert_array_equal(a.eval.labels, b.eval.labels)
    assert a.num_classes == 3 and a.image_size == (12, 12) and a.class_names == ["0", "1", "2"]


def test_few_shot_exact_and_deterministic():
    images, labels = _arrays(n_per_class=10)
    split = sources.ArraySplit(images, labels)
    a = sources.few_shot(split, 4, 3, seed=1)
    b = sources.few_shot(split, 4, 3, seed=1)
    c = sources.few_shot(split, 4, 3, seed=2)
    assert np.bincount(a.labels).tolist() == [4, 4, 4]
    np.testing.assert_array_equal(a.records, b.records)
    assert not np.array_equal(a.records, c.records)
    with pytest.raises(ValueError, match="Class 0 has 10 training examples, fewer than examples_per_class=11"):
        sources.few_shot(split, 11, 3)


def test_image_folder(tmp_path):
    root = _image_folder(tmp_path / "pets")
    ds = sources.load(str(root), eval_fraction=0.2)
    assert ds.class_names == ["cat", "dog"] and ds.num_classes == 2 and ds.image_size == (20, 30)
    assert len(ds.train) == 8 and len(ds.eval) == 2
    x, y = next(pipeline.train_pipeline(ds.train, 2, 4, 40, 32).as_numpy_iterator())
    assert x.shape == (4, 32, 32, 3) and y.shape == (4, 2)


def test_image_folder_with_train_and_test(tmp_path):
    _image_folder(tmp_path / "d" / "train", per_class=4)
    _image_folder(tmp_path / "d" / "test", per_class=2)
    ds = sources.from_folder(tmp_path / "d")
    assert len(ds.train) == 8 and len(ds.eval) == 4


def test_folder_errors(tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="Class folder .*empty/a' holds no images"):
        sources.from_folder(tmp_path / "empty")
    root = _image_folder(tmp_path / "one_empty")
    (root / "bird").mkdir()
    with pytest.raises(ValueError, match="Class folder .*bird' holds no images"):
        sources.from_folder(root)
    with pytest.raises(ValueError, match="has no class sub-folders"):
        (tmp_path / "flat").mkdir()
        sources.from_folder(tmp_path / "flat")
    root = _image_folder(tmp_path / "notes")
    (root / "cat" / "README.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"holds files that are not images: .*README.txt \(not an image file"):
        sources.from_folder(root)
    root = _image_folder(tmp_path / "broken")
    (root / "dog" / "bad.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(ValueError, match=r"1 of 11 images under .* cannot be decoded by TensorFlow within "
                                         r"max_pixels=40000000: .*bad.jpg \(not a readable JPEG"):
        sources.from_folder(root)
    with pytest.raises(ValueError, match="Image folder not found"):
        sources.from_folder(tmp_path / "nope" / "x")


def _truncated_jpeg(path, size=(40, 60)):
    pixels = np.random.default_rng(0).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # the header survives: PIL's verify() accepts it


def test_truncated_jpeg_is_caught_before_training(tmp_path):
    root = _image_folder(tmp_path / "pets")
    _truncated_jpeg(root / "dog" / "cut.jpg")
    from PIL import Image as PILImage

    with PILImage.open(root / "dog" / "cut.jpg") as im:
        im.verify()  # the old header-only check passed this file
    with pytest.raises(ValueError, match=r"cannot be decoded by TensorFlow within max_pixels=\d+: .*dog/cut.jpg "
                                         r"\(corrupt.*--skip-bad-images"):
        sources.load(str(root))
    ds = sources.load(str(root), skip_bad_images=True)
    assert ds.skipped == [str(root / "dog" / "cut.jpg")]
    assert len(ds.train) + len(ds.eval) == 10
    assert str(root / "dog" / "cut.jpg") not in set(ds.train.records) | set(ds.eval.records)


def test_every_decodable_format_loads_and_sizes_are_decoded(tmp_path):
    root = tmp_path / "formats"
    rng = np.random.default_rng(0)
    for c, fmt in (("a", "webp"), ("a", "bmp"), ("b", "gif"), ("b", "png"), ("a", "jpeg"), ("b", "jpg")):
        os.makedirs(root / c, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(24, 28, 3), dtype=np.uint8)).save(root / c / f"x.{fmt}")
    sizes, bad = image_check.check_images(np.array(sorted(str(p) for p in root.rglob("x.*"))))
    assert bad == {} and sizes.tolist() == [[24, 28]] * 6
    ds = sources.load(str(root))
    assert ds.image_size == (24, 28) and len(ds.train) + len(ds.eval) == 6


def test_class_names_must_be_single_line_and_distinct(tmp_path):
    root = _image_folder(tmp_path / "nl", classes=("cat", "dog\nhouse"))
    with pytest.raises(ValueError, match=r"single-line string. Received: 'dog\\nhouse'"):
        sources.load(str(root))
    images, labels = _arrays()
    with pytest.raises(ValueError, match="class names must be distinct"):
        sources.load(sources.from_arrays(images, labels, class_names=["a", "b", "a"]))
    with pytest.raises(ValueError, match="2 names for 3 classes"):
        sources.load(sources.from_arrays(images, labels, class_names=["a", "b"], num_classes=3))


def test_sparse_labels_say_how_to_remap():
    images, _ = _arrays(n_per_class=1, classes=2)
    with pytest.raises(ValueError, match=r"2 distinct values between 0 and 1000000. Remap them first: "
                                         r"`classes, labels = np.unique\(labels, return_inverse=True\)`"):
        sources.load((images, np.array([0, 10**6])))
    with pytest.raises(ValueError, match="3 distinct values between 1 and 3"):
        sources.load((_arrays()[0], np.repeat([1, 2, 3], 6)))


def test_one_class_is_refused(tmp_path):
    images, _ = _arrays()
    with pytest.raises(ValueError, match="needs at least 2 classes; the data set 'arrays' has 1"):
        sources.load((images, np.zeros(len(images), int)))
    root = _image_folder(tmp_path / "solo", classes=("cat",))
    with pytest.raises(ValueError, match="needs at least 2 classes; the data set 'solo' has 1"):
        sources.load(str(root))


def test_fingerprint_follows_the_examples(tmp_path):
    images, labels = _arrays()
    a = sources.ArraySplit(images, labels)
    assert a.fingerprint() == sources.ArraySplit(images.copy(), labels.copy()).fingerprint()
    changed = images.copy()
    changed[0, 0, 0, 0] ^= 1
    assert sources.ArraySplit(changed, labels).fingerprint() != a.fingerprint()
    assert sources.ArraySplit(images, labels[::-1].copy()).fingerprint() != a.fingerprint()
    root = _image_folder(tmp_path / "pets")
    moved = tmp_path / "elsewhere" / "pets"
    first = sources.load(str(root)).train.fingerprint()
    os.makedirs(moved.parent)
    os.rename(root, moved)
    assert sources.load(str(moved)).train.fingerprint() == first  # the data set may move
    os.remove(min(moved.rglob("*.png")))
    assert sources.load(str(moved)).train.fingerprint() != first


def test_array_errors():
    images, labels = _arrays()
    with pytest.raises(ValueError, match="different lengths: 18 images, 17 labels"):
        sources.from_arrays(images, labels[:-1])
    with pytest.raises(ValueError, match="The data set is empty"):
        sources.from_arrays(images[:0], labels[:0])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\]. Received labels in \[-1, 2\]"):
        sources.from_arrays(images, np.where(labels == 0, -1, labels), num_classes=3)
    with pytest.raises(ValueError, match=r"look like \[0, 1\] floats"):
        sources.from_arrays(images / 255.0, labels)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_pixels_are_refused_naming_the_argument(value):
    images, labels = _arrays()
    bad = images.astype("float32")
    bad[3, 1, 2, 0] = value  # np.round(nan).astype(uint8) would make it a silent 0
    with pytest.raises(ValueError, match=r"`images` must hold finite pixels .* \(the first at index \(3, 1, 2, 0\)\)"):
        sources.from_arrays(bad, labels)
    with pytest.raises(ValueError, match=r"`eval_data` images must hold finite pixels"):
        sources.from_arrays(images, labels, eval_data=(bad.astype("float64"), labels))
    sources.from_arrays(images.astype("float16"), labels)  # finite floats in [0, 255] stay accepted


def _big_png(path, width, height):
    """A valid all-black RGB PNG of width x height in a few MB (one deflate block repeated, never all in memory)."""
    import struct
    import zlib

    row = b"\0" * (1 + 3 * width)  # filter type 0, then the pixels
    rows_per_block = max(1, (1 << 20) // len(row))
    blocks, rest = divmod(height, rows_per_block)
    adler = 1
    for n in [rows_per_block] * blocks + [rest]:
        adler = zlib.adler32(row * n, adler)

    def block(n):  # a full flush ends each block byte-aligned and without references back: repeatable
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        return c.compress(row * n) + c.flush(zlib.Z_FULL_FLUSH)

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    stream = b"\x78\xda" + block(rows_per_block) * blocks + (block(rest) if rest else b"") + b"\x03\x00"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", stream + struct.pack(">I", adler)) + chunk(b"IEND", b""))


def _peak_rss_reset():
    """Resets this process's peak RSS (Linux); returns a function giving the growth of the peak since, in MB."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None

    def peak_mb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024

    start = peak_mb()
    return lambda: peak_mb() - start


def test_big_png_helper_writes_a_valid_image(tmp_path):
    _big_png(tmp_path / "x.png", 37, 1000)
    pixels = np.asarray(Image.open(tmp_path / "x.png"))
    assert pixels.shape == (1000, 37, 3) and not pixels.any()


def test_an_image_over_max_pixels_is_refused_before_it_is_decoded(tmp_path):
    root = _image_folder(tmp_path / "pets")
    _big_png(root / "cat" / "huge.png", 20000, 20000)  # 1.2 MB on disk, 1.2 GB decoded
    growth = _peak_rss_reset()
    with pytest.raises(ValueError, match=r"1 of 11 images under .* cannot be decoded by TensorFlow within "
                                         r"max_pixels=40000000: .*cat/huge.png \(20000x20000 image is over "
                                         r"max_pixels=40000000\)\. .*--max-pixels.*--skip-bad-images"):
        sources.load(str(root))
    ds = sources.load(str(root), skip_bad_images=True)
    if growth is not None:
        assert growth() < 400, f"peak RSS grew by {growth():.0f} MB"  # a decode would take 1200 MB
    assert ds.skipped == [str(root / "cat" / "huge.png")] and len(ds.train) + len(ds.eval) == 10


def test_max_pixels_is_the_exact_bound(tmp_path):
    root = _image_folder(tmp_path / "pets", size=(20, 30))  # 600 pixels each
    assert len(sources.load(str(root), max_pixels=600).train) == 8
    with pytest.raises(ValueError, match=r"10 of 10 images under .* within max_pixels=599: .*30x20 image is over"):
        sources.load(str(root), max_pixels=599)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_fifos_and_devices_in_an_image_folder_are_refused_without_reading(tmp_path):
    root = _image_folder(tmp_path / "pets")
    os.mkfifo(root / "cat" / "pipe.png")  # tf.io.read_file would wait for a writer forever
    os.symlink("/dev/zero", root / "dog" / "zero.jpg")
    with pytest.raises(ValueError, match=r"2 of 12 images .*cat/pipe.png \(not a regular file\), .*dog/zero.jpg "
                                         r"\(not a regular file\)"):
        sources.load(str(root))
    assert len(sources.load(str(root), skip_bad_images=True).skipped) == 2


def test_outputs_inside_an_image_folder_are_refused(tmp_path):
    root = _image_folder(tmp_path / "pets")
    os.symlink(root / "cat", tmp_path / "alias")
    for name, path in (("output_dir", root / "runs" / "r1"), ("output_dir", root), ("export_dir", root / "dog"),
                       ("output_dir", tmp_path / "alias" / "run")):  # a link into the folder is inside too
        with pytest.raises(ValueError, match=rf"`{name}` {path} is inside the image folder {root}: "):
            sources.check_outside(str(root), **{name: path})
    sources.check_outside(str(root), output_dir=tmp_path / "pets_run", export_dir=None)  # a sibling is fine
    sources.check_outside(str(root / "cat"), output_dir=root / "dog")
    for other in ("cifar10", "sklearn:digits", _arrays()):  # no folder: nothing to refuse
        sources.check_outside(other, output_dir=root)
    assert sources.folder_source(str(root)) == str(root) and sources.folder_source("cifar10") is None


def test_fingerprints_are_those_of_earlier_runs(tmp_path):
    """The digests run.json holds: the values the single `Split(records, labels, kind)` class gave, byte for byte."""
    images, labels = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3), np.array([0, 1])
    assert sources.ArraySplit(images, labels).fingerprint() == "3d53f26c5b49f1ca1f98"
    records = np.empty(2, dtype=object)
    records[:] = [b"ab", b"cde"]
    assert sources.EncodedSplit(records, np.array([1, 0])).fingerprint() == "a9a6688a4bb744e81576"
    for path, body in (("pets/a/x.jpg", b"abc"), ("pets/b/y.png", b"abcde")):
        (tmp_path / path).parent.mkdir(parents=True)
        (tmp_path / path).write_bytes(body)
    paths = np.array([str(tmp_path / "pets/a/x.jpg"), str(tmp_path / "pets/b/y.png")])
    assert sources.FileSplit(paths, labels).fingerprint() == "6370a52572cee43fdbae"


def test_every_in_memory_source_meets_the_split_interface(tmp_path):
    """Arrays, encoded bytes and files: the same examples, read in order and in the stream, through one interface."""
    images, labels = _arrays(n_per_class=2)
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image).save(paths[-1])
    encoded = np.empty(len(paths), dtype=object)
    encoded[:] = [(tmp_path / f"{i}.png").read_bytes() for i in range(len(paths))]
    splits = [sources.ArraySplit(images, labels), sources.EncodedSplit(encoded, labels),
              sources.FileSplit(np.array(paths), labels)]
    assert len({split.kind for split in splits}) == 3 and all(isinstance(s, sources.Split) for s in splits)
    for split in splits:
        decoded = [(split.decode(r).numpy(), int(y)) for r, y in split.ordered()]
        np.testing.assert_array_equal(np.stack([x for x, _ in decoded]), images)  # PNG: lossless
        assert [y for _, y in decoded] == labels.tolist() == split.labels.tolist()
        fetch = split.fetcher()
        order = [int(i) for i in split.stream(seed=1, first=0).take(len(split))]
        assert sorted(order) == list(range(len(split)))  # one pass: every example once
        record, label = fetch(order[0])
        np.testing.assert_array_equal(split.decode(record), images[order[0]])
        assert int(label) == labels[order[0]]
        draw = split.subset(np.array([1, 3]))
        assert type(draw) is type(split) and draw.labels.tolist() == labels[[1, 3]].tolist()
