"""Model factories for the ``cnnviz explain`` tests (``--model tests._explain_models:tiny``)."""
import os
import time

import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                                      nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def tiny():
    torch.manual_seed(0)
    return Tiny()


class Slow(Tiny):
    """Sleeps in each forward (CNNVIZ_TEST_SLEEP seconds) so a test can kill a run midway."""

    def forward(self, x):
        time.sleep(float(os.environ.get("CNNVIZ_TEST_SLEEP", "0")))
        return super().forward(x)


def slow():
    torch.manual_seed(0)
    return Slow()


def broken():
    raise RuntimeError("no weights here")


def scouter_negative():
    """The shipped SCOUTER- model of the shapes data, as a factory for ``--model``."""
    from cnnviz_fast.models import shapes_scouter
    return shapes_scouter(positive=False)
