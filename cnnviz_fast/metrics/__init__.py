"""Explainer benchmarking metrics (``from cnnviz_fast import metrics``).

Faithfulness (the model's score under perturbation, streamed through the model in large
batches): ``pixel_flipping``, ``region_perturbation``, ``deletion``, ``insertion``, ``auc``,
``faithfulness_correlation``. Localisation on ground-truth masks: ``pointing_game``,
``energy_pointing_game``, ``relevance_mass_accuracy``, ``relevance_rank_accuracy``,
``attribution_localisation``. Complexity: ``sparseness``, ``complexity``. Randomisation
sanity checks: ``model_randomization``, ``random_logit``. Each docstring names its paper, the
peer it equals (mostly Quantus 0.6) and any documented difference.
"""
from .complexity import complexity, sparseness
from .faithfulness import (auc, deletion, faithfulness_correlation, insertion, pixel_flipping,
                           region_perturbation)
from .localisation import (attribution_localisation, energy_pointing_game, pointing_game,
                           relevance_mass_accuracy, relevance_rank_accuracy)
from .randomisation import model_randomization, random_logit

__all__ = ["pixel_flipping", "region_perturbation", "deletion", "insertion", "auc", "faithfulness_correlation",
           "pointing_game", "energy_pointing_game", "relevance_mass_accuracy", "relevance_rank_accuracy",
           "attribution_localisation", "sparseness", "complexity", "model_randomization", "random_logit"]
