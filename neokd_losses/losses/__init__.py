"""Loss functions and modules: NEO-KD, its two distillation terms and the paper's baselines.

The related boundary-distillation plug-ins (BSS, activation boundaries) live in
:mod:`neokd_losses.distill`."""

from .baselines import ARDLoss, SKDLoss, TripleWinsLoss, ard_loss, skd_loss, triple_wins_loss
from .lw import LWLoss, exit_classifiers, lw_loss
from .neighbor import NeighborKD, neighbor_kd, neighbor_weights
from .neokd import NEOKDLoss, NEOKDTerms, neokd_loss
from .orthogonal import ExitwiseOrthogonalKD, exitwise_orthogonal_kd, orthogonal_label_mask

__all__ = [
    "ARDLoss",
    "ExitwiseOrthogonalKD",
    "LWLoss",
    "NEOKDLoss",
    "NEOKDTerms",
    "NeighborKD",
    "SKDLoss",
    "TripleWinsLoss",
    "ard_loss",
    "exit_classifiers",
    "exitwise_orthogonal_kd",
    "lw_loss",
    "neighbor_kd",
    "neighbor_weights",
    "neokd_loss",
    "orthogonal_label_mask",
    "skd_loss",
    "triple_wins_loss",
]
