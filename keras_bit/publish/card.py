"""The model card (README.md) of a published model: what it is, how it was trained, how to feed and load it."""

from keras_bit.publish import formats

_LIBRARY = {"timm": "timm", "transformers": "transformers", "keras": "keras"}
_MAX_LISTED_CLASSES = 200
_PLACEHOLDER = "OWNER/REPO"

_USAGE = {
    "timm": """```python
import timm
import torch

model = timm.create_model("hf-hub:{repo}", pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=model))
with torch.no_grad():
    logits = model(transform(image).unsqueeze(0))  # image: a PIL RGB image
```""",
    "transformers": """```python
import torch
from transformers import AutoImageProcessor, BitForImageClassification

processor = AutoImageProcessor.from_pretrained("{repo}")
model = BitForImageClassification.from_pretrained("{repo}").eval()
with torch.no_grad():
    logits = model(**processor(image, return_tensors="pt")).logits  # image: a PIL RGB image
print(model.config.id2label[int(logits.argmax(-1))])
```""",
    "keras": """```python
import keras
import keras_bit  # registers keras_bit's layers
from huggingface_hub import hf_hub_download

model = keras.saving.load_model(hf_hub_download("{repo}", "{keras_file}"))
x = keras_bit.preprocess_input(images)  # uint8 RGB, resized to {height}x{width}
scores = model.predict(x)
```
`{weights_file}` holds the same weights for `keras_bit.ResNetV2(**config["model_config"], weights=...)`.""",
}


def _inline(value, limit=200):
    """A run setting as one line of Markdown text (bounded; backticks cannot open code spans)."""
    text = " ".join(str(value).split()).replace("`", "'")
    return text if len(text) <= limit else text[:limit] + "..."


def _architecture(info):
    name = f"BiT ResNetV2-{info.arch_name}" if info.arch_name else "BiT ResNetV2 (custom size)"
    return (f"{name}: {'-'.join(map(str, info.block_units))} units per block, root width {info.root}, "
            f"GroupNorm ({info.groups} groups) and weight-standardized convolutions")


def _training(settings, results):
    lines = []
    if settings:
        fields = (("Upstream weights", "weights"), ("Model", "model"), ("Data", "data"),
                  ("Training examples", "train_examples"), ("Evaluation examples", "eval_examples"),
                  ("Batch size", "batch_size"), ("Steps", "steps"), ("Resolution (resize, crop)", "resolution"),
                  ("Base learning rate", "base_lr"), ("MixUp alpha", "mixup"), ("Seed", "seed"))
        if "weights" in settings and settings["weights"] is None:  # recorded as None: no upstream checkpoint
            settings = {**settings, "weights": "none (trained from a random initialisation)"}
        lines += [f"- {label}: {_inline(settings[key])}" for label, key in fields if settings.get(key) is not None]
    if results is not None:
        top5 = "" if results.top5_accuracy is None else f", top-5 accuracy {results.top5_accuracy:.4f}"
        lines.append(f"- Final evaluation after {results.steps} steps: top-1 accuracy {results.accuracy:.4f}{top5}, "
                     f"loss {results.loss:.4f}, on {results.examples} examples")
    elif settings:
        lines.append("- No final evaluation recorded (results.json): the run had not finished.")
    return lines or ["Not recorded (published without its fine-tuning run folder)."]


def _classes(info, class_names, fmt):
    if info.classes is None:
        return ["No classification head: the model outputs features."]
    head = {None: "logits", "softmax": "softmax probabilities", "sigmoid": "one sigmoid score per class"}
    keras_head = head.get(info.activation, info.activation)
    outputs = (f"The model outputs {keras_head}." if fmt == "keras" else
               f"The model outputs logits (the Keras model it was published from: {keras_head}).")
    lines = [f"{info.classes} classes. {outputs}"]
    if class_names:
        shown = class_names[:_MAX_LISTED_CLASSES]
        lines += ["", "```text", *(f"{i}: {name}" for i, name in enumerate(shown)), "```"]
        if len(class_names) > len(shown):
            lines.append(f"... and {len(class_names) - len(shown)} more (see config.json).")
    return lines


def model_card(info, fmt, size, class_names=None, settings=None, results=None, repo_id=None):
    """README.md text: YAML metadata for the Hub, then the model, training, classes, preprocessing and usage."""
    repo = repo_id or _PLACEHOLDER
    usage = _USAGE[fmt].format(repo=repo, keras_file=formats.KERAS_MODEL, weights_file=formats.KERAS_WEIGHTS,
                               height=size[0], width=size[1])
    lines = [
        "---", f"library_name: {_LIBRARY[fmt]}", "license: apache-2.0", "pipeline_tag: image-classification",
        "tags:", "- image-classification", "- bit", "- keras-bit", f"- {fmt}", "---", "",
        f"# {_inline(repo.split('/')[-1] if repo_id else info.name)}", "",
        f"A Big Transfer (BiT) image classifier fine-tuned with keras_bit, published in {fmt} form.", "",
        "## Model", "", f"- Architecture: {_architecture(info)}", f"- Parameters: {info.params:,}",
        "", "## Training", "", *_training(settings, results),
        "", "## Classes", "", *_classes(info, class_names, fmt),
        "", "## Preprocessing", "",
        f"RGB images resized whole to {size[0]}x{size[1]} pixels ({formats.INTERPOLATION}, no crop: crop_pct "
        f"{formats.CROP_PCT}, as keras_bit evaluates), pixels mapped from [0, 255] to [-1, 1] (`x / 127.5 - 1`, "
        f"i.e. mean {formats.MEAN[0]} and std {formats.STD[0]} on [0, 1]).",
        "", "## Usage", "", usage,
        "", "## License", "",
        "Apache-2.0, as the BiT weights it was fine-tuned from (github.com/google-research/big_transfer).",
        "", "## Reference", "",
        "Kolesnikov et al., \"Big Transfer (BiT): General Visual Representation Learning\", "
        "https://arxiv.org/abs/1912.11370.", "",
    ]
    return "\n".join(lines)
