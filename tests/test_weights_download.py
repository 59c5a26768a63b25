"""Atomic, verified downloads into the Keras cache (`keras_bit.weights.download`), with local servers only."""

import contextlib
import dataclasses
import functools
import hashlib
import http.server
import os
import pathlib
import socketserver
import threading
import time

import numpy as np
import pytest

import keras_bit
import reference
from helpers import TINY, TINY_SIZE, images, relative_error, tiny_checkpoint
from keras_bit import io
from keras_bit.presets import Preset
from keras_bit.weights import download

pytestmark = pytest.mark.backend_agnostic  # .ci/backend runs these on JAX and PyTorch

PAYLOAD = bytes(range(256)) * 40  # 10240 bytes


@contextlib.contextmanager
def _serving(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class _Raw(socketserver.StreamRequestHandler):
    """Answers every request with `self.server.answer`, raw bytes, then closes the connection."""

    def handle(self):
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass  # the request line and headers
        self.wfile.write(self.server.answer)


@pytest.fixture
def file_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving `tmp_path / "www"`; yields (base URL, folder)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(_QuietFiles, directory=str(www))
    with _serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)) as url:
        yield url, www


@pytest.fixture
def raw_server():
    """A server answering `answer` bytes verbatim; yields a function taking the answer and returning the URL."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Raw)
    server.daemon_threads = True
    with _serving(server) as url:
        def answering(answer):
            server.answer = answer
            return url + "/file.bin"
        yield answering


def _leftovers(folder):
    return (sorted(name for name in os.listdir(folder) if ".part-" in name or name.startswith(io.TEMP_PREFIX))
            if os.path.isdir(folder) else [])


def test_fetch_file_url_then_cache(tmp_path):
    source = tmp_path / "src.bin"
    source.write_bytes(PAYLOAD)
    path = download.fetch(source.as_uri(), "f.bin", "sub", cache_dir=tmp_path / "cache", size=len(PAYLOAD),
                          sha256=hashlib.sha256(PAYLOAD).hexdigest())
    assert path == str(tmp_path / "cache" / "sub" / "f.bin")
    assert pathlib.Path(path).read_bytes() == PAYLOAD
    source.unlink()  # cached: the source is no longer needed
    assert download.fetch(source.as_uri(), "f.bin", "sub", cache_dir=tmp_path / "cache") == path
    assert _leftovers(tmp_path / "cache" / "sub") == []


def test_fetch_http(tmp_path, file_server):
    url, www = file_server
    (www / "f.bin").write_bytes(PAYLOAD)
    path = download.fetch(f"{url}/f.bin", "f.bin", "sub", cache_dir=tmp_path / "cache", size=len(PAYLOAD))
    assert pathlib.Path(path).read_bytes() == PAYLOAD
    assert _leftovers(tmp_path / "cache" / "sub") == []
    with pytest.raises(keras_bit.DownloadError, match=rf"Could not download {url}/missing.bin \(.+\)\. "):
        download.fetch(f"{url}/missing.bin", "missing.bin", "sub", cache_dir=tmp_path / "cache")


def test_transfer_cut_short(tmp_path, raw_server):
    """The server announces more bytes than it sends and closes: nothing cached, no partial file left."""
    header = f"HTTP/1.1 200 OK\r\nContent-Length: {len(PAYLOAD) + 5000}\r\nConnection: close\r\n\r\n".encode()
    url = raw_server(header + PAYLOAD)
    cache = tmp_path / "cache"
    with pytest.raises(keras_bit.DownloadError, match=rf"stopped after {len(PAYLOAD)} of {len(PAYLOAD) + 5000} bytes"):
        download.fetch(url, "f.bin", "sub", cache_dir=cache)
    assert not (cache / "sub" / "f.bin").exists()
    assert _leftovers(cache / "sub") == []


# A status line that is not HTTP, and a chunked body cut inside a chunk: http.client raises HTTPException
# subclasses (BadStatusLine, IncompleteRead), which are not OSError.
BROKEN_ANSWERS = {
    "not_http": b"SPAM SPAM SPAM\r\n\r\n",
    "chunk_cut": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n1000\r\n" + PAYLOAD[:100],
}


@pytest.mark.parametrize("answer", sorted(BROKEN_ANSWERS))
def test_broken_answer_is_download_error(tmp_path, raw_server, answer):
    url = raw_server(BROKEN_ANSWERS[answer])
    with pytest.raises(keras_bit.DownloadError, match=rf"Could not download {url}"):
        download.fetch(url, "f.bin", "sub", cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("answer", sorted(BROKEN_ANSWERS))
def test_broken_answer_leaves_nothing(tmp_path, raw_server, answer):
    url = raw_server(BROKEN_ANSWERS[answer])
    with pytest.raises(keras_bit.DownloadError):
        download.fetch(url, "f.bin", "sub", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "sub" / "f.bin").exists()
    assert _leftovers(tmp_path / "cache" / "sub") == []


@pytest.mark.parametrize("check", ["size", "sha256"])
def test_verification_failure_caches_nothing(tmp_path, check):
    source = tmp_path / "src.bin"
    source.write_bytes(PAYLOAD)
    stated = {"size": dict(size=len(PAYLOAD) + 1), "sha256": dict(sha256="0" * 64)}[check]
    message = {"size": rf"{len(PAYLOAD)} bytes, expected {len(PAYLOAD) + 1}", "sha256": r"sha256 .*, expected 0{64}"}
    with pytest.raises(keras_bit.DownloadError, match=r"the downloaded file has " + message[check]):
        download.fetch(source.as_uri(), "f.bin", "sub", cache_dir=tmp_path / "cache", **stated)
    assert os.listdir(tmp_path / "cache" / "sub") == []


def test_cached_file_of_wrong_size_is_fetched_again(tmp_path):
    source = tmp_path / "src.bin"
    source.write_bytes(PAYLOAD)
    target = tmp_path / "cache" / "sub" / "f.bin"
    target.parent.mkdir(parents=True)
    target.write_bytes(PAYLOAD[:100])  # e.g. left by an older, non-atomic downloader
    assert download.fetch(source.as_uri(), "f.bin", "sub", cache_dir=tmp_path / "cache", size=len(PAYLOAD))
    assert target.read_bytes() == PAYLOAD
    target.write_bytes(PAYLOAD[:100])
    source.unlink()
    with pytest.raises(keras_bit.DownloadError, match=rf"The cached copy at {target} has 100 bytes, "
                                                      rf"expected {len(PAYLOAD)}: delete it"):
        download.fetch(source.as_uri(), "f.bin", "sub", cache_dir=tmp_path / "cache", size=len(PAYLOAD))


def test_preset_with_size_refetches_a_short_cached_file(tmp_path, monkeypatch, rng):
    """Through a model: the cached copy fails the preset's stated size, so the mirror's copy replaces it."""
    mirror = tmp_path / "mirror"
    (mirror / "vtab").mkdir(parents=True)
    d = tiny_checkpoint(mirror / "vtab" / "tiny.npz", classes=10)
    monkeypatch.setenv("KERAS_BIT_BASE_URL", mirror.as_uri())
    cached = tmp_path / "cache" / "bit_models" / "vtab-tiny.npz"
    cached.parent.mkdir(parents=True)
    cached.write_bytes((mirror / "vtab" / "tiny.npz").read_bytes()[:5000])
    preset = dataclasses.replace(_tiny_preset(), size=(mirror / "vtab" / "tiny.npz").stat().st_size)
    model = keras_bit.ResNetV2(**TINY, weights=preset, cache_dir=tmp_path / "cache", classifier_activation=None)
    assert cached.read_bytes() == (mirror / "vtab" / "tiny.npz").read_bytes()
    x = images(rng)
    assert relative_error(model.predict(x, verbose=0), reference.forward(d, x, groups=8)) <= 1e-5


def test_offline_message_names_url_and_target(tmp_path):
    target = tmp_path / "cache" / "bit_models" / "BiT-S-R50x1.npz"
    with pytest.raises(keras_bit.DownloadError) as info:
        download.fetch("file:///no/such/mirror/BiT-S-R50x1.npz", "BiT-S-R50x1.npz", "bit_models",
                       cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert "Could not download file:///no/such/mirror/BiT-S-R50x1.npz" in message
    assert f"place it at {target}" in message and "$KERAS_HOME" in message


def test_stale_partial_files_removed_fresh_kept(tmp_path):
    source = tmp_path / "src.bin"
    source.write_bytes(PAYLOAD)
    folder = tmp_path / "cache" / "sub"
    folder.mkdir(parents=True)
    stale, fresh = folder / f"{io.TEMP_PREFIX}12-0123456789ab-f.bin", folder / f"{io.TEMP_PREFIX}34-ba9876543210-f.bin"
    old_name = folder / "f.bin.part-0123456789ab"  # the name earlier versions gave partial downloads
    other = folder / f"{io.TEMP_PREFIX}12-0123456789ab-a-f.bin"  # another file's partial download
    for path, content in ((stale, b"killed download"), (fresh, b"download in progress"), (old_name, b"killed"),
                          (other, b"another file")):
        path.write_bytes(content)
    an_hour_ago = time.time() - download.STALE_PARTIAL_SECONDS - 60
    for path in (stale, old_name, other):
        os.utime(path, (an_hour_ago, an_hour_ago))
    download.fetch(source.as_uri(), "f.bin", "sub", cache_dir=tmp_path / "cache")
    assert not stale.exists() and not old_name.exists() and fresh.read_bytes() == b"download in progress"
    assert other.read_bytes() == b"another file"
    assert (folder / "f.bin").read_bytes() == PAYLOAD


def _tiny_preset(classes=10):
    return Preset("tiny", "tiny", "a tiny test checkpoint", classes, TINY_SIZE, bucket_path="vtab/tiny.npz")


def _corrupt_cached(folder):
    path = folder / "bit_models" / "vtab-tiny.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    tiny_checkpoint(path, classes=10)
    path.write_bytes(path.read_bytes()[:5000])
    return path


def test_corrupt_cached_checkpoint_says_delete_it(keras_home, monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_BIT_BASE_URL", (tmp_path / "no_mirror").as_uri())
    cached = _corrupt_cached(type(tmp_path)(keras_home))
    try:
        with pytest.raises(ValueError, match=rf"Could not read checkpoint {cached}.*It is a cached download: "
                                              rf"delete {cached} to download it again"):
            keras_bit.ResNetV2(**TINY, weights=_tiny_preset())
    finally:
        cached.unlink()


def test_corrupt_cached_checkpoint_in_cache_dir_says_delete_it(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_BIT_BASE_URL", (tmp_path / "no_mirror").as_uri())
    cached = _corrupt_cached(tmp_path / "cache")
    with pytest.raises(ValueError, match=rf"delete {cached} to download it again"):
        keras_bit.ResNetV2(**TINY, weights=_tiny_preset(), cache_dir=tmp_path / "cache")


def test_corrupt_cached_vtab_checkpoint_says_delete_it(keras_home, monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_BIT_BASE_URL", (tmp_path / "no_mirror").as_uri())
    cached = _corrupt_cached(type(tmp_path)(keras_home))
    try:
        with pytest.raises(ValueError, match=rf"delete {cached} to download it again"):
            keras_bit.ResNetV2(**TINY, weights=_tiny_preset(classes=None))
    finally:
        cached.unlink()


def test_corrupt_cached_named_checkpoint(keras_home, monkeypatch, tmp_path):
    """The same through a published name: BiT("BiT-S-R50x1") with a truncated cached file."""
    monkeypatch.setenv("KERAS_BIT_BASE_URL", (tmp_path / "no_mirror").as_uri())
    cached = os.path.join(keras_home, "bit_models", "BiT-S-R50x1.npz")
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    np.savez(cached, **{"resnet/group_norm/gamma": np.ones(2048, np.float32)})
    with open(cached, "r+b") as f:
        f.truncate(300)
    try:
        with pytest.raises(ValueError, match=rf"It is a cached download: delete {cached}"):
            keras_bit.BiT("BiT-S-R50x1", include_top=False)
    finally:
        os.remove(cached)
