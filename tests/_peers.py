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


def import_zennit():
    """The ``zennit`` package, or None when it is not installed (tests then skip)."""
    if importlib.util.find_spec("zennit") is None:
        return None
    try:
        import torchvision  # noqa: F401
    except Exception:  # any failure to load it (missing, or built against another torch)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]  # drop what the failed import left half-initialised
        _install_torchvision_stand_in()
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
