"""cnnviz-fast: compiled-kernel engine for CNN visualization and explanation.

Importing the package never imports triton and never touches CUDA; Triton kernels load
lazily when a CUDA tensor (or ``TRITON_INTERPRET=1``) calls for them.
"""
from ._backend import backends
from ._hooks import resolve_layer
from .explain.activations import TopKPatches, TopKResult, activation_grid, layer_activations, top_k_patches
from .explain.cam import cam, grad_cam, grad_cam_pp, layer_cam, score_cam
from .explain.feature_plots import embedding_plot, neighbours_grid
from .explain.features import Embeddings, FeatureIndex, Neighbours, embed, pca, tsne
from .explain.gradients import (deconvnet, deeplift, guided_backprop, integrated_gradients, saliency,
                                 smoothgrad, to_map)
from .explain.lrp import lrp
from .explain.occlusion import occlusion
from .explain.patches import Patches, crop_patches, patch_grid
from .explain.receptive import ReceptiveField, receptive_field
from .ops import cam_combine, channel_topk_update, upsample_normalize
from .pipeline import explain_dataset, register_method
from .store import open_results

__version__ = "0.1.0"

__all__ = [
    # plumbing and shared ops
    "backends", "resolve_layer", "upsample_normalize",
    # CAM family
    "cam", "cam_combine", "grad_cam", "grad_cam_pp", "layer_cam", "score_cam",
    # occlusion
    "occlusion",
    # gradient and relevance attributions
    "saliency", "to_map", "guided_backprop", "deconvnet", "smoothgrad", "integrated_gradients",
    "deeplift", "lrp",
    # activation investigation
    "channel_topk_update", "layer_activations", "activation_grid", "receptive_field",
    "ReceptiveField", "TopKPatches", "TopKResult", "top_k_patches", "crop_patches",
    "patch_grid", "Patches",
    # feature space
    "Embeddings", "FeatureIndex", "Neighbours", "embed", "pca", "tsne", "embedding_plot", "neighbours_grid",
    # datasets into a result store
    "explain_dataset", "register_method", "open_results",
]
