"""Slow-down attacks: make a deployed early-exit classifier spend its whole compute budget.

An early-exit network saves compute by letting confident samples leave early. An attacker
who lowers every exit's confidence sends every sample to the last exit (DeepSloth, Hong
et al., ICLR 2021): the answer may stay right while the saving is gone.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from neokd_losses._exits import stack_exits
from neokd_losses._validation import check_real
from neokd_losses.attacks._adapter import MultiExitAttack
from neokd_losses.attacks.pgd import ThreatModel
from neokd_losses.attacks.policy import (
    Thresholds,
    check_pgd_arguments,
    check_thresholds,
    deployed_decision,
    tracked_pgd,
)

__all__ = ["SlowdownAttack", "SlowdownObjective"]

SlowdownObjective = Literal["uniform", "hinge"]
"""``"uniform"``: every exit toward the uniform distribution; ``"hinge"``: every early
exit's confidence below its threshold."""


class SlowdownAttack(MultiExitAttack):
    r"""PGD that pushes samples to later exits of a deployed early-exit classifier.

    - ``objective="uniform"`` (DeepSloth-style): minimize
      :math:`\sum_k \mathrm{KL}(p_k \,\|\, u)` over all exits, u the uniform distribution
      (equivalently, maximize the summed entropy). Needs no thresholds.
    - ``objective="hinge"``: minimize
      :math:`\sum_{k<E} \max(0, \max_c p_{k,c} - T_k + m)`, which stops as soon as every
      early exit's confidence is ``margin`` m below its threshold T_k (thresholds are
      clipped to [0, 1] inside the hinge: a threshold of −∞ cannot be avoided).

    With ``thresholds``, every iterate (the clean point included) is judged by the exit the deployed network would
    use (:func:`~neokd_losses.attacks.policy.deployed_decision`): each sample keeps
    the iterate that reaches the latest exit, the objective breaking ties; without them, the
    iterate of best objective. The labels are accepted for the torchattacks API and
    ignored.

    Args:
        model: multi-exit ``nn.Module`` returning E logits (B, K).
        thresholds: the deployed thresholds (E,), or None (``"uniform"`` only).
        objective: ``"uniform"`` or ``"hinge"``.
        eps: as in :class:`~neokd_losses.attacks.policy.ExitPolicyAttack`.
        alpha: as in :class:`~neokd_losses.attacks.policy.ExitPolicyAttack`.
        steps: as in :class:`~neokd_losses.attacks.policy.ExitPolicyAttack`.
        norm: as in :class:`~neokd_losses.attacks.policy.ExitPolicyAttack`.
        restarts: as in :class:`~neokd_losses.attacks.policy.ExitPolicyAttack`.
        generator: as in :class:`~neokd_losses.attacks.policy.ExitPolicyAttack`.
        margin: m ≥ 0 of the hinge.

    Raises:
        TypeError, ValueError: for wrong arguments, ``"hinge"`` without thresholds, or
            (at call time) thresholds that do not match the model's exits.

    Shape:
        - images: (B, ...) in [0, 1]; labels: (B,) (ignored); output: (B, ...).

    Example:
        >>> model = TwoExits(in_features=4, num_classes=3)
        >>> atk = SlowdownAttack(model, [0.6, 0.0], objective="hinge", eps=0.1, alpha=0.03, steps=5)
        >>> x, y = torch.rand(5, 4), torch.zeros(5, dtype=torch.long)
        >>> bool((atk(x, y) - x).abs().max() <= 0.1 + 1e-6)
        True
    """

    def __init__(
        self,
        model: nn.Module,
        thresholds: Thresholds | None = None,
        objective: SlowdownObjective = "uniform",
        eps: float = 8 / 255,
        alpha: float = 2 / 255,
        steps: int = 50,
        norm: ThreatModel = "Linf",
        margin: float = 0.05,
        restarts: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__("SlowdownAttack", model)
        self.eps, self.alpha, self.steps, self.restarts = check_pgd_arguments(
            eps, alpha, steps, norm, restarts, generator
        )
        self.norm: ThreatModel = norm
        if objective not in ("uniform", "hinge"):
            raise ValueError(f"`objective` must be 'uniform' or 'hinge', got {objective!r}.")
        if objective == "hinge" and thresholds is None:
            raise ValueError(
                "objective='hinge' pushes each exit's confidence below its threshold: pass "
                "`thresholds` (E,), or use objective='uniform'."
            )
        self.objective: SlowdownObjective = objective
        self.thresholds = (
            None
            if thresholds is None
            else tuple(check_thresholds(thresholds, len(thresholds)).tolist())
        )
        self.margin = check_real(margin, "margin", low=0.0)
        self._generator = generator

    def slowdown_objective(self, logits: Tensor) -> Tensor:
        """The objective ascended for every row (N,) from stacked logits (E, N, K)."""
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        log_p = logits.log_softmax(-1)
        if self.objective == "uniform":
            kl = (log_p.exp() * (log_p + math.log(logits.shape[-1]))).sum(-1)  # (E, N)
            return -kl.sum(0)
        assert self.thresholds is not None
        t = check_thresholds(self.thresholds, logits.shape[0]).to(logits).clamp(0.0, 1.0)
        confidence = log_p.exp().amax(-1)[:-1]
        return -torch.relu(confidence - t[:-1, None] + self.margin).sum(0)

    def _attack(self, images: Tensor, labels: Tensor) -> Tensor:
        with torch.no_grad():
            clean = stack_exits(self.get_exit_logits(images), name="model output")
        if self.thresholds is not None:
            check_thresholds(self.thresholds, clean.shape[0])
        thresholds = self.thresholds

        def objective(logits: Tensor, y: Tensor, step: int, run: int) -> Tensor:
            return self.slowdown_objective(logits)

        def score(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            value = self.slowdown_objective(logits)
            if thresholds is None:
                return value, torch.zeros_like(value)
            exit_index, _ = deployed_decision(logits, thresholds)
            return exit_index.double(), value

        return tracked_pgd(
            self.get_exit_logits,
            images,
            labels,
            objective,
            score,
            eps=self.eps,
            alpha=self.alpha,
            steps=self.steps,
            norm=self.norm,
            restarts=self.restarts,
            generator=self._generator,
        )
