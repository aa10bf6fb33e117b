"""neokd-losses: NEO-KD adversarial training for any multi-exit network.

A multi-exit model is anything whose ``forward`` returns a list or tuple of E exit logits
tensors (B, K). This package provides the NEO-KD losses (neighbour and exit-wise
orthogonal knowledge distillation, Ham et al., NeurIPS 2023) as functions and modules.
Functional forms live in :mod:`neokd_losses.functional`.
"""

from .losses import (
    ExitwiseOrthogonalKD,
    NeighborKD,
    NEOKDLoss,
    NEOKDTerms,
    orthogonal_label_mask,
)

__all__ = [
    "ExitwiseOrthogonalKD",
    "NEOKDLoss",
    "NEOKDTerms",
    "NeighborKD",
    "__version__",
    "orthogonal_label_mask",
]

__version__ = "0.1.0"
