"""`keras-bit push RUN_DIR OWNER/NAME --format ...`: publish a fine-tuning run's model (or only write the files)."""

import os

from keras_bit.publish import formats
from keras_bit.validation import positive_int_arg


def add_parser(sub):
    """Adds the `push` subcommand to the `keras-bit` parser's subparsers `sub`."""
    p = sub.add_parser("push", help="publish a fine-tuning run's model on the Hugging Face Hub, as timm, "
                                    "transformers or Keras files with a model card",
                       description="The Hub token is $HF_TOKEN's, else the one `hf auth login` saved.")
    p.add_argument("run_dir", help="the run's --output-dir (its model.keras, run.json, results.json)")
    p.add_argument("repo_id", help="Hub repository OWNER/NAME (created if missing); with --save-only, the one the "
                                   "model card's examples load from")
    p.add_argument("--format", required=True, choices=formats.FORMATS,
                   help="timm (timm.create_model), transformers (BitForImageClassification) or keras (.keras)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--save-only", metavar="FOLDER", default=None,
                   help="write the files into FOLDER instead of uploading them (default: upload)")
    p.add_argument("--overwrite", action="store_true", help="with --save-only: replace a non-empty FOLDER")
    p.add_argument("--image-size", type=positive_int_arg, default=None,
                   help="input size the model card and configs state (default: the run's crop size)")


def load_run_model(run_dir):
    """The model.keras of a fine-tuning run folder (ValueError naming the file when there is none)."""
    from keras_bit.predict import load_model
    from keras_bit.train.run_dir import RunDir

    run = RunDir(run_dir)
    if not os.path.isdir(run.path):
        raise ValueError(f"Run folder not found: {run.path}")
    if not os.path.lexists(run.model_keras):
        raise ValueError(f"{run.model_keras} not found: a run writes model.keras when it finishes "
                         "(keras-bit finetune with the same --output-dir completes it).")
    return load_model(run.model_keras)


def run(args):
    """The `push` command: prints the folder written (--save-only) or the commit's URL."""
    from keras_bit import publish

    if args.save_only is None and args.overwrite:
        raise ValueError("--overwrite: only used with --save-only (an upload adds a commit)")
    if args.save_only is not None and args.private:
        raise ValueError("--private: not used with --save-only (nothing is uploaded)")
    publish.check_repo_id(args.repo_id)  # before the model is loaded
    parent = args.save_only and os.path.dirname(os.path.abspath(args.save_only))
    if parent and not os.path.isdir(parent):
        raise ValueError(f"--save-only {args.save_only}: the folder it goes in, {parent}, does not exist")
    model = load_run_model(args.run_dir)
    if args.save_only is not None:
        folder = publish.save_pretrained(model, args.save_only, args.format, run_dir=args.run_dir,
                                         repo_id=args.repo_id, image_size=args.image_size, overwrite=args.overwrite)
        print(folder)
        return 0
    commit = publish.push_to_hub(model, args.repo_id, args.format, run_dir=args.run_dir,
                                 private=True if args.private else None, image_size=args.image_size)
    print(getattr(commit, "commit_url", None) or f"https://huggingface.co/{args.repo_id}")
    return 0
