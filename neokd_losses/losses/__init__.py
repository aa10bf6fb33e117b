"""Loss functions and modules: NEO-KD, its two distillation terms, and the baselines."""

from .neighbor import NeighborKD, neighbor_kd, neighbor_weights
from .neokd import NEOKDLoss, NEOKDTerms, neokd_loss
from .orthogonal import ExitwiseOrthogonalKD, exitwise_orthogonal_kd, orthogonal_label_mask

__all__ = [
    "ExitwiseOrthogonalKD",
    "NEOKDLoss",
    "NEOKDTerms",
    "NeighborKD",
    "exitwise_orthogonal_kd",
    "neighbor_kd",
    "neighbor_weights",
    "neokd_loss",
    "orthogonal_label_mask",
]
