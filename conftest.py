"""Doctest namespace shared by every docstring example of the package.

Docstring examples use ``TwoExits``, a toy two-exit model, without defining it; it is
defined once here (and shown in the API reference's introduction) instead of in every
docstring.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn


class TwoExits(nn.Module):
    """A toy two-exit model: two linear exits on the flattened input, the second after tanh.

    Args:
        in_features: number of input features (the flattened size of one sample).
        num_classes: K, the number of classes of both exits.
    """

    def __init__(self, in_features: int = 4, num_classes: int = 3) -> None:
        super().__init__()
        self.a = nn.Linear(in_features, num_classes)
        self.b = nn.Linear(in_features, num_classes)

    def forward(self, x: Tensor) -> list[Tensor]:
        h = x.flatten(1)
        return [self.a(h), self.b(torch.tanh(h))]


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace: dict[str, Any]) -> None:
    doctest_namespace["TwoExits"] = TwoExits
    doctest_namespace["torch"] = torch
    doctest_namespace["nn"] = nn
