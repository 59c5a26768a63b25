"""BiT's TF2 SavedModels from TF Hub / Kaggle Models, read without running them.

The BiT authors published every BiT-S / BiT-M model and the 48 BiT-M-R50x1
"experts" as TF2 SavedModels (tfhub.dev `google/bit/...`,
`google/experts/bit/r50x1/in21k/<subtree>`, now Kaggle Models
`google/bit/tensorFlow2/<variation>`). `hub.KerasLayer` does not run under
Keras 3, so keras_bit reads their variables instead of their graph:

* `saved_model.pb` (size-bounded) holds the SavedObjectGraph: each variable
  node's attribute path from the root and TF's name for it
  (`SavedVariable.name`, without ":0").
* `variables/variables.index` + `.data-*` is an object-based checkpoint whose
  own object graph (`_CHECKPOINTABLE_OBJECT_GRAPH`, node ids the same as the
  SavedObjectGraph's) gives each node's checkpoint key (e.g.
  `model/variables/7/.ATTRIBUTES/VARIABLE_VALUE`) and TF's name again: the
  two must agree.

A variable is named as in the bucket `.npz` (`resnet/block1/unit01/a/
group_norm/gamma`, the head `resnet/head/dense/{kernel,bias}`, a Dense
(in, out)). Where the module has the object structure of the authors' TF2
model (big_transfer bit_tf2/models.py `ResnetV2`: `_root`, `_blocks/<b>/
layer_with_weights-<u>/_unit_a`, `_unit_a_conv`, `_unit_b`, `_unit_c`, `_proj`,
`_pre_head/0`, `_head`), the name comes from that path: TF's own names for
those variables depend on the TF / Keras version (tf_keras 2.21 calls them
"group_norm/gamma" in every unit). Otherwise TF's names are used; they must be
unique, under one model scope (`resnet/` in the authors' code; another scope
and a 1x1 convolution head `head/conv2d/kernel` are accepted too).
Feature-vector modules have no head. The published modules take images in
[0, 1] and rescale inside their graph; a keras_bit model keeps
`preprocess_input`'s [-1, 1] (feed it `2 * x - 1` for x in [0, 1]).
"""

import collections
import os
import re
import stat

from keras_bit import backend, io
from keras_bit.weights import core, download, npz

FORMAT = "tfhub"
GRAPH_FILE = "saved_model.pb"
VARIABLES = os.path.join("variables", "variables")
# A BiT SavedModel's graph is a few MB (R152x4 included); the bound keeps a hostile file from claiming GBs.
MAX_GRAPH_BYTES = 256 << 20
_OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
_ROOT = "root_block/standardized_conv2d/kernel"
_SHARD = re.compile(r"variables\.data-(?P<index>[0-9]{5})-of-(?P<count>[0-9]{5})")

KAGGLE_SCHEME = "kaggle://"
_KAGGLE_URL = "https://www.kaggle.com/models/"
# One part of a Kaggle handle; never "." or "..": kagglehub makes each part a folder of its cache.
_PART = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}"
_HANDLE = re.compile(rf"(?P<path>{_PART}/{_PART}/{_PART}/{_PART})(/(?P<version>[1-9][0-9]{{0,5}}))?")
# The long form of a model page: /models/<owner>/<model>/frameworks/<fw>/variations/<v>[/versions/<n>].
_LONG = re.compile(rf"(?P<owner>{_PART})/(?P<model>{_PART})/frameworks/(?P<fw>{_PART})/variations/(?P<var>{_PART})"
                   rf"(/versions/(?P<version>[1-9][0-9]{{0,5}}))?")
KAGGLE_HELP = ("'kaggle://<owner>/<model>/<framework>/<variation>[/<version>]' (the kagglehub handle, e.g. "
               "'kaggle://google/bit/tensorFlow2/m-r50x1/1') or its https://www.kaggle.com/models/... page")
OFFLINE_HINT = ("Without network access kagglehub reads its cache ($KAGGLEHUB_CACHE, default ~/.cache/kagglehub) "
                "for a handle with its version (.../<version>) downloaded before: copy that cache from a connected "
                "machine.")


def kaggle_handle(weights):
    """The kagglehub handle named by a `kaggle://` value or Kaggle model page URL; None for any other value.

    Raises:
        ValueError: a Kaggle value that is not a model variation handle.

    Example:
        >>> kaggle_handle("kaggle://google/bit/tensorFlow2/m-r50x1/1")
        'google/bit/tensorFlow2/m-r50x1/1'
    """
    if not isinstance(weights, str) or not weights.startswith((KAGGLE_SCHEME, _KAGGLE_URL)):
        return None
    rest = weights[len(KAGGLE_SCHEME):] if weights.startswith(KAGGLE_SCHEME) else weights[len(_KAGGLE_URL):]
    if weights.startswith(_KAGGLE_URL):
        rest = rest.partition("?")[0].rstrip("/")
        long = _LONG.fullmatch(rest)
        if long:
            rest = "/".join(long.group("owner", "model", "fw", "var")) + (
                f"/{long['version']}" if long["version"] else "")
    match = _HANDLE.fullmatch(rest)
    if match is None:
        raise ValueError(f"A Kaggle Models handle is {KAGGLE_HELP}. Received: weights={weights!r}")
    return rest


def fetch(handle):
    """The local folder of a Kaggle Models variation, through `kagglehub.model_download` and its cache.

    Raises:
        keras_bit.BackendError: kagglehub is not installed.
        ValueError: no such model on Kaggle.
        keras_bit.DownloadError: neither cached nor downloadable (offline).
    """
    kagglehub = backend.require("kagglehub", "Loading weights from Kaggle Models", "kaggle")
    try:
        path = kagglehub.model_download(handle)
    except Exception as e:  # kagglehub raises requests' and its own HTTP errors: one documented error each
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (403, 404):
            raise ValueError(f"kaggle://{handle}: no such Kaggle model variation or version (HTTP {status}).") from e
        message = " ".join(str(e).split())[:300]
        raise download.DownloadError(f"Could not get kaggle://{handle} ({type(e).__name__}: {message}). "
                                     f"{OFFLINE_HINT}") from e
    return os.fsdecode(os.fspath(path))


def is_saved_model(path):
    """Whether a `weights=` path names a folder holding `saved_model.pb` or `variables` (the reader checks them)."""
    try:
        path = os.fsdecode(os.fspath(path))
    except TypeError:
        return False
    return os.path.isdir(path) and any(os.path.lexists(os.path.join(path, n)) for n in (GRAPH_FILE, "variables"))


def _own_file(path, what):
    """`path` if it is a regular file itself (not a link, FIFO, device or folder), else ValueError naming it."""
    try:
        mode = os.lstat(path).st_mode
    except OSError as e:
        raise ValueError(f"SavedModel {what} {path} is missing or unreadable: {e.strerror or e}.") from e
    if not stat.S_ISREG(mode):
        kind = "a link" if stat.S_ISLNK(mode) else "not a regular file"
        raise ValueError(f"SavedModel {what} {path} is {kind}; a SavedModel's files hold their own data.")
    return path


def _checkpoint_files(folder):
    """The checkpoint's index and data shards, every one a regular file of its own; ValueError naming the first not."""
    variables = os.path.join(folder, "variables")
    if os.path.islink(variables) or not os.path.isdir(variables):
        raise ValueError(f"SavedModel {folder}: {variables} is {'a link' if os.path.islink(variables) else 'missing'};"
                         " a TF2 SavedModel keeps its variables in that folder.")
    index = _own_file(os.path.join(folder, VARIABLES + ".index"), "checkpoint index")
    names = sorted(n for n in os.listdir(variables) if n.startswith("variables.data-"))
    shards = [_SHARD.fullmatch(n) for n in names]
    counts = {int(m["count"]) for m in shards if m}
    count = counts.pop() if len(counts) == 1 and all(shards) else 0
    if not count or [int(m["index"]) for m in shards] != list(range(count)):
        raise ValueError(f"SavedModel {folder}: the checkpoint shards in {variables} are {names or 'missing'}; "
                         "expected variables.data-00000-of-<n> ... -<n-1>-of-<n>.")
    for name in names:
        _own_file(os.path.join(variables, name), "checkpoint shard")
    return index


# The authors' ResnetV2 (bit_tf2/models.py) as Python objects: the attribute path of each variable in the object
# graph (a Keras Sequential tracks its layers as "layer_with_weights-<n>"). It names a variable whatever TensorFlow
# called it: tf_keras 2.21 names bit_tf2's variables "group_norm/gamma", the same in every unit.
_UNIT = r"(?P<scope>(?:.*/)?)_blocks/(?P<block>[0-9]{1,3})/layer_with_weights-(?P<unit>[0-9]{1,3})/"
_OBJECT_PATHS = (
    (r"(?P<scope>(?:.*/)?)_root/layer_with_weights-0/kernel", "root_block/standardized_conv2d/kernel"),
    (_UNIT + r"_unit_(?P<part>[abc])/layer_with_weights-0/(?P<leaf>gamma|beta)", "{unit}/{part}/group_norm/{leaf}"),
    (_UNIT + r"_unit_a_conv/kernel", "{unit}/a/standardized_conv2d/kernel"),
    (_UNIT + r"_unit_(?P<part>[bc])/layer_with_weights-1/kernel", "{unit}/{part}/standardized_conv2d/kernel"),
    (_UNIT + r"_proj/kernel", "{unit}/a/proj/standardized_conv2d/kernel"),
    (r"(?P<scope>(?:.*/)?)_pre_head/0/(?P<leaf>gamma|beta)", "group_norm/{leaf}"),
    (r"(?P<scope>(?:.*/)?)_head/(?P<leaf>kernel|bias)", "head/dense/{leaf}"),
)
# Children that list a layer's variables again (Keras' aggregates), or a Sequential's layers by position.
_AGGREGATES = ("variables", "trainable_variables", "non_trainable_variables", "keras_api", "signatures")
_POSITION = re.compile(r"layer-[0-9]+")


def _object_paths(nodes):
    """node id -> its attribute path from the root: breadth first (the shortest), past Keras' aggregate lists."""
    paths, queue = {0: ""}, collections.deque([0])
    while queue:
        i = queue.popleft()
        for child in nodes[i].children:
            name = child.local_name
            skip = name in _AGGREGATES or _POSITION.fullmatch(name)
            if child.node_id in paths or child.node_id >= len(nodes) or skip:
                continue
            paths[child.node_id] = f"{paths[i]}/{name}" if paths[i] else name
            queue.append(child.node_id)
    return paths


def _bit_tf2_name(path):
    """`(scope, .npz-style name)` of a bit_tf2 variable's object path, or None for any other path."""
    for pattern, template in _OBJECT_PATHS:
        match = re.fullmatch(pattern, path)
        if match:
            parts = match.groupdict()
            unit = f"block{int(parts['block']) + 1}/unit{int(parts['unit']) + 1:02d}" if "block" in parts else ""
            return parts["scope"], "resnet/" + template.format(**{**parts, "unit": unit})
    return None


def _saved_variables(folder):
    """`(graph path, {node id: (name, TF's name)})` from the SavedObjectGraph of `saved_model.pb` (read bounded,
    never run). The name is the bit_tf2 object path's where the module has that structure, else TF's own."""
    from tensorflow.core.protobuf import saved_model_pb2

    path = _own_file(os.path.join(folder, GRAPH_FILE), "graph")
    data = io.read_bounded(path, MAX_GRAPH_BYTES, "SavedModel graph")
    with core.reading(path):
        saved = saved_model_pb2.SavedModel.FromString(data)
    nodes = saved.meta_graphs[0].object_graph_def.nodes if len(saved.meta_graphs) == 1 else ()
    raw = {i: n.variable.name.removesuffix(":0") for i, n in enumerate(nodes) if n.WhichOneof("kind") == "variable"}
    if not raw:
        raise ValueError(f"SavedModel graph {path} holds no TF2 object graph with variables (a TF1 Hub module, or "
                         "not a SavedModel?); keras_bit reads the TF2 SavedModels of TF Hub and Kaggle Models.")
    paths = _object_paths(nodes)
    found = {i: _bit_tf2_name(paths[i]) for i in raw if i in paths}
    found = {i: named for i, named in found.items() if named is not None}
    if len({scope for scope, _ in found.values()}) > 1:
        raise ValueError(f"SavedModel graph {path} holds BiT variables under several objects "
                         f"({', '.join(sorted({scope or '<root>' for scope, _ in found.values()}))}).")
    names = {i: (found[i][1] if i in found else name, name) for i, name in raw.items()}
    seen = set()
    for name, _ in names.values():
        if not name or name in seen:
            raise ValueError(f"SavedModel graph {path}: variable name {name!r} is empty or used twice.")
        seen.add(name)
    return path, names


class Reader:
    """The variables of a TF2 SavedModel folder by name: shapes and dtypes from the index, arrays on `read`."""

    def __init__(self, folder):
        tf = backend.require("tensorflow", "Reading a TF Hub / Kaggle SavedModel", "tensorflow")
        from tensorflow.core.protobuf import trackable_object_graph_pb2

        self.path = folder = os.fsdecode(os.fspath(folder))
        if not os.path.isdir(folder):
            raise ValueError(f"SavedModel {folder} is not a folder.")
        graph_path, names = _saved_variables(folder)
        index = _checkpoint_files(folder)
        with core.reading(index):
            self._reader = tf.train.load_checkpoint(os.path.join(folder, VARIABLES))
            shapes, dtypes = self._reader.get_variable_to_shape_map(), self._reader.get_variable_to_dtype_map()
            if _OBJECT_GRAPH_KEY not in shapes:
                raise ValueError(f"no {_OBJECT_GRAPH_KEY} (not an object-based TF2 checkpoint)")
            graph = trackable_object_graph_pb2.TrackableObjectGraph.FromString(
                self._reader.get_tensor(_OBJECT_GRAPH_KEY))
        self._keys = {}
        for node_id, (name, tf_name) in names.items():
            attributes = [a for a in graph.nodes[node_id].attributes if a.name == "VARIABLE_VALUE"] if (
                node_id < len(graph.nodes)) else []
            if len(attributes) != 1 or attributes[0].checkpoint_key not in shapes or (
                    attributes[0].full_name and attributes[0].full_name != tf_name):
                raise ValueError(f"SavedModel {folder}: variable {name!r} of {graph_path} has no value of its own in "
                                 f"the checkpoint {index} (truncated or corrupt?).")
            self._keys[name] = attributes[0].checkpoint_key
        self._shapes, self._dtypes = shapes, dtypes

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._reader = None

    def keys(self):
        return list(self._keys)

    def info(self, key):
        """`(shape, dtype name)` from the checkpoint index alone."""
        checkpoint_key = self._keys[key]
        return tuple(self._shapes[checkpoint_key]), self._dtypes[checkpoint_key].name

    def read(self, key):
        with core.reading(self.path, key):
            return self._reader.get_tensor(self._keys[key])


def _layout(reader):
    """`(scope, head)` of a module's names: the model scope ("resnet" in the authors' code) and the head's kind
    ("dense", "conv2d" or None for a feature-vector module)."""
    roots = [k for k in reader.keys() if k == _ROOT or k.endswith("/" + _ROOT)]
    if len(roots) != 1:
        raise ValueError(f"SavedModel {reader.path} is not a BiT module: {len(roots)} variables named like "
                         f"'resnet/{_ROOT}' (expected 1).")
    scope = roots[0][: -len(_ROOT)]  # "resnet/" or ""
    keys = set(reader.keys())
    head = next((kind for kind in ("dense", "conv2d") if f"{scope}head/{kind}/bias" in keys), None)
    return scope, head


def key_map(model, load_head=True, scope="resnet/", head="dense"):
    """Variable name -> (variable, Layout): the `.npz` names under `scope`, the head a Dense or a 1x1 conv."""
    mapping = {}
    for key, (variable, layout) in npz.key_map(model, load_head).items():
        name = key[len("resnet/"):]
        if head == "dense" and key.startswith(npz.HEAD_SCOPE + "/"):  # Dense kernel (in, out), not (1, 1, in, out)
            name, layout = "head/dense/" + name[len("head/conv2d/"):], core.SAME
        mapping[scope + name] = (variable, layout)
    return mapping


def head_classes(path):
    """Class count of a SavedModel's head (from the checkpoint index), or None for a feature-vector module."""
    with Reader(path) as reader:
        scope, head = _layout(reader)
        if head is None:
            return None
        return core.head_size(reader, path, f"{scope}head/{head}/bias", f"{scope}head/{head}/kernel", -1)


def load(model, path, load_head=True):
    """Strictly loads a BiT TF2 SavedModel folder (TF Hub / Kaggle layout) into a keras_bit model."""
    with Reader(path) as reader:
        scope, head = _layout(reader)
        head_keys = [k for k in reader.keys() if k.startswith(f"{scope}head/")]  # noqa: SIM118 (a Reader)
        hint = " Is it a BiT module of this architecture?"
        if load_head and head is None:
            hint = (" It is a feature-vector module (no head): build the model with include_top=False, or load "
                    "with load_head=False.")
        core.load_strict(model, reader, key_map(model, load_head, scope, head or "dense"), path,
                         head_keys if not load_head else (), hint=hint)
