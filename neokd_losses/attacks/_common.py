"""Checks and helpers shared by the attacks (MultiExitPGD, BoundarySupportingAttack)."""

from __future__ import annotations

import contextlib
import itertools
import math
import numbers
import operator
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

RANGE_TOLERANCE = 1e-5
"""Round-off allowed outside [0, 1] after undoing ``set_normalization_used`` (at least;
``check_image_range`` allows a few units in the last place of low-precision dtypes)."""


@contextlib.contextmanager
def preserved_modes(module: nn.Module) -> Iterator[None]:
    """Restore the train/eval flag of ``module`` and of every submodule on exit."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def upcast(logits: Tensor) -> Tensor:
    """float16 / bfloat16 logits (autocast) to float32; float32 and float64 unchanged."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def as_real(value: Any, name: str) -> float:
    """``value`` as a finite float; TypeError for non-numbers (bool included)."""
    is_scalar_tensor = isinstance(value, Tensor) and value.numel() == 1
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or is_scalar_tensor):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__}.")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"`{name}` must be finite, got {value!r}.")
    return result


def as_int(value: Any, name: str) -> int:
    """``value`` as an int; TypeError for bools, floats and other non-integers."""
    if isinstance(value, bool):
        raise TypeError(f"`{name}` must be an int, got bool.")
    try:
        return operator.index(value)
    except TypeError as err:
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}.") from err


def check_image_kind(images: Any) -> None:
    """TypeError / ValueError unless ``images`` is a floating tensor batch (B, ...)."""
    if not isinstance(images, Tensor):
        raise TypeError(f"`images` must be a Tensor (B, ...), got {type(images).__name__}.")
    if not images.is_floating_point():
        raise TypeError(
            f"`images` must be floating point in [0, 1], got dtype {images.dtype}. "
            "Convert 8-bit images with `images.float() / 255`."
        )
    if images.dim() < 2:
        raise ValueError(
            f"`images` must be a batch (B, ...) with at least 2 dimensions, "
            f"got shape {tuple(images.shape)}."
        )


def check_image_range(images: Tensor, tolerance: float, *, normalised: bool) -> None:
    """ValueError unless ``images`` lies in [0, 1] (up to ``tolerance``).

    ``normalised`` says the values were recovered by undoing ``set_normalization_used``,
    which changes the advice in the message and widens the tolerance to a few units in
    the last place of the images' dtype: normalising a float16 / bfloat16 image and
    undoing it rounds twice (by up to about 0.002 near 0 and 1 in bfloat16).
    """
    if images.numel() == 0:
        return
    if normalised:
        tolerance = max(tolerance, 4 * torch.finfo(images.dtype).eps)
    low, high = (float(v) for v in torch.aminmax(images.detach()))
    if low >= -tolerance and high <= 1 + tolerance:
        return
    if normalised:
        raise ValueError(
            "`images` must be normalised with the mean and std given to "
            "set_normalization_used, i.e. lie in [0, 1] once un-normalised; got values "
            f"in [{low:.6g}, {high:.6g}] after un-normalising."
        )
    raise ValueError(
        f"`images` must lie in [0, 1], got values in [{low:.6g}, {high:.6g}]. Scale "
        "them to [0, 1]; if the model expects normalised inputs, pass [0, 1] images to a "
        "model that normalises, or use set_normalization_used(mean, std)."
    )


def check_generator(generator: Any) -> None:
    """TypeError unless ``generator`` is a ``torch.Generator`` or None."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"`generator` must be a torch.Generator or None, got {type(generator).__name__}."
        )


def first_device(module: nn.Module) -> torch.device | None:
    """The device of ``module``'s first parameter or buffer; None without any."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        found: torch.device = tensor.device
        return found
    return None


def module_device(module: nn.Module, fallback: Tensor) -> torch.device:
    """The device of ``module``'s first parameter or buffer; ``fallback``'s without any."""
    found = first_device(module)
    return fallback.device if found is None else found
