"""Stacking of multi-exit outputs, shared by every loss and attack (checks: `_validation`).

A multi-exit model returns a sequence of E logits tensors, each (B, K). Internally the
library works on one stacked (E, B, K) tensor so that every loss is vectorized over exits.
The helpers here turn user input into that tensor, or raise an error that names what was
expected, what was received and, where one exists, the fix.

All helpers take *logits* (unnormalized scores), never probabilities.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from neokd_losses._validation import Reduction, check_reduction, upcast

__all__ = ["ExitLogits", "check_same_exits", "reduce_exits", "stack_exits"]

ExitLogits = Sequence[Tensor]
"""A model output: a list or tuple of E logits tensors, each (B, K)."""


_HOW_TO = "the how-to 'Wrap your own multi-exit model'"


def _kind_and_fix(output: object, var: str, single_hint: str) -> tuple[str, str]:
    """What ``output`` is, in words, and how to turn it into a list of E exit logits.

    ``var`` is the expression the fix refers to (``"out"`` for a model's output).
    """
    in_forward = var == "out"
    if isinstance(output, Tensor):
        shape = tuple(output.shape)
        if output.dim() == 3:
            unstack = "make the model's forward return `list(out.unbind(0))`"
            fix = unstack if in_forward else f"pass `list({var}.unbind(0))`, or {unstack}"
            return (
                f"a single Tensor of shape {shape}, which looks like E = {shape[0]} exits "
                "stacked as (E, B, K)",
                f"Unstack it: {fix}.",
            )
        return f"a single Tensor of shape {shape}", single_hint
    if isinstance(output, Mapping):
        keys = list(output.keys())
        return (
            f"{type(output).__name__} with keys {keys}",
            f"Return the exits as a list in exit order, `[{var}[k] for k in {keys}]`, e.g. "
            f"by wrapping the model in the `ExitList` module of {_HOW_TO} "
            f"(`ExitList(model, {keys})`).",
        )
    if isinstance(output, Sequence) and not isinstance(output, (str, bytes)) and output:
        head = output[0]
        if isinstance(head, Sequence) and not isinstance(head, (str, bytes, Tensor)):
            rest = ", ".join(type(v).__name__ for v in output[1:])
            return (
                f"{type(output).__name__} whose first item is a {type(head).__name__} of "
                f"{len(head)} items (followed by {rest or 'nothing'}), which looks like "
                "`(exits, features)`",
                "Return the exit logits only: `return exits` instead of `return exits, "
                f"features` in the model's forward (or pass `{var}[0]`; see {_HOW_TO}).",
            )
    return type(output).__name__, ""


def exit_sequence(
    output: object, prefix: str, var: str, single_hint: str, item: Callable[[int], str]
) -> Sequence[Tensor]:
    """Return ``output`` if it is a list or tuple of tensors (maybe empty), else raise.

    Every message names what was received and the fix: a stacked (E, B, K) tensor is
    unstacked with ``list(out.unbind(0))``, a dict becomes a list in exit order (the
    ``ExitList`` wrapper of the own-model how-to), and ``(exits, features)`` becomes
    ``exits``.

    Args:
        output: a model's output or a loss argument.
        prefix: the start of the message, e.g. "`logits` must be a list or tuple of E
            exit logits tensors (B, K), got".
        var: the expression the fix refers to; ``"out"`` for a model's output.
        single_hint: the fix for a single (B, K) tensor.
        item: item i's name in messages, e.g. ``lambda i: f"`logits[{i}]`"``.

    Raises:
        TypeError: if ``output`` is not a list or tuple, or an item is not a tensor.
    """
    if isinstance(output, Sequence) and not isinstance(output, (str, bytes, Tensor)):
        if all(isinstance(z, Tensor) for z in output):
            return output
    kind, fix = _kind_and_fix(output, var, single_hint)
    if kind == type(output).__name__ and isinstance(output, Sequence):
        for i, z in enumerate(output):
            if not isinstance(z, Tensor):
                raise TypeError(f"{item(i)} must be a Tensor (B, K), got {type(z).__name__}.")
    raise TypeError(f"{prefix} {kind}." + (f" {fix}" if fix else ""))


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
    var = name if name.isidentifier() else "out"
    logits = exit_sequence(
        logits,
        f"`{name}` must be a list or tuple of E exit logits tensors (B, K), got",
        var,
        f"Pass the model's list of exit outputs; for a single-exit model wrap it as [{var}].",
        lambda i: f"`{name}[{i}]`",
    )
    if len(logits) == 0:
        raise ValueError(
            f"`{name}` must hold at least one exit, got an empty {type(logits).__name__}."
        )
    first = logits[0]
    for i, z in enumerate(logits):
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
    return upcast(torch.stack(tuple(logits)))


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
