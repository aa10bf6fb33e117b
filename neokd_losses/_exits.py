"""Validation and stacking of multi-exit outputs, shared by every loss and attack.

A multi-exit model returns a sequence of E logits tensors, each (B, K). Internally the
library works on one stacked (E, B, K) tensor so that every loss is vectorised over exits.
The helpers here turn user input into that tensor, or raise an error that names what was
expected, what was received and, where one exists, the fix.

All helpers take *logits* (unnormalised scores), never probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Union, get_args

import torch
from torch import Tensor

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

ExitWeights = Union[Sequence[float], Tensor, None]
"""Per-exit weights (the paper's gamma): E non-negative numbers, or None for all ones."""

Reduction = Literal["mean", "sum", "none"]
_REDUCTIONS: tuple[str, ...] = get_args(Reduction)

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _is_compiling() -> bool:
    """True while torch.compile traces the caller (data-dependent checks are skipped)."""
    return bool(torch.compiler.is_compiling())


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


def check_targets(
    targets: Tensor, batch_size: int, num_classes: int, name: str = "targets"
) -> None:
    """Check class-index targets: an integer tensor (B,) with values in [0, K).

    The value-range check reads the tensor's minimum and maximum (a device sync on CUDA);
    it is skipped while ``torch.compile`` traces the function.

    Raises:
        TypeError: if ``targets`` is not an integer tensor.
        ValueError: if its shape is not (B,) or a value lies outside [0, K).
    """
    if not isinstance(targets, Tensor):
        raise TypeError(
            f"`{name}` must be a Tensor of class indices (B,), got {type(targets).__name__}."
        )
    if targets.dtype == torch.bool or targets.is_floating_point() or targets.is_complex():
        raise TypeError(
            f"`{name}` must hold integer class indices (torch.long), got dtype {targets.dtype}. "
            "Soft or one-hot targets are not accepted; pass `targets.argmax(-1)`."
        )
    if targets.shape != (batch_size,):
        raise ValueError(
            f"`{name}` must have shape (B,) = ({batch_size},) to match the logits, "
            f"got {tuple(targets.shape)}."
        )
    if batch_size and not _is_compiling():
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"`{name}` must lie in [0, {num_classes}) for K = {num_classes} classes, "
                f"got values in [{low}, {high}]."
            )


def as_exit_weights(
    weights: ExitWeights,
    num_exits: int | None = None,
    name: str = "exit_weights",
) -> Tensor | None:
    """Validate per-exit weights and return them as a float tensor (E,), or None.

    Args:
        weights: E non-negative finite numbers, or None (all exits weigh 1).
        num_exits: the expected E; not checked when None (at construction time).
        name: the argument's name, used in error messages.

    Raises:
        TypeError: if ``weights`` is not a sequence of numbers or a tensor.
        ValueError: if it is not 1-D, has the wrong length, or holds a negative or
            non-finite value.
    """
    if weights is None:
        return None
    if isinstance(weights, Tensor):
        w = weights.detach()
        if not w.is_floating_point():
            w = w.to(torch.get_default_dtype())
    elif isinstance(weights, Sequence) and not isinstance(weights, (str, bytes)):
        try:
            w = torch.as_tensor(weights, dtype=torch.get_default_dtype())
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"`{name}` must be a sequence of numbers, got {weights!r}.") from err
    else:
        raise TypeError(
            f"`{name}` must be a sequence of E numbers or a 1-D tensor, got {type(weights).__name__}."
        )
    if w.dim() != 1:
        raise ValueError(f"`{name}` must be 1-D (E,), got shape {tuple(w.shape)}.")
    if num_exits is not None and w.numel() != num_exits:
        raise ValueError(
            f"`{name}` must have one weight per exit: expected {num_exits}, got {w.numel()}."
        )
    if not _is_compiling() and (not bool(torch.isfinite(w).all()) or bool((w < 0).any())):
        raise ValueError(f"`{name}` must be finite and non-negative, got {w.tolist()}.")
    return w


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` if it is an int >= 1; raise TypeError / ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}.")
    if value < 1:
        raise ValueError(f"`{name}` must be >= 1, got {value}.")
    return value


def check_temperature(temperature: float) -> float:
    """Return ``temperature`` as a float, or raise a ValueError unless it is finite and > 0
    (a TypeError for a bool or a non-number)."""
    if isinstance(temperature, bool):
        raise TypeError(f"`temperature` must be a real number > 0, got bool {temperature!r}.")
    try:
        t = float(temperature)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"`temperature` must be a real number > 0, got {type(temperature).__name__} "
            f"{temperature!r}."
        ) from err
    if not t > 0 or t == float("inf"):
        raise ValueError(f"`temperature` must be a finite number > 0, got {temperature!r}.")
    return t


def check_coefficient(name: str, value: float, *, at_most_one: bool = False) -> float:
    """``value`` as a float >= 0 (and <= 1 with ``at_most_one``), finite; TypeError for
    non-numbers."""
    if isinstance(value, bool):
        raise TypeError(f"`{name}` must be a real number, got bool {value!r}.")
    try:
        v = float(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__}.") from err
    high = 1.0 if at_most_one else float("inf")
    if not (v >= 0 and (v <= high if at_most_one else v < high)):
        expected = "a number in [0, 1]" if at_most_one else "a finite number >= 0"
        raise ValueError(f"`{name}` must be {expected}, got {value!r}.")
    return v


def check_reduction(reduction: str) -> Reduction:
    """Return ``reduction`` if it is "mean", "sum" or "none", else raise a ValueError."""
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"`reduction` must be one of {', '.join(repr(r) for r in _REDUCTIONS)}, "
            f"got {reduction!r}."
        )
    return reduction  # type: ignore[return-value]


def check_exit_index(exit_index: int, num_exits: int) -> int:
    """Return ``exit_index`` made non-negative, or raise a ValueError if it is out of range.

    Negative indices count from the last exit, as in Python: -1 is exit E - 1.
    """
    if isinstance(exit_index, bool) or not isinstance(exit_index, int):
        raise TypeError(f"`exit_index` must be an int, got {type(exit_index).__name__}.")
    if not -num_exits <= exit_index < num_exits:
        raise ValueError(
            f"`exit_index` must lie in [{-num_exits}, {num_exits}) for a model with "
            f"{num_exits} exits, got {exit_index}."
        )
    return exit_index % num_exits


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
