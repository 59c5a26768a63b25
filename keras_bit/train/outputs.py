"""What a fine-tuning run writes into its `output_dir` besides backups and logs (chief only).

Before training: `run.json`, `class_names.txt`, `skipped_images.txt`. At the
end: `model.keras`, `results.json`, `summary.png` and, with `export_dir`, one
serving SavedModel per run: a finished run started again trains nothing and
returns the version it exported (recorded as `export_path` in results.json)
rather than writing the same weights as a new version. Each file is written
under a temporary name and renamed into place (`keras_bit.train.run_record`).
"""

import logging
import os

from keras_bit.train import run_record
from keras_bit.train.run_record import CLASS_NAMES_FILE, RESULTS_FILE, SKIPPED_FILE

logger = logging.getLogger("keras_bit")


def write_run_files(output_dir, record, dataset):
    """Before training: run.json (the settings `record`), class_names.txt and, if any, skipped_images.txt."""
    run_record.write_run_json(output_dir, record)
    run_record.write_text(os.path.join(output_dir, CLASS_NAMES_FILE), "\n".join(dataset.class_names) + "\n")
    skipped = getattr(dataset, "skipped", None) or []
    if skipped:
        run_record.write_text(os.path.join(output_dir, SKIPPED_FILE), "\n".join(skipped) + "\n")


def write_outputs(trained, run, dataset, scores, output_dir, chief, export_dir, show, seconds, start):
    """Step 6: model.keras, results.json, summary.png and the optional SavedModel (chief only).

    Returns:
        `(export_path, summary_path)`, each None when not written.
    """
    export_path = summary_path = None
    # A run that trained nothing now has the weights of its earlier export, if it made one.
    exported = run_record.recorded_export(output_dir) if start >= run.total else None
    if chief:
        _save_model(trained, os.path.join(output_dir, "model.keras"))
        results = {"steps": run.total, "trained_from_step": start, "seconds": round(seconds, 1),
                   "eval": {k: scores[k] for k in ("loss", "accuracy", "top5_accuracy", "examples")},
                   "confusion_matrix": scores["confusion_matrix"], "class_names": list(dataset.class_names),
                   **({"export_path": exported} if exported else {})}
        run_record.write_json(os.path.join(output_dir, RESULTS_FILE), results, indent=1)
        summary_path = _draw_summary(output_dir)
    if show:
        print(f"eval top-1 accuracy: {scores['accuracy']:.4f}, top-5: {scores['top5_accuracy']:.4f} "
              f"({scores['examples']} examples, {run.total} steps, {seconds:.0f} s)", flush=True)
    if export_dir is not None and chief:
        export_path = _export(trained, export_dir, exported, dataset.class_names, output_dir)
        if export_path != exported:
            run_record.write_json(os.path.join(output_dir, RESULTS_FILE), dict(results, export_path=export_path),
                                  indent=1)
    return export_path, summary_path


def _export(trained, export_dir, exported, class_names, output_dir):
    """The run's SavedModel version under `export_dir`: written once; `exported` (an earlier one) is reused."""
    root = os.path.abspath(os.fspath(export_dir))
    if exported and os.path.commonpath([root, os.path.abspath(exported)]) == root:
        logger.info("This run was already exported to %s: not exporting it again. To write another version: "
                    "keras-bit export %s --class-names %s --export-dir %s", exported,
                    os.path.join(output_dir, "model.keras"), os.path.join(output_dir, CLASS_NAMES_FILE), root)
        return exported
    from keras_bit.export import export_saved_model

    return export_saved_model(trained, export_dir, class_names=class_names)


def _save_model(model, path):
    # Keras writes the archive in place; a temporary name keeps a kill from leaving half a model.keras.
    tmp = run_record.temp_path(path)
    try:
        model.save(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, f"Cannot write {path}: {e.strerror or e}. The run's weights are in its newest "
                               "backup: free space and run the same command again to write the outputs.") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _draw_summary(output_dir):
    from keras_bit.train import report

    try:
        return report.write_summary(output_dir)
    except (OSError, ValueError) as e:  # the picture is a convenience: never fail a finished run on it
        logger.warning("summary.png not drawn: %s", e)
        return None

