"""Peer libraries the tests compare against, imported so that they load on this machine.

zennit (the LRP reference) cannot be imported as is here: ``zennit/__init__.py`` imports
``zennit.torchvision``, whose first line is ``from torchvision.models.resnet import Bottleneck,
BasicBlock``, and torchvision cannot load against the CPU-only torch build of this project (and
must never be a dependency: the Makefile installs zennit with ``--no-deps``). zennit only needs
the two block classes, to recognise ResNet blocks in its ``ResNetCanonizer``. So, only when
``import torchvision`` fails, :func:`import_zennit` puts a minimal stand-in tree ``torchvision``,
``torchvision.models``, ``torchvision.models.resnet`` into ``sys.modules`` whose ``BasicBlock`` and
``Bottleneck`` are the project's torchvision-compatible blocks (``cnnviz_fast.models``), so that
zennit's canonizer recognises the project's ResNets; then it imports zennit.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def _install_torchvision_stand_in() -> None:
    from cnnviz_fast.models import BasicBlock, Bottleneck

    root = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")
    resnet = types.ModuleType("torchvision.models.resnet")
    resnet.BasicBlock, resnet.Bottleneck = BasicBlock, Bottleneck
    root.models, models.resnet = models, resnet
    root.__cnnviz_stand_in__ = True
    sys.modules.update({"torchvision": root, "torchvision.models": models,
                        "torchvision.models.resnet": resnet})


def _torchvision_or_stand_in():
    """The real torchvision where it loads, else the stand-in tree; returns the module."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # any failure to load it (missing, or built against another torch)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]  # drop what the failed import left half-initialised
        _install_torchvision_stand_in()
    return sys.modules["torchvision"]


def import_zennit():
    """The ``zennit`` package, or None when it is not installed (tests then skip)."""
    if importlib.util.find_spec("zennit") is None:
        return None
    _torchvision_or_stand_in()
    return importlib.import_module("zennit")


def import_quantus():
    """The ``quantus`` package, or None when it is not installed (tests then skip).

    Quantus 0.6 imports ``cv2`` at import time for its rotation and translation perturbations
    only (OpenCV is not installed here, and the metrics we compare with never call it), and
    zennit through its explainers: an empty ``cv2`` stand-in goes into ``sys.modules`` only
    when ``import cv2`` fails, and zennit comes from :func:`import_zennit`.
    """
    if importlib.util.find_spec("quantus") is None:
        return None
    try:
        import cv2  # noqa: F401
    except ImportError:
        sys.modules["cv2"] = types.ModuleType("cv2")
    import_zennit()
    return importlib.import_module("quantus")


def _install_lucent_stand_ins() -> None:
    """Lucent's ``optvis.transform`` imports ``torchvision.transforms.Normalize`` and kornia at
    module level; the agreement tests pass ``transforms=[]`` and ``preprocess=False``, so these
    are never called. The stand-ins raise if they ever are."""
    def unused(name):
        def fail(*_args, **_kwargs):
            raise NotImplementedError(f"{name} is a test stand-in; Lucent called it unexpectedly")
        return fail

    torchvision = sys.modules.get("torchvision") or _torchvision_or_stand_in()
    if getattr(torchvision, "__cnnviz_stand_in__", False) and "torchvision.transforms" not in sys.modules:
        transforms = types.ModuleType("torchvision.transforms")
        transforms.Normalize = unused("torchvision.transforms.Normalize")
        torchvision.transforms = transforms
        sys.modules["torchvision.transforms"] = transforms
    if "kornia" not in sys.modules and importlib.util.find_spec("kornia") is None:
        kornia = types.ModuleType("kornia")
        geometry = types.ModuleType("kornia.geometry")
        transform = types.ModuleType("kornia.geometry.transform")
        kornia.__version__ = "0.0.0-stand-in"
        transform.translate = unused("kornia.geometry.transform.translate")
        kornia.get_rotation_matrix2d = unused("kornia.get_rotation_matrix2d")
        kornia.warp_affine = unused("kornia.warp_affine")
        kornia.geometry, geometry.transform = geometry, transform
        sys.modules.update({"kornia": kornia, "kornia.geometry": geometry, "kornia.geometry.transform": transform})


def import_lucent():
    """``lucent.optvis`` (render, param, objectives), or None when torch-lucent or one of its
    imports is missing (tests then skip); torchvision and kornia get stand-ins where they do
    not load."""
    if importlib.util.find_spec("lucent") is None:
        return None
    _install_lucent_stand_ins()
    try:
        return importlib.import_module("lucent.optvis.render"), importlib.import_module("lucent.optvis.param"), \
            importlib.import_module("lucent.optvis.objectives")
    except ImportError:  # one of its own imports (decorator, IPython) is missing: skip as absent
        return None


def _install_torchvision_for_grad_cam() -> None:
    """What pytorch-grad-cam 1.5.7 imports from torchvision at import time: transforms
    (``Compose``, ``Normalize``, ``ToTensor``, ``functional.resize``) and ``ops.box_iou``. The
    tests call none of them except ``box_iou`` (FasterRCNNBoxScoreTarget), given here by the
    compat module's own, so the comparison is not with a copy of ourselves anywhere else."""
    from cnnviz_fast.compat.pytorch_grad_cam import _box_iou

    root = sys.modules["torchvision"]
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    ops = types.ModuleType("torchvision.ops")

    def unavailable(*_args, **_kwargs):
        raise RuntimeError("torchvision stand-in: not available in the tests")

    transforms.Compose = transforms.Normalize = transforms.ToTensor = functional.resize = unavailable
    transforms.functional, ops.box_iou = functional, _box_iou
    root.transforms, root.ops = transforms, ops
    sys.modules.update({"torchvision.transforms": transforms, "torchvision.transforms.functional": functional,
                        "torchvision.ops": ops})


def import_pytorch_grad_cam():
    """The ``pytorch_grad_cam`` package, or None when it (or OpenCV / ttach, which it imports) is
    not installed. Without a loadable torchvision a stand-in tree is put in place first."""
    if any(importlib.util.find_spec(m) is None for m in ("pytorch_grad_cam", "cv2", "ttach")):
        return None
    if getattr(_torchvision_or_stand_in(), "__cnnviz_stand_in__", False):
        _install_torchvision_for_grad_cam()
    return importlib.import_module("pytorch_grad_cam")
