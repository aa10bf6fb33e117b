"""The NEO-KD paper's baseline objectives: Triple Wins, SKD and ARD for multi-exit networks.

Every loss here has the calling convention of :class:`~neokd_losses.losses.neokd.NEOKDLoss`:
``loss(adv_logits, clean_logits, targets)`` with the *logits* (unnormalised scores) of
every exit on the adversarial and on the clean inputs, and class-index targets. Each
returns the per-exit, per-sample loss reduced by ``reduction``: ``"mean"`` sums over
exits and averages over the batch (the paper's 1/B Σ_j Σ_i), ``"sum"`` sums everything
and ``"none"`` returns the (E, B) tensor. Losses compute in float32 for half-precision
inputs. Teachers (the last exit, for SKD and ARD) are detached by default.

The NEO-KD paper (Ham et al., NeurIPS 2023) does not print the baselines'
hyper-parameters; the defaults below are this library's choices, documented per loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._cross_entropy import soft_cross_entropy
from .._exits import (
    ExitLogits,
    ExitWeights,
    Reduction,
    as_exit_weights,
    check_coefficient,
    check_reduction,
    check_same_exits,
    check_targets,
    check_temperature,
    reduce_exits,
    stack_exits,
)

__all__ = [
    "ARDLoss",
    "SKDLoss",
    "TripleWinsLoss",
    "ard_loss",
    "skd_loss",
    "triple_wins_loss",
]


def _stack_pair(
    adv_logits: ExitLogits, clean_logits: ExitLogits, targets: Tensor
) -> tuple[Tensor, Tensor]:
    """Validate and stack both sides to (E, B, K) with a common float dtype."""
    adv = stack_exits(adv_logits, "adv_logits")
    clean = stack_exits(clean_logits, "clean_logits")
    dtype = torch.promote_types(adv.dtype, clean.dtype)
    adv, clean = adv.to(dtype), clean.to(dtype)
    check_same_exits(adv, clean, ("adv_logits", "clean_logits"))
    check_targets(targets, adv.shape[1], adv.shape[2])
    return adv, clean


def _exit_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy per exit and sample, (E, B), of stacked logits (E, B, K)."""
    num_exits, batch, _ = logits.shape
    flat = F.cross_entropy(logits.flatten(0, 1), targets.long().repeat(num_exits), reduction="none")
    return flat.view(num_exits, batch)


def _kl_from_teacher(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)) over the last dim.

    Computed as the soft cross-entropy minus the teacher's entropy, so a student equal to
    its teacher gives exactly the same two numbers and a loss of zero up to rounding.
    """
    teacher_probs = F.softmax(teacher_logits / temperature, dim=-1)
    entropy: Tensor = -torch.special.xlogy(teacher_probs, teacher_probs).sum(-1)
    cross = soft_cross_entropy(student_logits, teacher_probs, temperature)
    return (cross - entropy) * (temperature * temperature)


def _gamma(exit_weights: ExitWeights, like: Tensor) -> Tensor | None:
    weights = as_exit_weights(exit_weights, like.shape[0])
    return None if weights is None else weights.to(like)[:, None]


def triple_wins_loss(
    adv_logits: ExitLogits,
    clean_logits: ExitLogits,
    targets: Tensor,
    *,
    clean_weight: float = 1.0,
    adv_weight: float = 1.0,
    exit_weights: ExitWeights = None,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Multi-exit adversarial training without distillation (Triple Wins, Hu et al., 2020).

    The "Adv. w/o distill" baseline of the NEO-KD tables: every exit is trained with
    cross-entropy on the clean and on the adversarial input,

    .. math::
        L = \frac{1}{B}\sum_j \sum_i γ_i \big[ w_c\, \mathrm{CE}(z_i(x_j), y_j)
            + w_a\, \mathrm{CE}(z_i(x_j^{adv}), y_j) \big],

    with :math:`w_c = w_a = 1` and γ = 1 by default: "the sum of clean and adversarial
    losses of all exits", as the NEO-KD paper describes this baseline. NEO-KD's own
    objective has the same two cross-entropies at weight 1, so with the defaults
    ``neokd_loss(..., alpha=0, beta=0)`` equals this loss exactly and the baseline differs
    from NEO-KD only by the distillation terms (the controlled comparison). The Triple
    Wins code weighs both by 0.5 (``clean_weight=0.5, adv_weight=0.5``), which halves the
    gradient and hence the effective learning rate. The adversarial inputs are expected to
    be detached from the attack's graph (as :class:`~neokd_losses.attacks.pgd.MultiExitPGD`
    returns them). Since this loss has no distillation term, the exit weights γ weigh each
    exit's whole loss (NEO-KD's γ weigh only its distillation terms).

    Args:
        adv_logits: logits of every exit on the adversarial inputs.
        clean_logits: logits of every exit on the clean inputs.
        targets: class indices (B,).
        clean_weight: weight :math:`w_c \ge 0` of the clean cross-entropy (default 1;
            the Triple Wins code uses 0.5).
        adv_weight: weight :math:`w_a \ge 0` of the adversarial cross-entropy (default 1;
            the Triple Wins code uses 0.5).
        exit_weights: per-exit weights γ (E,); default all ones.
        reduction: ``"mean"`` (sum over exits, mean over the batch), ``"sum"`` or ``"none"``.

    Returns:
        The loss: a scalar, or (E, B) for ``reduction="none"``.

    Raises:
        TypeError: for logits that are not sequences of float tensors, non-integer targets
            or non-numeric weights.
        ValueError: for mismatched shapes, targets out of range, negative weights, bad
            ``exit_weights`` or ``reduction``.

    Shape:
        - adv_logits, clean_logits: sequences of E tensors (B, K).
        - targets: (B,).
        - output: () or (E, B).

    Example:
        >>> import torch
        >>> clean = [torch.randn(4, 10, requires_grad=True) for _ in range(3)]
        >>> adv = [torch.randn(4, 10, requires_grad=True) for _ in range(3)]
        >>> targets = torch.randint(0, 10, (4,))
        >>> triple_wins_loss(adv, clean, targets).backward()
        >>> triple_wins_loss(adv, clean, targets, reduction="none").shape
        torch.Size([3, 4])
    """
    wc = check_coefficient("clean_weight", clean_weight)
    wa = check_coefficient("adv_weight", adv_weight)
    check_reduction(reduction)
    adv, clean = _stack_pair(adv_logits, clean_logits, targets)
    gamma = _gamma(exit_weights, adv)
    loss = wc * _exit_ce(clean, targets) + wa * _exit_ce(adv, targets)
    if gamma is not None:
        loss = loss * gamma
    return reduce_exits(loss, reduction)


def skd_loss(
    adv_logits: ExitLogits,
    clean_logits: ExitLogits,
    targets: Tensor,
    *,
    alpha: float = 1.0,
    temperature: float = 1.0,
    clean_weight: float = 1.0,
    adv_weight: float = 1.0,
    exit_weights: ExitWeights = None,
    reduction: Reduction = "mean",
    detach_teacher: bool = True,
) -> Tensor:
    r"""Multi-exit self-distillation (SKD, Phuong & Lampert, ICCV 2019), adversarial version.

    The last exit's prediction on the adversarial input, detached and softened at
    temperature T, is distilled into every earlier exit's prediction on the same
    adversarial input, on top of the per-exit cross-entropies on clean and adversarial
    inputs:

    .. math::
        L = \frac{1}{B}\sum_j \sum_{i=1}^{E} \Big[ w_c\, \mathrm{CE}(z_i(x_j), y_j)
            + w_a\, \mathrm{CE}(z_i(x_j^{adv}), y_j)
            + 1[i < E]\; γ_i\, α\, T^2\, \mathrm{KL}\big(σ(z_E(x_j^{adv})/T) \,\|\,
              σ(z_i(x_j^{adv})/T)\big) \Big]

    with σ the softmax. The cross-entropy weights default to 1 and the distillation
    weights γ to 1, as in :func:`~neokd_losses.losses.neokd.neokd_loss`, so that SKD and
    NEO-KD differ only in their distillation term; α = 1 and T = 1 are this library's
    defaults (the NEO-KD paper does not print SKD's). The KL divergence has the same
    gradient as the soft cross-entropy ℓ but is zero when an exit matches its teacher.
    The last exit has no distillation term. With one exit SKD is
    :math:`w_c\,\mathrm{CE} + w_a\,\mathrm{CE}` on clean and adversarial inputs.

    Args:
        adv_logits: logits of every exit on the adversarial inputs.
        clean_logits: logits of every exit on the clean inputs.
        targets: class indices (B,).
        alpha: weight α >= 0 of the distillation term.
        temperature: T > 0 of the distillation term (which is multiplied by T²).
        clean_weight: weight :math:`w_c \ge 0` of the clean cross-entropy.
        adv_weight: weight :math:`w_a \ge 0` of the adversarial cross-entropy.
        exit_weights: per-exit weights γ (E,) of the distillation term; default all ones.
        reduction: ``"mean"`` (sum over exits, mean over the batch), ``"sum"`` or ``"none"``.
        detach_teacher: stop gradients through the last exit's teacher prediction.

    Returns:
        The loss: a scalar, or (E, B) for ``reduction="none"``.

    Raises:
        TypeError: for logits that are not sequences of float tensors, non-integer targets
            or non-numeric weights.
        ValueError: for mismatched shapes, targets out of range, negative weights, bad
            ``exit_weights``, ``temperature`` or ``reduction``.

    Shape:
        - adv_logits, clean_logits: sequences of E tensors (B, K).
        - targets: (B,).
        - output: () or (E, B).

    Example:
        >>> import torch
        >>> clean = [torch.randn(4, 10, requires_grad=True) for _ in range(3)]
        >>> adv = [torch.randn(4, 10, requires_grad=True) for _ in range(3)]
        >>> targets = torch.randint(0, 10, (4,))
        >>> loss = skd_loss(adv, clean, targets, alpha=1.0, temperature=3.0)
        >>> loss.backward()
        >>> skd_loss(adv, clean, targets, reduction="none").shape
        torch.Size([3, 4])
    """
    a = check_coefficient("alpha", alpha)
    t = check_temperature(temperature)
    wc = check_coefficient("clean_weight", clean_weight)
    wa = check_coefficient("adv_weight", adv_weight)
    check_reduction(reduction)
    adv, clean = _stack_pair(adv_logits, clean_logits, targets)
    gamma = _gamma(exit_weights, adv)
    loss = wc * _exit_ce(clean, targets) + wa * _exit_ce(adv, targets)
    if a:
        teacher = adv[-1:].detach() if detach_teacher else adv[-1:]
        kd = _kl_from_teacher(adv, teacher, t)
        kd = torch.cat([kd[:-1], torch.zeros_like(kd[-1:])])
        if gamma is not None:
            kd = kd * gamma
        loss = loss + a * kd
    return reduce_exits(loss, reduction)


def ard_loss(
    adv_logits: ExitLogits,
    clean_logits: ExitLogits,
    targets: Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    exit_weights: ExitWeights = None,
    reduction: Reduction = "mean",
    detach_teacher: bool = True,
) -> Tensor:
    r"""Adversarially robust distillation (ARD, Goldblum et al., AAAI 2020), multi-exit version.

    ARD trains a student on the teacher's clean prediction evaluated at the student's
    adversarial input, mixed with clean cross-entropy; in the multi-exit setting the last
    exit's clean prediction (detached) is the teacher of every earlier exit. The last exit
    cannot distil from itself, so its distillation slot is filled by adversarial
    cross-entropy against the label (Madry-style adversarial training), which keeps the
    teacher robust; α = 1 then reduces the last exit to plain adversarial training, as for
    ARD's adversarially trained teacher. Per exit i and sample j:

    .. math::
        L_{ij} = \begin{cases}
            γ_i\, α\, T^2\, \mathrm{KL}\big(σ(z_E(x_j)/T) \,\|\, σ(z_i(x_j^{adv})/T)\big)
            + (1-α)\, \mathrm{CE}(z_i(x_j), y_j) & i < E \\
            γ_E\, α\, \mathrm{CE}(z_E(x_j^{adv}), y_j) + (1-α)\, \mathrm{CE}(z_E(x_j), y_j)
            & i = E
        \end{cases}

    and :math:`L = \frac{1}{B}\sum_j \sum_i L_{ij}` for ``reduction="mean"``, with σ
    the softmax. γ weighs the distillation slot as in NEO-KD. α = 0.5 (both parts at equal
    weight) and T = 1 are this library's defaults; the NEO-KD paper does not print ARD's.

    Args:
        adv_logits: logits of every exit on the adversarial inputs.
        clean_logits: logits of every exit on the clean inputs.
        targets: class indices (B,).
        alpha: weight α in [0, 1] of the distillation slot; 1 - α weighs clean CE.
        temperature: T > 0 of the distillation term (which is multiplied by T²).
        exit_weights: per-exit weights γ (E,) of the distillation slot; default all ones.
        reduction: ``"mean"`` (sum over exits, mean over the batch), ``"sum"`` or ``"none"``.
        detach_teacher: stop gradients through the last exit's clean teacher prediction.

    Returns:
        The loss: a scalar, or (E, B) for ``reduction="none"``.

    Raises:
        TypeError: for logits that are not sequences of float tensors, non-integer targets
            or a non-numeric α.
        ValueError: for mismatched shapes, targets out of range, α outside [0, 1], bad
            ``exit_weights``, ``temperature`` or ``reduction``.

    Shape:
        - adv_logits, clean_logits: sequences of E tensors (B, K).
        - targets: (B,).
        - output: () or (E, B).

    Example:
        >>> import torch
        >>> clean = [torch.randn(4, 10, requires_grad=True) for _ in range(3)]
        >>> adv = [torch.randn(4, 10, requires_grad=True) for _ in range(3)]
        >>> targets = torch.randint(0, 10, (4,))
        >>> ard_loss(adv, clean, targets, alpha=0.9, temperature=4.0).backward()
        >>> ard_loss(adv, clean, targets, reduction="none").shape
        torch.Size([3, 4])
    """
    a = check_coefficient("alpha", alpha, at_most_one=True)
    t = check_temperature(temperature)
    check_reduction(reduction)
    adv, clean = _stack_pair(adv_logits, clean_logits, targets)
    gamma = _gamma(exit_weights, adv)
    loss = (1.0 - a) * _exit_ce(clean, targets)
    if a:
        teacher = clean[-1:].detach() if detach_teacher else clean[-1:]
        kd = _kl_from_teacher(adv[:-1], teacher, t)
        last = _exit_ce(adv[-1:], targets)
        slot = torch.cat([kd, last])
        if gamma is not None:
            slot = slot * gamma
        loss = loss + a * slot
    return reduce_exits(loss, reduction)


class TripleWinsLoss(nn.Module):
    """Triple Wins multi-exit adversarial training; see :func:`triple_wins_loss`.

    Args:
        clean_weight: weight >= 0 of the clean cross-entropy (default 1, as the NEO-KD
            paper describes the baseline; the Triple Wins code uses 0.5).
        adv_weight: weight >= 0 of the adversarial cross-entropy (default 1; the Triple
            Wins code uses 0.5).
        exit_weights: per-exit weights γ (E,) of each exit's loss, a registered buffer;
            default all ones.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Shape:
        - adv_logits, clean_logits: sequences of E tensors (B, K); targets: (B,).
        - output: () or (E, B) for ``reduction="none"``.

    Example:
        >>> import torch
        >>> criterion = TripleWinsLoss()  # the NEO-KD paper's baseline: weights 1 and 1
        >>> TripleWinsLoss(clean_weight=0.5, adv_weight=0.5)  # the Triple Wins code's weights
        TripleWinsLoss(clean_weight=0.5, adv_weight=0.5, reduction='mean')
        >>> clean = [torch.randn(4, 10, requires_grad=True) for _ in range(3)]
        >>> adv = [torch.randn(4, 10, requires_grad=True) for _ in range(3)]
        >>> criterion(adv, clean, torch.randint(0, 10, (4,))).backward()
    """

    exit_weights: Tensor | None

    def __init__(
        self,
        clean_weight: float = 1.0,
        adv_weight: float = 1.0,
        exit_weights: ExitWeights = None,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__()
        self.clean_weight = check_coefficient("clean_weight", clean_weight)
        self.adv_weight = check_coefficient("adv_weight", adv_weight)
        self.reduction: Reduction = check_reduction(reduction)
        self.register_buffer("exit_weights", as_exit_weights(exit_weights))

    def forward(self, adv_logits: ExitLogits, clean_logits: ExitLogits, targets: Tensor) -> Tensor:
        return triple_wins_loss(
            adv_logits,
            clean_logits,
            targets,
            clean_weight=self.clean_weight,
            adv_weight=self.adv_weight,
            exit_weights=self.exit_weights,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return (
            f"clean_weight={self.clean_weight}, adv_weight={self.adv_weight}, "
            f"reduction={self.reduction!r}"
        )


class SKDLoss(nn.Module):
    """Adversarial multi-exit self-distillation (SKD); see :func:`skd_loss`.

    Args:
        alpha: weight α >= 0 of the distillation term (default 1).
        temperature: T > 0 of the distillation term (default 1).
        clean_weight: weight >= 0 of the clean cross-entropy (default 1).
        adv_weight: weight >= 0 of the adversarial cross-entropy (default 1).
        exit_weights: per-exit weights γ (E,) of the distillation term, a registered
            buffer; default all ones.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        detach_teacher: stop gradients through the last exit's teacher prediction.

    Shape:
        - adv_logits, clean_logits: sequences of E tensors (B, K); targets: (B,).
        - output: () or (E, B) for ``reduction="none"``.

    Example:
        >>> import torch
        >>> criterion = SKDLoss(alpha=1.0, temperature=3.0)
        >>> clean = [torch.randn(4, 10, requires_grad=True) for _ in range(3)]
        >>> adv = [torch.randn(4, 10, requires_grad=True) for _ in range(3)]
        >>> criterion(adv, clean, torch.randint(0, 10, (4,))).backward()
    """

    exit_weights: Tensor | None

    def __init__(
        self,
        alpha: float = 1.0,
        temperature: float = 1.0,
        clean_weight: float = 1.0,
        adv_weight: float = 1.0,
        exit_weights: ExitWeights = None,
        reduction: Reduction = "mean",
        detach_teacher: bool = True,
    ) -> None:
        super().__init__()
        self.alpha = check_coefficient("alpha", alpha)
        self.temperature = check_temperature(temperature)
        self.clean_weight = check_coefficient("clean_weight", clean_weight)
        self.adv_weight = check_coefficient("adv_weight", adv_weight)
        self.reduction: Reduction = check_reduction(reduction)
        self.detach_teacher = detach_teacher
        self.register_buffer("exit_weights", as_exit_weights(exit_weights))

    def forward(self, adv_logits: ExitLogits, clean_logits: ExitLogits, targets: Tensor) -> Tensor:
        return skd_loss(
            adv_logits,
            clean_logits,
            targets,
            alpha=self.alpha,
            temperature=self.temperature,
            clean_weight=self.clean_weight,
            adv_weight=self.adv_weight,
            exit_weights=self.exit_weights,
            reduction=self.reduction,
            detach_teacher=self.detach_teacher,
        )

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, temperature={self.temperature}, "
            f"clean_weight={self.clean_weight}, adv_weight={self.adv_weight}, "
            f"reduction={self.reduction!r}"
        )


class ARDLoss(nn.Module):
    """Multi-exit adversarially robust distillation (ARD); see :func:`ard_loss`.

    Args:
        alpha: weight α in [0, 1] of the distillation slot (default 0.5).
        temperature: T > 0 of the distillation term (default 1).
        exit_weights: per-exit weights γ (E,) of the distillation slot, a registered
            buffer; default all ones.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        detach_teacher: stop gradients through the last exit's clean teacher prediction.

    Shape:
        - adv_logits, clean_logits: sequences of E tensors (B, K); targets: (B,).
        - output: () or (E, B) for ``reduction="none"``.

    Example:
        >>> import torch
        >>> criterion = ARDLoss(alpha=0.9, temperature=4.0)
        >>> clean = [torch.randn(4, 10, requires_grad=True) for _ in range(3)]
        >>> adv = [torch.randn(4, 10, requires_grad=True) for _ in range(3)]
        >>> criterion(adv, clean, torch.randint(0, 10, (4,))).backward()
    """

    exit_weights: Tensor | None

    def __init__(
        self,
        alpha: float = 0.5,
        temperature: float = 1.0,
        exit_weights: ExitWeights = None,
        reduction: Reduction = "mean",
        detach_teacher: bool = True,
    ) -> None:
        super().__init__()
        self.alpha = check_coefficient("alpha", alpha, at_most_one=True)
        self.temperature = check_temperature(temperature)
        self.reduction: Reduction = check_reduction(reduction)
        self.detach_teacher = detach_teacher
        self.register_buffer("exit_weights", as_exit_weights(exit_weights))

    def forward(self, adv_logits: ExitLogits, clean_logits: ExitLogits, targets: Tensor) -> Tensor:
        return ard_loss(
            adv_logits,
            clean_logits,
            targets,
            alpha=self.alpha,
            temperature=self.temperature,
            exit_weights=self.exit_weights,
            reduction=self.reduction,
            detach_teacher=self.detach_teacher,
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, temperature={self.temperature}, reduction={self.reduction!r}"
