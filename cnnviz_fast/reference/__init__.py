"""Reference implementations in plain PyTorch: the definition of correct for every fast op."""
from .upsample import upsample_normalize_ref

__all__ = ["upsample_normalize_ref"]

from .occlusion import occlusion_copies_ref, occlusion_scatter_ref  # noqa: E402

__all__ += ["occlusion_copies_ref", "occlusion_scatter_ref"]

from .incremental import incremental_gather_ref  # noqa: E402

__all__ += ["incremental_gather_ref"]
