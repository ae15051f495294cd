"""``explain_dataset``: a model over a whole dataset, every method, into a result store.

Plumbing only: explainers are found by name on the ``cnnviz_fast`` package when a run starts
(``METHODS`` maps a method name to the function's name and how its output becomes a map), so
this module never imports the methods; ``register_method`` adds one (a later method such as
Scouter plugs in there). Every argument is checked, and the model, layers, parameters and
targets are tried on one blank input, before any image is decoded.
"""
from __future__ import annotations

import ast
import csv
import dataclasses
import hashlib
import importlib
import inspect
import io
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import store as _store
from ._hooks import resolve_layer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
_THUMBNAIL = 128  # longest side of the input thumbnails kept in the shards for reports


class ExplainError(ValueError):
    """A bad argument of ``explain_dataset``; the message starts with the option's name."""


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """How a method becomes a stored map.

    function: the name of a ``cnnviz_fast`` function (looked up at run time) or a callable
    ``f(model, x, target, **params)``. output: ``"map"`` (already ``[B, (k,) H, W]``),
    ``"max_abs"`` / ``"sum"`` (an input attribution ``[B, (k,) C, H, W]`` reduced over channels
    by ``to_map``). signed: maps keep a sign (reports draw them on a diverging colour map).
    one_forward: the method runs the model once on the clean batch and takes a callable target,
    so with ``--target pred --top-k 1`` its forward pass also gives the predictions (no extra
    forward pass per batch).
    """
    function: object
    output: str = "map"
    signed: bool = False
    one_forward: bool = False


METHODS = {
    "cam": MethodSpec("cam", one_forward=True), "grad_cam": MethodSpec("grad_cam", one_forward=True),
    "grad_cam_pp": MethodSpec("grad_cam_pp", one_forward=True), "layer_cam": MethodSpec("layer_cam", one_forward=True),
    "score_cam": MethodSpec("score_cam"),
    "occlusion": MethodSpec("occlusion", signed=True),
    "saliency": MethodSpec("saliency", "max_abs", one_forward=True),
    "guided_backprop": MethodSpec("guided_backprop", "max_abs", one_forward=True),
    "deconvnet": MethodSpec("deconvnet", "max_abs", one_forward=True), "smoothgrad": MethodSpec("smoothgrad", "max_abs"),
    "integrated_gradients": MethodSpec("integrated_gradients", "sum", signed=True),
    "deeplift": MethodSpec("deeplift", "sum", signed=True), "lrp": MethodSpec("lrp", "sum", signed=True),
    # models with a ScouterHead (cnnviz_fast.models:shapes_scouter): evidence for (SCOUTER+) or against (SCOUTER-)
    "scouter": MethodSpec("scouter_explain"),
}


def register_method(name: str, function, output: str = "map", signed: bool = False,
                    one_forward: bool = False) -> None:
    """Make ``name`` usable as ``--method name[:key=value,...]`` (see ``MethodSpec``)."""
    if output not in ("map", "max_abs", "sum"):
        raise ValueError(f"output: expected 'map', 'max_abs' or 'sum', got {output!r}")
    METHODS[name] = MethodSpec(function, output, signed, one_forward)


# ----------------------------------------------------------------------------- models

@dataclasses.dataclass
class _Model:
    module: nn.Module
    kind: str  # default | factory | torchscript | export
    hash: str
    size: int
    crop: int
    mean: tuple
    std: tuple
    class_names: tuple = ()
    cam_layer: str | None = None


def _tensor_hash(state: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # Lightning-style checkpoints
    if not isinstance(state, dict):
        raise ExplainError(f"--weights: {path} holds a {type(state).__name__}, not a state_dict")
    return state


def load_model(spec=None, weights=None) -> _Model:
    """The model of ``spec``: None (the embedded default), ``package.module:function``, a
    TorchScript archive, a ``torch.export`` program (``.pt2``) or a function returning the
    module (``explain_dataset_ray``'s ``model_fn``); ``weights`` a state_dict file."""
    if spec is None:
        if weights is not None:
            raise ExplainError("--weights: needs --model (the default model has its own weights)")
        from .models import SHAPES_CNN_CAM_LAYER, shapes_cnn
        model = shapes_cnn()
        return _Model(model, "default", _tensor_hash(model.state_dict()), 64, 64, (0.0, 0.0, 0.0),
                      (1.0, 1.0, 1.0), model.class_names, SHAPES_CNN_CAM_LAYER)
    path = Path(spec) if isinstance(spec, (str, Path)) else None
    if path is None:
        module, kind = _from_factory(spec), "factory"
    elif path.suffix == ".pt2":
        if not path.is_file():
            raise ExplainError(f"--model: no file {spec}")
        try:
            module = torch.export.load(str(path)).module()
        except Exception as err:
            raise ExplainError(f"--model: {spec} is not a torch.export program: {err}") from err
        kind = "export"
    elif path.suffix in (".pt", ".pth", ".ts", ".jit", ".zip") or path.is_file():
        if not path.is_file():
            raise ExplainError(f"--model: no file {spec}")
        try:
            module = _Scripted(torch.jit.load(str(path), map_location="cpu"))
        except Exception as err:
            raise ExplainError(f"--model: {spec} is not a TorchScript archive (a state_dict goes to "
                               f"--weights with a factory --model package.module:function): {err}") from err
        kind = "torchscript"
    else:
        module = _from_factory(spec)
        kind = "factory"
    if weights is not None:
        if kind != "factory":
            raise ExplainError(f"--weights: only with a factory --model; {spec} carries its own weights")
        _apply_weights(module, Path(weights))
    digest = _file_hash(path) if kind in ("export", "torchscript") else _tensor_hash(module.state_dict())
    if kind != "export":  # an exported program has no train/eval switch; it runs as it was traced
        module.eval()
    return _Model(module, kind, digest, 256, 224, IMAGENET_MEAN, IMAGENET_STD,
                  tuple(getattr(module, "class_names", ()) or ()))


class _Scripted(nn.Module):
    """A TorchScript module behind a plain one. Methods hook the modules of the model they are
    given and ScriptModules refuse Python hooks, so the archive is held outside the module tree
    (no CAM layers can be named in it); ``.to()`` still moves it."""

    def __init__(self, scripted):
        super().__init__()
        object.__setattr__(self, "_scripted", scripted)

    def _apply(self, fn, recurse=True):
        self._scripted._apply(fn)
        return super()._apply(fn, recurse)

    def forward(self, x):
        return self._scripted(x)


def _model_label(spec) -> str:
    """How the config names the model: its spec, or a model_fn's module:qualname."""
    if spec is None:
        return "default"
    if callable(spec):
        fn = getattr(spec, "func", spec)  # a functools.partial names its function
        return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"
    return str(spec)


def _from_factory(spec) -> nn.Module:
    if callable(spec):
        factory, spec = spec, _model_label(spec)
    elif spec.count(":") != 1:
        raise ExplainError(f"--model: expected package.module:function, a TorchScript file or a .pt2 "
                           f"program, got {spec!r}")
    else:
        mod_name, fn_name = spec.split(":")
        try:
            module = importlib.import_module(mod_name)
        except Exception as err:
            raise ExplainError(f"--model: cannot import {mod_name!r}: {type(err).__name__}: {err}") from err
        factory = getattr(module, fn_name, None)
        if not callable(factory):
            raise ExplainError(f"--model: {mod_name!r} has no function {fn_name!r}")
    try:
        model = factory()
    except Exception as err:
        raise ExplainError(f"--model: {spec}() failed: {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise ExplainError(f"--model: {spec}() returned a {type(model).__name__}, not an nn.Module")
    return model


def _apply_weights(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise ExplainError(f"--weights: no file {path}")
    try:
        state = _load_state_dict(path)
    except ExplainError:
        raise
    except Exception as err:
        raise ExplainError(f"--weights: cannot read {path}: {type(err).__name__}: {err}") from err
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)

    def some(keys):
        return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
    problems = [f"{label} {len(keys)}: {some(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
    if problems:
        raise ExplainError(f"--weights: {path} does not fit the model; " + "; ".join(problems))
    model.load_state_dict(state)


# ----------------------------------------------------------------------------- data

@dataclasses.dataclass
class _Data:
    keys: list  # file paths, or ints into ``tensors``
    labels: list
    classes: tuple = ()
    tensors: torch.Tensor | None = None
    names: list | None = None  # what the index calls each item
    source: str | None = None  # what the config calls the data, when it is not a path


def _label_of(text, classes: dict):
    text = (text or "").strip()
    if text == "":
        return -1
    try:
        return int(text)
    except ValueError:
        return classes.setdefault(text, len(classes))


def load_data(path) -> _Data:
    """Items of an image folder, a CSV / text list of paths, a ``.pt`` / ``.npz`` tensor file,
    or a ``ray.data.Dataset`` with a ``path`` or ``image`` column (``cnnviz_fast.distributed``)."""
    if hasattr(path, "map_batches") and hasattr(path, "schema"):
        from .distributed import dataset_items
        return dataset_items(path)
    root = Path(path)
    if not root.exists():
        raise ExplainError(f"--data: {path} does not exist")
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
        if not files:
            raise ExplainError(f"--data: no images under {path} ({', '.join(sorted(_IMAGE_SUFFIXES))})")
        classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
        lookup = {c: i for i, c in enumerate(classes)}
        labels = [lookup[p.relative_to(root).parts[0]] if len(p.relative_to(root).parts) > 1 else -1
                  for p in files]
        return _Data([str(p) for p in files], labels, tuple(classes))
    suffix = root.suffix.lower()
    if suffix in (".csv", ".txt"):
        return _list_file(root)
    if suffix in (".pt", ".pth", ".npz"):
        return _tensor_file(root)
    raise ExplainError(f"--data: expected an image folder, a .csv/.txt list or a .pt/.npz tensor file, got {path}")


def _list_file(path: Path) -> _Data:
    text = path.read_text()
    rows = list(csv.reader(io.StringIO(text))) if path.suffix.lower() == ".csv" else \
        [[line] for line in text.splitlines()]
    rows = [r for r in rows if r and r[0].strip()]
    column = 0
    label_col = 1 if rows and len(rows[0]) > 1 else None
    if rows and "path" in [c.strip().lower() for c in rows[0]]:
        header = [c.strip().lower() for c in rows[0]]
        column, label_col = header.index("path"), header.index("label") if "label" in header else None
        rows = rows[1:]
    if not rows:
        raise ExplainError(f"--data: {path} lists no images")
    classes: dict = {}
    keys = [str((path.parent / r[column].strip()).resolve()) for r in rows]
    labels = [_label_of(r[label_col] if label_col is not None and label_col < len(r) else "", classes)
              for r in rows]
    return _Data(keys, labels, tuple(sorted(classes, key=classes.get)))


def _tensor_file(path: Path) -> _Data:
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path) as z:
                arrays = {k: torch.from_numpy(z[k]) for k in z.files}
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            arrays = loaded if isinstance(loaded, dict) else {"images": loaded}
    except Exception as err:
        raise ExplainError(f"--data: cannot read {path}: {type(err).__name__}: {err}") from err
    images = arrays.get("images", next(iter(arrays.values()), None))
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ExplainError(f"--data: {path} must hold images [N, C, H, W] (key 'images'), got {got}")
    images = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    labels = arrays.get("labels")
    labels = [-1] * len(images) if labels is None else [int(v) for v in labels.reshape(-1).tolist()]
    if len(labels) != len(images):
        raise ExplainError(f"--data: {path} has {len(images)} images but {len(labels)} labels")
    return _Data(list(range(len(images))), labels, (), images, [f"{path.name}#{i}" for i in range(len(images))])


class _Decoded(torch.utils.data.Dataset):
    """Item ``i`` -> ``(i, image float32 [3, crop, crop] in [0, 1] or None, error or None)``;
    decoding runs in DataLoader workers, and a bad file becomes an error string, not an exception."""

    def __init__(self, data: _Data, positions: list, size: int, crop: int):
        self.data, self.positions, self.size, self.crop = data, positions, size, crop

    def __len__(self):
        return len(self.positions)

    def __getitem__(self, i):
        pos = self.positions[i]
        key = self.data.keys[pos]
        if self.data.tensors is not None:
            return pos, self.data.tensors[key], None
        from PIL import Image
        try:
            with Image.open(key) as image:
                image = image.convert("RGB")
                w, h = image.size
                scale = self.size / min(w, h)
                image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
                w, h = image.size
                left, top = (w - self.crop) // 2, (h - self.crop) // 2
                image = image.crop((left, top, left + self.crop, top + self.crop))
                arr = np.asarray(image, dtype=np.float32) / 255.0
        except Exception as err:  # any decoder failure skips the file, with its reason
            return pos, None, f"{type(err).__name__}: {err}"
        return pos, torch.from_numpy(arr).permute(2, 0, 1).contiguous(), None


def _collate(items):
    good = [(p, x) for p, x, err in items if err is None]
    bad = [(p, err) for p, _, err in items if err is not None]
    positions = [p for p, _ in good]
    images = torch.stack([x for _, x in good]) if good else None
    return positions, images, bad, items[0][0]


# ----------------------------------------------------------------------------- methods

def parse_method(text: str):
    """``"name:key=value,key=value"`` -> ``(name, {key: value})``; values as Python literals,
    else strings."""
    name, _, rest = text.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ExplainError(f"--method {text}: expected NAME:key=value,..., got {item!r}")
        try:
            params[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            params[key.strip()] = value.strip()
    return name.strip(), params


@dataclasses.dataclass
class _Method:
    name: str  # the column/tensor name: the method name, with a suffix when repeated
    method: str
    spec: MethodSpec
    function: object
    params: dict


def _resolve_methods(texts, model: _Model) -> list:
    import cnnviz_fast
    if not texts:
        raise ExplainError("--method: give at least one, e.g. --method grad_cam")
    out, seen = [], {}
    for text in texts:
        name, params = parse_method(text)
        spec = METHODS.get(name)
        if spec is None:
            raise ExplainError(f"--method: unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
        fn = getattr(cnnviz_fast, spec.function) if isinstance(spec.function, str) else spec.function
        sig = inspect.signature(fn)
        accepted = [p for p in list(sig.parameters)[3:] if sig.parameters[p].kind != inspect.Parameter.VAR_KEYWORD]
        unknown = [k for k in params if k not in accepted]
        if unknown and not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
            raise ExplainError(f"--method {name}: unknown parameter {unknown[0]!r}; accepted: {', '.join(accepted)}")
        if "layer" in sig.parameters and "layer" not in params:
            if sig.parameters["layer"].default is inspect.Parameter.empty:
                if model.cam_layer is None:
                    raise ExplainError(f"--method {name}: needs layer=NAME, e.g. {name}:layer="
                                       f"{_last_conv_block(model.module) or 'layer4'}")
                params["layer"] = model.cam_layer
        if isinstance(params.get("layer"), str):
            try:
                resolve_layer(model.module, params["layer"])
            except ValueError as err:
                raise ExplainError(f"--method {name}: {err}") from err
        seen[name] = seen.get(name, 0) + 1
        column = name if seen[name] == 1 else f"{name}_{seen[name]}"
        out.append(_Method(column, name, spec, fn, params))
    return out


def _last_conv_block(model: nn.Module):
    names = [n for n, m in model.named_modules() if n and "." not in n and
             any(isinstance(c, nn.Conv2d) for c in m.modules())]
    return names[-1] if names else None


def _run_method(method: _Method, model: nn.Module, x: torch.Tensor, target) -> torch.Tensor:
    """Maps ``[B, k, H, W]`` (float32) of one method for ``[B, k]`` targets."""
    import cnnviz_fast
    out = method.function(model, x, target, **method.params)
    if method.spec.output != "map":
        out = cnnviz_fast.to_map(out, method.spec.output)
    if out.dim() == 3:
        out = out[:, None]
    return out.detach().float()


# ----------------------------------------------------------------------------- the run

def _pair_floats(name, value, default):
    if value is None:
        return tuple(default)
    vals = tuple(float(v) for v in value)
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3 or any(not math.isfinite(v) for v in vals) or (name == "--std" and min(vals) <= 0):
        raise ExplainError(f"{name}: expected 1 or 3 finite numbers{' > 0' if name == '--std' else ''}, got {value}")
    return vals


def _versions() -> dict:
    from . import __version__
    out = {"cnnviz_fast": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for name in ("numpy", "safetensors", "pyarrow"):
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:
            out[name] = None
    return out


def _metric_functions(names):
    if not names:
        return {}
    try:
        metrics = importlib.import_module("cnnviz_fast.metrics")
    except ImportError as err:
        raise ExplainError(f"--metrics: cnnviz_fast.metrics is not available in this install ({err})") from err
    out = {}
    for name in names:
        fn = getattr(metrics, name, None)
        if not callable(fn):
            raise ExplainError(f"--metrics: unknown metric {name!r}; expected deletion, insertion")
        out[name] = fn
    return out


def explain_dataset(data, out, methods, model: str | None = None, weights=None, *, target="pred",
                    top_k: int = 1, size: int | None = None, crop: int | None = None, mean=None, std=None,
                    device=None, batch_size: int = 32, shard_size: int | None = None,
                    dtype: str = "float32", overlays: bool = False, metrics=(), metric_steps: int = 16,
                    workers: int = 2, overwrite: bool = False, progress: bool = True,
                    command: str | None = None, report: bool = True, log=None, ray=None, num_actors: int = 1,
                    num_gpus_per_actor: float = 0):
    """Explain every image of ``data`` with ``model`` by each method into the store ``out``.

    data: an image folder (recursive; first-level subfolders are the classes, as
    torchvision's ``ImageFolder``), a ``.csv`` (columns ``path`` and optional ``label``, or
    path,label rows without a header) or ``.txt`` (one path per line) list, relative paths
    from the list's folder, or a ``.pt`` / ``.npz`` file of images ``[N, C, H, W]`` (key
    ``images``, optional ``labels``; float in [0, 1] or uint8) used as they are.
    methods: strings ``"name[:key=value,...]"`` of ``METHODS`` (e.g. ``"grad_cam:layer=layer4"``,
    ``"occlusion:window=16,stride=8,mode='incremental'"``). model / weights: see ``load_model``.
    target: ``"pred"`` (the ``top_k`` best classes), ``"label"`` (the data's labels) or a class
    index. size / crop / mean / std: resize the shorter side to ``size``, centre-crop ``crop``,
    normalize; ImageNet's 256/224 and mean/std for external models, the default model's own
    64/64 and no normalization for it. dtype: ``"float32"`` or ``"float16"`` stored maps.
    shard_size: images per shard (a multiple of ``batch_size``; default ``8 * batch_size``).
    metrics: names in ``cnnviz_fast.metrics`` (``deletion``, ``insertion``), each called as
    ``f(model, x, target, saliency, steps=metric_steps) -> (curves, auc)``.

    ray: None (here), ``"auto"`` or a cluster address: the shards run on Ray actors
    (``cnnviz_fast.distributed``; ``num_actors`` of them, ``num_gpus_per_actor`` GPUs each),
    each shard in the same batches as here, so the store is the same.

    Returns ``Results`` (``open_results``). A store of the same configuration resumes after its
    last complete shard (on Ray: skips every complete shard); a different one raises
    ``ExplainError`` unless ``overwrite``.
    Unreadable images are skipped and listed in ``manifest.json`` and the report.
    """
    from tqdm import tqdm

    _store._need("safetensors.torch")
    _store._need("pyarrow.parquet")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ExplainError(f"--batch-size: expected an int >= 1, got {batch_size!r}")
    shard_size = 8 * batch_size if shard_size is None else shard_size
    if not isinstance(shard_size, int) or shard_size < 1 or shard_size % batch_size:
        raise ExplainError(f"--shard-size: expected a multiple of --batch-size {batch_size}, got {shard_size!r}")
    if not isinstance(top_k, int) or top_k < 1:
        raise ExplainError(f"--top-k: expected an int >= 1, got {top_k!r}")
    if dtype not in ("float32", "float16"):
        raise ExplainError(f"--dtype: expected float32 or float16, got {dtype!r}")
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        raise ExplainError(f"--device: {device!r} is not usable here: {err}") from err
    metric_fns = _metric_functions(list(metrics or ()))

    loaded = load_model(model, weights)
    size = loaded.size if size is None else size
    crop = min(size, loaded.crop) if crop is None else crop
    if size < 1 or crop < 1 or crop > size:
        raise ExplainError(f"--crop: expected 1 <= crop <= size, got size {size} and crop {crop}")
    mean, std = _pair_floats("--mean", mean, loaded.mean), _pair_floats("--std", std, loaded.std)
    items = load_data(data)
    if items.classes and loaded.class_names and set(items.classes) <= set(loaded.class_names):
        # folder names the model knows: labels become the model's class indices
        items.labels = [loaded.class_names.index(items.classes[v]) if v >= 0 else -1 for v in items.labels]
        items.classes = tuple(loaded.class_names)
    resolved = _resolve_methods(methods, loaded)
    net = loaded.module.to(device)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)

    # Probe: the model, targets and every method on one blank input, before any image is read.
    shape = tuple(items.tensors.shape[1:]) if items.tensors is not None else (3, crop, crop)
    # two samples, so a program exported with a fixed batch of 1 is caught here
    probe = ((torch.zeros(min(2, batch_size), *shape, device=device) - mean_t) / std_t)
    try:
        with torch.no_grad():
            logits = net(probe)
    except Exception as err:
        hint = " (export it with a dynamic batch dimension)" if loaded.kind == "export" else ""
        raise ExplainError(f"--model: the model rejected an input of shape {tuple(probe.shape)}{hint}: "
                           f"{type(err).__name__}: {err}") from err
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ExplainError(f"--model: expected [B, classes] outputs, got "
                           f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    n_classes = logits.shape[1]
    if target == "label":
        if any(v < 0 for v in items.labels):
            raise ExplainError(f"--target label: {sum(v < 0 for v in items.labels)} images of {data} have no label")
        if max(items.labels) >= n_classes:
            raise ExplainError(f"--target label: label {max(items.labels)} is out of range for a model with "
                               f"{n_classes} outputs")
    elif target != "pred":
        if isinstance(target, str) and target in loaded.class_names:
            target = loaded.class_names.index(target)
        try:
            target = int(target)
        except (TypeError, ValueError):
            raise ExplainError(f"--target: expected pred, label, a class index or name, got {target!r}") from None
        if not 0 <= target < n_classes:
            raise ExplainError(f"--target: class {target} is out of range for a model with {n_classes} outputs")
    if top_k > n_classes:
        raise ExplainError(f"--top-k: {top_k} is more than the model's {n_classes} classes")
    k = top_k if target == "pred" else 1
    for m in resolved:
        try:
            _run_method(m, net, probe[:1], torch.zeros(1, k, dtype=torch.long, device=device))
        except Exception as err:
            raise ExplainError(f"--method {m.name}: {type(err).__name__}: {err}") from err

    config = {"data": items.source or str(Path(data).resolve()), "n_items": len(items.keys), "model": _model_label(model),
              "model_kind": loaded.kind, "model_hash": loaded.hash,
              "methods": [[m.name, m.spec.function if isinstance(m.spec.function, str) else
                           getattr(m.spec.function, "__qualname__", repr(m.spec.function)), m.params]
                          for m in resolved],
              "target": target, "top_k": k, "size": size, "crop": crop, "mean": mean, "std": std,
              "device": str(device), "batch_size": batch_size, "shard_size": shard_size, "dtype": dtype,
              "metrics": sorted(metric_fns), "metric_steps": metric_steps}
    manifest = {"command": command, "versions": _versions(), "model_hash": loaded.hash,
                "class_names": list(loaded.class_names), "label_names": list(items.classes),
                "methods": {m.name: {"method": m.method, "signed": m.spec.signed, "params": m.params} for m in resolved},
                "complete": False}
    writer = _store.StoreWriter(out, config, manifest, overwrite)
    logger = _logger(writer.root, log)
    start_shard = writer.complete_shards()
    n = len(items.keys)
    store_dtype = torch.float16 if dtype == "float16" else torch.float32
    run = _Run(net, loaded, items, resolved, metric_fns, metric_steps, mean_t, std_t, target, k, store_dtype,
               writer.root if overlays else None, probe)
    run_start = time.perf_counter()
    if ray is not None:
        from .distributed import explain_shards_ray
        explain_shards_ray(ray, writer, logger, run, dict(model=model, weights=weights, size=size, crop=crop,
                           batch_size=batch_size, shard_size=shard_size), num_actors, num_gpus_per_actor, progress)
        return _finish(writer, logger, run, n, run_start, report)
    positions = list(range(start_shard * shard_size, n))
    logger.info("explain %d images (%d done in %d shards) into %s", n, min(n, start_shard * shard_size),
                start_shard, writer.root)
    loader = torch.utils.data.DataLoader(_Decoded(items, positions, size, crop), batch_size=batch_size,
                                         num_workers=workers, collate_fn=_collate,
                                         persistent_workers=False, prefetch_factor=4 if workers else None)
    bar = tqdm(total=n, initial=n - len(positions), unit="img", desc="explain", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    shard = _ShardBuffer(start_shard)
    for batch_positions, x01, bad, first in loader:
        number = first // shard_size
        if number != shard.number:
            shard.flush(writer, logger)
            shard = _ShardBuffer(number)
        run.explain(shard, logger, batch_positions, x01, bad)
        bar.update(len(batch_positions) + len(bad))
    shard.flush(writer, logger)
    bar.close()
    return _finish(writer, logger, run, n, run_start, report)


@dataclasses.dataclass
class _Run:
    """What every batch of a run needs; ``explain`` is the batch step of both this module's
    loop and the Ray actors (``cnnviz_fast.distributed``)."""
    net: nn.Module
    loaded: _Model
    items: _Data
    methods: list
    metric_fns: dict
    metric_steps: int
    mean_t: torch.Tensor
    std_t: torch.Tensor
    target: object
    k: int
    store_dtype: torch.dtype
    overlay_root: Path | None
    probe: torch.Tensor

    def repeat_probe(self) -> None:
        """The model and methods on the probe input, as ``explain_dataset`` runs them before its
        first batch: a Ray actor does it too, since a process's first pass through some PyTorch
        CPU kernels can round differently in the last bit (seen with integrated_gradients)."""
        with torch.no_grad():
            self.net(self.probe)
        for m in self.methods:  # as explain_dataset's probe runs them
            _run_method(m, self.net, self.probe[:1], torch.zeros(1, self.k, dtype=torch.long, device=self.probe.device))

    def explain(self, shard, logger, positions, x01, bad) -> None:
        """One decoded batch (``_collate``'s output) into ``shard``."""
        for pos, reason in bad:
            shard.skipped.append([_name(self.items, pos), reason])
            logger.warning("skipped %s: %s", _name(self.items, pos), reason)
        if x01 is not None:
            _explain_batch(shard, self.net, self.items, self.methods, self.metric_fns,
                           self.metric_steps, positions, x01.to(self.mean_t.device), self.mean_t, self.std_t,
                           self.target, self.k, self.store_dtype, self.overlay_root)


def _finish(writer, logger, run: _Run, n: int, run_start: float, report: bool):
    names = [m.name for m in run.methods]
    results = writer.finish(names, {"seconds": _method_seconds(writer.root, names), "images": n,
                                    "last_run_seconds": time.perf_counter() - run_start})
    logger.info("done: %d index rows, %d skipped", len(results), len(results.manifest["skipped"]))
    if report:
        from .report import results_report
        results_report(results).write(writer.root / "report.html")
    for handler in list(logger.handlers):  # the log file is closed with the run
        logger.removeHandler(handler)
        if isinstance(handler, logging.FileHandler):
            handler.close()
    return results


def _name(items: _Data, pos: int) -> str:
    return items.names[pos] if items.names else items.keys[pos]


def _logger(root: Path, extra_handler):
    logger = logging.getLogger(f"cnnviz_fast.explain.{root}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    # A log is appended to as the run goes, so it is the one file not written atomically.
    handler = logging.FileHandler(root / "explain.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    if extra_handler is not None:
        logger.addHandler(extra_handler)
    return logger


class _ShardBuffer:
    def __init__(self, number: int):
        self.number, self.maps, self.inputs, self.records, self.skipped, self.seconds = number, {}, [], [], [], {}

    def flush(self, writer, logger) -> None:
        if not self.records and not self.skipped:
            return
        maps = {name: torch.cat(parts) for name, parts in self.maps.items()}
        maps[_store.INPUTS] = torch.cat(self.inputs) if self.inputs else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
        writer.write_shard(self.number, maps, self.records, self.skipped, self.seconds)
        logger.info("shard %05d: %d images, %d skipped", self.number, len(self.records), len(self.skipped))


def _thumbnails(x01: torch.Tensor) -> torch.Tensor:
    side = max(x01.shape[-2:])
    if side > _THUMBNAIL:
        x01 = torch.nn.functional.interpolate(x01, scale_factor=_THUMBNAIL / side, mode="bilinear",
                                              antialias=True, align_corners=False)
    return (x01.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def _explain_batch(shard, net, items, methods, metric_fns, metric_steps, positions, x01, mean_t, std_t,
                   target, k, store_dtype, overlay_root):
    x = (x01 - mean_t) / std_t
    done = {}
    logits = None
    if target == "pred" and k == 1 and methods[0].spec.one_forward:
        picker, before = _Predicted(), dict(shard.seconds)
        done[methods[0].name] = _timed(shard, methods[0], net, x, picker)
        if len(picker.outputs) == 1 and picker.outputs[0].shape[0] == len(x):
            logits = picker.outputs[0]
        else:  # the method split the batch: redo it with fixed targets below, timed again
            done.clear()
            shard.seconds = before
    if logits is None:
        with torch.no_grad():
            logits = net(x)
    probs = logits.float().softmax(1)
    score, pred = probs.max(1)
    if target == "pred":
        targets = probs.topk(k, dim=1).indices
    elif target == "label":
        targets = torch.tensor([items.labels[p] for p in positions], device=x.device)[:, None]
    else:
        targets = torch.full((len(positions), 1), target, dtype=torch.long, device=x.device)
    target_scores = probs.gather(1, targets)
    shard.inputs.append(_thumbnails(x01))
    metric_values = {}
    for m in methods:
        maps = done[m.name] if m.name in done else _timed(shard, m, net, x, targets)
        shard.maps.setdefault(m.name, []).append(maps.flatten(0, 1).to(store_dtype).cpu())
        for metric, fn in metric_fns.items():
            aucs = [torch.as_tensor(fn(net, x, targets[:, j], maps[:, j], steps=metric_steps)[1]).float().cpu()
                    for j in range(k)]
            metric_values.setdefault(m.name, {})[metric] = torch.stack(aucs, 1).tolist()
        if overlay_root is not None:
            _write_overlays(overlay_root / "overlays" / m.name, m.spec.signed, x01, maps, positions, items)
    for i, pos in enumerate(positions):
        shard.records.append({
            "path": _name(items, pos), "label": items.labels[pos], "prediction": int(pred[i]),
            "score": float(score[i]), "targets": targets[i].tolist(), "target_scores": target_scores[i].tolist(),
            **({"metrics": {name: {metric: v[i] for metric, v in per.items()} for name, per in
                            metric_values.items()}} if metric_values else {})})


class _Predicted:
    """A callable target: each sample's top class, with the outputs it saw kept, so that a
    method's own forward pass gives the predictions."""

    def __init__(self):
        self.outputs = []

    def __call__(self, output):
        self.outputs.append(output.detach())
        return output.gather(1, output.detach().argmax(1, keepdim=True))[:, 0]


def _timed(shard, method, net, x, target) -> torch.Tensor:
    start = time.perf_counter()
    maps = _run_method(method, net, x, target)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    shard.seconds[method.name] = shard.seconds.get(method.name, 0.0) + time.perf_counter() - start
    return maps


def _write_overlays(folder: Path, signed: bool, x01, maps, positions, items) -> None:
    from .viz import heat_overlay, save_image
    for j in range(maps.shape[1]):
        pictures = heat_overlay(x01, maps[:, j], signed)
        for i, pos in enumerate(positions):
            stem = Path(_name(items, pos)).stem.replace("#", "_")
            save_image(pictures[i], folder / f"{pos:06d}_{stem}_{j}.png")


def _method_seconds(root: Path, names) -> dict:
    totals = dict.fromkeys(names, 0.0)
    for p in sorted((root / _store.SHARDS).glob("*.json")):
        for name, s in json.loads(p.read_text())["seconds"].items():
            totals[name] = totals.get(name, 0.0) + s
    return totals
