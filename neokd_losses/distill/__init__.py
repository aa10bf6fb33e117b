"""Boundary-distillation plug-ins: BSS and activation-boundary (AB) transfer.

These are related knowledge-distillation methods (Heo et al., AAAI 2019), not part of
NEO-KD: knowledge distillation with boundary-supporting samples (``bss_kd_loss``,
``BSSDistillationLoss``, with the samples crafted by ``BoundarySupportingAttack``) and
activation-boundary transfer between hidden layers (``activation_boundary_loss``,
``ActivationBoundaryLoss``, ``ab_connector``, ``FeatureRecorder``). Both plug into a
multi-exit student. The most used names are also importable from the top level
``neokd_losses`` and, for the functions, from ``neokd_losses.functional``.
"""

from neokd_losses.distill.activation_boundary import (
    ActivationBoundaryLoss,
    FeatureRecorder,
    ab_connector,
    activation_boundary_loss,
)
from neokd_losses.distill.boundary import BoundarySupportingAttack, BoundarySupportingSamples
from neokd_losses.distill.bss import BSSDistillationLoss, bss_kd_loss, bss_weight_schedule

__all__ = [
    "ActivationBoundaryLoss",
    "BSSDistillationLoss",
    "BoundarySupportingAttack",
    "BoundarySupportingSamples",
    "FeatureRecorder",
    "ab_connector",
    "activation_boundary_loss",
    "bss_kd_loss",
    "bss_weight_schedule",
]
