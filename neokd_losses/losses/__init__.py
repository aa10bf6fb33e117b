"""Loss functions and modules: NEO-KD, its two distillation terms, the paper's baselines,
and the related boundary-distillation plug-ins (BSS, activation boundaries)."""

from .activation_boundary import (
    ActivationBoundaryLoss,
    FeatureRecorder,
    ab_connector,
    activation_boundary_loss,
)
from .baselines import ARDLoss, SKDLoss, TripleWinsLoss, ard_loss, skd_loss, triple_wins_loss
from .bss import BSSDistillationLoss, bss_kd_loss, bss_weight_schedule
from .lw import LWLoss, exit_classifiers, lw_loss
from .neighbor import NeighborKD, neighbor_kd, neighbor_weights
from .neokd import NEOKDLoss, NEOKDTerms, neokd_loss
from .orthogonal import ExitwiseOrthogonalKD, exitwise_orthogonal_kd, orthogonal_label_mask

__all__ = [
    "ARDLoss",
    "ActivationBoundaryLoss",
    "BSSDistillationLoss",
    "ExitwiseOrthogonalKD",
    "FeatureRecorder",
    "LWLoss",
    "NEOKDLoss",
    "NEOKDTerms",
    "NeighborKD",
    "SKDLoss",
    "TripleWinsLoss",
    "ab_connector",
    "activation_boundary_loss",
    "ard_loss",
    "bss_kd_loss",
    "bss_weight_schedule",
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
