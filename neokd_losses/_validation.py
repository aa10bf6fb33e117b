"""The one place for argument and input checks.

Every public function and constructor of the package validates through these helpers,
so one rule holds everywhere: a number is a real, finite ``int``/``float`` (or a
one-element real tensor); a bool, a string, a complex number, NaN and infinity are
refused. Kinds raise ``TypeError``, values raise ``ValueError``, and every message
names the argument, what was expected and what was received, and the fix where one
exists.

Checks that read tensor values (label ranges, weights) are skipped while
``torch.compile`` traces the caller, since they would force a graph break.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import numbers
import operator
from collections.abc import Iterator, Sequence
from typing import Literal, Union, get_args

import torch
from torch import Tensor, nn

__all__ = [
    "RANGE_TOLERANCE",
    "ExitWeights",
    "Reduction",
    "as_class_indices",
    "as_exit_weights",
    "check_bool",
    "check_coefficient",
    "check_costs",
    "check_exit_index",
    "check_exit_vector",
    "check_generator",
    "check_image_input",
    "check_image_kind",
    "check_image_range",
    "check_int",
    "check_module",
    "check_one_of",
    "check_positive_int",
    "check_real",
    "check_reduction",
    "check_targets",
    "check_temperature",
    "first_device",
    "is_compiling",
    "module_device",
    "preserved_modes",
    "upcast",
]

ExitWeights = Union[Sequence[float], Tensor, None]
"""Per-exit weights (the paper's gamma): E non-negative numbers, or None for all ones."""

Reduction = Literal["mean", "sum", "none"]
_REDUCTIONS: tuple[str, ...] = get_args(Reduction)

_LOW_PRECISION = (torch.float16, torch.bfloat16)

RANGE_TOLERANCE = 1e-5
"""Round-off allowed outside [0, 1] after undoing ``set_normalization_used`` (at least;
``check_image_range`` allows a few units in the last place of low-precision dtypes)."""


def is_compiling() -> bool:
    """True while torch.compile traces the caller (data-dependent checks are skipped)."""
    return bool(torch.compiler.is_compiling())


# --------------------------------------------------------------------------- scalars


def _describe(value: object) -> str:
    return f"{type(value).__name__} {value!r}"


def _bound(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    """The interval as words: "> 0", ">= 0", "in [0, 1]", or "" without bounds."""
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def check_real(
    value: object,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
) -> float:
    """``value`` as a finite float inside an optional interval.

    With ``finite=False`` only the kind is checked (NaN and ±inf pass through, for
    callers that check them with a message of their own, or allow infinite thresholds).

    Accepted: ``int``, ``float``, any ``numbers.Real`` (NumPy scalars too) and
    one-element real tensors. Refused with ``TypeError``: bools, strings, complex numbers
    and every other kind. Refused with ``ValueError``: NaN, ±inf, and values outside
    ``[low, high]`` (``low_open`` / ``high_open`` exclude the end points).

    Example:
        >>> check_real(0.5, "alpha", low=0.0, high=1.0)
        0.5
        >>> check_real("3", "alpha")
        Traceback (most recent call last):
        ...
        TypeError: `alpha` must be a real number, got str '3'.
    """
    bound = _bound(low, high, low_open, high_open)
    is_real_tensor = (
        isinstance(value, Tensor)
        and value.numel() == 1
        and not value.is_complex()
        and value.dtype != torch.bool
    )
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or is_real_tensor):
        expected = f"a real number {bound}" if low_open else "a real number"
        raise TypeError(f"`{name}` must be {expected}, got {_describe(value)}.")
    result = float(value)  # type: ignore[arg-type]
    if not finite and not math.isfinite(result):
        return result
    below = low is not None and (result <= low if low_open else result < low)
    above = high is not None and (result >= high if high_open else result > high)
    if not math.isfinite(result) or below or above:
        if not bound:
            raise ValueError(f"`{name}` must be finite, got {value!r}.")
        expected = f"a number {bound}" if high is not None else f"a finite number {bound}"
        raise ValueError(f"`{name}` must be {expected}, got {value!r}.")
    return result


def check_int(value: object, name: str, *, low: int | None = None) -> int:
    """``value`` as an int (>= ``low`` when given); TypeError for bools, floats, strings."""
    if isinstance(value, bool):
        raise TypeError(f"`{name}` must be an int, got bool {value!r}.")
    try:
        result = operator.index(value)  # type: ignore[arg-type]
    except TypeError as err:
        raise TypeError(f"`{name}` must be an int, got {_describe(value)}.") from err
    if low is not None and result < low:
        raise ValueError(f"`{name}` must be >= {low}, got {result}.")
    return result


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` if it is an int >= 1; raise TypeError / ValueError otherwise."""
    return check_int(value, name, low=1)


def check_bool(value: object, name: str) -> bool:
    """Return ``value`` if it is a bool; raise TypeError otherwise (no truthiness)."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {_describe(value)}.")
    return value


def check_one_of(value: object, name: str, choices: Sequence[object]) -> None:
    """ValueError unless ``value`` is one of ``choices`` (strings such as modes)."""
    if value not in choices:
        raise ValueError(
            f"`{name}` must be one of {', '.join(repr(c) for c in choices)}, got {value!r}."
        )


def check_temperature(temperature: object, name: str = "temperature") -> float:
    """A finite temperature T > 0."""
    return check_real(temperature, name, low=0.0, low_open=True)


def check_coefficient(name: str, value: object, *, at_most_one: bool = False) -> float:
    """A finite coefficient >= 0 (and <= 1 with ``at_most_one``)."""
    return check_real(value, name, low=0.0, high=1.0 if at_most_one else None)


def check_reduction(reduction: object) -> Reduction:
    """Return ``reduction`` if it is "mean", "sum" or "none", else raise a ValueError."""
    check_one_of(reduction, "reduction", _REDUCTIONS)
    return reduction  # type: ignore[return-value]


def check_exit_index(exit_index: object, num_exits: int, name: str = "exit_index") -> int:
    """Return ``exit_index`` made non-negative, or raise a ValueError if it is out of range.

    Negative indices count from the last exit, as in Python: -1 is exit E - 1. ``name``
    is the argument's name in the messages.
    """
    index = check_int(exit_index, name)
    if not -num_exits <= index < num_exits:
        raise ValueError(
            f"`{name}` must lie in [{-num_exits}, {num_exits}) for a model with "
            f"{num_exits} exits, got {index}."
        )
    return index % num_exits


def check_generator(generator: object) -> None:
    """TypeError unless ``generator`` is a ``torch.Generator`` or None."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"`generator` must be a torch.Generator or None, got {type(generator).__name__}."
        )


# --------------------------------------------------------------------------- tensors


def _integer(values: Tensor) -> bool:
    """True for integer dtypes of any width (int64, int32, uint8, ...), not bool."""
    return not (values.dtype == torch.bool or values.is_floating_point() or values.is_complex())


def as_class_indices(labels: Tensor) -> Tensor:
    """``labels`` as int64 if they are integers of another width (int32 from NumPy arrays,
    uint8), the dtype cross-entropy and ``gather`` need; other tensors unchanged, for
    :func:`check_targets` to refuse.

    Example:
        >>> as_class_indices(torch.tensor([1, 2], dtype=torch.uint8)).dtype
        torch.int64
    """
    return labels.long() if _integer(labels) else labels


def check_targets(
    targets: object, batch_size: int, num_classes: int, name: str = "targets"
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
    if not _integer(targets):
        raise TypeError(
            f"`{name}` must hold integer class indices (torch.long), got dtype {targets.dtype}. "
            "Soft or one-hot targets are not accepted; pass `targets.argmax(-1)`."
        )
    if targets.shape != (batch_size,):
        raise ValueError(
            f"`{name}` must have shape (B,) = ({batch_size},) to match the logits, "
            f"got {tuple(targets.shape)}."
        )
    if batch_size and not is_compiling():
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"`{name}` must lie in [0, {num_classes}) for K = {num_classes} classes, "
                f"got values in [{low}, {high}]."
            )


def check_exit_vector(
    values: object,
    length: int,
    name: str,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    finite_non_negative: bool = False,
) -> Tensor:
    """``values``, one real number per exit (a sequence or a 1-D tensor), as a (E,) tensor.

    NaN is refused; with ``finite_non_negative``, ±inf and negative values too (costs,
    proportions). Without it ±inf passes (thresholds: -inf lets every sample leave).

    Args:
        values: the E numbers.
        length: E.
        name: the argument's name, used in error messages.
        dtype, device: of the result (``device=None``: a tensor stays where it is, a
            sequence goes to the default device).
        finite_non_negative: also refuse ±inf and negative values.

    Raises:
        TypeError: if ``values`` is not a sequence of real numbers or a real tensor.
        ValueError: if it is not (E,), holds NaN, or (``finite_non_negative``) an
            infinite or negative value.

    Example:
        >>> check_exit_vector([0.9, float("-inf")], 2, "thresholds")
        tensor([0.9000,   -inf], dtype=torch.float64)
    """
    if isinstance(values, Tensor):
        if values.is_complex() or values.dtype == torch.bool:
            raise TypeError(f"`{name}` must hold real numbers, got a {values.dtype} tensor.")
        vector = values.detach().to(device=device, dtype=dtype)
    elif isinstance(values, Sequence) and not isinstance(values, (str, bytes)):
        numbers = []
        for i, value in enumerate(values):
            try:
                numbers.append(check_real(value, f"{name}[{i}]", finite=False))
            except TypeError as err:
                raise TypeError(f"{err} `{name}` must be a sequence of real numbers.") from None
        vector = torch.tensor(numbers, dtype=dtype, device=device)
    else:
        raise TypeError(
            f"`{name}` must be a sequence of E numbers or a 1-D tensor (one per exit, "
            f"E = {length}), got {_describe(values)}."
        )
    if vector.shape != (length,):
        raise ValueError(
            f"`{name}` must have one entry per exit, shape ({length},) for a model with "
            f"{length} exits, got shape {tuple(vector.shape)}."
        )
    if finite_non_negative:
        if not bool(torch.isfinite(vector).all()) or bool((vector < 0).any()):
            raise ValueError(f"`{name}` must be finite and non-negative, got {vector.tolist()}.")
    elif bool(torch.isnan(vector).any()):
        raise ValueError(f"`{name}` must not hold NaN, got {vector.tolist()}.")
    return vector


def check_costs(costs: object, length: int, *, device: torch.device | str | None = None) -> Tensor:
    """The cumulative exit costs: E finite, non-negative, non-decreasing numbers (float64).

    Raises:
        TypeError, ValueError: as :func:`check_exit_vector`; ValueError also when the
            costs decrease from one exit to the next.

    Example:
        >>> check_costs([1, 3, 6], 3)
        tensor([1., 3., 6.], dtype=torch.float64)
    """
    cost = check_exit_vector(costs, length, "costs", device=device, finite_non_negative=True)
    if bool((cost[1:] < cost[:-1]).any()):
        raise ValueError(
            "`costs` must be cumulative, so non-decreasing from the first exit to the last "
            f"(exit k's cost includes everything computed before it), got {cost.tolist()}. "
            "Pass the cost of computing exits 1..k for exit k, e.g. from exit_costs(model, x) "
            "or stage_costs(model, x), not the cost of exit k's own layers."
        )
    return cost


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
        if w.is_complex() or w.dtype == torch.bool:
            raise TypeError(f"`{name}` must hold real numbers, got dtype {w.dtype}.")
        if not w.is_floating_point():
            w = w.to(torch.get_default_dtype())
    elif isinstance(weights, Sequence) and not isinstance(weights, (str, bytes)):
        if any(isinstance(v, Sequence) and not isinstance(v, (str, bytes)) for v in weights):
            shape = (len(weights), *{len(v) for v in weights if isinstance(v, Sequence)})
            raise ValueError(f"`{name}` must be 1-D (E,), got nested sequences of shape {shape}.")
        values = [check_real(v, f"{name}[{i}]") for i, v in enumerate(weights)]
        w = torch.tensor(values, dtype=torch.get_default_dtype())
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
    if not is_compiling() and (not bool(torch.isfinite(w).all()) or bool((w < 0).any())):
        raise ValueError(f"`{name}` must be finite and non-negative, got {w.tolist()}.")
    return w


def check_image_kind(images: object, name: str = "images") -> None:
    """TypeError / ValueError unless ``images`` is a floating tensor batch (B, ...)."""
    if not isinstance(images, Tensor):
        raise TypeError(f"`{name}` must be a Tensor (B, ...), got {type(images).__name__}.")
    if not images.is_floating_point():
        raise TypeError(
            f"`{name}` must be floating point in [0, 1], got dtype {images.dtype}. "
            "Convert 8-bit images with `images.float() / 255`."
        )
    if images.dim() < 2:
        raise ValueError(
            f"`{name}` must be a batch (B, ...) with at least 2 dimensions, "
            f"got shape {tuple(images.shape)}."
        )


def check_image_range(images: Tensor, tolerance: float, *, normalized: bool) -> None:
    """ValueError unless ``images`` lies in [0, 1] (up to ``tolerance``).

    ``normalized`` says the values were recovered by undoing ``set_normalization_used``,
    which changes the advice in the message and widens the tolerance to a few units in
    the last place of the images' dtype: normalizing a float16 / bfloat16 image and
    undoing it rounds twice (by up to about 0.002 near 0 and 1 in bfloat16).
    """
    if images.numel() == 0:
        return
    if normalized:
        tolerance = max(tolerance, 4 * torch.finfo(images.dtype).eps)
    low, high = (float(v) for v in torch.aminmax(images.detach()))
    if low >= -tolerance and high <= 1 + tolerance:
        return
    if normalized:
        raise ValueError(
            "`images` must be normalized with the mean and std given to "
            "set_normalization_used, i.e. lie in [0, 1] once un-normalized; got values "
            f"in [{low:.6g}, {high:.6g}] after un-normalizing."
        )
    raise ValueError(
        f"`images` must lie in [0, 1], got values in [{low:.6g}, {high:.6g}]. Scale "
        "them to [0, 1]; if the model expects normalized inputs, pass [0, 1] images to a "
        "model that normalizes, or use set_normalization_used(mean, std)."
    )


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


def upcast(logits: Tensor) -> Tensor:
    """float16 / bfloat16 logits (autocast) to float32; float32 and float64 unchanged."""
    return logits.float() if logits.dtype in _LOW_PRECISION else logits


# --------------------------------------------------------------------------- modules


@contextlib.contextmanager
def preserved_modes(module: nn.Module) -> Iterator[None]:
    """Restore the train/eval flag of ``module`` and of every submodule on exit."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def check_module(value: object, name: str = "model", returns: str = "") -> nn.Module:
    """Return ``value`` if it is an ``nn.Module``, else raise a TypeError.

    ``returns`` says what the module's forward must return, e.g. "a list of exit logits".

    Example:
        >>> check_module(len, returns="logits")
        Traceback (most recent call last):
        ...
        TypeError: `model` must be an nn.Module returning logits, got builtin_function_or_method.
    """
    if not isinstance(value, nn.Module):
        what = f"an nn.Module returning {returns}" if returns else "an nn.Module"
        raise TypeError(f"`{name}` must be {what}, got {type(value).__name__}.")
    return value


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
