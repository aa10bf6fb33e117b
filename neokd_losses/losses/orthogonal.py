"""Exit-wise orthogonal knowledge distillation (EOKD), NEO-KD's second distillation term.

Inputs are *logits* of every exit on clean and adversarial inputs, and class-index
targets. The orthogonal labeling keeps, for each exit, the ground-truth class and a
random set of ⌊(K-1)/E⌋ other classes, disjoint across the exits of one sample.

Mask redraw: the paper does not say how often the random selection is drawn. This library
draws a fresh, independent selection per sample and per call by default; pass ``mask`` (for
example from :func:`orthogonal_label_mask` with a seeded ``torch.Generator``) to pin it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._cross_entropy import soft_cross_entropy, tempered
from .._exits import ExitLogits
from .._validation import (
    ExitWeights,
    Reduction,
    check_bool,
    check_generator,
    check_positive_int,
    check_reduction,
    check_targets,
    check_temperature,
    is_compiling,
)
from ._base import _MultiExitLoss, stack_pair, weigh_and_reduce

__all__ = ["ExitwiseOrthogonalKD", "exitwise_orthogonal_kd", "orthogonal_label_mask"]


def orthogonal_label_mask(
    targets: Tensor,
    num_exits: int,
    num_classes: int,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw the exit-wise orthogonal label selection of EOKD.

    For every sample b, the K - 1 non-target classes are shuffled and dealt out in blocks of
    m = ⌊(K-1)/E⌋: exit e keeps the e-th block. Every exit also keeps the target class.
    So each exit keeps exactly m non-target classes, no non-target class is kept by two
    exits of one sample, and the (K-1) mod E classes left over are kept by none. One
    vectorized draw for the whole batch; no loop over samples.

    Args:
        targets: class indices (B,), integer dtype, values in [0, K).
        num_exits: E >= 1.
        num_classes: K, with K - 1 >= E so that every exit keeps at least one class.
        generator: a ``torch.Generator`` for reproducible draws (its device is used for
            drawing; the mask lands on ``targets.device``).

    Returns:
        A bool tensor (E, B, K), True where exit e keeps class k for sample b.

    Raises:
        TypeError: if ``targets`` is not an integer tensor, or ``num_exits`` /
            ``num_classes`` is not an int.
        ValueError: if E or K < 1, K - 1 < E, or ``targets`` has the wrong shape or range.

    Shape:
        - targets: (B,).
        - output: (E, B, K).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> mask = orthogonal_label_mask(torch.tensor([0, 3]), num_exits=3, num_classes=10, generator=g)
        >>> mask.shape, mask.sum(-1).tolist()
        (torch.Size([3, 2, 10]), [[4, 4], [4, 4], [4, 4]])
        >>> bool(mask[:, 0, 0].all())  # the target class is kept by every exit
        True
    """
    check_positive_int(num_exits, "num_exits")
    check_positive_int(num_classes, "num_classes")
    per_exit = (num_classes - 1) // num_exits
    if per_exit < 1:
        raise ValueError(
            f"orthogonal labels need at least one non-target class per exit, i.e. "
            f"num_classes - 1 >= num_exits; got num_classes={num_classes}, "
            f"num_exits={num_exits}. Use fewer exits for EOKD or set beta=0."
        )
    if not isinstance(targets, Tensor):
        raise TypeError(
            f"`targets` must be a Tensor of class indices (B,), got {type(targets).__name__}."
        )
    if targets.dim() != 1:
        raise ValueError(f"`targets` must have shape (B,), got {tuple(targets.shape)}.")
    batch = targets.shape[0]
    check_targets(targets, batch, num_classes)
    device = targets.device
    draw_device = generator.device if generator is not None else device
    scores = torch.rand(batch, num_classes, generator=generator, device=draw_device).to(device)
    # The target sorts last, so the first K - 1 columns are the shuffled non-target classes.
    scores.scatter_(1, targets[:, None].long(), 2.0)
    order = _argsort_rows(scores)[:, : num_exits * per_exit]
    dealt = torch.arange(num_exits * per_exit, device=device) // per_exit
    owner = torch.full((batch, num_classes), -1, dtype=torch.long, device=device)
    owner.scatter_(1, order, dealt.expand(batch, -1))
    exits = torch.arange(num_exits, device=device)[:, None, None]
    mask = owner[None] == exits
    return mask | F.one_hot(targets.long(), num_classes).bool()[None]


def _argsort_rows(scores: Tensor) -> Tensor:
    """Argsort of each row of a (B, K) float tensor.

    On the CPU, torch's row-wise argsort of short rows costs about 4 µs a row, which made
    the mask draw a fifth of the whole NEO-KD loss (benchmarks/bench_losses.py); NumPy's
    vectorized sort is about 5x faster there. Both sorts give the same permutation unless a
    row holds two equal keys; with float32 uniforms that happens to about K²/2²⁵ of the
    rows (0.03 % at K = 100, 3 % at K = 1000), and the two may then order the tied classes
    differently. Either order is a valid draw. CUDA tensors and traced code
    (torch.compile) use torch.argsort.
    """
    if scores.device.type == "cpu" and not is_compiling():
        try:
            import numpy as np
        except ImportError:  # pragma: no cover - numpy is optional for torch
            pass
        else:
            order = np.argsort(scores.numpy(), axis=1)
            return torch.from_numpy(order).to(torch.long)
    return scores.argsort(dim=1)


def orthogonal_teacher(
    clean: Tensor, mask: Tensor, temperature: float, detach_teacher: bool
) -> Tensor:
    """The EOKD teachers (E, B, K): each exit's clean softmax at temperature T, restricted
    to the classes its (E, B, K) mask keeps and renormalized."""
    teacher_logits = clean.detach() if detach_teacher else clean
    # O(softmax(z)) = softmax(z restricted to the kept classes): stable for any logits,
    # and the target class is always kept, so no row is empty.
    masked = tempered(teacher_logits, temperature).masked_fill(~mask, float("-inf"))
    return F.softmax(masked, dim=-1)


def resolve_mask(
    mask: Tensor | None, targets: Tensor, shape: torch.Size, generator: torch.Generator | None
) -> Tensor:
    """The given (E, B, K) mask, checked, or a fresh draw (on the targets' device)."""
    num_exits, _, num_classes = shape
    if mask is None:
        return orthogonal_label_mask(targets, num_exits, num_classes, generator=generator)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        kind = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"`mask` must be a bool Tensor (E, B, K), got {kind}.")
    if mask.shape != shape:
        raise ValueError(
            f"`mask` must have shape (E, B, K) = {tuple(shape)} to match the logits, "
            f"got {tuple(mask.shape)}."
        )
    return mask


def exitwise_orthogonal_kd(
    adv_logits: ExitLogits,
    clean_logits: ExitLogits,
    targets: Tensor,
    *,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    exit_weights: ExitWeights = None,
    reduction: Reduction = "mean",
    detach_teacher: bool = True,
) -> Tensor:
    r"""Exit-wise orthogonal knowledge distillation (EOKD) of NEO-KD (Ham et al., NeurIPS 2023).

    Each exit's adversarial prediction is distilled from its own clean prediction restricted
    to the classes the orthogonal labeling O keeps for that exit, then renormalized:

    .. math::
        \mathrm{EOKD}_{ij} = T^2\, ℓ\big(f_i(x_j^{adv}),\ O_i(f_i(x_j))\big),\quad
        O_i(p)_k = \frac{p_k\, M_{ijk}}{\sum_c p_c\, M_{ijc}}

    where :math:`M_{ij}` keeps the ground truth and a random, exit-disjoint set of
    ⌊(K-1)/E⌋ other classes (:func:`orthogonal_label_mask`). A fresh mask is drawn per call
    unless ``mask`` is given.

    Args:
        adv_logits: the student side, logits of every exit on adversarial inputs.
        clean_logits: the teacher side, logits of every exit on the clean inputs.
        targets: class indices (B,).
        mask: a bool (E, B, K) selection to use instead of a fresh draw; it should keep
            the target class (otherwise a row with no kept class yields NaN).
        generator: a ``torch.Generator`` for the fresh mask.
        temperature: T > 0 dividing both sides' logits; the loss is scaled by T².
        exit_weights: per-exit weights γ (E,), default all ones.
        reduction: ``"mean"`` (sum over exits, mean over the batch), ``"sum"`` or ``"none"``.
        detach_teacher: stop gradients through the clean (teacher) side. Default True.

    Returns:
        A scalar, or (E, B) for ``reduction="none"``; float32 for half-precision inputs.

    Raises:
        TypeError: for logits that are not sequences of float tensors, non-integer
            targets, or a mask that is not a bool tensor.
        ValueError: for mismatched shapes, targets out of range, K - 1 < E without a
            mask, or bad ``exit_weights``, ``temperature`` or ``reduction``.

    Shape:
        - adv_logits, clean_logits: sequences of E tensors (B, K).
        - targets: (B,); mask: (E, B, K).
        - output: () or (E, B).

    Example:
        >>> clean = [torch.randn(8, 10) for _ in range(3)]
        >>> adv = [torch.randn(8, 10, requires_grad=True) for _ in range(3)]
        >>> targets = torch.randint(0, 10, (8,))
        >>> exitwise_orthogonal_kd(adv, clean, targets).backward()
    """
    t = check_temperature(temperature)
    check_reduction(reduction)
    check_generator(generator)
    check_bool(detach_teacher, "detach_teacher")
    adv, clean = stack_pair(adv_logits, clean_logits, targets)
    mask = resolve_mask(mask, targets, adv.shape, generator).to(adv.device)
    loss = soft_cross_entropy(adv, orthogonal_teacher(clean, mask, t, detach_teacher), t) * t**2
    return weigh_and_reduce(loss, exit_weights, reduction)


class ExitwiseOrthogonalKD(_MultiExitLoss):
    """Exit-wise orthogonal KD: :func:`exitwise_orthogonal_kd` as a module.

    The constructor takes the keyword arguments of :func:`exitwise_orthogonal_kd` but
    ``mask`` (same names, defaults and checks, described there) and stores them;
    ``exit_weights`` becomes a registered buffer. A fresh orthogonal mask is drawn on
    every call from ``generator`` (or the global RNG); pass ``mask=`` to ``forward`` to
    pin it.

    Shape:
        - adv_logits, clean_logits: sequences of E tensors (B, K); targets: (B,).
        - mask: (E, B, K); output: () or (E, B) for ``reduction="none"``.

    Example:
        >>> criterion = ExitwiseOrthogonalKD(generator=torch.Generator().manual_seed(0))
        >>> clean = [torch.randn(8, 10) for _ in range(3)]
        >>> adv = [torch.randn(8, 10, requires_grad=True) for _ in range(3)]
        >>> criterion(adv, clean, torch.randint(0, 10, (8,))).backward()
    """

    _hyper_parameters = ("temperature",)
    _passed = ("generator", "detach_teacher")

    def __init__(
        self,
        temperature: float = 1.0,
        exit_weights: ExitWeights = None,
        reduction: Reduction = "mean",
        generator: torch.Generator | None = None,
        detach_teacher: bool = True,
    ) -> None:
        super().__init__(exit_weights, reduction)
        self.temperature = check_temperature(temperature)
        check_generator(generator)
        self.generator = generator
        self.detach_teacher = check_bool(detach_teacher, "detach_teacher")

    def forward(
        self,
        adv_logits: ExitLogits,
        clean_logits: ExitLogits,
        targets: Tensor,
        *,
        mask: Tensor | None = None,
    ) -> Tensor:
        return exitwise_orthogonal_kd(
            adv_logits, clean_logits, targets, mask=mask, **self._options()
        )
