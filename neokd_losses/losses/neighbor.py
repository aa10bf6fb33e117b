"""Neighbor knowledge distillation (NKD), the first of NEO-KD's two distillation terms.

Inputs are *logits* (unnormalized scores) of every exit, on clean and on adversarial
inputs; probabilities are formed inside with a softmax at temperature T.
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
    check_positive_int,
    check_reduction,
    check_temperature,
)
from ._base import _MultiExitLoss, stack_pair, weigh_and_reduce

__all__ = ["NeighborKD", "neighbor_kd", "neighbor_weights"]


def neighbor_weights(num_exits: int) -> Tensor:
    """The (E, E) averaging matrix of the neighbor teachers.

    Row i holds the weights with which the clean predictions of all exits enter exit i's
    teacher: 1/3 on exits i-1, i, i+1 for an inner exit; 1/2 on the first two exits for
    the first exit and on the last two for the last; a single exit is its own teacher.

    Args:
        num_exits: the number of exits E >= 1.

    Returns:
        A float32 tensor (E, E) whose rows sum to 1.

    Raises:
        TypeError: if ``num_exits`` is not an int.
        ValueError: if ``num_exits`` < 1.

    Shape:
        - output: (E, E); row i mixes the clean predictions (E, B, K) into exit i's
          teacher (B, K).

    Example:
        >>> neighbor_weights(4)
        tensor([[0.5000, 0.5000, 0.0000, 0.0000],
                [0.3333, 0.3333, 0.3333, 0.0000],
                [0.0000, 0.3333, 0.3333, 0.3333],
                [0.0000, 0.0000, 0.5000, 0.5000]])
    """
    check_positive_int(num_exits, "num_exits")
    idx = torch.arange(num_exits)
    adjacent = (idx[:, None] - idx[None, :]).abs() <= 1
    weights = adjacent.float()
    return weights / weights.sum(1, keepdim=True)


def neighbor_teacher(clean: Tensor, temperature: float, detach_teacher: bool) -> Tensor:
    """The neighbor teachers (E, B, K) of the stacked clean logits (E, B, K) at temperature T.

    Row i mixes the clean probabilities of exits i-1, i, i+1 by :func:`neighbor_weights`.
    """
    teacher_logits = clean.detach() if detach_teacher else clean
    probs = F.softmax(tempered(teacher_logits, temperature), dim=-1)
    # The rows of neighbor_weights, as shifted sums: p_{i-1} + p_i + p_{i+1} with zero
    # padding beyond the first and last exit, divided by the number of neighbors. Plain
    # additions, not a matmul (einsum), so autocast cannot run the mix in bf16/fp16.
    num_exits = probs.shape[0]
    padded = F.pad(probs, (0, 0, 0, 0, 1, 1))
    summed = padded[:-2] + padded[1:-1] + padded[2:]
    counts = [1.0] if num_exits == 1 else [2.0] + [3.0] * (num_exits - 2) + [2.0]
    return summed / torch.tensor(counts, device=probs.device, dtype=probs.dtype)[:, None, None]


def neighbor_kd(
    adv_logits: ExitLogits,
    clean_logits: ExitLogits,
    *,
    temperature: float = 1.0,
    exit_weights: ExitWeights = None,
    reduction: Reduction = "mean",
    detach_teacher: bool = True,
) -> Tensor:
    r"""Neighbor knowledge distillation (NKD) of NEO-KD (Ham et al., NeurIPS 2023).

    Exit i's prediction on the adversarial input is distilled from the average of the
    clean predictions of exit i and its direct neighbors:

    .. math::
        \mathrm{NKD}_{ij} = T^2\, ℓ\Big(f_i(x_j^{adv}),\ \tfrac{1}{|N_i|}\textstyle\sum_{n \in N_i} f_n(x_j)\Big),
        \quad N_i = \{i-1, i, i+1\} \cap \{1..E\}

    with :math:`N_1 = \{1, 2\}`, :math:`N_E = \{E-1, E\}`, and :math:`N_1 = \{1\}` when
    E = 1 (self-distillation from clean to adversarial). Probabilities are averaged, not
    logits. ``f`` is the softmax at temperature T; ℓ is the soft-target cross-entropy.

    Args:
        adv_logits: the student side, logits of every exit on adversarial inputs.
        clean_logits: the teacher side, logits of every exit on the clean inputs.
        temperature: T > 0 dividing both sides' logits; the loss is scaled by T².
        exit_weights: per-exit weights γ (E,), default all ones.
        reduction: ``"mean"`` (sum over exits, mean over the batch), ``"sum"`` or
            ``"none"``.
        detach_teacher: stop gradients through the clean (teacher) side. Default True.

    Returns:
        A scalar, or (E, B) for ``reduction="none"``; float32 for half-precision inputs.

    Raises:
        TypeError: if the logits are not sequences of floating-point tensors.
        ValueError: for exits of different shapes, adversarial and clean lists of
            different lengths, bad ``exit_weights``, ``temperature`` or ``reduction``.

    Shape:
        - adv_logits, clean_logits: sequences of E tensors (B, K).
        - output: () or (E, B).

    Example:
        >>> clean = [torch.randn(8, 10) for _ in range(3)]
        >>> adv = [torch.randn(8, 10, requires_grad=True) for _ in range(3)]
        >>> loss = neighbor_kd(adv, clean)
        >>> loss.backward()
        >>> neighbor_kd(adv, clean, reduction="none").shape
        torch.Size([3, 8])
    """
    t = check_temperature(temperature)
    check_reduction(reduction)
    check_bool(detach_teacher, "detach_teacher")
    adv, clean = stack_pair(adv_logits, clean_logits)
    loss = soft_cross_entropy(adv, neighbor_teacher(clean, t, detach_teacher), t) * t**2
    return weigh_and_reduce(loss, exit_weights, reduction)


class NeighborKD(_MultiExitLoss):
    """Neighbor knowledge distillation: :func:`neighbor_kd` as a module.

    The constructor takes the keyword arguments of :func:`neighbor_kd` (same names,
    defaults and checks, described there) and stores them; ``exit_weights`` becomes a
    registered buffer.

    Shape:
        - adv_logits, clean_logits: sequences of E tensors (B, K).
        - output: () or (E, B) for ``reduction="none"``.

    Example:
        >>> criterion = NeighborKD(exit_weights=[1.0, 1.0, 1.5])
        >>> criterion
        NeighborKD(temperature=1.0, exit_weights=[1.0, 1.0, 1.5], reduction='mean')
        >>> clean = [torch.randn(8, 10) for _ in range(3)]
        >>> adv = [torch.randn(8, 10, requires_grad=True) for _ in range(3)]
        >>> criterion(adv, clean).backward()
    """

    _hyper_parameters = ("temperature",)
    _passed = ("detach_teacher",)

    def __init__(
        self,
        temperature: float = 1.0,
        exit_weights: ExitWeights = None,
        reduction: Reduction = "mean",
        detach_teacher: bool = True,
    ) -> None:
        super().__init__(exit_weights, reduction)
        self.temperature = check_temperature(temperature)
        self.detach_teacher = check_bool(detach_teacher, "detach_teacher")

    def forward(self, adv_logits: ExitLogits, clean_logits: ExitLogits) -> Tensor:
        return neighbor_kd(adv_logits, clean_logits, **self._options())
