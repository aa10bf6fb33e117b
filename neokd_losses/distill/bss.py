"""Knowledge distillation with boundary-supporting samples (BSS, Heo et al., AAAI 2019).

A (multi-exit) student learns from a teacher on the clean batch and on
boundary-supporting samples: points that :class:`~neokd_losses.distill.boundary.
BoundarySupportingAttack` pushed just across the teacher's decision boundary. Inputs are
*logits* of the student's E exits and of the single-output teacher; class-index targets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._cross_entropy import soft_cross_entropy
from .._exits import ExitLogits, reduce_exits, stack_exits
from .._validation import (
    ExitWeights,
    Reduction,
    as_exit_weights,
    check_coefficient,
    check_real,
    check_reduction,
    check_targets,
    check_temperature,
    is_compiling,
)

__all__ = ["BSSDistillationLoss", "bss_kd_loss", "bss_weight_schedule"]


def _teacher(logits: Tensor, name: str, shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """Validate single-output teacher logits of the given (rows, K) shape."""
    if isinstance(logits, Sequence) and not isinstance(logits, Tensor):
        raise TypeError(
            f"`{name}` must be one logits Tensor (B, K) of the single-output teacher, got a "
            f"{type(logits).__name__}. For a multi-exit teacher pass one exit, e.g. {name}[-1]."
        )
    if not isinstance(logits, Tensor):
        raise TypeError(f"`{name}` must be a Tensor (B, K), got {type(logits).__name__}.")
    if not logits.is_floating_point():
        raise TypeError(f"`{name}` must hold floating-point logits, got dtype {logits.dtype}.")
    if tuple(logits.shape) != shape:
        raise ValueError(
            f"`{name}` must have shape {shape} to match the student's logits, "
            f"got {tuple(logits.shape)}."
        )
    return logits.to(dtype)


def _promoted(*inputs: object) -> torch.dtype:
    """float32 promoted with the dtype of every floating tensor among ``inputs`` (tensors
    or sequences of tensors; anything else is left to the validation that follows)."""
    dtype = torch.float32
    for item in inputs:
        parts = item if isinstance(item, (list, tuple)) else [item]
        for part in parts:
            if isinstance(part, Tensor) and part.is_floating_point():
                dtype = torch.promote_types(dtype, part.dtype)
    return dtype


def _bss_rows(
    bss_student_logits: ExitLogits,
    bss_teacher_logits: Tensor,
    bss_index: Tensor,
    bss_weight: Tensor | None,
    student: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Validate the boundary-supporting side: (E, M, K), (M, K), index (M,), weight (M,)."""
    num_exits, batch, num_classes = student.shape
    bss_student = stack_exits(bss_student_logits, "bss_student_logits").to(student.dtype)
    if bss_student.shape[0] != num_exits or bss_student.shape[2] != num_classes:
        raise ValueError(
            f"`bss_student_logits` must hold E = {num_exits} exits of K = {num_classes} "
            f"classes like `student_logits`, got {bss_student.shape[0]} exits of shape "
            f"{tuple(bss_student.shape[1:])}."
        )
    rows = bss_student.shape[1]
    bss_teacher = _teacher(
        bss_teacher_logits, "bss_teacher_logits", (rows, num_classes), student.dtype
    )
    if not isinstance(bss_index, Tensor):
        raise TypeError(f"`bss_index` must be a Tensor (M,), got {type(bss_index).__name__}.")
    if bss_index.dtype == torch.bool or bss_index.is_floating_point() or bss_index.is_complex():
        raise TypeError(
            f"`bss_index` must hold integer batch positions (torch.long), got dtype "
            f"{bss_index.dtype}; pass BoundarySupportingSamples.batch_index."
        )
    if tuple(bss_index.shape) != (rows,):
        raise ValueError(
            f"`bss_index` must have shape (M,) = ({rows},), one batch position per "
            f"boundary-supporting sample, got {tuple(bss_index.shape)}."
        )
    if rows and not is_compiling():
        low, high = int(bss_index.min()), int(bss_index.max())
        if low < 0 or high >= batch:
            raise ValueError(
                f"`bss_index` must lie in [0, {batch}) for a batch of B = {batch}, got values "
                f"in [{low}, {high}]."
            )
    if bss_weight is None:
        weight = student.new_ones(rows)
    else:
        if not isinstance(bss_weight, Tensor) or not bss_weight.is_floating_point():
            raise TypeError(
                "`bss_weight` must be a floating-point Tensor (M,), got "
                f"{bss_weight.dtype if isinstance(bss_weight, Tensor) else type(bss_weight).__name__}."
            )
        if tuple(bss_weight.shape) != (rows,):
            raise ValueError(
                f"`bss_weight` must have shape (M,) = ({rows},), got {tuple(bss_weight.shape)}."
            )
        as_exit_weights(bss_weight, rows, name="bss_weight")
        weight = bss_weight.detach().to(student)
    return bss_student, bss_teacher, bss_index.to(student.device).long(), weight


def bss_kd_loss(
    student_logits: ExitLogits,
    teacher_logits: Tensor,
    targets: Tensor,
    bss_student_logits: ExitLogits | None = None,
    bss_teacher_logits: Tensor | None = None,
    bss_index: Tensor | None = None,
    bss_weight: Tensor | None = None,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    temperature: float = 1.0,
    ce_weight: float = 1.0,
    exit_weights: ExitWeights = None,
    reduction: Reduction = "mean",
    detach_teacher: bool = True,
) -> Tensor:
    r"""Knowledge distillation with boundary-supporting samples (Heo et al., AAAI 2019).

    For every exit i of the student s and every sample j of the batch, with the teacher t,
    :math:`J(a, b) = -a^\top \log b` and σ the softmax:

    .. math::
        L_{ij} = w_{ce}\, \mathrm{CE}(s_i(x_j), y_j)
          + γ_i α\, T^2 J\big(σ(t(x_j)/T), σ(s_i(x_j)/T)\big)
          + γ_i β\, T^2 \sum_{m:\, n_m = j} w_m\,
            J\big(σ(t(\hat x_m)/T), σ(s_i(\hat x_m)/T)\big)

    where :math:`\hat x_m` are the boundary-supporting samples, :math:`n_m` the batch
    position of each one's base sample (``bss_index``) and :math:`w_m` its weight
    (``bss_weight``). With the weights of
    :meth:`~neokd_losses.distill.boundary.BoundarySupportingAttack.generate` the inner sum
    is the paper's :math:`\sum_k p_n^k J` over target classes k, exactly (every target,
    weight :math:`p_n^k`) or in expectation (targets drawn ∝ :math:`p_n^k`, weight 1/S).
    ``reduction="mean"`` sums over exits and averages over the B clean samples, so the
    BSS term is normalized by B, not by the number of samples M. The KD terms are
    multiplied by T² (Hinton); the reference anneals α from 4 to 1 and β from 2 to 0, see
    :func:`bss_weight_schedule`. Without boundary-supporting samples (all four ``bss_*``
    arguments None) the loss is CE + Hinton KD. The teacher's logits are detached by
    default; for a single-exit student pass ``[logits]``. ``ce_weight=0`` leaves only the
    distillation terms, to add on top of another objective that already holds the clean
    cross-entropy (e.g. :class:`~neokd_losses.losses.neokd.NEOKDLoss`).

    Args:
        student_logits: the student's logits on the clean batch, E tensors (B, K).
        teacher_logits: the teacher's logits on the clean batch, (B, K).
        targets: class indices (B,).
        bss_student_logits: the student's logits on the M boundary-supporting samples,
            E tensors (M, K).
        bss_teacher_logits: the teacher's logits on them, (M, K).
        bss_index: (M,) the batch position of each sample's base input.
        bss_weight: (M,) non-negative weights; default all ones.
        alpha: weight α >= 0 of the KD term on the clean batch.
        beta: weight β >= 0 of the KD term on the boundary-supporting samples.
        temperature: T > 0 of both KD terms.
        ce_weight: weight :math:`w_{ce} \ge 0` of the cross-entropy (default 1).
        exit_weights: per-exit weights γ (E,) of the two KD terms; default all ones.
        reduction: ``"mean"`` (sum over exits, mean over the batch), ``"sum"`` or ``"none"``.
        detach_teacher: stop gradients through the teacher's logits.

    Returns:
        The loss: a scalar, or (E, B) for ``reduction="none"`` (each BSS term counted at
        the position of its base sample).

    Raises:
        TypeError: for logits of the wrong kind (a single tensor for the student, a list
            for the teacher, integer values), non-integer targets or ``bss_index``, or
            non-numeric coefficients.
        ValueError: for mismatched shapes, targets or ``bss_index`` out of range, negative
            coefficients or weights, bad ``exit_weights``, ``temperature`` or
            ``reduction``, only some of the ``bss_*`` arguments, or an empty batch.

    Shape:
        - student_logits: sequence of E tensors (B, K); teacher_logits: (B, K).
        - targets: (B,).
        - bss_student_logits: sequence of E tensors (M, K); bss_teacher_logits: (M, K).
        - bss_index, bss_weight: (M,).
        - output: () or (E, B).

    Example:
        >>> import torch
        >>> student = [torch.randn(4, 10, requires_grad=True) for _ in range(3)]
        >>> teacher = torch.randn(4, 10)
        >>> targets = torch.randint(0, 10, (4,))
        >>> bss_student = [torch.randn(6, 10, requires_grad=True) for _ in range(3)]
        >>> bss_teacher = torch.randn(6, 10)
        >>> bss_index = torch.tensor([0, 0, 1, 2, 3, 3])
        >>> loss = bss_kd_loss(student, teacher, targets, bss_student, bss_teacher, bss_index,
        ...                    alpha=4.0, beta=2.0, temperature=3.0)
        >>> loss.backward()
        >>> bss_kd_loss(student, teacher, targets, reduction="none").shape
        torch.Size([3, 4])
    """
    a = check_coefficient("alpha", alpha)
    b = check_coefficient("beta", beta)
    t = check_temperature(temperature)
    w_ce = check_coefficient("ce_weight", ce_weight)
    check_reduction(reduction)
    student = stack_exits(student_logits, "student_logits")
    num_exits, batch, num_classes = student.shape
    if batch == 0:
        raise ValueError(
            f"`student_logits` hold an empty batch (B = 0, exits of shape "
            f"{tuple(student.shape[1:])}): a loss over no samples is undefined (its mean is "
            "NaN). Skip empty batches before the loss."
        )
    # float32 at least, float64 when any input is: never cast an input down.
    dtype = _promoted(student, teacher_logits, bss_student_logits, bss_teacher_logits)
    student = student.to(dtype)
    teacher = _teacher(teacher_logits, "teacher_logits", (batch, num_classes), dtype)
    check_targets(targets, batch, num_classes)
    gamma = as_exit_weights(exit_weights, num_exits)
    given = [v is not None for v in (bss_student_logits, bss_teacher_logits, bss_index)]
    if any(given) and not all(given):
        raise ValueError(
            "pass `bss_student_logits`, `bss_teacher_logits` and `bss_index` together (and "
            "optionally `bss_weight`), or none of them; got only "
            + ", ".join(
                name
                for name, g in zip(
                    ("bss_student_logits", "bss_teacher_logits", "bss_index"), given, strict=True
                )
                if g
            )
            + "."
        )
    if bss_weight is not None and not all(given):
        raise ValueError("`bss_weight` was given without boundary-supporting samples.")

    flat_targets = targets.long().to(student.device).repeat(num_exits)
    ce = F.cross_entropy(student.flatten(0, 1), flat_targets, reduction="none").view(
        num_exits, batch
    )
    kd = student.new_zeros(num_exits, batch)
    if a:
        probs = F.softmax((teacher.detach() if detach_teacher else teacher) / t, dim=-1)
        kd = kd + a * soft_cross_entropy(student, probs.expand_as(student), t)
    if all(given):
        assert bss_student_logits is not None and bss_teacher_logits is not None
        assert bss_index is not None
        s_hat, t_hat, index, weight = _bss_rows(
            bss_student_logits, bss_teacher_logits, bss_index, bss_weight, student
        )
        if b:
            probs_hat = F.softmax((t_hat.detach() if detach_teacher else t_hat) / t, dim=-1)
            per_row = soft_cross_entropy(s_hat, probs_hat.expand_as(s_hat), t) * weight
            bss_term = student.new_zeros(num_exits, batch).index_add(1, index, per_row)
            kd = kd + b * bss_term
    kd = kd * (t * t)
    if gamma is not None:
        kd = kd * gamma.to(kd)[:, None]
    return reduce_exits(w_ce * ce + kd, reduction)


def bss_weight_schedule(
    epoch: float,
    num_epochs: float,
    *,
    alpha_start: float = 4.0,
    alpha_end: float = 1.0,
    beta_start: float = 2.0,
    beta_end: float = 0.0,
    beta_stop: float = 0.75,
) -> tuple[float, float]:
    r"""The BSS reference's schedule of the two distillation weights (Heo et al., 2019).

    α decays linearly from ``alpha_start`` at epoch 0 to ``alpha_end`` at ``num_epochs``;
    β decays linearly from ``beta_start`` to ``beta_end`` at ``beta_stop · num_epochs``
    and stays there:

    .. math::
        α(e) = α_1 + (α_0 - α_1)\,(1 - e/N), \qquad
        β(e) = β_1 + (β_0 - β_1)\,\max\big(0,\, 1 - e/(s N)\big)

    With the defaults: α goes 4 → 1 over training and β 2 → 0 over its first 75 %,
    i.e. α = 3(1 − e/N) + 1 and β = max(2(1 − 4e/(3N)), 0). The paper's text does not
    print these numbers; the defaults follow the shape of the authors' training script
    as recalled here and were not checked against it, so treat them as a starting point
    and set the end points for your own run.

    Args:
        epoch: the current epoch e (fractional epochs are fine), 0 <= e <= N.
        num_epochs: the number N > 0 of training epochs.
        alpha_start: α at epoch 0.
        alpha_end: α at the last epoch.
        beta_start: β at epoch 0.
        beta_end: β from ``beta_stop · N`` on.
        beta_stop: the fraction s in (0, 1] of training after which β stays at its end.

    Returns:
        ``(alpha, beta)`` for the epoch.

    Raises:
        ValueError: if ``num_epochs`` <= 0, ``epoch`` is outside [0, N], ``beta_stop`` is
            outside (0, 1], or a weight is negative.

    Example:
        >>> bss_weight_schedule(0, 80)
        (4.0, 2.0)
        >>> bss_weight_schedule(30, 80)
        (2.875, 1.0)
        >>> bss_weight_schedule(80, 80)
        (1.0, 0.0)
    """
    n = check_real(num_epochs, "num_epochs", low=0.0, low_open=True)
    e = check_real(epoch, "epoch")
    if not 0 <= e <= n:
        raise ValueError(f"`epoch` must lie in [0, num_epochs] = [0, {num_epochs}], got {epoch!r}.")
    s = check_real(beta_stop, "beta_stop", low=0.0, high=1.0, low_open=True)
    alpha_start, alpha_end, beta_start, beta_end = (
        check_coefficient(name, value)
        for name, value in (
            ("alpha_start", alpha_start),
            ("alpha_end", alpha_end),
            ("beta_start", beta_start),
            ("beta_end", beta_end),
        )
    )
    alpha = alpha_end + (alpha_start - alpha_end) * (1.0 - e / n)
    beta = beta_end + (beta_start - beta_end) * max(0.0, 1.0 - e / (s * n))
    return float(alpha), float(beta)


class BSSDistillationLoss(nn.Module):
    """Distillation with boundary-supporting samples; see :func:`bss_kd_loss`.

    ``alpha`` and ``beta`` are plain attributes, so a training loop can follow the
    reference schedule with ``criterion.alpha, criterion.beta = bss_weight_schedule(e, N)``.

    Args:
        alpha: weight α >= 0 of the KD term on the clean batch (default 1).
        beta: weight β >= 0 of the KD term on the boundary-supporting samples (default 1).
        temperature: T > 0 of both KD terms (default 1).
        ce_weight: weight >= 0 of the cross-entropy (default 1).
        exit_weights: per-exit weights γ (E,) of the KD terms, a registered buffer;
            default all ones.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        detach_teacher: stop gradients through the teacher's logits.

    Shape:
        - student_logits: sequence of E tensors (B, K); teacher_logits: (B, K);
          targets: (B,).
        - bss_student_logits: sequence of E tensors (M, K); bss_teacher_logits: (M, K);
          bss_index, bss_weight: (M,).
        - output: () or (E, B) for ``reduction="none"``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from neokd_losses.distill.boundary import BoundarySupportingAttack
        >>> teacher = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
        >>> student = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
        >>> images = torch.rand(8, 1, 4, 4)
        >>> labels = teacher(images).argmax(1)
        >>> bss = BoundarySupportingAttack(teacher).generate(images, labels)
        >>> criterion = BSSDistillationLoss(temperature=3.0)
        >>> criterion.alpha, criterion.beta = bss_weight_schedule(0, 10)
        >>> loss = criterion([student(images)], teacher(images), labels,
        ...                  [student(bss.samples)], teacher(bss.samples),
        ...                  bss.batch_index, bss.weight)
        >>> loss.backward()
    """

    exit_weights: Tensor | None

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 1.0,
        temperature: float = 1.0,
        ce_weight: float = 1.0,
        exit_weights: ExitWeights = None,
        reduction: Reduction = "mean",
        detach_teacher: bool = True,
    ) -> None:
        super().__init__()
        self.alpha = check_coefficient("alpha", alpha)
        self.beta = check_coefficient("beta", beta)
        self.temperature = check_temperature(temperature)
        self.ce_weight = check_coefficient("ce_weight", ce_weight)
        self.reduction: Reduction = check_reduction(reduction)
        self.detach_teacher = detach_teacher
        self.register_buffer("exit_weights", as_exit_weights(exit_weights))

    def forward(
        self,
        student_logits: ExitLogits,
        teacher_logits: Tensor,
        targets: Tensor,
        bss_student_logits: ExitLogits | None = None,
        bss_teacher_logits: Tensor | None = None,
        bss_index: Tensor | None = None,
        bss_weight: Tensor | None = None,
    ) -> Tensor:
        return bss_kd_loss(
            student_logits,
            teacher_logits,
            targets,
            bss_student_logits,
            bss_teacher_logits,
            bss_index,
            bss_weight,
            alpha=self.alpha,
            beta=self.beta,
            temperature=self.temperature,
            ce_weight=self.ce_weight,
            exit_weights=self.exit_weights,
            reduction=self.reduction,
            detach_teacher=self.detach_teacher,
        )

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}, "
            f"ce_weight={self.ce_weight}, reduction={self.reduction!r}"
        )
