"""Weights files as an attacker writes them: a file can only give numbers, or one ValueError naming file and key.

Every reader (.npz, .weights.h5, .safetensors) and the Hub config reader are
attacked with files these tests craft: storage outside the file, links,
declared sizes far beyond the architecture, dtypes that are not floats,
non-regular paths, config fields of the wrong type; then a fuzz over header
mutations of valid files of each format. Allocation is measured with
tracemalloc (NumPy reports its buffers to it): memory is bounded by the tiny
architecture, never by what a file declares.
"""

import io as _io
import json
import os
import pathlib
import re
import struct
import threading
import time
import tracemalloc
import zipfile

import numpy as np
import pytest
from safetensors.numpy import save_file

import keras_bit
import reference
from helpers import assert_refused, bit_config, hub_repo, offline_hub, timm_config, tiny_model, tiny_weights
from keras_bit.weights import core, hub_config, sources

HEAD_BIAS, HEAD_KERNEL = "resnet/head/conv2d/bias", "resnet/head/conv2d/kernel"
STEM = "resnet/root_block/standardized_conv2d/kernel"
# A load of the tiny model allocates well under this; a file that could make keras_bit allocate what it declares
# would blow through it.
MEMORY_BOUND = 64 << 20


def _npy(shape, descr="<f4", data=b"", fortran=False):
    """A .npy member with a header stating `shape` / `descr` and whatever bytes `data` holds."""
    buffer = _io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": fortran, "shape": tuple(shape)})
    return buffer.getvalue() + data


def _npz(path, arrays, members=(), compression=zipfile.ZIP_DEFLATED):
    """An .npz of `arrays` (name -> array) plus raw `members` ((name, bytes) pairs, repeated names allowed)."""
    import warnings

    with zipfile.ZipFile(path, "w", compression) as z, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name"
        for name, array in arrays.items():
            buffer = _io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=False)
            z.writestr(name + ".npy", buffer.getvalue())
        for name, data in members:
            z.writestr(name + ".npy", data)
    return str(path)


def _bounded(call):
    """Runs `call()`, returning (its exception or None, seconds, peak traced bytes)."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        call()
        error = None
    except Exception as e:  # noqa: BLE001 - the caller asserts the type
        error = e
    finally:
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return error, seconds, peak


def _refused_quickly(call, message):
    error, seconds, peak = _bounded(call)
    assert isinstance(error, ValueError), f"expected ValueError, got {error!r}"
    assert re.search(message, str(error)), str(error)
    assert seconds < 10 and peak < MEMORY_BOUND, (seconds, peak)
    return error


# --- .npz: sizes and dtypes come from headers, before any data. ---


def test_npz_head_declaring_a_huge_head_is_refused_from_its_header(tmp_path):
    """The issue's 9.4 MB / 2.6 GB case: the head size is read from the header, and bounded."""
    d = tiny_weights()
    del d[HEAD_BIAS]
    for elements in (100_001, 500_000_000, 2**40, 2**62):
        path = _npz(tmp_path / f"huge{elements}.npz", d, [(HEAD_BIAS, _npy((elements,)))])
        _refused_quickly(lambda: tiny_model(weights=path), rf"head bias .* has shape \({elements},\).*<= 100000")


def test_npz_head_bias_of_the_wrong_rank_is_a_value_error(tmp_path):
    """The issue's 0-d bias IndexError, and its relatives."""
    d = tiny_weights()
    for shape in ((), (10, 1), (0,)):
        d[HEAD_BIAS] = np.zeros(shape, np.float32)
        path = _npz(tmp_path / f"bias{len(shape)}{sum(shape)}.npz", d)
        error = _refused_quickly(lambda: tiny_model(weights=path), re.escape(f"shape {shape}"))
        assert path in str(error) and HEAD_BIAS in str(error)


def test_npz_head_kernel_disagreeing_with_its_bias(tmp_path):
    d = tiny_weights(classes=10)
    d[HEAD_BIAS] = np.zeros(7, np.float32)
    _refused_quickly(lambda: tiny_model(weights=_npz(tmp_path / "h.npz", d)), r"does not hold the 7 classes")
    del d[HEAD_KERNEL]
    _refused_quickly(lambda: tiny_model(weights=_npz(tmp_path / "k.npz", d)), r"head kernel .* has shape None")


def test_npz_dtype_is_refused_from_the_header(tmp_path):
    d = tiny_weights()
    shape = d.pop(STEM).shape
    model = tiny_model(classes=10)
    for descr, message in (("|V100000000", r"has dtype void800000000"),  # the right shape, 100 MB per element
                           ("|O", r"has dtype object"), ("<i4", r"dtype int32, expected floating point"),
                           ("|b1", r"dtype bool"), ("<c8", r"dtype complex64"), ("<M8[s]", r"dtype datetime64")):
        path = _npz(tmp_path / "dtype.npz", d, [(STEM, _npy(shape, descr))])
        error, _, peak = _bounded(lambda: assert_refused(model, lambda: keras_bit.load_weights(model, path),
                                                               message))
        assert error is None and peak < MEMORY_BOUND, (descr, error, peak)


def test_npz_backbone_key_declaring_a_huge_shape_allocates_nothing(tmp_path):
    d = tiny_weights()
    del d[STEM]
    path = _npz(tmp_path / "stem.npz", d, [(STEM, _npy((1 << 20, 1 << 20, 3, 32)))])
    model = tiny_model(classes=10)
    _refused_quickly(lambda: keras_bit.load_weights(model, path), r"has shape \(1048576, 1048576, 3, 32\)")


def test_npz_member_that_lies_about_its_data(tmp_path):
    d = tiny_weights()
    stem = d.pop(STEM)
    raw = stem.astype("<f4").tobytes()
    model = tiny_model(classes=10)
    for member, message in (
            (_npy((-1,) + stem.shape[1:], data=raw), r"negative dimension"),
            (_npy(stem.shape, data=raw[:-4]), r"data bytes, its header declares"),
            (_npy(stem.shape, data=raw + b"\0" * 4), r"bytes after the \d+ data bytes"),
            (b"PK\x03\x04 not an array", r"Could not read key .*magic string"),
            (b"\x93NUMPY\x03\x00" + _npy(stem.shape, data=raw)[8:], r"unsupported .npy format version"),
            (b"\x93NUMPY\x01\x00\xff\xff" + b"{" * 70000, r"Could not read key")):  # an oversized header
        path = _npz(tmp_path / "lies.npz", d, [(STEM, member)])
        error = assert_refused(model, lambda: keras_bit.load_weights(model, path), message)
        assert STEM in str(error) and path in str(error)


def test_npz_with_a_member_twice_is_refused(tmp_path):
    """zipfile reads the last of two same-named members, other zip readers the first: ambiguous, refused."""
    d = tiny_weights()
    path = _npz(tmp_path / "twice.npz", d, [(STEM, _npy(d[STEM].shape, data=np.zeros_like(d[STEM]).tobytes()))])
    _refused_quickly(lambda: tiny_model(weights=path), rf"holds key '{STEM}' more than once")


def test_npz_with_an_unsupported_zip_method_is_a_value_error(tmp_path):
    """zipfile raises NotImplementedError for an unknown compression method: it must reach the user as ValueError."""
    path = _npz(tmp_path / "method.npz", tiny_weights(), compression=zipfile.ZIP_STORED)
    data = bytearray(pathlib.Path(path).read_bytes())
    for signature, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):  # local and central headers' method field
        start = 0
        while (start := data.find(signature, start)) != -1:
            data[start + offset:start + offset + 2] = struct.pack("<H", 99)
            start += 4
    pathlib.Path(path).write_bytes(data)
    model = tiny_model(classes=10)
    assert_refused(model, lambda: keras_bit.load_weights(model, path), r"NotImplementedError|compression method")


def test_npz_layouts_numpy_writes_load_the_same_numbers(tmp_path):
    """The header-first reader still reads every float layout NumPy writes (and ZIP_STORED archives)."""
    d = tiny_weights()
    model = tiny_model(classes=10)
    for convert in (np.asfortranarray, lambda a: a.astype(">f4"), lambda a: a.astype(np.float64),
                    lambda a: a.astype(np.float16)):
        for compression in (zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED):
            converted = {k: convert(v) for k, v in d.items()}
            keras_bit.load_weights(model, _npz(tmp_path / "layout.npz", converted, compression=compression))
            for key, layer in ((STEM, "root_block_conv"), ("resnet/group_norm/gamma", "post_gn")):
                np.testing.assert_array_equal(model.get_layer(layer).weights[0].numpy(),
                                              converted[key].astype(np.float32))


def test_npz_header_length_is_bounded_before_it_is_read(tmp_path):
    """NumPy reads a header's declared length (up to 4 GB) before checking it: 600 MB of deflated spaces cost
    1.2 GB. The length field is read first and bounded."""
    d = tiny_weights()
    del d[STEM]
    member = b"\x93NUMPY\x02\x00" + struct.pack("<I", 600_000_000) + b" " * 600_000
    path = _npz(tmp_path / "header.npz", d, [(STEM, member)])
    model = tiny_model(classes=10)
    _refused_quickly(lambda: keras_bit.load_weights(model, path), r".npy header of 600000000 bytes")


def test_npz_many_members_and_key_collisions(tmp_path):
    """The duplicate check counts (a quadratic search took minutes on 200k members); "k" and "k.npy" are one key."""
    d = tiny_weights()
    names = [(f"m{i}", b"") for i in range(20_000)] + [("m7", b"")]
    error, seconds, _ = _bounded(lambda: tiny_model(weights=_npz(tmp_path / "many.npz", {}, names)))
    assert isinstance(error, ValueError) and "key 'm7' more than once" in str(error) and seconds < 10, (error, seconds)
    path = str(tmp_path / "collide.npz")
    _npz(path, d)
    with zipfile.ZipFile(path, "a") as z:
        z.writestr(STEM, b"raw bytes under the same key")
    _refused_quickly(lambda: tiny_model(weights=path), rf"key '{STEM}' more than once")


def test_npz_trailing_bytes_are_named(tmp_path):
    d = tiny_weights()
    stem = d.pop(STEM)
    path = _npz(tmp_path / "trailing.npz", d, [(STEM, _npy(stem.shape, data=stem.tobytes() + b"\0"))])
    model = tiny_model(classes=10)
    assert_refused(model, lambda: keras_bit.load_weights(model, path), r"bytes after the \d+ data bytes")


# --- Paths that are not regular files are refused before they are opened. ---


def _no_hang(call, seconds=20):
    """Runs `call` in a thread; fails (instead of hanging the suite) if it has not returned in `seconds`."""
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(error=_bounded(call)[0]), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the loader blocked on a path that never delivers data"
    return outcome["error"]


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"), reason="needs FIFOs and /dev/zero")
def test_fifos_devices_and_folders_are_refused_without_blocking(tmp_path):
    """The issue's FIFO hang: every path that is not a regular file is refused before it is opened."""
    model = tiny_model(classes=10)
    for suffix, fmt in ((".npz", "npz"), (".weights.h5", "keras"), (".safetensors", "timm")):
        path = str(tmp_path / f"pipe{suffix}")
        os.mkfifo(path)
        for call in (lambda: tiny_model(weights=path), lambda: keras_bit.load_weights(model, path),
                     lambda: keras_bit.load_weights(model, path, fmt=fmt)):
            error = _no_hang(call)
            assert isinstance(error, ValueError) and f"{path} is a FIFO, not a regular file" in str(error), error
        device, folder = tmp_path / f"zero{suffix}", tmp_path / f"folder{suffix}"
        device.symlink_to("/dev/zero")
        folder.mkdir()
        for path, kind in ((device, "a device"), (folder, "a folder")):
            error = _no_hang(lambda: tiny_model(weights=str(path)))
            assert isinstance(error, ValueError) and f"is {kind}, not a regular file" in str(error), error


def test_a_link_to_a_regular_file_loads(tmp_path):
    """Hugging Face cache entries are links to blobs: following a link to a regular file is fine."""
    d = tiny_weights()
    real = _npz(tmp_path / "real.npz", d)
    (tmp_path / "link.npz").symlink_to(real)
    model = tiny_model(weights=str(tmp_path / "link.npz"))
    np.testing.assert_array_equal(model.get_layer("root_block_conv").kernel.numpy(), d[STEM])


# --- .weights.h5: only data stored in the file itself. ---


@pytest.fixture
def h5_file(tmp_path):
    """A valid tiny `.weights.h5` and the model it came from (random weights)."""
    model = tiny_model(classes=10)
    for variable in model.weights:
        variable.assign(np.random.default_rng(0).normal(size=variable.shape).astype(np.float32))
    path = str(tmp_path / "model.weights.h5")
    model.save_weights(path)
    return path, [w.numpy() for w in model.weights]


def _rewrite_h5(path, key, make):
    """Replaces dataset `key` of the HDF5 file at `path` with `make(file, key, old_dataset_array)`."""
    import h5py

    with h5py.File(path, "r+") as f:
        old = f[key][()]
        del f[key]
        make(f, key, old)


H5_STEM = "layers/standardized_conv2d/vars/0"


def test_h5_storage_outside_the_file_is_refused(tmp_path, h5_file):
    """The issue's exfiltration case: a dataset whose bytes come from another local file never loads."""
    import h5py

    path, _ = h5_file
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"password=hunter2;" * 400)
    other = str(tmp_path / "other.h5")

    def external(name):
        return lambda f, key, old: f.create_dataset(key, shape=old.shape, dtype="f4",
                                                    external=[(name, 0, h5py.h5f.UNLIMITED)])

    def virtual(f, key, old):
        with h5py.File(other, "w") as o:
            o["x"] = old
        layout = h5py.VirtualLayout(shape=old.shape, dtype="f4")
        layout[...] = h5py.VirtualSource(other, "x", shape=old.shape)
        f.create_virtual_dataset(key, layout)

    def soft_link(f, key, old):
        f["elsewhere"] = old
        f[key] = h5py.SoftLink("/elsewhere")

    def external_link(f, key, old):
        with h5py.File(other, "w") as o:
            o["x"] = old
        f[key] = h5py.ExternalLink(other, "/x")

    model = tiny_model(classes=10)
    for make, message in ((external(str(secret)), "keeps its data in another file"),
                          (external("secret.txt"), "keeps its data in another file"),
                          (virtual, "a virtual dataset"), (soft_link, "is a soft link"),
                          (external_link, "is an external link")):
        fresh = str(tmp_path / "fresh.weights.h5")
        with open(path, "rb") as src, open(fresh, "wb") as dst:
            dst.write(src.read())
        _rewrite_h5(fresh, H5_STEM, make)
        error = assert_refused(model, lambda: keras_bit.load_weights(model, fresh), message)
        assert fresh in str(error) and H5_STEM in str(error)
        with pytest.raises(ValueError, match=message):
            tiny_model(weights=fresh)


def test_h5_datasets_are_checked_from_their_metadata(h5_file):
    path, _ = h5_file
    model = tiny_model(classes=10)
    cases = (
        (lambda f, key, old: f.create_dataset(key, data=np.full(old.shape, b"x" * 8)), r"has dtype bytes64"),
        (lambda f, key, old: f.create_dataset(key, shape=old.shape, dtype=np.dtype([("a", "f4"), ("b", "f4")])),
         r"has dtype void64"),
        (lambda f, key, old: f.create_dataset(key, data=old.astype(np.int64)), r"dtype int64, expected floating"),
        # Declared, never stored: reading it would allocate 4 TiB.
        (lambda f, key, old: f.create_dataset(key, shape=(2**40,), dtype="f4", chunks=(1024,), fillvalue=1.0),
         r"has shape \(1099511627776,\)"),
    )
    original = pathlib.Path(path).read_bytes()
    for make, message in cases:
        pathlib.Path(path).write_bytes(original)
        _rewrite_h5(path, H5_STEM, make)
        error, _, peak = _bounded(lambda: assert_refused(model, lambda: keras_bit.load_weights(model, path),
                                                               message))
        assert error is None and peak < MEMORY_BOUND, (message, error, peak)


def test_h5_head_declaring_a_huge_head_is_refused(h5_file):
    path, _ = h5_file

    def make(f, key, old):
        f.create_dataset(key, shape=(10**9,), dtype="f4", chunks=(1024,))

    _rewrite_h5(path, "layers/dense/vars/1", make)
    _refused_quickly(lambda: tiny_model(weights=path), r"head bias 'layers/dense/vars/1' has shape \(1000000000,\)")


def test_h5_that_is_not_hdf5_is_a_value_error(tmp_path):
    path = tmp_path / "model.weights.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\xff" * 600)
    _refused_quickly(lambda: tiny_model(weights=str(path)), r"Could not read Keras weights file")


def test_h5_chunks_larger_than_their_data_are_refused(h5_file):
    """A 10-value bias stored in one 2**24-value gzip chunk: HDF5 would inflate the whole chunk to read it."""
    path, _ = h5_file

    def make(f, key, old):
        f.create_dataset(key, data=old, maxshape=(None,), chunks=(1 << 24,), compression="gzip")

    _rewrite_h5(path, "layers/dense/vars/1", make)
    _refused_quickly(lambda: tiny_model(weights=path), r"stored in chunks of 67108864 bytes")


# --- .safetensors. ---


def _safetensors_with(path, tensors, header_edit):
    """Writes `tensors`, then rewrites the JSON header through `header_edit(header_dict)`."""
    save_file(tensors, str(path))
    data = pathlib.Path(path).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header_edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    pathlib.Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return str(path)


def test_safetensors_dtypes_are_refused_from_the_header(tmp_path):
    """The issue's F8 AttributeError: any dtype that is not a float is a ValueError naming the key."""
    tensors = reference.to_timm(tiny_weights())
    key = "stages.0.blocks.0.conv1.weight"
    tensors[key] = np.zeros(tensors[key].size, np.uint8).reshape(tensors[key].shape)  # one byte per element
    model = tiny_model(classes=10)
    for dtype in ("F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL"):
        path = _safetensors_with(tmp_path / "f8.safetensors", tensors, lambda h: h[key].update(dtype=dtype))
        error = assert_refused(model, lambda: keras_bit.load_weights(model, path),
                               rf"key '{key}' has dtype .*expected floating point")
        assert path in str(error)


def test_safetensors_head_of_rank_zero_is_a_value_error(tmp_path):
    tensors = reference.to_timm(tiny_weights())
    tensors["head.fc.bias"] = np.zeros((), np.float32)
    save_file(tensors, str(tmp_path / "m.safetensors"))
    _refused_quickly(lambda: tiny_model(weights=str(tmp_path / "m.safetensors")), r"head bias 'head.fc.bias'")


def test_safetensors_header_length_is_bounded(tmp_path):
    path = tmp_path / "big.safetensors"
    header = json.dumps({f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(200_000)})
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode())
    _refused_quickly(lambda: tiny_model(weights=str(path)), r"header declares \d+ bytes \(at most 8388608")


# --- Hub configs: bounded, and checked field by field. ---


@pytest.fixture
def hub(tmp_path, monkeypatch):
    return offline_hub(monkeypatch, tmp_path / "hf_cache")


def _timm_repo(hub, config, repo="someone/tiny"):
    tensors = reference.to_timm(tiny_weights(classes=10))
    hub_repo(hub, repo, {"config.json": config, "model.safetensors": tensors})
    return f"hf://{repo}"


def test_hub_config_that_is_not_an_object(hub):
    """The issue's list config.json AttributeError, and other JSON that is not a config."""
    model = tiny_model(classes=10)
    for k, (config, message) in enumerate(((b"[1, 2, 3]", r"must hold a JSON object, not a list"),
                                           (b'"resnetv2_50x1_bit"', r"must hold a JSON object, not a str"),
                                           (b"\xff\xfe not utf-8", r"is not valid JSON"),
                                           (b"[" * 100_000 + b"]" * 100_000, r"is not valid JSON"),
                                           (b"{truncated", r"is not valid JSON"))):
        handle = _timm_repo(hub, config, repo=f"someone/tiny{k}")
        error = _refused_quickly(lambda: keras_bit.load_weights(model, handle), message)
        assert "config.json" in str(error) and "delete" in str(error)


def _timm_tiny(**overrides):
    config = timm_config(num_classes=10, size=64)
    config.update(overrides)
    return config


def test_timm_config_fields_are_type_checked(hub):
    """The issue's string numbers and 100000 x 100000 input_size: each field is typed and bounded."""
    for k, (field, value, message) in enumerate((
            ("num_classes", "10", r"'num_classes' must be an integer from 0 to 100000. Received: '10'"),
            ("num_classes", True, r"'num_classes' must be an integer"),
            ("num_classes", 10**12, r"'num_classes' must be an integer from 0 to 100000"),
            ("num_classes", 10.0, r"'num_classes' must be an integer"),
            ("pretrained_cfg", [3, 224, 224], r"'pretrained_cfg' must be a JSON object"),
            ("pretrained_cfg", {"input_size": [3, 100000, 100000]}, (r"'input_size' must be a list of 3 integers "
                                                                     r"from 1 to 4096")),
            ("pretrained_cfg", {"input_size": ["3", "224", "224"]}, r"'input_size' must be a list of 3 integers"),
            ("pretrained_cfg", {"input_size": 224}, r"'input_size' must be a list of 3 integers"),
            ("architecture", ["resnetv2_50x1_bit"], r"not a timm BiT model"))):
        handle = _timm_repo(hub, _timm_tiny(**{field: value}), repo=f"someone/timm{k}")
        _refused_quickly(lambda: keras_bit.ResNetV2(weights=handle, block_units=(3, 4, 6, 3)), message)


def test_transformers_config_fields_are_type_checked(hub):
    tensors = reference.to_transformers(tiny_weights(classes=10))
    for k, (field, value, message) in enumerate((
        ("depths", ["2", 1, 1, 1], r"'depths' must be a list of 4 integers"),
        ("depths", [2, 1, 1], r"'depths' must be a list of 4 integers"),
        ("depths", [10**9, 1, 1, 1], r"'depths' must be a list of 4 integers from 1 to 256"),
        ("width_factor", "1", r"'width_factor' must be an integer"),
        ("width_factor", 0, r"'width_factor' must be an integer from 1"),
        ("embedding_size", 32.5, r"'embedding_size' must be an integer"),
        ("hidden_sizes", "128", r"'hidden_sizes' must be a list of 4 integers"),
        ("num_groups", "8", r"'num_groups' must be an integer"),
        ("id2label", ["a", "b"], r"'id2label' must be a JSON object"),
        ("id2label", {str(i): "x" for i in range(100_001)}, r"'id2label' has 100001 labels"),
        ("num_labels", "10", r"'num_labels' must be an integer"),
        ("model_type", 7, r"'model_type' must be a string"),
        ("layer_type", ["preactivation"], r"'layer_type' must be a string"),
        ("embedding_dynamic_padding", "false", r"'embedding_dynamic_padding' must be true or false"),
    )):
        config = bit_config(**{field: value})
        if field == "num_labels":
            del config["id2label"]
        hub_repo(hub, f"someone/bit{k}", {"config.json": config, "model.safetensors": tensors})
        _refused_quickly(lambda: tiny_model(weights=f"hf://someone/bit{k}", classes=10), message)


def test_transformers_config_with_null_fields_takes_the_defaults(hub):
    """null is JSON's "not set": the BitConfig defaults apply (they match the tiny file but for the overrides)."""
    config = bit_config(global_padding=None, layer_type=None, embedding_dynamic_padding=None)
    hub_repo(hub, "someone/bit", {"config.json": config,
                                  "model.safetensors": reference.to_transformers(tiny_weights(classes=10))})
    assert int(tiny_model(weights="hf://someone/bit").output_shape[-1]) == 10


def test_hub_cache_links_leading_outside_the_repository_are_refused(hub, tmp_path):
    """A copied cache whose snapshot links point at other local files: neither file is read."""
    elsewhere = tmp_path / "elsewhere.safetensors"
    save_file(reference.to_transformers(tiny_weights(classes=10)), str(elsewhere))
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"architecture": "sk-SECRET"}))
    model = tiny_model(classes=10)
    for name, target in (("model.safetensors", elsewhere), ("config.json", secret)):
        paths = hub_repo(hub, f"someone/{name[:5]}", {"config.json": bit_config(), "model.safetensors":
                                                      reference.to_transformers(tiny_weights(classes=10))})
        os.remove(paths[name])
        os.symlink(target, paths[name])
        error = assert_refused(model, lambda: keras_bit.load_weights(model, f"hf://someone/{name[:5]}"),
                               rf"the cached {name} at .* leads outside the repository's cache folder")
        assert "SECRET" not in str(error)


def test_load_weights_from_the_hub_checks_the_configs_architecture(hub):
    """GroupNorm's group count is invisible in the tensors: a config stating another is refused, not loaded."""
    tensors = reference.to_transformers(tiny_weights(classes=10))
    hub_repo(hub, "someone/groups", {"config.json": bit_config(num_groups=4), "model.safetensors": tensors})
    model = tiny_model(classes=10)
    assert_refused(model, lambda: keras_bit.load_weights(model, "hf://someone/groups"), r"groups=4.*groups=8")
    hub_repo(hub, "someone/fine", {"config.json": bit_config(), "model.safetensors": tensors})
    keras_bit.load_weights(model, "hf://someone/fine")


def test_hub_config_larger_than_the_bound_is_refused(hub, monkeypatch):
    handle = _timm_repo(hub, _timm_tiny(padding="x" * 5000))
    monkeypatch.setattr(hub_config, "MAX_CONFIG_BYTES", 4096)
    _refused_quickly(
        lambda: keras_bit.load_weights(tiny_model(classes=10), handle), r"bytes; at most 4096 are expected"
    )


def test_hub_revisions_that_could_leave_the_cache_are_refused():
    """The issue's `@../../x`: huggingface_hub names a file after a branch, so a revision is checked part by part."""
    for revision in ("../../x", "..", "x/..", "./x", "refs//x", "a b", "x@y", "x\\y", "a\x00b", "x" * 129, "/abs",
                     "main/", "refs/pr/../../../x", "~", "$HOME", "a\nb"):
        with pytest.raises(ValueError, match="a revision is a branch, tag or commit"):
            sources.parse_hub_handle(f"hf://owner/repo@{revision}")
    for revision in ("main", "v1.0", "refs/pr/3", "0123456789abcdef0123456789abcdef01234567", "feature_x-2.1",
                     "refs/heads/main"):
        assert sources.parse_hub_handle(f"hf://owner/repo@{revision}") == ("owner/repo", revision)


# --- Fuzz: random header mutations of valid files. Every outcome is the same weights or a ValueError. ---


def _data_regions_npz(path):
    return []  # every member's bytes, headers included, are under the zip's CRC: any change is detected


def _data_regions_safetensors(path):
    data = pathlib.Path(path).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return [(8 + n, len(data))]


def _data_regions_h5(path):
    import h5py

    regions = []
    with h5py.File(path, "r") as f:
        def collect(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.id.get_offset() is not None:
                regions.append((obj.id.get_offset(), obj.id.get_offset() + obj.id.get_storage_size()))
        f.visititems(collect)
    return regions


def _mutations(data, regions, rng, count):
    """`count` mutated copies of `data`, each with one change outside `regions` (the tensors' data bytes)."""
    def outside(i):
        return not any(lo <= i < hi for lo, hi in regions)

    candidates = [i for i in range(len(data)) if outside(i)]
    for _ in range(count):
        mutated = bytearray(data)
        kind = rng.integers(4)
        i = int(rng.choice(candidates))
        if kind == 0:  # flip one bit
            mutated[i] ^= 1 << int(rng.integers(8))
        elif kind == 1:  # a run of 0xff (large numbers in size fields)
            for j in range(i, min(i + int(rng.integers(1, 9)), len(mutated))):
                if outside(j):
                    mutated[j] = 0xFF
        elif kind == 2:  # a random byte
            mutated[i] = int(rng.integers(256))
        else:  # truncation
            mutated = mutated[:i]
        yield bytes(mutated)


# npz and h5 take 10-16 s each (30 mutations, each loaded under a time and memory bound): in the slow tier.
@pytest.mark.parametrize("fmt", [pytest.param("npz", marks=pytest.mark.slow),
                                 pytest.param("h5", marks=pytest.mark.slow), "safetensors"])
def test_fuzz_header_mutations_give_the_same_weights_or_a_value_error(tmp_path, fmt):
    rng = np.random.default_rng({"npz": 1, "h5": 2, "safetensors": 3}[fmt])
    source = tiny_model(classes=10)
    for variable in source.weights:
        variable.assign(rng.normal(size=variable.shape).astype(np.float32))
    expected = [w.numpy() for w in source.weights]
    path = str(tmp_path / {"npz": "m.npz", "h5": "m.weights.h5", "safetensors": "m.safetensors"}[fmt])
    if fmt == "npz":
        keras_bit.save_npz(source, path)
    elif fmt == "h5":
        source.save_weights(path)
    else:
        from keras_bit.weights import timm

        save_file({k: np.ascontiguousarray(_to_file(v.numpy(), layout)) for k, (v, layout) in
                   timm.key_map(source).items()}, path)
    regions = {"npz": _data_regions_npz, "h5": _data_regions_h5, "safetensors": _data_regions_safetensors}[fmt](path)
    original = pathlib.Path(path).read_bytes()
    target = tiny_model(classes=10)
    outcomes = {"same": 0, "refused": 0}
    for k, data in enumerate(_mutations(original, regions, rng, 30)):
        mutated = str(tmp_path / f"{k}_{os.path.basename(path)}")
        pathlib.Path(mutated).write_bytes(data)
        for variable in target.weights:
            variable.assign(np.zeros(variable.shape, np.float32))
        error, seconds, peak = _bounded(lambda: keras_bit.load_weights(target, mutated))
        assert seconds < 10 and peak < MEMORY_BOUND, (k, seconds, peak)
        if error is None:
            for old, variable in zip(expected, target.weights):
                np.testing.assert_array_equal(old, variable.numpy(), err_msg=f"mutation {k} loaded other weights")
            outcomes["same"] += 1
        else:
            assert isinstance(error, ValueError), f"mutation {k}: {type(error).__name__}: {error}"
            assert all(np.all(v.numpy() == 0) for v in target.weights), f"mutation {k} half-loaded the model"
            outcomes["refused"] += 1
        os.remove(mutated)
    assert outcomes["refused"] > 0


def _to_file(array, layout):
    """The inverse of `layout.to_keras` for the layouts timm uses (OIHW kernels, the 1x1-conv head)."""
    if layout is core.OIHW:
        return array.transpose(3, 2, 0, 1)
    if layout is core.OI11:
        return array.T[:, :, None, None]
    return array


def test_the_reading_boundary_converts_errors_but_not_interrupts():
    """Readers run their library calls in `core.reading`: any Exception becomes one ValueError naming file and key;
    Ctrl-C (a BaseException) still stops the program."""
    with pytest.raises(ValueError, match=r"Could not read key 'k' of checkpoint f .*IndexError"):
        with core.reading("f", "k"):
            [][1]
    with pytest.raises(KeyboardInterrupt):
        with core.reading("f", "k"):
            raise KeyboardInterrupt


# --- The installed command: a hostile file is one line and exit status 2. ---


def test_cli_convert_of_hostile_files_is_one_line(tmp_path, h5_file, capsys):
    import shutil
    import subprocess
    import sys

    beside = os.path.join(os.path.dirname(sys.executable), "keras-bit")  # this interpreter's, not another's
    command = beside if os.path.exists(beside) else shutil.which("keras-bit")
    if command is None:
        pytest.skip("the keras-bit console script is not installed")
    import h5py

    path, _ = h5_file
    _rewrite_h5(path, H5_STEM, lambda f, key, old: f.create_dataset(
        key, shape=old.shape, dtype="f4", external=[("/etc/hostname", 0, h5py.h5f.UNLIMITED)]))
    fifo = str(tmp_path / "pipe.npz")
    os.mkfifo(fifo)
    d = tiny_weights()
    del d[HEAD_BIAS]
    huge = _npz(tmp_path / "huge.npz", d, [(HEAD_BIAS, _npy((2**40,)))])
    for k, (source, message) in enumerate(((path, "keeps its data in another file"),
                                           (fifo, "is a FIFO, not a regular file"),
                                           (huge, "has shape (1099511627776,)"))):
        argv = ["convert", source, str(tmp_path / "out.weights.h5"), "--model", "BiT-M-R50x1"]
        if k == 0:  # the installed script in its own process: one line, no traceback, no TensorFlow noise
            proc = subprocess.run([command, *argv], check=False, capture_output=True, text=True, timeout=120,
                                  stdin=subprocess.DEVNULL)
        else:  # the same `main` in this process (a script start costs seconds)
            from helpers import cli_in_process

            proc = cli_in_process(*argv, capsys=capsys)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(err) == 1, (proc.returncode, proc.stderr[-2000:])
        assert err[0].startswith("keras-bit convert: error: ") and message in err[0], err
        assert not os.path.exists(tmp_path / "out.weights.h5")
