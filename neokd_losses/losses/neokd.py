"""The full NEO-KD objective: clean and adversarial cross-entropy plus NKD and EOKD.

Inputs are *logits* of every exit on clean and adversarial inputs, and class-index targets.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, overload

import torch
import torch.nn.functional as F
from torch import Tensor

from .._cross_entropy import per_exit_cross_entropy, soft_cross_entropy
from .._exits import ExitLogits, reduce_exits
from .._validation import (
    ExitWeights,
    Reduction,
    as_exit_weights,
    check_bool,
    check_coefficient,
    check_generator,
    check_reduction,
    check_temperature,
)
from ._base import _MultiExitLoss, stack_pair
from .neighbor import neighbor_teacher
from .orthogonal import orthogonal_teacher, resolve_mask

__all__ = ["NEOKDLoss", "NEOKDTerms", "neokd_loss"]


class NEOKDTerms(NamedTuple):
    """The NEO-KD objective and its parts, each reduced like the total.

    ``total = clean_ce + adv_ce + alpha * nkd + beta * eokd``, where ``nkd`` and ``eokd``
    are already weighted by the exit weights γ but not by alpha and beta. A term whose
    coefficient is 0 is not computed and reported as zeros.

    Shape:
        - every field: () for ``reduction="mean"`` or ``"sum"``, (E, B) for ``"none"``.

    Example:
        >>> clean = [torch.randn(4, 10) for _ in range(3)]
        >>> adv = [torch.randn(4, 10) for _ in range(3)]
        >>> targets = torch.randint(0, 10, (4,))
        >>> terms = neokd_loss(adv, clean, targets, reduction="none", return_terms=True)
        >>> terms.nkd.shape
        torch.Size([3, 4])
        >>> parts = terms.clean_ce + terms.adv_ce + 3.0 * terms.nkd + 1.0 * terms.eokd
        >>> torch.allclose(terms.total, parts)
        True
    """

    total: Tensor
    clean_ce: Tensor
    adv_ce: Tensor
    nkd: Tensor
    eokd: Tensor


@overload
def neokd_loss(
    adv_logits: ExitLogits,
    clean_logits: ExitLogits,
    targets: Tensor,
    *,
    alpha: float = ...,
    beta: float = ...,
    exit_weights: ExitWeights = ...,
    temperature: float = ...,
    mask: Tensor | None = ...,
    generator: torch.Generator | None = ...,
    reduction: Reduction = ...,
    detach_teacher: bool = ...,
    return_terms: Literal[False] = ...,
) -> Tensor: ...


@overload
def neokd_loss(
    adv_logits: ExitLogits,
    clean_logits: ExitLogits,
    targets: Tensor,
    *,
    alpha: float = ...,
    beta: float = ...,
    exit_weights: ExitWeights = ...,
    temperature: float = ...,
    mask: Tensor | None = ...,
    generator: torch.Generator | None = ...,
    reduction: Reduction = ...,
    detach_teacher: bool = ...,
    return_terms: Literal[True],
) -> NEOKDTerms: ...


def neokd_loss(
    adv_logits: ExitLogits,
    clean_logits: ExitLogits,
    targets: Tensor,
    *,
    alpha: float = 3.0,
    beta: float = 1.0,
    exit_weights: ExitWeights = None,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    reduction: Reduction = "mean",
    detach_teacher: bool = True,
    return_terms: bool = False,
) -> Tensor | NEOKDTerms:
    r"""The NEO-KD training objective (Ham et al., NeurIPS 2023, eq. 5).

    .. math::
        L = \frac{1}{B}\sum_j \sum_i \Big[ ℓ(f_i(x_j), y_j) + ℓ(f_i(x_j^{adv}), y_j)
            + γ_i\big(α\, \mathrm{NKD}_{ij} + β\, \mathrm{EOKD}_{ij}\big) \Big]

    with NKD from :func:`~neokd_losses.functional.neighbor_kd` and EOKD from
    :func:`~neokd_losses.functional.exitwise_orthogonal_kd`. The temperature applies to
    the two distillation terms only (scaled by T²); the cross-entropies use T = 1. The
    clean logits receive gradients through their cross-entropy; as teachers they are
    detached by default. The paper uses α = 3, β = 1 and γ = 1 for the first three exits,
    1.5 for later ones on 5- and 7-exit networks. ``alpha=0`` gives the EOKD-only
    ablation, ``beta=0`` the NKD-only one, and ``alpha=beta=0`` plain adversarial
    training on the summed per-exit cross-entropies.

    Args:
        adv_logits: logits of every exit on the adversarial inputs.
        clean_logits: logits of every exit on the clean inputs.
        targets: class indices (B,).
        alpha: weight α >= 0 of NKD.
        beta: weight β >= 0 of EOKD.
        exit_weights: per-exit weights γ (E,) of the distillation terms; default all ones.
        temperature: T > 0 of the distillation terms.
        mask: a fixed (E, B, K) orthogonal selection; default a fresh draw per call.
        generator: a ``torch.Generator`` for the fresh mask.
        reduction: ``"mean"`` (sum over exits, mean over the batch), ``"sum"`` or ``"none"``.
        detach_teacher: stop gradients through the clean side of NKD and EOKD.
        return_terms: return :class:`NEOKDTerms` (total and parts) instead of the total.
            The total is then exactly the sum of its parts; without it, the adversarial
            terms are computed as one soft cross-entropy against a mixed target (ℓ is
            linear in its target; faster), equal up to float rounding.

    Returns:
        The loss (a scalar, or (E, B) for ``reduction="none"``), or its terms; float32
        for half-precision inputs.

    Raises:
        TypeError: for logits that are not sequences of float tensors or non-integer
            targets.
        ValueError: for mismatched shapes, targets out of range, negative α or β, bad
            ``exit_weights``, ``temperature`` or ``reduction``, or K - 1 < E with β > 0.

    Shape:
        - adv_logits, clean_logits: sequences of E tensors (B, K).
        - targets: (B,); mask: (E, B, K).
        - output: () or (E, B).

    Example:
        >>> clean = [torch.randn(8, 10, requires_grad=True) for _ in range(3)]
        >>> adv = [torch.randn(8, 10, requires_grad=True) for _ in range(3)]
        >>> targets = torch.randint(0, 10, (8,))
        >>> terms = neokd_loss(adv, clean, targets, return_terms=True)
        >>> terms.total.backward()
        >>> sorted(terms._fields)
        ['adv_ce', 'clean_ce', 'eokd', 'nkd', 'total']
    """
    a = check_coefficient("alpha", alpha)
    b = check_coefficient("beta", beta)
    t = check_temperature(temperature)
    check_reduction(reduction)
    check_generator(generator)
    check_bool(detach_teacher, "detach_teacher")
    check_bool(return_terms, "return_terms")
    adv, clean = stack_pair(adv_logits, clean_logits, targets)
    num_exits, batch, _ = adv.shape
    gamma = as_exit_weights(exit_weights, num_exits)

    clean_ce = per_exit_cross_entropy(clean, targets)
    teachers, coefficients = [], []
    if a:
        teachers.append(neighbor_teacher(clean, t, detach_teacher))
        coefficients.append(a)
    if b:
        mask = resolve_mask(mask, targets, adv.shape, generator).to(adv.device)
        teachers.append(orthogonal_teacher(clean, mask, t, detach_teacher))
        coefficients.append(b)
    if not return_terms:
        return reduce_exits(
            clean_ce + _adversarial_terms(adv, targets, teachers, coefficients, gamma, t),
            reduction,
        )
    # The terms one by one: the stacked teachers (n, E, B, K) share one log-softmax.
    adv_ce = per_exit_cross_entropy(adv, targets)
    nkd = eokd = adv.new_zeros(num_exits, batch)
    if teachers:
        kd = _weigh(soft_cross_entropy(adv, torch.stack(teachers), t) * t**2, gamma)
        nkd = kd[0] if a else nkd
        eokd = kd[-1] if b else eokd
    total = clean_ce + adv_ce + a * nkd + b * eokd
    return NEOKDTerms(
        *(reduce_exits(term, reduction) for term in (total, clean_ce, adv_ce, nkd, eokd))
    )


def _adversarial_terms(
    adv: Tensor,
    targets: Tensor,
    teachers: list[Tensor],
    coefficients: list[float],
    gamma: Tensor | None,
    temperature: float,
) -> Tensor:
    """CE(f_i(x_adv), y) + γ_i(α NKD + β EOKD), (E, B), with as few passes as possible.

    ℓ is linear in its target, so α·NKD + β·EOKD is one soft cross-entropy against the
    mixed teacher α·q_NKD + β·q_EOKD; at T = 1 the adversarial cross-entropy joins it,
    as CE(z, y) = ℓ(z, onehot(y)): one log-softmax of the adversarial logits in all.
    Equal to the sum of the separate terms up to float rounding.
    """
    if not teachers:
        return per_exit_cross_entropy(adv, targets)
    mixed = coefficients[0] * teachers[0]
    for coefficient, teacher in zip(coefficients[1:], teachers[1:], strict=True):
        mixed = mixed + coefficient * teacher
    if temperature != 1.0:
        kd = soft_cross_entropy(adv, mixed, temperature) * temperature**2
        return per_exit_cross_entropy(adv, targets) + _weigh(kd, gamma)
    if gamma is not None:
        mixed = mixed * gamma.to(mixed)[:, None, None]
    onehot = F.one_hot(targets.long(), adv.shape[-1]).to(mixed)
    return soft_cross_entropy(adv, mixed + onehot)


def _weigh(kd: Tensor, gamma: Tensor | None) -> Tensor:
    """Distillation terms (..., E, B) times the exit weights γ (E,), if any."""
    return kd if gamma is None else kd * gamma.to(kd)[:, None]


class NEOKDLoss(_MultiExitLoss):
    """The NEO-KD objective: :func:`~neokd_losses.functional.neokd_loss` as a module.

    The constructor takes the keyword arguments of
    :func:`~neokd_losses.functional.neokd_loss` but ``mask`` and ``return_terms`` (same
    names, defaults and checks, described there) and stores them; ``exit_weights``
    becomes a registered buffer. ``forward`` takes ``mask`` and ``return_terms``. The
    paper's settings are α = 3, β = 1 and γ = ``[1, 1, 1, 1.5, 1.5]`` for 5 exits.

    Shape:
        - adv_logits, clean_logits: sequences of E tensors (B, K); targets: (B,).
        - mask: (E, B, K); output: () or (E, B) for ``reduction="none"``.

    Example:
        >>> criterion = NEOKDLoss(alpha=3.0, beta=1.0)
        >>> clean = [torch.randn(8, 10, requires_grad=True) for _ in range(3)]
        >>> adv = [torch.randn(8, 10, requires_grad=True) for _ in range(3)]
        >>> targets = torch.randint(0, 10, (8,))
        >>> criterion(adv, clean, targets).backward()
        >>> criterion(adv, clean, targets, return_terms=True).nkd.shape
        torch.Size([])
    """

    _hyper_parameters = ("alpha", "beta", "temperature")
    _passed = ("generator", "detach_teacher")

    def __init__(
        self,
        alpha: float = 3.0,
        beta: float = 1.0,
        exit_weights: ExitWeights = None,
        temperature: float = 1.0,
        reduction: Reduction = "mean",
        generator: torch.Generator | None = None,
        detach_teacher: bool = True,
    ) -> None:
        super().__init__(exit_weights, reduction)
        self.alpha = check_coefficient("alpha", alpha)
        self.beta = check_coefficient("beta", beta)
        self.temperature = check_temperature(temperature)
        check_generator(generator)
        self.generator = generator
        self.detach_teacher = check_bool(detach_teacher, "detach_teacher")

    @overload
    def forward(
        self,
        adv_logits: ExitLogits,
        clean_logits: ExitLogits,
        targets: Tensor,
        *,
        mask: Tensor | None = ...,
        return_terms: Literal[False] = ...,
    ) -> Tensor: ...

    @overload
    def forward(
        self,
        adv_logits: ExitLogits,
        clean_logits: ExitLogits,
        targets: Tensor,
        *,
        mask: Tensor | None = ...,
        return_terms: Literal[True],
    ) -> NEOKDTerms: ...

    def forward(
        self,
        adv_logits: ExitLogits,
        clean_logits: ExitLogits,
        targets: Tensor,
        *,
        mask: Tensor | None = None,
        return_terms: bool = False,
    ) -> Tensor | NEOKDTerms:
        return neokd_loss(  # type: ignore[call-overload, no-any-return]
            adv_logits,
            clean_logits,
            targets,
            mask=mask,
            return_terms=return_terms,
            **self._options(),
        )
