"""Attacks on the exit policy of a deployed early-exit classifier.

A deployed early-exit network answers with the first exit whose confidence (max softmax)
reaches its threshold; the last exit answers for every sample no earlier exit took. This
is exactly the rule of :func:`neokd_losses.evaluation.exit_assignment`, and
:func:`deployed_decision` applies it to the full forward pass: running every exit and
reading the exit the rule picks gives the same answer as stopping at that exit, i.e. as
:class:`~neokd_losses.inference.EarlyExitClassifier` (tested).
:class:`ExitPolicyAttack` attacks that answer rather than any fixed exit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from neokd_losses._exits import stack_exits
from neokd_losses._validation import (
    check_generator,
    check_int,
    check_real,
    check_targets,
    upcast,
)
from neokd_losses.attacks._adapter import MultiExitAttack
from neokd_losses.attacks._pgd_core import pgd_step, random_start
from neokd_losses.attacks.apgd import APGDLoss, attack_losses
from neokd_losses.attacks.exit_view import as_exit_list
from neokd_losses.attacks.pgd import ThreatModel

__all__ = ["ExitPolicyAttack", "deployed_decision", "firing_weights"]

Thresholds = Tensor | Sequence[float]
Score = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""Maps stacked logits (E, N, K) and labels to (primary, secondary) scores (N,) each."""


def check_thresholds(thresholds: object, num_exits: int) -> Tensor:
    """The thresholds as a float64 tensor (E,), or a clear error.

    Raises:
        TypeError: if ``thresholds`` is not a sequence of numbers or a tensor.
        ValueError: if it does not hold one value per exit of the model, or holds NaN.
    """
    if isinstance(thresholds, Tensor):
        t = thresholds.detach().to("cpu", torch.float64)
    elif isinstance(thresholds, Sequence) and not isinstance(thresholds, (str, bytes)):
        try:
            t = torch.tensor([float(v) for v in thresholds], dtype=torch.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"`thresholds` must be a sequence of E numbers, got {thresholds!r}."
            ) from err
    else:
        raise TypeError(
            "`thresholds` must be a sequence of E numbers or a 1-D tensor (one confidence "
            f"threshold per exit), got {type(thresholds).__name__}."
        )
    if t.dim() != 1 or t.numel() != num_exits:
        raise ValueError(
            f"`thresholds` must hold one threshold per exit of the model: it has {num_exits} "
            f"exits, got shape {tuple(t.shape)} ({t.flatten().tolist()}). Fit them on this "
            "model's validation logits, e.g. with neokd_losses.evaluation.fit_thresholds."
        )
    if bool(torch.isnan(t).any()):
        raise ValueError(f"`thresholds` must not hold NaN, got {t.tolist()}.")
    return t


def deployed_decision(logits: Tensor, thresholds: Thresholds) -> tuple[Tensor, Tensor]:
    """The exit each sample leaves at and the deployed network's answer.

    The first exit k with max softmax ≥ T_k answers; the last exit answers the rest.
    Confidences are computed in the logits' dtype (float32 for half precision) and the
    thresholds compared in that dtype, as
    :func:`~neokd_losses.evaluation.budgeted.exit_assignment` and
    :class:`~neokd_losses.inference.EarlyExitClassifier` do, so a confidence equal to a
    threshold fitted on the same logits leaves in all three.

    Example:
        >>> z = torch.tensor([[[4.0, 0.0], [0.0, 0.1]], [[0.0, 1.0], [1.0, 0.0]]])
        >>> deployed_decision(z, [0.9, 0.0])
        (tensor([0, 1]), tensor([0, 0]))

    Shape:
        - logits: (E, N, K); thresholds: (E,); outputs: (N,) each.
    """
    probs = upcast(logits.detach()).softmax(-1)
    t = check_thresholds(thresholds, logits.shape[0]).to(probs.device, probs.dtype)
    confidence, prediction = probs.max(-1)  # (E, N)
    fires = confidence >= t[:, None]
    fires[-1] = True
    exit_index = fires.to(torch.uint8).argmax(0)
    return exit_index, prediction.gather(0, exit_index[None]).squeeze(0)


def firing_weights(logits: Tensor, thresholds: Tensor, tau: float) -> Tensor:
    """Relaxed probability that each exit answers: s_k · Π_{j<k} (1 − s_j).

    s_k = sigmoid((max softmax_k − T_k) / τ) for k < E and s_E = 1; the weights of a
    sample sum to 1 and tend to the one-hot deployed exit as τ → 0.

    Example:
        >>> z = torch.tensor([[[4.0, 0.0]], [[0.0, 0.0]]])
        >>> firing_weights(z, torch.tensor([0.5, 0.0]), 0.01).round(decimals=3)
        tensor([[1.],
                [0.]])

    Shape:
        - logits: (E, N, K); thresholds: (E,); output: (E, N).
    """
    s, survive = _gates(logits, thresholds, tau)
    return s * survive


def _gates(logits: Tensor, thresholds: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """s_k (s_E = 1) and Π_{j<k} (1 − s_j), (E, N) each."""
    confidence = logits.softmax(-1).amax(-1)  # (E, N)
    s = torch.sigmoid((confidence - thresholds.to(confidence)[:, None]) / tau)
    s = torch.cat([s[:-1], torch.ones_like(s[-1:])])
    survive = torch.cumprod(torch.cat([torch.ones_like(s[:1]), 1 - s[:-1]]), dim=0)
    return s, survive


def tracked_pgd(
    forward: Callable[[Tensor], list[Tensor] | tuple[Tensor, ...]],
    x0: Tensor,
    labels: Tensor,
    objective: Callable[[Tensor, Tensor, int, int], Tensor],
    score: Score,
    *,
    eps: float,
    alpha: float,
    steps: int,
    norm: ThreatModel,
    restarts: int,
    generator: torch.Generator | None,
) -> Tensor:
    """PGD ascending ``objective(logits, labels, step, run)`` (N,); keeps the best iterate.

    ``restarts`` runs start from fresh random points (``run`` is the run's index); the
    random start and the step are :class:`~neokd_losses.attacks.MultiExitPGD`'s.

    Every iterate (the clean point and the starts included) is scored exactly by
    ``score``: a row keeps the first iterate with the highest primary score, the
    secondary one breaking ties.
    """
    shape = (-1, *([1] * (x0.dim() - 1)))
    best = x0.clone()
    best_primary = torch.full((x0.shape[0],), -math.inf, dtype=torch.float64, device=x0.device)
    best_secondary = best_primary.clone()

    def keep(x: Tensor, logits: Tensor) -> None:
        nonlocal best, best_primary, best_secondary
        primary, secondary = (s.double() for s in score(logits.detach(), labels))
        better = (primary > best_primary) | (
            (primary == best_primary) & (secondary > best_secondary)
        )
        best = torch.where(better.view(shape), x.detach(), best)
        best_primary = torch.where(better, primary, best_primary)
        best_secondary = torch.where(better, secondary, best_secondary)

    with torch.no_grad():  # the clean point is a candidate too: never worse than clean
        keep(x0, stack_exits(as_exit_list(forward(x0), "model"), name="model output"))
    for run in range(restarts):
        x = random_start(x0, 1, eps=eps, norm=norm, generator=generator)
        for i in range(steps):
            x = x.detach().requires_grad_(True)
            logits = stack_exits(as_exit_list(forward(x), "model"), name="model output")
            keep(x, logits)
            (grad,) = torch.autograd.grad(objective(logits, labels, i, run).sum(), x)
            x = pgd_step(x.detach(), grad, x0, eps=eps, alpha=alpha, norm=norm)
        with torch.no_grad():
            keep(x, stack_exits(as_exit_list(forward(x), "model"), name="model output"))
    return best.detach()


def check_pgd_arguments(
    eps: object, alpha: object, steps: object, norm: object, restarts: object, generator: object
) -> tuple[float, float, int, int]:
    """Validate the PGD settings shared by the exit-policy and slow-down attacks."""
    eps_ = check_real(eps, "eps", low=0.0)
    alpha_ = check_real(alpha, "alpha", low=0.0, low_open=True)
    steps_ = check_int(steps, "steps", low=0)
    restarts_ = check_int(restarts, "restarts", low=1)
    if norm not in ("Linf", "L2"):
        raise ValueError(f"`norm` must be 'Linf' or 'L2', got {norm!r}.")
    check_generator(generator)
    return eps_, alpha_, steps_, restarts_


class ExitPolicyAttack(MultiExitAttack):
    r"""PGD on the answer of a deployed early-exit classifier (thresholds on confidence).

    The deployed network answers with exit k = the first whose max softmax reaches T_k
    (the last exit otherwise). The attack ascends a smooth relaxation of "the deployed
    answer is wrong":

    .. math:: L = \sum_k w_k\,\ell_k + \lambda \sum_{k<E} \prod_{j<k}(1 - s_j)\,
       \sigma\big((q_k - T_k)/\tau\big),

    with :math:`s_k = \sigma((\max_c p_{k,c} - T_k)/\tau)` (s_E = 1),
    :math:`w_k = s_k \prod_{j<k}(1 - s_j)` (:func:`firing_weights`), ℓ_k exit k's
    ``loss`` (CE or C&W margin), :math:`q_k = \max_{c \ne y} p_{k,c}` the confidence of
    the best wrong class and λ = ``push_weight``: the second term pushes a wrong early
    exit over its threshold so that the network leaves early with a wrong answer. τ is
    annealed geometrically from ``tau[0]`` to ``tau[1]`` over the steps. Every iterate
    (the clean point included) is judged by the exact deployed answer
    (:func:`deployed_decision`): each sample keeps, among its iterates whose deployed
    answer is wrong, the one of highest L at the final τ (the first of them on a tie);
    if none is wrong, the iterate of highest L.

    Args:
        model: multi-exit ``nn.Module`` returning E logits (B, K).
        thresholds: the deployed thresholds T (E,), e.g. from
            :func:`~neokd_losses.evaluation.fit_thresholds`; ±inf allowed.
        eps: radius ε ≥ 0 of the ball. alpha: step size > 0. steps: PGD steps ≥ 0.
        norm: ``"Linf"`` or ``"L2"``.
        loss: ℓ_k, ``"cw"`` (the C&W margin) or ``"ce"``, or a sequence of them: one run
            per loss (default both, which beat either alone on small digits models: the
            margin where CE saturates at confidently correct exits, CE elsewhere).
        tau: (start, end) temperatures > 0 of the relaxation (confidences lie in
            [0, 1]: τ = 0.05 is already close to the hard rule).
        push_weight: λ ≥ 0 (0 turns the push term off).
        restarts: random restarts ≥ 1 per loss (the best iterate over all runs is kept).
        generator: generator of the random starts.

    Raises:
        TypeError, ValueError: for wrong arguments; at call time if the thresholds do not
            hold one value per exit of the model.

    Shape:
        - images: (B, ...) in [0, 1]; labels: (B,); output: (B, ...).

    Example:
        >>> model = TwoExits(in_features=4, num_classes=3)
        >>> atk = ExitPolicyAttack(model, [0.6, 0.0], eps=0.1, alpha=0.03, steps=5)
        >>> x, y = torch.rand(5, 4), torch.randint(0, 3, (5,))
        >>> bool((atk(x, y) - x).abs().max() <= 0.1 + 1e-6)
        True
    """

    def __init__(
        self,
        model: nn.Module,
        thresholds: Thresholds,
        eps: float = 8 / 255,
        alpha: float = 2 / 255,
        steps: int = 50,
        norm: ThreatModel = "Linf",
        loss: APGDLoss | Sequence[APGDLoss] = ("cw", "ce"),
        tau: tuple[float, float] = (1.0, 0.05),
        push_weight: float = 1.0,
        restarts: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__("ExitPolicyAttack", model)
        self.eps, self.alpha, self.steps, self.restarts = check_pgd_arguments(
            eps, alpha, steps, norm, restarts, generator
        )
        self.norm: ThreatModel = norm
        self.thresholds = tuple(check_thresholds(thresholds, len(thresholds)).tolist())
        losses = (loss,) if isinstance(loss, str) else tuple(loss)
        if not losses or any(item not in ("ce", "cw") for item in losses):
            raise ValueError(
                f"`loss` must be 'ce', 'cw' or a non-empty sequence of them, got {loss!r}."
            )
        self.loss: tuple[APGDLoss, ...] = losses
        if not isinstance(tau, (tuple, list)) or len(tau) != 2:
            raise TypeError(f"`tau` must be a pair (start, end) of temperatures, got {tau!r}.")
        self.tau = (
            check_real(tau[0], "tau[0]", low=0.0, low_open=True),
            check_real(tau[1], "tau[1]", low=0.0, low_open=True),
        )
        self.push_weight = check_real(push_weight, "push_weight", low=0.0)
        self._generator = generator

    def _tau(self, step: int) -> float:
        if self.steps <= 1:
            return self.tau[1]
        ratio = self.tau[1] / self.tau[0]
        return float(self.tau[0] * ratio ** (step / (self.steps - 1)))

    def relaxed_objective(
        self, logits: Tensor, labels: Tensor, tau: float, loss: APGDLoss = "cw"
    ) -> Tensor:
        """The relaxed objective L of every row (N,) for stacked logits (E, N, K)."""
        t = check_thresholds(self.thresholds, logits.shape[0]).to(logits.device)
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        s, survive = _gates(logits, t, tau)
        value = (s * survive * attack_losses(logits, labels, loss)).sum(0)
        if self.push_weight > 0 and logits.shape[0] > 1:
            probs = logits.softmax(-1)
            index = labels.view(1, -1, 1).expand(probs.shape[0], -1, 1)
            q = probs.scatter(-1, index, 0.0).amax(-1)[:-1]  # best wrong class, (E-1, N)
            push = survive[:-1] * torch.sigmoid((q - t[:-1, None].to(q)) / tau)
            value = value + self.push_weight * push.sum(0)
        return value

    def _attack(self, images: Tensor, labels: Tensor) -> Tensor:
        with torch.no_grad():
            clean = stack_exits(self.get_exit_logits(images), name="model output")
        check_thresholds(self.thresholds, clean.shape[0])
        check_targets(labels, images.shape[0], clean.shape[-1], name="labels")

        def objective(logits: Tensor, y: Tensor, step: int, run: int) -> Tensor:
            loss = self.loss[run % len(self.loss)]
            return self.relaxed_objective(logits, y, self._tau(step), loss)

        def score(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            _, answer = deployed_decision(logits, self.thresholds)
            return (answer != y).double(), self.relaxed_objective(logits, y, self.tau[1])

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
            restarts=self.restarts * len(self.loss),
            generator=self._generator,
        )
