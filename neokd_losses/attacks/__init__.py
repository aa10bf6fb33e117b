"""Adversarial attacks with the torchattacks API: ``MultiExitPGD`` and ``ExitView``.

``MultiExitPGD`` runs the single, average and max-average PGD attacks of Triple Wins /
NEO-KD against a model that returns a list of E exit logits; ``ExitView`` exposes one
exit as a single-output model so any stock torchattacks attack can target it. The
``BoundarySupportingAttack`` of BSS distillation lives in :mod:`neokd_losses.distill`.
"""

from neokd_losses.attacks.apgd import MultiExitAPGD, multi_exit_apgd
from neokd_losses.attacks.autoattack import exit_autoattack
from neokd_losses.attacks.exit_view import ExitView
from neokd_losses.attacks.pgd import MultiExitPGD
from neokd_losses.attacks.policy import ExitPolicyAttack, deployed_decision
from neokd_losses.attacks.slowdown import SlowdownAttack

__all__ = [
    "ExitPolicyAttack",
    "ExitView",
    "MultiExitAPGD",
    "MultiExitPGD",
    "SlowdownAttack",
    "deployed_decision",
    "exit_autoattack",
    "multi_exit_apgd",
]
