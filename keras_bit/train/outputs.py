"""What a fine-tuning run writes into its `output_dir` besides backups and logs (chief only).

Before training: `run.json`, `class_names.txt`, `skipped_images.txt`. At the
end: `model.keras`, `results.json`, `summary.png` and, with `export_dir`, one
serving SavedModel per run: a finished run started again trains nothing and
returns the version it exported (recorded as `export_path` in results.json)
rather than writing the same weights as a new version. Every file is named,
written and read by the run's `keras_bit.train.run_dir.RunDir`.
"""

import logging
import os

logger = logging.getLogger("keras_bit")


def write_run_files(run_dir, record, dataset):
    """Before training: run.json (the settings `record`), class_names.txt and, if any, skipped_images.txt."""
    run_dir.write_settings(record)
    run_dir.write_class_names(dataset.class_names)
    run_dir.write_skipped(getattr(dataset, "skipped", None) or [])


def write_outputs(trained, run, dataset, scores, run_dir, chief, export_dir, show, seconds, start):
    """Step 6: model.keras, results.json, summary.png and the optional SavedModel (chief only).

    Args:
        run_dir: the run's `RunDir`.

    Returns:
        `(export_path, summary_path)`, each None when not written.
    """
    export_path = summary_path = None
    # A run that trained nothing now has the weights of its earlier export, if it made one.
    exported = run_dir.recorded_export() if start >= run.total else None
    if chief:
        run_dir.save_model(trained)
        results = {"steps": run.total, "trained_from_step": start, "seconds": round(seconds, 1),
                   "eval": {k: scores[k] for k in ("loss", "accuracy", "top5_accuracy", "examples")},
                   "confusion_matrix": scores["confusion_matrix"], "class_names": list(dataset.class_names),
                   **({"export_path": exported} if exported else {})}
        run_dir.write_results(results)
        summary_path = _draw_summary(run_dir)
    if show:
        print(f"eval top-1 accuracy: {scores['accuracy']:.4f}, top-5: {scores['top5_accuracy']:.4f} "
              f"({scores['examples']} examples, {run.total} steps, {seconds:.0f} s)", flush=True)
    if export_dir is not None and chief:
        export_path = _export(trained, export_dir, exported, dataset.class_names, run_dir)
        if export_path != exported:
            run_dir.write_results(dict(results, export_path=export_path))
    return export_path, summary_path


def _export(trained, export_dir, exported, class_names, run_dir):
    """The run's SavedModel version under `export_dir`: written once; `exported` (an earlier one) is reused."""
    root = os.path.abspath(os.fspath(export_dir))
    if exported and os.path.commonpath([root, os.path.abspath(exported)]) == root:
        logger.info("This run was already exported to %s: not exporting it again. To write another version: "
                    "keras-bit export %s --class-names %s --export-dir %s", exported, run_dir.model_keras,
                    run_dir.class_names_txt, root)
        return exported
    from keras_bit.export import export_saved_model

    return export_saved_model(trained, export_dir, class_names=class_names)


def _draw_summary(run_dir):
    from keras_bit.train import report

    try:
        return report.write_summary(run_dir)
    except (OSError, ValueError) as e:  # the picture is a convenience: never fail a finished run on it
        logger.warning("%s not drawn: %s", os.path.basename(run_dir.summary_png), e)
        return None
