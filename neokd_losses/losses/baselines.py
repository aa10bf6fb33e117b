"""The NEO-KD paper's baseline objectives: Triple Wins, SKD and ARD for multi-exit networks.

Every loss here has the calling convention of :class:`~neokd_losses.losses.neokd.NEOKDLoss`:
``loss(adv_logits, clean_logits, targets)`` with the *logits* (unnormalized scores) of
every exit on the adversarial and on the clean inputs, and class-index targets. Each
returns the per-exit, per-sample loss reduced by ``reduction``: ``"mean"`` sums over
exits and averages over the batch (the paper's 1/B Σ_j Σ_i), ``"sum"`` sums everything
and ``"none"`` returns the (E, B) tensor. Losses compute in the working dtype of both
sides (float32 for half-precision inputs). Teachers are detached by default.

The NEO-KD paper (Ham et al., NeurIPS 2023) does not print the baselines'
hyper-parameters; the defaults below are this library's choices, documented per loss.
The LW baseline, which needs the exit classifiers' weights, is in
:mod:`neokd_losses.losses.lw`.
"""

from __future__ import annotations

from typing import Literal, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .._cross_entropy import per_exit_cross_entropy, soft_cross_entropy, tempered
from .._exits import ExitLogits, reduce_exits
from .._validation import (
    ExitWeights,
    Reduction,
    as_exit_weights,
    check_bool,
    check_coefficient,
    check_exit_index,
    check_int,
    check_reduction,
    check_temperature,
)
from ._base import _MultiExitLoss, stack_pair, weigh_and_reduce

__all__ = [
    "ARDLoss",
    "SKDLoss",
    "TripleWinsLoss",
    "ard_loss",
    "skd_loss",
    "triple_wins_loss",
]

Teacher = Union[Literal["last", "ensemble"], int]
"""The teacher of SKD and ARD: ``"last"`` (the last exit), an exit index (negative
counts from the last exit), or ``"ensemble"`` (the mean of the softmax of all exits)."""

_TEACHERS = ("last", "ensemble")


def check_teacher(teacher: object) -> Teacher:
    """``teacher`` if it is "last", "ensemble" or an int; the range is checked per call."""
    if isinstance(teacher, str):
        if teacher not in _TEACHERS:
            raise ValueError(
                f'`teacher` must be "last", "ensemble" or an exit index (int), got {teacher!r}.'
            )
        return teacher  # type: ignore[return-value]
    try:
        return check_int(teacher, "teacher")
    except TypeError as err:
        raise TypeError(
            f'`teacher` must be "last", "ensemble" or an exit index (int), '
            f"got {type(teacher).__name__} {teacher!r}."
        ) from err


def _teacher_index(teacher: Teacher, num_exits: int) -> int | None:
    """The teacher exit's index in [0, E), or None for the ensemble (no single exit)."""
    if teacher == "ensemble":
        return None
    if teacher == "last":
        return num_exits - 1
    return check_exit_index(teacher, num_exits, "teacher")


def _teacher_probs(logits: Tensor, index: int | None, temperature: float, detach: bool) -> Tensor:
    """The teacher's probabilities at temperature T, (1, B, K), from stacked logits (E, B, K):
    exit ``index``'s softmax, or the mean of every exit's softmax for ``index=None``."""
    source = logits.detach() if detach else logits
    if index is None:
        return F.softmax(tempered(source, temperature), dim=-1).mean(0, keepdim=True)
    return F.softmax(tempered(source[index : index + 1], temperature), dim=-1)


def _kl_from_teacher(student_logits: Tensor, teacher_probs: Tensor, temperature: float) -> Tensor:
    """T²·KL(q ‖ softmax(student/T)) over the last dim, for teacher probabilities q.

    Computed as the soft cross-entropy minus the teacher's entropy, so a student equal to
    its teacher gives exactly the same two numbers and a loss of zero up to rounding.
    """
    entropy: Tensor = -torch.special.xlogy(teacher_probs, teacher_probs).sum(-1)
    cross = soft_cross_entropy(student_logits, teacher_probs, temperature)
    return (cross - entropy) * (temperature * temperature)


def _exit_rows(index: int, like: Tensor) -> Tensor:
    return torch.tensor([index], device=like.device)


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
    adv, clean = stack_pair(adv_logits, clean_logits, targets)
    loss = wc * per_exit_cross_entropy(clean, targets) + wa * per_exit_cross_entropy(adv, targets)
    return weigh_and_reduce(loss, exit_weights, reduction)


def skd_loss(
    adv_logits: ExitLogits,
    clean_logits: ExitLogits,
    targets: Tensor,
    *,
    alpha: float = 1.0,
    temperature: float = 1.0,
    clean_weight: float = 1.0,
    adv_weight: float = 1.0,
    teacher: Teacher = "last",
    exit_weights: ExitWeights = None,
    reduction: Reduction = "mean",
    detach_teacher: bool = True,
) -> Tensor:
    r"""Multi-exit self-distillation (SKD, Phuong & Lampert, ICCV 2019), adversarial version.

    A teacher prediction on the adversarial input, detached and softened at temperature
    T, is distilled into the other exits' predictions on the same adversarial input, on
    top of the per-exit cross-entropies on clean and adversarial inputs:

    .. math::
        L = \frac{1}{B}\sum_j \sum_{i=1}^{E} \Big[ w_c\, \mathrm{CE}(z_i(x_j), y_j)
            + w_a\, \mathrm{CE}(z_i(x_j^{adv}), y_j)
            + 1[i \ne t]\; γ_i\, α\, T^2\, \mathrm{KL}\big(q_j \,\|\,
              σ(z_i(x_j^{adv})/T)\big) \Big]

    with σ the softmax and the teacher :math:`q_j` chosen by ``teacher``:

    - ``"last"`` (default, the NEO-KD paper's main tables): :math:`q_j = σ(z_E(x_j^{adv})/T)`,
      t = E: the last exit teaches every earlier exit and has no distillation term.
    - an exit index k (0-based; negative counts from the last exit, -1 is ``"last"``):
      :math:`q_j = σ(z_k(x_j^{adv})/T)`, t = k: exit k teaches every other exit, earlier
      and later, and has no distillation term against itself.
    - ``"ensemble"``: :math:`q_j = \frac{1}{E}\sum_{n=1}^{E} σ(z_n(x_j^{adv})/T)`, the mean
      of the softened probabilities (not of the logits) of all exits; no exit is the
      teacher, so every exit, the last one included, gets a distillation term.

    The cross-entropy weights default to 1 and the distillation weights γ to 1, as in
    :func:`~neokd_losses.losses.neokd.neokd_loss`, so that SKD and NEO-KD differ only in
    their distillation term; α = 1 and T = 1 are this library's defaults (the NEO-KD
    paper does not print SKD's). The KL divergence has the same gradient as the soft
    cross-entropy ℓ but is zero when an exit matches its teacher. With one exit and a
    single-exit teacher, SKD is :math:`w_c\,\mathrm{CE} + w_a\,\mathrm{CE}`.

    Args:
        adv_logits: logits of every exit on the adversarial inputs.
        clean_logits: logits of every exit on the clean inputs.
        targets: class indices (B,).
        alpha: weight α >= 0 of the distillation term.
        temperature: T > 0 of the distillation term (which is multiplied by T²).
        clean_weight: weight :math:`w_c \ge 0` of the clean cross-entropy.
        adv_weight: weight :math:`w_a \ge 0` of the adversarial cross-entropy.
        teacher: ``"last"``, an exit index, or ``"ensemble"`` (see above).
        exit_weights: per-exit weights γ (E,) of the distillation term; default all ones.
        reduction: ``"mean"`` (sum over exits, mean over the batch), ``"sum"`` or ``"none"``.
        detach_teacher: stop gradients through the teacher prediction.

    Returns:
        The loss: a scalar, or (E, B) for ``reduction="none"``.

    Raises:
        TypeError: for logits that are not sequences of float tensors, non-integer targets,
            non-numeric weights or a ``teacher`` of another kind.
        ValueError: for mismatched shapes, an empty batch, targets out of range, negative
            weights, bad ``exit_weights``, ``temperature``, ``reduction`` or ``teacher``
            (an unknown name, or an index outside [-E, E)).

    Shape:
        - adv_logits, clean_logits: sequences of E tensors (B, K).
        - targets: (B,).
        - output: () or (E, B).

    Example:
        >>> clean = [torch.randn(4, 10, requires_grad=True) for _ in range(3)]
        >>> adv = [torch.randn(4, 10, requires_grad=True) for _ in range(3)]
        >>> targets = torch.randint(0, 10, (4,))
        >>> loss = skd_loss(adv, clean, targets, alpha=1.0, temperature=3.0)
        >>> loss.backward()
        >>> skd_loss(adv, clean, targets, teacher="ensemble", reduction="none").shape
        torch.Size([3, 4])
    """
    a = check_coefficient("alpha", alpha)
    t = check_temperature(temperature)
    wc = check_coefficient("clean_weight", clean_weight)
    wa = check_coefficient("adv_weight", adv_weight)
    teacher = check_teacher(teacher)
    check_reduction(reduction)
    check_bool(detach_teacher, "detach_teacher")
    adv, clean = stack_pair(adv_logits, clean_logits, targets)
    gamma = as_exit_weights(exit_weights, adv.shape[0])
    loss = wc * per_exit_cross_entropy(clean, targets) + wa * per_exit_cross_entropy(adv, targets)
    index = _teacher_index(teacher, adv.shape[0])
    if a:
        kd = _kl_from_teacher(adv, _teacher_probs(adv, index, t, detach_teacher), t)
        if index is not None:
            kd = kd.index_fill(0, _exit_rows(index, kd), 0.0)
        if gamma is not None:
            kd = kd * gamma.to(kd)[:, None]
        loss = loss + a * kd
    return reduce_exits(loss, reduction)


def ard_loss(
    adv_logits: ExitLogits,
    clean_logits: ExitLogits,
    targets: Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    teacher: Teacher = "last",
    exit_weights: ExitWeights = None,
    reduction: Reduction = "mean",
    detach_teacher: bool = True,
) -> Tensor:
    r"""Adversarially robust distillation (ARD, Goldblum et al., AAAI 2020), multi-exit version.

    ARD trains a student on the teacher's clean prediction evaluated at the student's
    adversarial input, mixed with clean cross-entropy. In the multi-exit setting the
    teacher is an exit's clean prediction (detached), by default the last exit's. The
    teacher exit cannot distil from itself, so its distillation slot is filled by
    adversarial cross-entropy against the label (Madry-style adversarial training), which
    keeps the teacher robust; α = 1 then reduces the teacher exit to plain adversarial
    training, as for ARD's adversarially trained teacher. Per exit i and sample j:

    .. math::
        L_{ij} = \begin{cases}
            γ_i\, α\, T^2\, \mathrm{KL}\big(q_j \,\|\, σ(z_i(x_j^{adv})/T)\big)
            + (1-α)\, \mathrm{CE}(z_i(x_j), y_j) & i \ne t \\
            γ_t\, α\, \mathrm{CE}(z_t(x_j^{adv}), y_j) + (1-α)\, \mathrm{CE}(z_t(x_j), y_j)
            & i = t
        \end{cases}

    and :math:`L = \frac{1}{B}\sum_j \sum_i L_{ij}` for ``reduction="mean"``, with σ
    the softmax. The teacher :math:`q_j` and the teacher exit t follow ``teacher``, as in
    :func:`skd_loss` but on the clean inputs: ``"last"`` (default) is
    :math:`q_j = σ(z_E(x_j)/T)` with t = E; an exit index k gives
    :math:`q_j = σ(z_k(x_j)/T)` with t = k; ``"ensemble"`` is
    :math:`q_j = \frac{1}{E}\sum_n σ(z_n(x_j)/T)`, and then no exit is the teacher, so
    every exit has the distillation slot (and no adversarial cross-entropy). γ weighs
    the distillation slot as in NEO-KD. α = 0.5 (both parts at equal weight) and T = 1
    are this library's defaults; the NEO-KD paper does not print ARD's.

    Args:
        adv_logits: logits of every exit on the adversarial inputs.
        clean_logits: logits of every exit on the clean inputs.
        targets: class indices (B,).
        alpha: weight α in [0, 1] of the distillation slot; 1 - α weighs clean CE.
        temperature: T > 0 of the distillation term (which is multiplied by T²).
        teacher: ``"last"``, an exit index, or ``"ensemble"`` (see above).
        exit_weights: per-exit weights γ (E,) of the distillation slot; default all ones.
        reduction: ``"mean"`` (sum over exits, mean over the batch), ``"sum"`` or ``"none"``.
        detach_teacher: stop gradients through the clean teacher prediction.

    Returns:
        The loss: a scalar, or (E, B) for ``reduction="none"``.

    Raises:
        TypeError: for logits that are not sequences of float tensors, non-integer targets,
            a non-numeric α or a ``teacher`` of another kind.
        ValueError: for mismatched shapes, an empty batch, targets out of range, α outside
            [0, 1], bad ``exit_weights``, ``temperature``, ``reduction`` or ``teacher``.

    Shape:
        - adv_logits, clean_logits: sequences of E tensors (B, K).
        - targets: (B,).
        - output: () or (E, B).

    Example:
        >>> clean = [torch.randn(4, 10, requires_grad=True) for _ in range(3)]
        >>> adv = [torch.randn(4, 10, requires_grad=True) for _ in range(3)]
        >>> targets = torch.randint(0, 10, (4,))
        >>> ard_loss(adv, clean, targets, alpha=0.9, temperature=4.0).backward()
        >>> ard_loss(adv, clean, targets, teacher=1, reduction="none").shape
        torch.Size([3, 4])
    """
    a = check_coefficient("alpha", alpha, at_most_one=True)
    t = check_temperature(temperature)
    teacher = check_teacher(teacher)
    check_reduction(reduction)
    check_bool(detach_teacher, "detach_teacher")
    adv, clean = stack_pair(adv_logits, clean_logits, targets)
    gamma = as_exit_weights(exit_weights, adv.shape[0])
    loss = (1.0 - a) * per_exit_cross_entropy(clean, targets)
    index = _teacher_index(teacher, adv.shape[0])
    if a:
        slot = _kl_from_teacher(adv, _teacher_probs(clean, index, t, detach_teacher), t)
        if index is not None:
            own = per_exit_cross_entropy(adv[index : index + 1], targets)
            slot = slot.index_copy(0, _exit_rows(index, slot), own)
        if gamma is not None:
            slot = slot * gamma.to(slot)[:, None]
        loss = loss + a * slot
    return reduce_exits(loss, reduction)


class TripleWinsLoss(_MultiExitLoss):
    """Triple Wins multi-exit adversarial training: :func:`triple_wins_loss` as a module.

    The constructor takes the keyword arguments of :func:`triple_wins_loss` (same names,
    defaults and checks, described there) and stores them; ``exit_weights`` becomes a
    registered buffer. The default weights 1 and 1 are the NEO-KD paper's baseline;
    ``TripleWinsLoss(clean_weight=0.5, adv_weight=0.5)`` is the Triple Wins code's.

    Shape:
        - adv_logits, clean_logits: sequences of E tensors (B, K); targets: (B,).
        - output: () or (E, B) for ``reduction="none"``.

    Example:
        >>> criterion = TripleWinsLoss()  # the NEO-KD paper's baseline: weights 1 and 1
        >>> TripleWinsLoss(clean_weight=0.5, adv_weight=0.5)  # the Triple Wins code's weights
        TripleWinsLoss(clean_weight=0.5, adv_weight=0.5, reduction='mean')
        >>> clean = [torch.randn(4, 10, requires_grad=True) for _ in range(3)]
        >>> adv = [torch.randn(4, 10, requires_grad=True) for _ in range(3)]
        >>> criterion(adv, clean, torch.randint(0, 10, (4,))).backward()
    """

    _hyper_parameters = ("clean_weight", "adv_weight")

    def __init__(
        self,
        clean_weight: float = 1.0,
        adv_weight: float = 1.0,
        exit_weights: ExitWeights = None,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__(exit_weights, reduction)
        self.clean_weight = check_coefficient("clean_weight", clean_weight)
        self.adv_weight = check_coefficient("adv_weight", adv_weight)

    def forward(self, adv_logits: ExitLogits, clean_logits: ExitLogits, targets: Tensor) -> Tensor:
        return triple_wins_loss(adv_logits, clean_logits, targets, **self._options())


class SKDLoss(_MultiExitLoss):
    """Adversarial multi-exit self-distillation (SKD): :func:`skd_loss` as a module.

    The constructor takes the keyword arguments of :func:`skd_loss` (same names, defaults
    and checks, described there, including the ``teacher`` choice) and stores them;
    ``exit_weights`` becomes a registered buffer.

    Shape:
        - adv_logits, clean_logits: sequences of E tensors (B, K); targets: (B,).
        - output: () or (E, B) for ``reduction="none"``.

    Example:
        >>> criterion = SKDLoss(alpha=1.0, temperature=3.0, teacher="ensemble")
        >>> criterion
        SKDLoss(alpha=1.0, temperature=3.0, clean_weight=1.0, adv_weight=1.0, teacher='ensemble', reduction='mean')
        >>> clean = [torch.randn(4, 10, requires_grad=True) for _ in range(3)]
        >>> adv = [torch.randn(4, 10, requires_grad=True) for _ in range(3)]
        >>> criterion(adv, clean, torch.randint(0, 10, (4,))).backward()
    """

    _hyper_parameters = ("alpha", "temperature", "clean_weight", "adv_weight", "teacher")
    _passed = ("detach_teacher",)

    def __init__(
        self,
        alpha: float = 1.0,
        temperature: float = 1.0,
        clean_weight: float = 1.0,
        adv_weight: float = 1.0,
        exit_weights: ExitWeights = None,
        reduction: Reduction = "mean",
        detach_teacher: bool = True,
        teacher: Teacher = "last",
    ) -> None:
        super().__init__(exit_weights, reduction)
        self.alpha = check_coefficient("alpha", alpha)
        self.temperature = check_temperature(temperature)
        self.clean_weight = check_coefficient("clean_weight", clean_weight)
        self.adv_weight = check_coefficient("adv_weight", adv_weight)
        self.detach_teacher = check_bool(detach_teacher, "detach_teacher")
        self.teacher = check_teacher(teacher)

    def forward(self, adv_logits: ExitLogits, clean_logits: ExitLogits, targets: Tensor) -> Tensor:
        return skd_loss(adv_logits, clean_logits, targets, **self._options())


class ARDLoss(_MultiExitLoss):
    """Multi-exit adversarially robust distillation (ARD): :func:`ard_loss` as a module.

    The constructor takes the keyword arguments of :func:`ard_loss` (same names, defaults
    and checks, described there, including the ``teacher`` choice) and stores them;
    ``exit_weights`` becomes a registered buffer.

    Shape:
        - adv_logits, clean_logits: sequences of E tensors (B, K); targets: (B,).
        - output: () or (E, B) for ``reduction="none"``.

    Example:
        >>> criterion = ARDLoss(alpha=0.9, temperature=4.0, teacher=-2)
        >>> clean = [torch.randn(4, 10, requires_grad=True) for _ in range(3)]
        >>> adv = [torch.randn(4, 10, requires_grad=True) for _ in range(3)]
        >>> criterion(adv, clean, torch.randint(0, 10, (4,))).backward()
    """

    _hyper_parameters = ("alpha", "temperature", "teacher")
    _passed = ("detach_teacher",)

    def __init__(
        self,
        alpha: float = 0.5,
        temperature: float = 1.0,
        exit_weights: ExitWeights = None,
        reduction: Reduction = "mean",
        detach_teacher: bool = True,
        teacher: Teacher = "last",
    ) -> None:
        super().__init__(exit_weights, reduction)
        self.alpha = check_coefficient("alpha", alpha, at_most_one=True)
        self.temperature = check_temperature(temperature)
        self.detach_teacher = check_bool(detach_teacher, "detach_teacher")
        self.teacher = check_teacher(teacher)

    def forward(self, adv_logits: ExitLogits, clean_logits: ExitLogits, targets: Tensor) -> Tensor:
        return ard_loss(adv_logits, clean_logits, targets, **self._options())
