"""The rest of the bad-input matrix: each case gets a clear error (or a finite answer), never a silent mix.

Cases tested elsewhere, by the module that owns them:
- model building (unknown names, input < 32 px, 1 or 4 channels with pretrained
  weights, classes <= 0): test_models_bit.py (the ERRORS table) and test_models_resnet_v2.py;
- checkpoints (truncated, corrupt, wrong architecture, wrong dtype, NaN, nothing
  half-loaded): test_weights_hostile.py, test_weights_npz.py;
- data (empty folder, non-image files, a class below K examples, labels out of
  range): test_train_sources.py;
- serving and deployment (corrupt bytes, decompression bombs, wrong dtype/rank, empty batch, bad names and
  versions, overwriting): test_export_saved_model.py, test_export_image_decode.py, test_export_formats.py;
- `keras-bit predict` / `export` (bad files among good ones, folders, missing models): test_predict.py;
- fine-tuning (missing output-dir parent, resuming with other settings, one run per output_dir, the export
  written once, NumPy integers): test_train_finetune.py; the run folder's lock, temporary names and run.json:
  test_train_run_dir.py; images over max_pixels, FIFOs, NaN pixels, outputs inside the data:
  test_train_sources.py. Here: the same through the installed `keras-bit finetune`, one line and exit status 2.
"""

import functools
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_bit
from helpers import TINY, images, tiny_checkpoint, tiny_model
from keras_bit.layers import StandardizedConv2D
from helpers import (TINY_BUILDER, HeldElsewhere, assert_cli_error, cli_in_process, copy_run, folder_digests,
                     installed_command, learnable, run_finetune)


@pytest.mark.skipif(not os.path.isdir("/proc/sys"), reason="needs Linux /proc")
@pytest.mark.parametrize("path", ["/proc/sys", "/proc/keras_bit_run"])
def test_unwritable_output_dir_is_refused_before_training(path):
    # /proc refuses new files even to root (CI runs as root, where chmod would not stop a write).
    with pytest.raises(ValueError, match=f"`output_dir` is not writable: {path}"):
        keras_bit.finetune(TINY_BUILDER, learnable(), output_dir=path, steps=5, batch_size=8)


def test_unwritable_output_dir_without_root(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes to read-only directories; covered by the /proc cases")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ValueError, match="`output_dir` is not writable"):
        keras_bit.finetune(TINY_BUILDER, learnable(), output_dir=locked, steps=5, batch_size=8)


def test_resume_with_a_different_model_is_refused(tmp_path, interrupted_run):
    copy_run(interrupted_run, tmp_path, "r")  # killed after 3 of 10 steps, a backup every 2
    wider = functools.partial(keras_bit.ResNetV2, **dict(TINY, width_factor=2))
    with pytest.raises(ValueError, match=r"holds a backup of a run with other settings: "
                                         r"model=.* -> .*ResNetV2\(.*width_factor=2"):
        keras_bit.finetune(wider, learnable(), output_dir=tmp_path / "r", steps=10, checkpoint_every=2, batch_size=8,
                           resolution=(36, 32), base_lr=0.5, verbose=0)
    # Untouched: byte for byte the folder the other tests resume (the original run still resumes).
    assert folder_digests(tmp_path / "r") == folder_digests(interrupted_run)


def test_tpu_flag_without_a_tpu_is_one_clear_line(capsys):
    from keras_bit import cli

    assert cli.main(["finetune", "--tpu", "local", "--steps", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("keras-bit finetune: error: Cannot connect to the TPU 'local'")


@pytest.mark.parametrize("value", [0, 255, 127])
def test_all_constant_images_give_finite_distinct_free_outputs(tmp_path, value):
    # Every GroupNorm sees zero variance somewhere (constant image => constant root features).
    tiny_checkpoint(tmp_path / "t.npz", classes=10)
    model = tiny_model(weights=str(tmp_path / "t.npz"), classes=10)
    x = keras_bit.preprocess_input(np.full((2, 64, 64, 3), value, np.float32))
    probs = model.predict(x, verbose=0)
    assert np.all(np.isfinite(probs))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_all_zero_kernel_gives_zeros_and_finite_gradients(rng):
    conv = StandardizedConv2D(8, 3)
    x = tf.constant(images(rng, 2, 16))
    conv.build(x.shape)
    conv.kernel.assign(np.zeros(conv.kernel.shape, np.float32))
    with tf.GradientTape() as tape:
        y = conv(x)
        loss = tf.reduce_sum(y * y) + tf.reduce_sum(y)
    grad = tape.gradient(loss, conv.kernel)
    np.testing.assert_array_equal(y.numpy(), 0.0)
    assert np.all(np.isfinite(grad.numpy()))
    # The same through a whole model: zeroed kernels everywhere, finite outputs.
    model = tiny_model(classes=3)
    model.set_weights([np.zeros_like(w) if w.ndim == 4 else w for w in model.get_weights()])
    assert np.all(np.isfinite(model.predict(images(rng), verbose=0)))


def test_mixed_float16_long_run_keeps_loss_scaling_and_finite_values(tmp_path):
    result = run_finetune(tmp_path, steps=60, checkpoint_every=30, mixed_precision="mixed_float16", base_lr=1.0)
    assert keras.config.dtype_policy().name == "float32"  # restored after the run
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert all(np.all(np.isfinite(w.numpy())) for w in result.model.weights)
    assert result.eval_accuracy >= 0.8
    # Loss scaling was in place: the backed-up optimizer is a LossScaleOptimizer (its SGD is
    # saved as `inner_optimizer`, beside the dynamic scale's own variables).
    import h5py

    with h5py.File(tmp_path / "run" / "backup" / "step-000000060.weights.h5") as f:
        names = []
        f.visit(names.append)
    assert "optimizer/inner_optimizer/vars" in names, [n for n in names if n.startswith("optimizer")][:5]


# --- `keras-bit finetune` through the installed command: one line, exit 2 (issue 22, run folders). ---


def _png_folder(root, n=4, size=(20, 30)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_cli_refuses_an_output_dir_held_by_another_run(tmp_path, capsys):
    out = tmp_path / "run"
    with HeldElsewhere(out) as holder:
        proc = cli_in_process("finetune", "--output-dir", out, "--steps", "5", capsys=capsys)
    assert_cli_error(proc, "finetune", f"`output_dir` {out} is in use by another fine-tuning run (pid {holder.pid} on "
                                       "host", "Wait for that run to end, or choose another output directory.")


@pytest.mark.parametrize("flag,value,fragment", [
    ("--seed", str(2**64 + 1), f"`seed` must be a non-negative integer below 2**32 (NumPy's seed range). "
                               f"Received: seed={2**64 + 1}"),
    ("--examples-per-class-seed", str(2**32), "`examples_per_class_seed` must be a non-negative integer below 2**32"),
])
def test_cli_refuses_a_seed_numpy_cannot_take(tmp_path, flag, value, fragment, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["finetune", flag, value, "--steps", "5", "--output-dir", tmp_path / "run"]
    if flag == "--examples-per-class-seed":
        argv += ["--examples-per-class", "1"]
    assert_cli_error(cli_in_process(*argv, capsys=capsys), "finetune", fragment)
    assert not (tmp_path / "run").exists()


def test_cli_max_pixels_and_an_output_dir_inside_the_data(tmp_path, capsys, monkeypatch):
    root = _png_folder(tmp_path / "pets")  # the installed command: a real process shows one line, no traceback
    proc = installed_command("finetune", "--data", root, "--max-pixels", "599", "--steps", "5", "--output-dir",
                             tmp_path / "run", cwd=tmp_path)
    assert_cli_error(proc, "finetune", "8 of 8 images under", "within max_pixels=599", f"{root}/cat/0.png (30x20 "
                     "image is over max_pixels=599)", "--skip-bad-images")
    monkeypatch.chdir(tmp_path)
    proc = cli_in_process("finetune", "--data", root, "--steps", "5", "--output-dir", root / "run", capsys=capsys)
    assert_cli_error(proc, "finetune", f"`output_dir` {root / 'run'} is inside the image folder {root}")
    assert sorted(p.name for p in root.iterdir()) == ["cat", "dog"]


def test_cli_run_json_that_is_not_an_object(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    (out / "backup").mkdir(parents=True)
    (out / "backup" / "step-000000002.weights.h5").write_bytes(b"\x89HDF")
    (out / "run.json").write_text('["not", "settings"]')
    proc = cli_in_process("finetune", "--data", _png_folder(tmp_path / "pets"), "--steps", "5", "--output-dir",
                          out, "--resolution", "32", capsys=capsys)
    assert_cli_error(proc, "finetune", f"run settings file {out / 'run.json'} must hold a JSON object, not a list")
