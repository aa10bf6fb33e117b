"""Functional forms of the losses (pure functions of logits or features) and of the attacks.

Example:
    >>> import torch
    >>> from neokd_losses.functional import neokd_loss
    >>> clean = [torch.randn(4, 10) for _ in range(3)]
    >>> adv = [torch.randn(4, 10) for _ in range(3)]
    >>> neokd_loss(adv, clean, torch.tensor([0, 1, 2, 3])).shape
    torch.Size([])
"""

from .attacks._pgd_core import multi_exit_pgd
from .distill.activation_boundary import activation_boundary_loss
from .distill.bss import bss_kd_loss, bss_weight_schedule
from .losses.baselines import ard_loss, skd_loss, triple_wins_loss
from .losses.lw import exit_classifiers, lw_loss
from .losses.neighbor import neighbor_kd, neighbor_weights
from .losses.neokd import neokd_loss
from .losses.orthogonal import exitwise_orthogonal_kd, orthogonal_label_mask

__all__ = [
    "activation_boundary_loss",
    "ard_loss",
    "bss_kd_loss",
    "bss_weight_schedule",
    "exit_classifiers",
    "exitwise_orthogonal_kd",
    "lw_loss",
    "multi_exit_pgd",
    "neighbor_kd",
    "neighbor_weights",
    "neokd_loss",
    "orthogonal_label_mask",
    "skd_loss",
    "triple_wins_loss",
]
