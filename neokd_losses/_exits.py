"""Validation and stacking of multi-exit outputs, shared by every loss and attack.

A multi-exit model returns a sequence of E logits tensors, each (B, K). Internally the
library works on one stacked (E, B, K) tensor so that every loss is vectorised over exits.
The helpers here turn user input into that tensor, or raise an error that names what was
expected, what was received and, where one exists, the fix.

All helpers take *logits* (unnormalised scores), never probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from neokd_losses._validation import (
    ExitWeights,
    Reduction,
    as_exit_weights,
    check_coefficient,
    check_exit_index,
    check_positive_int,
    check_reduction,
    check_targets,
    check_temperature,
)

__all__ = [
    "ExitLogits",
    "ExitWeights",
    "Reduction",
    "as_exit_weights",
    "check_coefficient",
    "check_exit_index",
    "check_positive_int",
    "check_reduction",
    "check_same_exits",
    "check_targets",
    "check_temperature",
    "reduce_exits",
    "stack_exits",
]

ExitLogits = Sequence[Tensor]
"""A model output: a list or tuple of E logits tensors, each (B, K)."""

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def stack_exits(logits: ExitLogits, name: str = "logits") -> Tensor:
    """Validate a sequence of E exit logits and stack it to one (E, B, K) tensor.

    Half-precision logits (float16, bfloat16, as produced under autocast) are upcast to
    float32 so that every loss computes in float32; float32 and float64 are kept.

    Args:
        logits: sequence of E tensors (B, K), the output of a multi-exit model.
        name: the argument's name, used in error messages.

    Returns:
        The stacked logits, (E, B, K), floating point of at least float32 precision.

    Raises:
        TypeError: if ``logits`` is a single tensor or not a sequence of tensors, or the
            tensors are not floating point.
        ValueError: if the sequence is empty or the exits differ in shape or are not 2-D.

    Example:
        >>> import torch
        >>> stack_exits([torch.zeros(4, 10), torch.ones(4, 10)]).shape
        torch.Size([2, 4, 10])
    """
    if isinstance(logits, Tensor):
        raise TypeError(
            f"`{name}` must be a list or tuple of E exit logits tensors (B, K), got a single "
            f"Tensor of shape {tuple(logits.shape)}. Pass the model's list of exit outputs; "
            f"for a single-exit model wrap it as [{name}]."
        )
    if not isinstance(logits, Sequence) or isinstance(logits, (str, bytes)):
        raise TypeError(
            f"`{name}` must be a list or tuple of E exit logits tensors (B, K), "
            f"got {type(logits).__name__}."
        )
    if len(logits) == 0:
        raise ValueError(
            f"`{name}` must hold at least one exit, got an empty {type(logits).__name__}."
        )
    first = logits[0]
    for i, z in enumerate(logits):
        if not isinstance(z, Tensor):
            raise TypeError(f"`{name}[{i}]` must be a Tensor (B, K), got {type(z).__name__}.")
        if not z.is_floating_point():
            raise TypeError(
                f"`{name}[{i}]` must hold floating-point logits, got dtype {z.dtype}. "
                "Pass the model's raw float outputs (logits), not predicted labels."
            )
        if z.dim() != 2:
            raise ValueError(f"`{name}[{i}]` must be 2-D (B, K), got shape {tuple(z.shape)}.")
        if z.shape != first.shape:
            raise ValueError(
                f"all exits in `{name}` must have the same shape (B, K): exit 0 is "
                f"{tuple(first.shape)}, exit {i} is {tuple(z.shape)}."
            )
    stacked = torch.stack(tuple(logits))
    if stacked.dtype in _LOW_PRECISION:
        stacked = stacked.float()
    return stacked


def check_same_exits(student: Tensor, teacher: Tensor, names: tuple[str, str]) -> None:
    """Raise a ValueError unless two stacked (E, B, K) tensors agree in E, B and K."""
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"`{names[0]}` and `{names[1]}` must have the same number of exits, got "
            f"{student.shape[0]} and {teacher.shape[0]}."
        )
    if student.shape != teacher.shape:
        raise ValueError(
            f"`{names[0]}` and `{names[1]}` must have exits of the same shape (B, K), got "
            f"{tuple(student.shape[1:])} and {tuple(teacher.shape[1:])}."
        )


def reduce_exits(loss: Tensor, reduction: Reduction) -> Tensor:
    """Reduce a per-exit, per-sample loss (E, B).

    ``"mean"`` sums over exits and averages over the batch (the paper's 1/N Σ_j Σ_i),
    ``"sum"`` sums everything, ``"none"`` returns the (E, B) tensor unchanged.

    Example:
        >>> import torch
        >>> loss = torch.tensor([[1.0, 3.0], [2.0, 4.0]])
        >>> reduce_exits(loss, "mean"), reduce_exits(loss, "sum")
        (tensor(5.), tensor(10.))
    """
    if reduction == "mean":
        return loss.sum(0).mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    check_reduction(reduction)
    raise AssertionError("unreachable")  # pragma: no cover
