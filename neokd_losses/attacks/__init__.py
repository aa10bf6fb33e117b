"""Adversarial attacks with the torchattacks API: ``MultiExitPGD``, ``ExitView``, BSS.

``MultiExitPGD`` runs the single, average and max-average PGD attacks of Triple Wins /
NEO-KD against a model that returns a list of E exit logits; ``ExitView`` exposes one
exit as a single-output model so any stock torchattacks attack can target it;
``BoundarySupportingAttack`` crafts the boundary-supporting samples of BSS distillation.
"""

from neokd_losses.attacks.autoattack import exit_autoattack
from neokd_losses.attacks.boundary import BoundarySupportingAttack, BoundarySupportingSamples
from neokd_losses.attacks.exit_view import ExitView
from neokd_losses.attacks.pgd import MultiExitPGD

__all__ = [
    "BoundarySupportingAttack",
    "BoundarySupportingSamples",
    "ExitView",
    "MultiExitPGD",
    "exit_autoattack",
]
