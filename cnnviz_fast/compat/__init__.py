"""Drop-in faces of other explanation libraries over cnnviz-fast's engine.

``cnnviz_fast.compat.captum``: Captum's attribution classes (``from captum.attr import X`` ->
``from cnnviz_fast.compat.captum import X``). ``cnnviz_fast.compat.pytorch_grad_cam``:
pytorch-grad-cam's CAM classes, targets and ``show_cam_on_image``. Neither imports the
original package; the submodules load on first use.
"""
__all__ = ["captum", "pytorch_grad_cam"]
