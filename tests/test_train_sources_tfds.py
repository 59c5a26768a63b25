"""tfds sources read from tfds' files: a real prepared data set (generated, no downloads) in a temporary data_dir."""

import http.server
import socket
import threading
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from keras_bit.train import pipeline, sources
from keras_bit.train.sources import tfds as tfds_source

TRAIN_IDS, TEST_IDS = range(60), range(100, 109)
SHARDS = 4
WINDOW = 16  # small, so one pass crosses window and file boundaries


def _image(i):
    """Example i's pixels (PNG, lossless: decoded records can be matched back to their example)."""
    return np.random.default_rng(i).integers(0, 256, size=(10 + i % 3, 12, 3), dtype=np.uint8)


def _label(i):
    return i % 3


class KerasBitTinyShapes(tfds.core.GeneratorBasedBuilder):
    """60 training and 9 test images of 3 classes, generated in `_split_generators`."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                "label": tfds.features.ClassLabel(names=["red", "green", "blue"]),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(TRAIN_IDS), "test": self._generate_examples(TEST_IDS)}

    def _generate_examples(self, ids):
        for i in ids:
            yield i, {"image": _image(i), "label": _label(i)}


class KerasBitTinyRemote(KerasBitTinyShapes):
    """The same set, but downloaded: tfds reads its URLs from `url_infos` (a builder's checksums file)."""

    url_infos = {"https://keras-bit-tiny.invalid/shapes.zip": None}  # .invalid never resolves (RFC 2606)

    def _split_generators(self, dl_manager):
        dl_manager.download(next(iter(self.url_infos)))
        return super()._split_generators(dl_manager)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    config = tfds.download.DownloadConfig(num_shards=SHARDS)
    KerasBitTinyShapes(data_dir=str(root)).download_and_prepare(download_config=config)
    return str(root)


@pytest.fixture(scope="module")
def tiny(data_dir):
    return tfds_source.from_tfds("keras_bit_tiny_shapes", data_dir=data_dir, shuffle_window=WINDOW)


@pytest.fixture
def offline(monkeypatch):
    """Every download goes through a proxy port nothing listens on: no host can be reached."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, closed)


def _example_ids(encoded_images):
    """The example each encoded image is, by its decoded pixels."""
    index = {_image(i).tobytes(): i for i in (*TRAIN_IDS, *TEST_IDS)}
    return [index[tf.io.decode_png(e).numpy().tobytes()] for e in encoded_images]


def _batches(split, steps, **kwargs):
    kwargs = {"seed": 7, "batch_size": 8, **kwargs}
    return list(pipeline.train_pipeline(split, 3, resize=16, crop=12, **kwargs).take(steps).as_numpy_iterator())


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for (xa, ya), (xb, yb) in zip(batches_a, batches_b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def _stream_ids(split, seed, first, count):
    records = split.stream(seed, first).take(count).map(lambda r: split.parse(r)[0])
    return _example_ids(records.as_numpy_iterator())


def test_split_holds_metadata_not_examples(tiny):
    split = tiny.train
    assert split.kind == "tfds" and len(split) == 60 and len(tiny.eval) == 9
    # Per-file arrays only: nothing in the split grows with the number of examples...
    arrays = {k: v for k, v in vars(split).items() if isinstance(v, np.ndarray)}
    assert arrays and all(v.shape == (SHARDS,) for v in arrays.values())
    assert split._labels is None
    # ...until labels are asked for (few-shot): then one int64 per example, read from the label column.
    np.testing.assert_array_equal(np.bincount(split.labels), [20, 20, 20])
    assert split.labels.dtype == np.int64


def test_same_seed_same_batches_other_seed_other_batches(tiny):
    first = _batches(tiny.train, 3)
    _assert_same(first, _batches(tiny.train, 3))
    other = _batches(tiny.train, 3, seed=8)
    assert not np.array_equal(first[0][0], other[0][0])
    assert first[0][0].shape == (8, 12, 12, 3) and first[0][1].shape == (8, 3)


def test_every_example_once_per_pass_in_a_new_order(tiny):
    ids = _stream_ids(tiny.train, seed=3, first=0, count=180)
    passes = [ids[k:k + 60] for k in (0, 60, 120)]
    for p in passes:
        assert sorted(p) == list(TRAIN_IDS)
    assert passes[0] != passes[1] != passes[2]
    assert passes[0] != sorted(passes[0])  # shuffled, not the generation order


def test_resumed_stream_equals_the_uninterrupted_one(tiny):
    """Every start position (window, file and pass boundaries included) continues the one stream."""
    full = _stream_ids(tiny.train, seed=3, first=0, count=160)
    for first in range(0, 150, 7):
        assert _stream_ids(tiny.train, seed=3, first=first, count=10) == full[first:first + 10], first
    # Batches too, MixUp included: step 7 holds positions 56..63, across the first pass boundary (60).
    uninterrupted = _batches(tiny.train, 12, mixup_alpha=0.2)
    for step in (1, 7, 8):
        _assert_same(_batches(tiny.train, 12 - step, mixup_alpha=0.2, start_step=step), uninterrupted[step:])


def test_worker_shards_together_are_the_global_batches(tiny):
    full = _batches(tiny.train, 4, start_step=6)
    shards = [_batches(tiny.train, 8, start_step=6, shard=(k, 2), per_replica_batch_size=2) for k in range(2)]
    for step, (x, y) in enumerate(full):
        pieces = [shards[k][2 * step + r] for k in range(2) for r in range(2)]
        np.testing.assert_array_equal(np.concatenate([p[0] for p in pieces]), x)
        np.testing.assert_array_equal(np.concatenate([p[1] for p in pieces]), y)


def test_eval_is_the_whole_split_in_a_fixed_order(tiny):
    batches = list(pipeline.eval_pipeline(tiny.eval, 3, 4, 12).as_numpy_iterator())
    assert [len(x) for x, _ in batches] == [4, 4, 1]
    _assert_same(batches, list(pipeline.eval_pipeline(tiny.eval, 3, 4, 12).as_numpy_iterator()))
    ids = _example_ids(image for image, _ in tiny.eval.ordered().as_numpy_iterator())
    assert sorted(ids) == list(TEST_IDS)
    labels = np.concatenate([y.argmax(axis=1) for _, y in batches])
    np.testing.assert_array_equal(labels, [_label(i) for i in ids])
    np.testing.assert_array_equal(tiny.eval.labels, labels)  # the label column is in the same order
    expected = pipeline.eval_transform(tf.constant(_image(ids[0])), 12)
    np.testing.assert_allclose(batches[0][0][0], expected, atol=1e-6)


def test_few_shot_draws_an_in_memory_split(tiny):
    draw = sources.few_shot(tiny.train, 3, 3, seed=5)
    assert draw.kind == "encoded" and len(draw) == 9
    ids = _example_ids(draw.records)
    np.testing.assert_array_equal(draw.labels, [_label(i) for i in ids])
    assert np.bincount(draw.labels).tolist() == [3, 3, 3]
    again = sources.few_shot(tiny.train, 3, 3, seed=5)
    other = sources.few_shot(tiny.train, 3, 3, seed=6)
    assert _example_ids(again.records) == ids and _example_ids(other.records) != ids
    x, _ = next(pipeline.train_pipeline(draw, 3, 32, 16, 12).as_numpy_iterator())  # a batch above the set size
    assert x.shape == (32, 12, 12, 3)


def test_load_by_name_end_to_end(data_dir):
    ds = sources.load("keras_bit_tiny_shapes", data_dir=data_dir)
    assert ds.name == "keras_bit_tiny_shapes" and ds.num_classes == 3 and ds.class_names == ["red", "green", "blue"]
    assert ds.image_size in {(10, 12), (11, 12), (12, 12)}  # shape unknown to tfds: the first image's
    assert (len(ds.train), len(ds.eval)) == (60, 9) and ds.train.shuffle_window == tfds_source.SHUFFLE_WINDOW
    x, y = _batches(ds.train, 1)[0]
    assert np.isfinite(x).all() and -1 <= x.min() and x.max() <= 1 and (y.sum(axis=1) == 1).all()
    assert ds.train.fingerprint() == sources.load("keras_bit_tiny_shapes", data_dir=data_dir).train.fingerprint()
    sliced = tfds_source.from_tfds("keras_bit_tiny_shapes", split="train[:50%]", data_dir=data_dir)
    assert len(sliced.train) == 30 and sliced.train.fingerprint() != ds.train.fingerprint()


def test_names_splits_and_arguments_are_checked(data_dir):
    with pytest.raises(ValueError, match="tfds has no data set of that name. Did you mean 'keras_bit_tiny_shapes'"):
        sources.load("keras_bit_tiny_shape", data_dir=data_dir)
    with pytest.raises(ValueError, match=r"has no split 'trian': Unknown split"):
        tfds_source.from_tfds("keras_bit_tiny_shapes", split="trian", data_dir=data_dir)
    with pytest.raises(ValueError, match="Received: shuffle_window=0"):
        tfds_source.from_tfds("keras_bit_tiny_shapes", data_dir=data_dir, shuffle_window=0)


def test_not_prepared_and_offline_fails_within_seconds(tmp_path, offline):
    started = time.monotonic()
    with pytest.raises(ValueError) as error:
        sources.load("keras_bit_tiny_remote", data_dir=str(tmp_path))
    assert time.monotonic() - started < tfds_source.PROBE_TIMEOUT + 5
    message = str(error.value)
    assert "'keras_bit_tiny_remote' is not prepared in " + str(tmp_path) in message
    assert "could not be downloaded (no network?)" in message and "--data-dir" in message
    assert "`tfds build keras_bit_tiny_remote --data_dir " in message


def test_cifar10_not_prepared_and_offline_fails_within_seconds(tmp_path, offline):
    """The reported defect: tfds' downloader retried for minutes; now the probe fails in seconds."""
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"tfds data set 'cifar10' is not prepared in .* could not be downloaded"):
        sources.load("cifar10", data_dir=str(tmp_path))
    assert time.monotonic() - started < tfds_source.PROBE_TIMEOUT + 5
    with pytest.raises(ValueError, match="Could not load tfds data set 'no_such_dataset_xyz'"):
        sources.load("no_such_dataset_xyz", data_dir=str(tmp_path))


def test_image_size_comes_from_the_metadata_when_tfds_knows_it():
    # No training split is touched (None) when the feature has a fixed shape.
    assert tfds_source._image_size(tfds.features.Image(shape=(32, 48, 3)), None) == (32, 48)


class _Silent(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def no_proxies(monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)


def test_probe_gives_up_on_a_silent_host_and_sees_any_answer(no_proxies):
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        started = time.monotonic()
        assert not tfds_source._reachable([f"http://127.0.0.1:{silent.getsockname()[1]}/x"], timeout=0.5)
        assert time.monotonic() - started < 2
    server = http.server.HTTPServer(("127.0.0.1", 0), _Silent)  # answers HEAD with 501: still a network
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert tfds_source._reachable([f"http://127.0.0.1:{server.server_port}/x"], timeout=5)
    finally:
        server.shutdown()
        server.server_close()
