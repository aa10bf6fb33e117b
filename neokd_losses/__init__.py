"""neokd-losses: NEO-KD adversarial training for any multi-exit network.

A multi-exit model is anything whose ``forward`` returns a list or tuple of E exit logits
tensors (B, K). The top level holds the small, stable API: the NEO-KD losses (neighbor
and exit-wise orthogonal knowledge distillation, Ham et al., NeurIPS 2023), the paper's
baseline losses, the multi-exit attacks, and the boundary-distillation plug-ins
(:mod:`neokd_losses.distill`).
Functional forms live in :mod:`neokd_losses.functional`, evaluation in
:mod:`neokd_losses.evaluation`, architectures in :mod:`neokd_losses.models`.

Example:
    >>> import torch
    >>> from neokd_losses import MultiExitPGD, NEOKDLoss
    >>> from neokd_losses.models import SmallCNN
    >>> model = SmallCNN()
    >>> images, labels = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    >>> adv = MultiExitPGD(model, eps=0.3, alpha=0.1, steps=2)(images, labels)
    >>> loss = NEOKDLoss()(model(adv), model(images), labels)
    >>> loss.backward()
"""

from .attacks import ExitPolicyAttack, ExitView, MultiExitAPGD, MultiExitPGD, SlowdownAttack
from .distill import (
    ActivationBoundaryLoss,
    BoundarySupportingAttack,
    BSSDistillationLoss,
    ab_connector,
    activation_boundary_loss,
    bss_kd_loss,
)
from .inference import EarlyExitClassifier, run_until
from .losses import (
    ARDLoss,
    ExitwiseOrthogonalKD,
    LWLoss,
    NeighborKD,
    NEOKDLoss,
    NEOKDTerms,
    SKDLoss,
    TripleWinsLoss,
    orthogonal_label_mask,
)

__all__ = [
    "ARDLoss",
    "ActivationBoundaryLoss",
    "BSSDistillationLoss",
    "BoundarySupportingAttack",
    "EarlyExitClassifier",
    "ExitPolicyAttack",
    "ExitView",
    "ExitwiseOrthogonalKD",
    "LWLoss",
    "MultiExitAPGD",
    "MultiExitPGD",
    "NEOKDLoss",
    "NEOKDTerms",
    "NeighborKD",
    "SKDLoss",
    "SlowdownAttack",
    "TripleWinsLoss",
    "__version__",
    "ab_connector",
    "activation_boundary_loss",
    "bss_kd_loss",
    "orthogonal_label_mask",
    "run_until",
]

__version__ = "0.1.0"
