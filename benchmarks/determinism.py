"""Are two fine-tuning runs of the same command bit-identical, whatever else the machine does?

Starts `--pairs` pairs of R50x1 fine-tuning processes on scikit-learn's digits. The two processes of a pair
run at the same time, beside `--hogs` busy-loop processes, so each sees a loaded, changing machine. Prints,
per pair, whether the final weights are bit-identical and the largest difference, for `deterministic=True`
(the default) and `False`, and the seconds per step of each setting.

    python benchmarks/determinism.py [--steps 30] [--pairs 2] [--hogs 1]
    python benchmarks/determinism.py --cost 2 --steps 200   # the price of op determinism, one run at a time
"""

import argparse
import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

RUN = """
import json, sys, time, numpy as np, keras_bit
out, deterministic, steps, batch = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
start = time.monotonic()
result = keras_bit.finetune("BiT-M-R50x1", "sklearn:digits", steps=steps, batch_size=batch, resolution=(36, 32),
                            output_dir=out, deterministic=deterministic, checkpoint_every=steps, verbose=0)
seconds = time.monotonic() - start
np.savez(out + "/weights.npz", *result.model.get_weights())
print(json.dumps({"seconds": seconds, "accuracy": result.eval_accuracy}))
"""


def _hog(stop_at):
    x = 0
    while time.monotonic() < stop_at:
        x += 1


def _run(deterministic, steps, batch, root):
    out = tempfile.mkdtemp(dir=root)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", RUN, out, "1" if deterministic else "0", str(steps), str(batch)],
                          capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]


def _cost(repeats, steps, root):
    """Seconds per step of the README main job's settings (batch 32), with and without op determinism,
    alternating so that a drift of the machine's speed hits both alike (the time includes start-up)."""
    times = {True: [], False: []}
    for _ in range(repeats):
        for deterministic in (True, False):
            times[deterministic].append(_run(deterministic, steps, 32, root) / steps)
    for deterministic, values in times.items():
        print(f"deterministic={deterministic!s:5}  s/step {' '.join(f'{v:.3f}' for v in values)}"
              f"  median {np.median(values):.3f}")
    print(f"cost of op determinism: {np.median(times[True]) / np.median(times[False]):.2f}x")


def _pair(deterministic, steps, hogs, root):
    hog_processes = [multiprocessing.Process(target=_hog, args=(time.monotonic() + 600,)) for _ in range(hogs)]
    for p in hog_processes:
        p.start()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    outs = [tempfile.mkdtemp(dir=root) for _ in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", RUN, out, "1" if deterministic else "0", str(steps), "16"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env) for out in outs]
    reports = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    for p in hog_processes:
        p.terminate()
    weights = [np.load(f"{out}/weights.npz") for out in outs]
    a, b = ([w[k] for k in sorted(w.files, key=lambda k: int(k.split("_")[1]))] for w in weights)
    identical = all(np.array_equal(x, y) for x, y in zip(a, b))
    diff = max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))
    digest = hashlib.sha256(b"".join(x.tobytes() for x in a)).hexdigest()[:12]
    return identical, diff, digest, [r["seconds"] / steps for r in reports], [r["accuracy"] for r in reports]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--hogs", type=int, default=1)
    parser.add_argument("--cost", type=int, default=0, help="instead: time N runs of each setting, one at a time")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="keras_bit_determinism_")
    if args.cost:
        return _cost(args.cost, args.steps, root)
    print(f"R50x1 from scratch, sklearn:digits, batch 16, 32 px, {args.steps} steps; "
          f"2 runs at a time beside {args.hogs} busy loop(s)")
    for deterministic in (True, False):
        for pair in range(args.pairs):
            identical, diff, digest, per_step, accuracy = _pair(deterministic, args.steps, args.hogs, root)
            print(f"deterministic={deterministic!s:5}  pair {pair}: identical={identical!s:5}  max|diff|={diff:.3g}  "
                  f"weights {digest}  s/step {per_step[0]:.3f} {per_step[1]:.3f}  accuracy {accuracy}", flush=True)


if __name__ == "__main__":
    main()
