"""Argument and input checks shared by the reference models."""

from __future__ import annotations

import math
import numbers

from torch import Tensor

from neokd_losses._exits import check_positive_int

__all__ = ["check_image_input", "check_positive_int", "check_real"]


def check_real(value: object, name: str) -> float:
    """Return ``value`` as a finite float; TypeError for non-numbers (bools and strings too)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__} {value!r}.")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"`{name}` must be finite, got {value!r}.")
    return result


def check_image_input(x: object, channels: int, size: tuple[int, int], model: str) -> None:
    """Raise unless ``x`` is a floating-point image batch (B, channels, *size)."""
    if not isinstance(x, Tensor):
        raise TypeError(
            f"{model} expects a Tensor (B, {channels}, {size[0]}, {size[1]}), "
            f"got {type(x).__name__}."
        )
    if not x.is_floating_point():
        raise TypeError(
            f"{model} expects floating-point images, got dtype {x.dtype}. "
            "Convert with `x.float() / 255` for 8-bit images."
        )
    if x.dim() != 4 or x.shape[1] != channels or (x.shape[2], x.shape[3]) != size:
        hint = (
            " Add a batch dimension with `x.unsqueeze(0)`."
            if x.dim() == 3
            else " Resize the images, or build the model for this size and channel count."
        )
        raise ValueError(
            f"{model} expects input of shape (B, {channels}, {size[0]}, {size[1]}), "
            f"got {tuple(x.shape)}.{hint}"
        )
