"""BiT's few-shot protocol: K examples per class, several draws, one fine-tune each, and their summary.

`fewshot` runs `keras_bit.finetune` once per shot count K and draw d, with
`examples_per_class=K, examples_per_class_seed=d` and every other setting
shared, into `output_dir/k{K}/draw{d}` (an ordinary run folder,
`keras_bit.train.run_dir.RunDir`). `output_dir/fewshot.json` records the
protocol (shots, draws, model, data and the shared settings); a restart with
another protocol is refused, naming what changed. A finished sub-run is read
back, not trained again; a killed one resumes from its backup. The summary is
`fewshot.csv` (one row per run), `fewshot.md` (mean ± sample std of top-1 per
K) and `fewshot.png` (`fewshot_report` rebuilds them from the sub-runs). Only
`fewshot` itself needs TensorFlow.

Reference:
    Kolesnikov et al., "Big Transfer (BiT)", https://arxiv.org/abs/1912.11370, section 4.2 (few-shot transfer).

Example:
    >>> keras_bit.fewshot("BiT-M-R50x1", "cifar10", shots=(1, 5), draws=3, output_dir="runs/cifar10_fewshot")
"""

import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import textwrap

import numpy as np

from keras_bit.io import atomic_path, read_json_object, write_json, write_text
from keras_bit.train import config as config_lib
from keras_bit.train.resume import changes as setting_changes
from keras_bit.train.run_dir import INSTALL_HINT, RunDir
from keras_bit.validation import is_int

logger = logging.getLogger("keras_bit")

PROTOCOL_JSON = "fewshot.json"
CSV_COLUMNS = ("shots", "draw", "top1", "top5", "loss", "examples", "steps")
OWNED = ("examples_per_class", "examples_per_class_seed", "output_dir")  # set per sub-run by the protocol
_RECORD_LIMIT = 1 << 20


@dataclasses.dataclass(frozen=True)
class FewshotResult:
    """What `fewshot` and `fewshot_report` return.

    Attributes:
        output_dir: str, the protocol folder.
        rows: list of dicts of `CSV_COLUMNS`, one per finished sub-run (`top5` None where not recorded).
        summary: dict K -> `(mean top-1, sample std or None with one draw, number of draws)`.
        csv_path, markdown_path: the tables written; png_path: the plot, None without matplotlib.
    """

    output_dir: str
    rows: list
    summary: dict
    csv_path: str
    markdown_path: str
    png_path: object


def sub_run(output_dir, shots, draw):
    """The `RunDir` of the fine-tune with `shots` examples per class and draw `draw`."""
    return RunDir(os.path.join(os.fspath(output_dir), f"k{shots}", f"draw{draw}"))


def fewshot(model, data, shots=(1, 5, 10, 25), draws=3, output_dir="bit_fewshot", config=None, *, callbacks=(),
            verbose="auto", **settings):
    """Runs BiT's few-shot protocol: one BiT-HyperRule fine-tune per shot count and draw, then the summary.

    Args:
        model: what `keras_bit.finetune` takes (a model name or a builder).
        data: what `keras_bit.finetune` takes; the K examples of each class are drawn from its training split.
        shots: non-empty sequence of unique positive ints, the examples per class K (the paper: 1, 5, 10, 25).
        draws: positive int, draws per K; draw d samples its examples with `examples_per_class_seed=d`.
        output_dir: the protocol folder (its parent must exist); sub-runs go to `k{K}/draw{d}`.
        config: a `FinetuneConfig` of the shared settings (None: the defaults); `**settings` override it.
        callbacks: extra Keras callbacks, given to every fine-tune.
        verbose: as `finetune`'s; also one line per finished sub-run.
        **settings: `FinetuneConfig` fields shared by every sub-run, except `examples_per_class`,
            `examples_per_class_seed` and `output_dir`, which the protocol sets.

    Returns:
        A `FewshotResult`.

    Raises:
        ValueError: a bad argument (named), or `output_dir` holding another protocol (what changed is named).
        TypeError: an unknown setting, or a `config` that is not a `FinetuneConfig`.

    Example:
        >>> result = keras_bit.fewshot("BiT-M-R50x1", "oxford_flowers102", weights="imagenet21k", draws=5)
        >>> result.summary[5]  # (mean top-1, std, draws) at 5 examples per class
    """
    shots, draws = check_protocol(shots, draws, settings)
    if config is not None and not isinstance(config, config_lib.FinetuneConfig):
        raise TypeError(f"`config` must be a keras_bit FinetuneConfig or None. Received: config={config!r}")
    base = (config or config_lib.FinetuneConfig()).replace(**settings)
    if base.examples_per_class is not None or base.examples_per_class_seed is not None:
        raise ValueError("`config` sets examples_per_class / examples_per_class_seed, which the few-shot protocol "
                         f"sets per run. Received: examples_per_class={base.examples_per_class!r}, "
                         f"examples_per_class_seed={base.examples_per_class_seed!r}")
    root = RunDir.checked(output_dir)
    os.makedirs(root.path, exist_ok=True)
    _claim(root.path, protocol_record(model, data, shots, draws, base))
    from keras_bit.train.finetune import finetune  # TensorFlow: only when runs are trained

    show = verbose not in (0, False)
    for k in shots:
        for d in range(draws):
            run = sub_run(root.path, k, d)
            if os.path.isfile(run.results_json):
                if show:
                    logger.info("Few-shot K=%d draw %d: finished before (%s), not trained again.", k, d, run.path)
                continue
            os.makedirs(os.path.dirname(run.path), exist_ok=True)
            result = finetune(model, data, base.replace(examples_per_class=k, examples_per_class_seed=d,
                                                        output_dir=run.path), callbacks=callbacks,
                              verbose=verbose)
            if show:
                logger.info("Few-shot K=%d draw %d: top-1 %.4f", k, d, result.eval_accuracy)
    return fewshot_report(root.path)


def check_protocol(shots, draws, settings=()):
    """`(shots as a tuple, draws)` checked; ValueError naming the bad argument."""
    if isinstance(shots, (str, bytes)) or not hasattr(shots, "__iter__"):
        raise ValueError(f"`shots` must be a non-empty sequence of positive ints. Received: shots={shots!r}")
    shots = tuple(shots)
    if not shots or not all(is_int(k) and k > 0 for k in shots):
        raise ValueError(f"`shots` must be a non-empty sequence of positive ints. Received: shots={shots!r}")
    if len(set(shots)) != len(shots):
        raise ValueError(f"`shots` must not repeat a value. Received: shots={shots!r}")
    if not (is_int(draws) and draws > 0):
        raise ValueError(f"`draws` must be a positive int. Received: draws={draws!r}")
    owned = [name for name in OWNED if name in settings]
    if owned:
        raise ValueError(f"{', '.join(owned)}: set by the few-shot protocol (`shots`, the draw, `output_dir`), "
                         "not a shared setting; remove it.")
    return tuple(int(k) for k in shots), int(draws)


def protocol_record(model, data, shots, draws, base):
    """The fewshot.json record: the protocol, the model and data, and the shared settings (JSON values)."""
    shared = {name: getattr(base, name) for name in config_lib.FIELDS if name not in OWNED}
    record = {"shots": list(shots), "draws": draws, "model": _describe(model), "data": _describe(data), **shared}
    return json.loads(json.dumps(record, default=str))  # tuples become lists, as they read back


def _describe(value):
    """A stable JSON description of a model or data argument (arrays by digest, builders by name)."""
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, (tuple, list)) and all(isinstance(v, np.ndarray) for v in value):
        digest = hashlib.sha256()
        for array in value:
            digest.update(f"{array.dtype}{array.shape}".encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        return f"arrays:{digest.hexdigest()[:16]}"
    func = getattr(value, "func", value)  # functools.partial: its function and keywords
    name = getattr(func, "__qualname__", type(func).__name__)
    keywords = getattr(value, "keywords", None)
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in sorted(keywords.items()))})" if keywords else name


def _claim(path, record):
    """Writes fewshot.json, or refuses the one there when its protocol differs (each difference named)."""
    file = os.path.join(path, PROTOCOL_JSON)
    if not os.path.lexists(file):
        write_json(file, record)
        return
    previous = read_json_object(file, _RECORD_LIMIT, what="The few-shot protocol file")
    found = [(key, previous.get(key), record[key]) for key in ("shots", "draws") if previous.get(key) != record[key]]
    found += setting_changes(previous, record)
    if found:
        parts = "; ".join(f"{config_lib.name_of(key)}={old!r} -> {new!r}" for key, old, new in found)
        raise ValueError(f"{path} holds a few-shot protocol with other settings: {parts}. Run again with the same "
                         "settings to continue it, or choose a new `output_dir`.")


def fewshot_report(output_dir):
    """Rebuilds fewshot.csv, fewshot.md and fewshot.png from the finished sub-runs of `output_dir`.

    Returns:
        A `FewshotResult`.

    Raises:
        ValueError: no fewshot.json, a malformed file (named), or no finished sub-run yet.

    Example:
        >>> fewshot_report("runs/cifar10_fewshot").summary
    """
    root = os.path.abspath(os.fspath(output_dir))
    file = os.path.join(root, PROTOCOL_JSON)
    if not os.path.isfile(file):
        raise ValueError(f"Not a few-shot protocol folder: {root!r} (no {PROTOCOL_JSON})")
    record = read_json_object(file, _RECORD_LIMIT, what="The few-shot protocol file")
    shots, draws = check_protocol(record.get("shots"), record.get("draws"))
    rows = []
    for k in shots:
        for d in range(draws):
            run = sub_run(root, k, d)
            if os.path.isfile(run.results_json):
                results = run.load().results
                rows.append(dict(shots=k, draw=d, top1=results.accuracy, top5=results.top5_accuracy,
                                 loss=results.loss, examples=results.examples, steps=results.steps))
    if not rows:
        raise ValueError(f"Nothing to report yet in {root!r}: no sub-run has finished.")
    summary = summarize(rows)
    csv_path, md_path = os.path.join(root, "fewshot.csv"), os.path.join(root, "fewshot.md")
    write_text(csv_path, _csv(rows))
    write_text(md_path, _markdown(rows, summary, record))
    png_path = _plot(summary, record, os.path.join(root, "fewshot.png"))
    return FewshotResult(root, rows, summary, csv_path, md_path, png_path)


def summarize(rows):
    """K -> `(mean top-1, sample std (ddof=1) or None for one draw, draws)` over `rows`."""
    summary = {}
    for k in dict.fromkeys(row["shots"] for row in rows):
        values = np.array([row["top1"] for row in rows if row["shots"] == k], dtype="float64")
        std = float(np.std(values, ddof=1)) if len(values) > 1 else None
        summary[k] = (float(np.mean(values)), std, len(values))
    return summary


def _csv(rows):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow(["" if row[c] is None else (f"{row[c]:.6g}" if isinstance(row[c], float) else row[c])
                         for c in CSV_COLUMNS])
    return buffer.getvalue()


def _markdown(rows, summary, record):
    lines = [f"# Few-shot: {record.get('model')} on {record.get('data')}", "",
             "| K (examples per class) | draws | top-1 mean ± std | top-1 per draw |", "|---|---|---|---|"]
    for k, (mean, std, n) in summary.items():
        per_draw = ", ".join(f"{row['top1']:.4f}" for row in rows if row["shots"] == k)
        spread = "—" if std is None else f"{std:.4f}"
        lines.append(f"| {k} | {n} | {mean:.4f} ± {spread} | {per_draw} |")
    lines += ["", "std: sample standard deviation over draws (ddof=1); — with a single draw."]
    return "\n".join(lines) + "\n"


def _plot(summary, record, path):
    """Draws fewshot.png (mean top-1 against K, std error bars); None, with a warning, without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("Skipped fewshot.png: matplotlib is not installed (%s draws it).", INSTALL_HINT)
        return None
    ks = list(summary)
    means = [summary[k][0] for k in ks]
    errors = [summary[k][1] or 0.0 for k in ks]
    figure = Figure(figsize=(6, 4.2), dpi=100)
    ax = figure.subplots()
    ax.errorbar(ks, means, yerr=errors, marker="o", capsize=4)
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("examples per class (K, log scale)")
    ax.set_ylabel("top-1 accuracy (mean ± std over draws)")
    ax.set_title(textwrap.fill(f"Few-shot: {record.get('model')} on {record.get('data')}", 72), fontsize=9)
    ax.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as partial, open(partial, "wb") as f:
        figure.savefig(f, format="png")
    return path


class _Options:
    """Adds `config.add_arguments`' options to `parser`, less those the protocol owns (they are not offered)."""

    def __init__(self, parser):
        self.parser = parser
        self.skipped = {config_lib.FIELDS[name].metadata["flag"] for name in OWNED}

    def add_argument(self, flag, **kwargs):
        if flag not in self.skipped:
            self.parser.add_argument(flag, **kwargs)


def add_parser(sub):
    """Adds the `fewshot` subcommand to the `keras-bit` parser's subparsers `sub`."""
    from keras_bit import presets
    from keras_bit.validation import positive_int_arg

    p = sub.add_parser("fewshot", help="BiT's few-shot protocol: fine-tune on K examples per class, several draws "
                                       "each, and summarise (fewshot.csv / .md / .png)")
    p.add_argument("--model", default="BiT-M-R50x1", choices=presets.MODEL_NAMES, metavar="MODEL",
                   help=f"one of {', '.join(presets.MODEL_NAMES)}")
    p.add_argument("--data", default="sklearn:digits",
                   help='tfds name, image folder, or "sklearn:digits" (bundled with scikit-learn, offline)')
    p.add_argument("--shots", nargs="+", type=positive_int_arg, default=[1, 5, 10, 25], metavar="K",
                   help="examples per class, one fine-tune set each")
    p.add_argument("--draws", type=positive_int_arg, default=3, help="draws per K (draw d: few-shot seed d)")
    p.add_argument("--output-dir", dest="output_dir", default="bit_fewshot",
                   help="the protocol folder: fewshot.json / .csv / .md / .png and one run folder per "
                        "fine-tune in k<K>/draw<d>/")
    config_lib.add_arguments(_Options(p))  # the shared settings of keras_bit.train.config.FinetuneConfig
    p.add_argument("--quiet", action="store_true", help="print only the summary and warnings")
    p.set_defaults(examples_per_class=None, examples_per_class_seed=None)


def run_command(args):
    """`keras-bit fewshot ...`: runs the protocol and prints its table and files."""
    check_protocol(args.shots, args.draws)  # before the shared settings are checked or anything loads
    base = config_lib.from_cli(args).replace(output_dir=config_lib.FIELDS["output_dir"].default)
    result = fewshot(args.model, args.data, args.shots, args.draws, args.output_dir, base,
                     verbose=0 if args.quiet else 1)
    with open(result.markdown_path, encoding="utf-8") as f:
        print(f.read().rstrip())
    for path in (result.csv_path, result.markdown_path, result.png_path):
        if path:
            print(path)
