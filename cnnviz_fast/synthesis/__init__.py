"""Synthesis: images made by optimizing the input (feature visualization, inversion, Gram
methods) and the filters of the first layers."""
from .filters import filter_grid
from .gram_methods import style_transfer, texture_synthesis
from .inversion import feature_inversion, total_variation
from ._loop import Synthesis
from .visualization import class_visualization, feature_visualization

__all__ = ["Synthesis", "class_visualization", "feature_inversion", "feature_visualization", "filter_grid",
           "style_transfer", "texture_synthesis", "total_variation"]
