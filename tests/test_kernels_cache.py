"""The kernel cache cannot crash the process: a cached library is loaded only if its record vouches for it.

Every damaged cache runs in a subprocess (a SIGBUS there is rc -7 and fails the
test instead of killing pytest) with its own KERAS_HOME holding a copy of the
library this session built once. Rebuilds use the real compiler once (the
truncated library); the others put a stand-in `c++` first on PATH that reports
the real compiler's version (so the cache key is the same) and, instead of
compiling, copies the session's library, fails, or writes garbage.
"""

import hashlib
import json
import os
import pathlib
import shutil
import signal
import stat
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from keras_bit import kernels
from keras_bit.kernels import cache

if keras.backend.backend() != "tensorflow":
    pytest.skip("the fused kernel is a TensorFlow op", allow_module_level=True)

import tensorflow as tf  # noqa: E402

PROBE = textwrap.dedent("""
    import json, os
    import numpy as np
    import tensorflow as tf
    from keras_bit import kernels
    from keras_bit.layers import GroupNormalization

    rng = np.random.default_rng(0)
    layer = GroupNormalization(8, activation="relu")
    layer.build((None, None, None, 32))
    layer.set_weights([rng.normal(1.0, 0.5, 32), rng.normal(0.0, 0.5, 32)])
    x = tf.constant(rng.normal(2.0, 3.0, (2, 5, 5, 32)).astype("float32"))
    result = {}
    for switch in ("1", "0"):
        os.environ[kernels.ENV_SWITCH] = switch

        @tf.function
        def run(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x)
                loss = tf.reduce_sum(y * y)
            return y, tape.gradient(loss, x)

        graph = run.get_concrete_function(x).graph.as_graph_def()
        ops = {n.op for n in graph.node} | {n.op for f in graph.library.function for n in f.node_def}
        y, dx = run(x)
        result[switch] = {"fused": "KerasBitGroupNorm" in ops, "y": y.numpy().tolist(), "dx": dx.numpy().tolist()}
    print(json.dumps(result))
""")

FAKE_CXX = """#!/bin/sh
if [ "$1" = --version ]; then exec {real} --version; fi
prev=; out=
for arg in "$@"; do [ "$prev" = -o ] && out=$arg; prev=$arg; done
case "$FAKE_CXX" in
  copy) sleep "${{FAKE_CXX_SLEEP:-0}}"; exec cp "$FAKE_CXX_LIBRARY" "$out";;
  garbage) printf 'not a shared library' > "$out";;
  *) echo "fake c++: error: simulated build failure" >&2; exit 1;;
esac
"""


@pytest.fixture(scope="module")
def built():
    """This session's library and record (built once, in-process), as `cache.Cached`."""
    if kernels.library() is None:
        pytest.skip("the fused kernel could not be built on this machine (see the warning)")
    cached = cache.locate(tf)
    assert cache.read_verified(cached)
    return cached


@pytest.fixture(scope="module")
def fake_bin(built, tmp_path_factory):
    """A folder holding the stand-in compiler, named as the real one so that the cache key does not change."""
    name = cache.compile_command(tf, "OUTPUT")[0]
    if os.sep in name:
        pytest.skip(f"$CXX={name} is a path: a stand-in on PATH cannot take its place")
    folder = tmp_path_factory.mktemp("fake_bin")
    script = folder / name
    script.write_text(FAKE_CXX.format(real=shutil.which(name)))
    script.chmod(0o755)
    return folder


@pytest.fixture(scope="module")
def foreign(built, tmp_path_factory):
    """A valid shared library that is not the kernel (no TensorFlow op in it)."""
    path = tmp_path_factory.mktemp("foreign") / "foreign.so"
    source = 'extern "C" int keras_bit_unrelated(void) { return 7; }\n'
    subprocess.run([cache.compile_command(tf, "")[0], "-shared", "-fPIC", "-x", "c++", "-", "-o", str(path)],
                   input=source, text=True, check=True, timeout=120)
    return path


@pytest.fixture
def home(built, tmp_path):
    """A KERAS_HOME holding a copy of the session's library and record, and where they are in it."""
    folder = tmp_path / "home" / cache.SUBDIR
    folder.mkdir(parents=True)
    for path in (built.path, built.record):
        shutil.copy(path, folder)
    return tmp_path / "home", built._replace(path=str(folder / os.path.basename(built.path)),
                                             record=str(folder / os.path.basename(built.record)))


def _probe(keras_home, fake_bin=None, mode=None, **env):
    """Runs PROBE; returns (whether the fused op ran, the kernel's warning lines). Both paths must agree."""
    env = {**os.environ, "KERAS_HOME": str(keras_home), **env}
    env.pop(kernels.ENV_SWITCH, None)
    if mode:
        env.update(PATH=f"{fake_bin}{os.pathsep}{env['PATH']}", FAKE_CXX=mode)
    done = subprocess.run([sys.executable, "-c", PROBE], check=False, capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])  # a SIGBUS is -7
    result = json.loads(done.stdout.strip().splitlines()[-1])
    fused, ops_path = result["1"], result["0"]
    assert not ops_path["fused"]
    np.testing.assert_allclose(fused["y"], ops_path["y"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fused["dx"], ops_path["dx"], rtol=1e-4, atol=1e-4 * np.abs(ops_path["dx"]).max())
    return fused["fused"], [line for line in done.stderr.splitlines() if "GroupNorm kernel" in line]


def _assert_healthy(cached, built):
    """The cache again holds the session's library and a record vouching for it, and nothing half-written."""
    with open(built.path, "rb") as f:
        assert cache.read_verified(cached) == f.read()
    folder = os.path.dirname(cached.path)
    assert sorted(os.listdir(folder)) == sorted(os.path.basename(p) for p in (cached.path, cached.record))
    assert stat.S_ISREG(os.lstat(cached.path).st_mode) and stat.S_ISREG(os.lstat(cached.record).st_mode)


def _truncate(cached, size=None):
    os.truncate(cached.path, os.path.getsize(cached.path) // 2 if size is None else size)


def _edit_record(cached, **changes):
    with open(cached.record) as f:
        record = json.load(f)
    with open(cached.record, "w") as f:
        json.dump({**record, **changes}, f)


def _replace(path, make):
    os.remove(path)
    make(path)


def _link_to_half(cached, tmp_path):
    shutil.copy(cached.path, tmp_path / "elsewhere.so")
    os.truncate(tmp_path / "elsewhere.so", os.path.getsize(cached.path) // 2)
    _replace(cached.path, lambda p: os.symlink(tmp_path / "elsewhere.so", p))


REFUSED = {  # damage -> what the refusal must say (the file is always named)
    "truncated library": (lambda c, t, f: _truncate(c), "size is"),
    "empty library": (lambda c, t, f: _truncate(c, 0), "size is 0,"),
    "one byte changed": (lambda c, t, f: _flip_byte(c.path), "sha256 is"),
    "another valid library": (lambda c, t, f: shutil.copy(f, c.path), "size is"),
    "library a folder": (lambda c, t, f: _replace(c.path, os.mkdir), "kernel library"),
    "library a FIFO": (lambda c, t, f: _replace(c.path, os.mkfifo), "kernel library"),
    "library a link to a truncated copy": (lambda c, t, f: _link_to_half(c, t), "size is"),
    "library a dangling link": (lambda c, t, f: _replace(c.path, lambda p: os.symlink(t / "nowhere.so", p)),
                                "kernel library"),
    "library a link to /dev/zero": (lambda c, t, f: _replace(c.path, lambda p: os.symlink("/dev/zero", p)),
                                    "kernel library"),  # refused before it is opened: it never ends
    "record a link to /dev/zero": (lambda c, t, f: _replace(c.record, lambda p: os.symlink("/dev/zero", p)),
                                   "kernel record"),
    "record missing": (lambda c, t, f: os.remove(c.record), "kernel record"),
    "record garbage": (lambda c, t, f: pathlib.Path(c.record).write_bytes(b"\x00{garbage"), "kernel record"),
    "record a list": (lambda c, t, f: pathlib.Path(c.record).write_text("[1, 2]"), "kernel record"),
    "record huge": (lambda c, t, f: pathlib.Path(c.record).write_text("{}" + " " * cache.RECORD_LIMIT),
                    "kernel record"),
    "record a folder": (lambda c, t, f: _replace(c.record, os.mkdir), "kernel record"),
    "record a FIFO": (lambda c, t, f: _replace(c.record, os.mkfifo), "kernel record"),  # never opened: no hang
    "record for another build": (lambda c, t, f: _edit_record(c, key="0" * 64), "key is"),
    "record size a string": (lambda c, t, f: _edit_record(c, size=str(os.path.getsize(c.path))), "size is"),
}


def _flip_byte(path):
    with open(path, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))


@pytest.mark.parametrize("damage", sorted(REFUSED))
def test_damaged_cache_is_refused_before_loading(home, foreign, tmp_path, damage):
    _, cached = home
    make, says = REFUSED[damage]
    make(cached, tmp_path, foreign)
    with pytest.raises(cache.Unusable) as refused:
        cache.read_verified(cached)
    message = str(refused.value)
    assert says in message and os.path.basename(cached.path)[:-3] in message, message


def test_links_to_a_good_library_and_a_linked_folder_are_followed(home, tmp_path):
    keras_home, cached = home
    os.replace(cached.path, tmp_path / "real.so")
    os.symlink(tmp_path / "real.so", cached.path)
    assert cache.read_verified(cached) == (tmp_path / "real.so").read_bytes()
    os.replace(keras_home, tmp_path / "moved")
    os.symlink(tmp_path / "moved", keras_home)  # people move ~/.keras and leave a link
    assert cache.read_verified(cached)


@pytest.mark.slow  # a process that rebuilds the kernel (compiler or stand-in): seconds each
def test_truncated_library_is_rebuilt_by_the_compiler(home, built):
    """The issue's case: it used to kill every run with SIGBUS until the user deleted the file."""
    keras_home, cached = home
    _truncate(cached)
    assert _probe(keras_home) == (True, [])
    _assert_healthy(cached, built)


REBUILT = {
    "another valid library, stale record": lambda c, t, f: shutil.copy(f, c.path),
    "another valid library with a record that matches it": lambda c, t, f: (
        shutil.copy(f, c.path), _edit_record(c, size=os.path.getsize(f), sha256=hashlib.sha256(
            pathlib.Path(f).read_bytes()).hexdigest())),  # loads, but lacks the ops: it was an AttributeError
    "garbage record": lambda c, t, f: pathlib.Path(c.record).write_bytes(b"\xff\xfe not json"),
    "missing record (a cache from before records)": lambda c, t, f: os.remove(c.record),
    "library a link to a truncated copy": lambda c, t, f: _link_to_half(c, t),
}


@pytest.mark.slow  # a process that rebuilds the kernel (compiler or stand-in): seconds each
@pytest.mark.parametrize("damage", sorted(REBUILT))
def test_damaged_cache_is_rebuilt_once_without_a_warning(home, built, fake_bin, foreign, tmp_path, damage):
    keras_home, cached = home
    REBUILT[damage](cached, tmp_path, foreign)
    before = {p: p.read_bytes() for p in tmp_path.glob("*.so")}
    assert _probe(keras_home, fake_bin, "copy", FAKE_CXX_LIBRARY=built.path) == (True, [])
    _assert_healthy(cached, built)
    assert {p: p.read_bytes() for p in tmp_path.glob("*.so")} == before  # a link is replaced, not written through


@pytest.mark.slow  # a process that rebuilds the kernel (compiler or stand-in): seconds each
def test_damaged_cache_and_failed_rebuild_fall_back_with_one_warning(home, fake_bin):
    keras_home, cached = home
    _truncate(cached)
    fused, warnings = _probe(keras_home, fake_bin, "fail")
    assert not fused and len(warnings) == 1, warnings
    for part in (os.path.basename(cached.path), "size is", "simulated build failure", "keras.ops GroupNorm"):
        assert part in warnings[0], warnings[0]


@pytest.mark.slow  # a process that rebuilds the kernel (compiler or stand-in): seconds each
def test_rebuild_that_does_not_load_falls_back_with_one_warning(tmp_path, fake_bin):
    fused, warnings = _probe(tmp_path, fake_bin, "garbage")
    assert not fused and len(warnings) == 1, warnings
    assert "does not load" in warnings[0] and "keras.ops GroupNorm" in warnings[0], warnings[0]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_damaged_read_only_cache_falls_back_with_one_warning(home):
    keras_home, cached = home
    _truncate(cached)
    os.chmod(os.path.dirname(cached.path), 0o555)
    try:
        fused, warnings = _probe(keras_home)
    finally:
        os.chmod(os.path.dirname(cached.path), 0o755)
    assert not fused and len(warnings) == 1 and "size is" in warnings[0], warnings


LOAD_AFTER_CHANGE = textwrap.dedent("""
    import os, sys
    import tensorflow as tf
    from keras_bit.kernels import cache
    cached = cache.locate(tf)
    data = cache.read_verified(cached)
    os.truncate(cached.path, len(data) // 2)  # changed on disk after the check
    if sys.argv[1] == "control":
        cache._sealed_memfd = lambda data: None  # load by path, as where no memfd exists
    module = cache.load_verified(tf, data, cached)
    y = module.keras_bit_group_norm(tf.ones((1, 2, 2, 4)), tf.ones(4), tf.zeros(4), groups=2, epsilon=1e-5, relu=True)
    print(float(tf.reduce_sum(y[0])))
""")


@pytest.mark.slow  # two processes, each importing TensorFlow and loading the kernel
@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="the bytes checked are loaded through a memfd")
def test_the_bytes_verified_are_the_bytes_loaded(home, tmp_path):
    keras_home, _ = home
    shutil.copytree(keras_home, tmp_path / "control")
    runs = {arm: subprocess.run([sys.executable, "-c", LOAD_AFTER_CHANGE, arm], check=False, capture_output=True,
                                text=True, env={**os.environ, "KERAS_HOME": str(where)}, timeout=300)
            for arm, where in (("memfd", keras_home), ("control", tmp_path / "control"))}
    assert runs["memfd"].returncode == 0, runs["memfd"].stderr[-3000:]
    assert float(runs["memfd"].stdout.split()[-1]) == 0.0  # constant input: normalised to 0, beta 0
    # The control loads the truncated file itself: the loader's SIGBUS the cache check exists to prevent.
    assert runs["control"].returncode == -signal.SIGBUS, (runs["control"].returncode, runs["control"].stderr[-2000:])


@pytest.mark.slow  # a process that rebuilds the kernel (compiler or stand-in): seconds each
def test_concurrent_first_builds_both_use_the_kernel(tmp_path, built, fake_bin):
    env = {**os.environ, "KERAS_HOME": str(tmp_path), "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
           "FAKE_CXX": "copy", "FAKE_CXX_LIBRARY": built.path, "FAKE_CXX_SLEEP": "2"}
    env.pop(kernels.ENV_SWITCH, None)
    procs = [subprocess.Popen([sys.executable, "-c", PROBE], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        result = json.loads(out.strip().splitlines()[-1])
        assert result["1"]["fused"] and not [line for line in err.splitlines() if "GroupNorm kernel" in line]
    _assert_healthy(built._replace(path=os.path.join(tmp_path, cache.SUBDIR, os.path.basename(built.path)),
                                   record=os.path.join(tmp_path, cache.SUBDIR, os.path.basename(built.record))),
                    built)
