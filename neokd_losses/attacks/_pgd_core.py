"""The functional multi-exit PGD, ``multi_exit_pgd``, and the pieces other attacks reuse.

Plain tensors in and out: the images (B, ...) in [0, 1], the labels (B,), a model whose
forward returns a sequence of E logits tensors (B, K). Every loss is computed from
logits (never probabilities), in float32 or better. The arguments are validated once
(:func:`check_pgd_args`), the images and labels once per call, the model output once on
its first forward; the steps then run without checks.

The pieces, for attacks built on this core (APGD, CW, exit-policy attacks):

- :func:`check_pgd_args`, :func:`check_images`, :func:`check_output`,
  :func:`check_labels`: validation;
- :class:`ExitForward`: how an attack runs the model, with an optional input transform,
  the cast to the model's dtype and, for staged models
  (:mod:`neokd_losses.models.staged`), truncation: exit k computed without any stage
  past k, and candidate rows that leave the batch after the exit they attack;
- :func:`random_start`, :func:`pgd_step`, :func:`round_toward`: the start, the L∞ / L2
  step and projection, and the half-precision rounding toward the clean image;
- :func:`ascend`: the gradient-ascent loop;
- :func:`average_loss`, :func:`keep_best`: the per-row weighted average loss and the
  max-average selection.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neokd_losses._cross_entropy import per_exit_cross_entropy
from neokd_losses._exits import stack_exits
from neokd_losses._validation import (
    ExitWeights,
    as_class_indices,
    as_exit_weights,
    check_exit_index,
    check_generator,
    check_image_kind,
    check_image_range,
    check_int,
    check_real,
    check_targets,
    module_device,
    upcast,
)
from neokd_losses.attacks.exit_view import as_exit_list
from neokd_losses.models.staged import has_exit_split, is_staged, run_stages, run_until

__all__ = [
    "AttackMode",
    "ExitForward",
    "PGDConfig",
    "ThreatModel",
    "ascend",
    "average_loss",
    "check_images",
    "check_labels",
    "check_output",
    "check_pgd_args",
    "exit_weight_vector",
    "keep_best",
    "multi_exit_pgd",
    "pgd_step",
    "random_start",
    "round_toward",
    "run_pgd",
    "warn_if_stuck",
    "working_dtype",
]

AttackMode = Literal["single", "average", "max-average"]
"""What the attack ascends: one exit's CE, the average CE, or the max-average choice."""

ThreatModel = Literal["Linf", "L2"]
"""The norm of the perturbation ball."""

_MODES: tuple[str, ...] = get_args(AttackMode)
_NORMS: tuple[str, ...] = get_args(ThreatModel)

_L2_DIVISION_EPS = 1e-10  # added to gradient norms before dividing, as torchattacks' PGDL2

Objective = Callable[[Tensor], Tensor]
"""Maps a batch of inputs (requiring grad) to the scalar the attack ascends."""


# --------------------------------------------------------------------------- arguments


@dataclass(frozen=True)
class PGDConfig:
    """Validated PGD hyper-parameters (see :func:`multi_exit_pgd` for their meaning).

    Built by :func:`check_pgd_args`; attacks built on the core carry one instead of ten
    arguments.
    """

    eps: float
    alpha: float
    steps: int
    random_start: bool
    mode: AttackMode
    exit_index: int | None
    exit_weights: tuple[float, ...] | None
    norm: ThreatModel
    max_batch: int | None
    generator: torch.Generator | None


def check_pgd_args(
    *,
    eps: object,
    alpha: object,
    steps: object,
    random_start: object,
    mode: object,
    exit_index: object,
    exit_weights: ExitWeights,
    norm: object,
    max_batch: object,
    generator: object,
    stacklevel: int = 2,
) -> PGDConfig:
    """Validate the PGD arguments once; return them as a :class:`PGDConfig`.

    Warns (UserWarning, at ``stacklevel`` above the caller) when an L∞ ``eps`` is above 1:
    images live in [0, 1], so it is almost surely a forgotten ``/ 255``. ``eps=1`` (the
    whole cube, the unbounded attack of sanity checks) does not warn.

    Raises:
        TypeError: an argument of the wrong kind.
        ValueError: an argument of the wrong value.

    Example:
        >>> cfg = check_pgd_args(eps=8 / 255, alpha=2 / 255, steps=7, random_start=True,
        ...                      mode="max-average", exit_index=None, exit_weights=[1, 2],
        ...                      norm="Linf", max_batch=None, generator=None)
        >>> cfg.steps, cfg.exit_weights
        (7, (1.0, 2.0))
    """
    eps_ = check_real(eps, "eps")
    if eps_ < 0:
        raise ValueError(f"`eps` must be >= 0, got {eps!r}.")
    alpha_ = check_real(alpha, "alpha")
    if alpha_ <= 0:
        raise ValueError(f"`alpha` (the step size) must be > 0, got {alpha!r}.")
    steps_ = check_int(steps, "steps")
    if steps_ < 0:
        raise ValueError(f"`steps` must be >= 0, got {steps!r}.")
    if not isinstance(random_start, bool):
        raise TypeError(f"`random_start` must be a bool, got {type(random_start).__name__}.")
    if mode not in _MODES:
        raise ValueError(
            f"`mode` must be one of {', '.join(repr(m) for m in _MODES)}, got {mode!r}."
        )
    if norm not in _NORMS:
        raise ValueError(
            f"`norm` must be one of {', '.join(repr(n) for n in _NORMS)}, got {norm!r}."
        )
    index: int | None = None
    if mode == "single":
        if exit_index is None:
            raise ValueError(
                "mode='single' attacks one exit: pass `exit_index` (e.g. -1 for the "
                "final exit), got None."
            )
        index = check_int(exit_index, "exit_index")
    elif exit_index is not None:
        raise ValueError(
            f"`exit_index` is only used by mode='single', got exit_index={exit_index!r} "
            f"with mode={mode!r}. Drop it, or set mode='single'."
        )
    weights: tuple[float, ...] | None = None
    if exit_weights is not None:
        if mode == "single":
            raise ValueError(
                "`exit_weights` weight the average over exits of mode='average' and "
                "'max-average'; mode='single' has none. Drop `exit_weights`."
            )
        w = as_exit_weights(exit_weights)
        assert w is not None
        if not bool((w > 0).any()):
            raise ValueError(
                f"`exit_weights` must hold at least one positive weight, got {w.tolist()}."
            )
        weights = tuple(float(v) for v in w.tolist())
    chunk: int | None = None
    if max_batch is not None:
        chunk = check_int(max_batch, "max_batch")
        if chunk < 1:
            raise ValueError(
                f"`max_batch` (candidate copies of the batch processed at once) must be "
                f">= 1 or None, got {max_batch!r}."
            )
    check_generator(generator)
    if norm == "Linf" and eps_ > 1:
        warnings.warn(
            f"eps={eps!r} is an L∞ radius in [0, 1] pixel units: images live in [0, 1], so "
            "a radius above 1 is almost surely a forgotten `/ 255` (eps=1 already allows "
            f"any image). Did you mean eps={eps!r} / 255 = {eps_ / 255:.4g}?",
            UserWarning,
            stacklevel=stacklevel + 1,
        )
    return PGDConfig(
        eps=eps_,
        alpha=alpha_,
        steps=steps_,
        random_start=random_start,
        mode=mode,  # type: ignore[arg-type]
        exit_index=index,
        exit_weights=weights,
        norm=norm,  # type: ignore[arg-type]
        max_batch=chunk,
        generator=generator,  # type: ignore[arg-type]
    )


def check_images(images: object) -> None:
    """TypeError / ValueError unless ``images`` is a floating batch (B, ...) in [0, 1].

    NaN entries are reported as such (a NaN image has no place in [0, 1]).

    Example:
        >>> check_images(torch.full((2, 3), float("nan")))
        Traceback (most recent call last):
        ...
        ValueError: `images` contain NaN (6 of 6 values); attacks need images in [0, 1]. Check the data pipeline (e.g. a division by a zero std).

    Shape:
        - images: (B, ...), at least 2 dimensions.
    """
    check_image_kind(images)
    assert isinstance(images, Tensor)
    if bool(images.detach().isnan().any()):
        count = int(images.detach().isnan().sum())
        raise ValueError(
            f"`images` contain NaN ({count} of {images.numel()} values); attacks need "
            "images in [0, 1]. Check the data pipeline (e.g. a division by a zero std)."
        )
    check_image_range(images, 0.0, normalized=False)


def check_labels(labels: object, batch: int, num_classes: int | None, name: str = "labels") -> None:
    """Check class-index labels (B,) against K classes, or only >= 0 while K is unknown.

    ``num_classes=None`` is for labels checked before the model ran (K unknown): their
    kind, their shape and a lower bound of 0; the upper bound waits for the model's K.

    Example:
        >>> check_labels(torch.tensor([0, 4]), 2, 3)
        Traceback (most recent call last):
        ...
        ValueError: `labels` must lie in [0, 3) for K = 3 classes, got values in [0, 4].

    Shape:
        - labels: (B,) integer class indices.
    """
    if num_classes is None:
        if (
            isinstance(labels, Tensor)
            and labels.shape == (batch,)
            and batch
            and not (labels.is_floating_point() or labels.is_complex())
            and labels.dtype != torch.bool
        ):
            low = int(labels.min())
            if low < 0:
                raise ValueError(
                    f"`{name}` must be class indices in [0, K), got values in "
                    f"[{low}, {int(labels.max())}]."
                )
        num_classes = sys.maxsize  # the upper bound is checked once K is known
    check_targets(labels, batch, num_classes, name=name)


def _look_like_probabilities(logits: Tensor) -> bool:
    """True when every row of (E, N, K) lies in [0, 1] and sums to 1 (softmax outputs)."""
    in_unit = bool(((logits >= 0) & (logits <= 1)).all())
    sums = logits.sum(-1)
    return in_unit and bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-3))


def check_output(
    exits: Sequence[Tensor], labels: Tensor, rows: int, model_name: str, label_name: str
) -> Tensor:
    """Validate one model output against the labels; return it detached and stacked.

    Checks the exits (floating (N, K), one shape), their batch against ``rows`` and the
    labels against K; warns (RuntimeWarning) when the exits look like probabilities.

    Example:
        >>> z = [torch.randn(2, 3), torch.randn(2, 3)]
        >>> check_output(z, torch.tensor([0, 2]), 2, "Net", "labels").shape
        torch.Size([2, 2, 3])

    Shape:
        - exits: sequence of E tensors (N, K); labels: (N,).
        - output: (E, N, K), at least float32.
    """
    logits = stack_exits([z.detach() for z in exits], name="model output")
    if logits.shape[1] != rows:
        raise ValueError(
            f"the model returned exits of batch size {logits.shape[1]} for an input "
            f"batch of {rows}; each exit must be (B, K)."
        )
    check_targets(labels, rows, logits.shape[2], name=label_name)
    if rows and logits.shape[2] > 1 and _look_like_probabilities(logits):
        warnings.warn(
            f"the exits of {model_name} look like probabilities (in [0, 1], rows summing "
            "to 1); the attack applies cross-entropy to logits. Return the logits (before "
            "softmax), or the attack ascends the wrong loss.",
            RuntimeWarning,
            stacklevel=4,
        )
    return logits


def exit_weight_vector(weights: tuple[float, ...] | None, num_exits: int, like: Tensor) -> Tensor:
    """Exit weights (E,) normalized to sum 1, in ``like``'s dtype and device (uniform for None).

    Example:
        >>> exit_weight_vector((1.0, 3.0), 2, torch.zeros(1))
        tensor([0.2500, 0.7500])

    Shape:
        - output: (E,).
    """
    w = as_exit_weights(weights, num_exits)
    if w is None:
        return torch.full((num_exits,), 1.0 / num_exits, dtype=like.dtype, device=like.device)
    w = w.to(dtype=like.dtype, device=like.device)
    return w / w.sum()


# --------------------------------------------------------------------------- the model


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def _split_rows(state: Any, count: int) -> tuple[Any, Any]:
    """A stage state (a tensor, or a tuple / list / dict of them, batch first) split into
    its first ``count`` rows and the rest.

    ``Tensor.split`` rather than two slices: its backward writes the input gradient once
    (one concatenation), where two slices would each fill a zero tensor of the input's size.
    """
    if isinstance(state, Tensor):
        first, rest = torch.split(state, [count, state.shape[0] - count])
        return first, rest
    if isinstance(state, dict):
        pairs = {key: _split_rows(value, count) for key, value in state.items()}
        return {k: v[0] for k, v in pairs.items()}, {k: v[1] for k, v in pairs.items()}
    if isinstance(state, (tuple, list)):
        parts = [_split_rows(value, count) for value in state]
        return type(state)(p[0] for p in parts), type(state)(p[1] for p in parts)
    raise TypeError(
        f"a stage state must be a Tensor or a tuple / list / dict of Tensors (batch first), "
        f"got {type(state).__name__}."
    )


class ExitForward:
    """How an attack runs a multi-exit model: transform, dtype cast and truncation.

    The inputs go through ``transform`` (e.g. a normalization; None for none), are cast
    to the model's dtype (its first floating parameter's; a float64 batch meets a
    float32 model as float32, the attack itself still steps in float64), then through the
    model. For a staged model (``forward_stage``, see :mod:`neokd_losses.models.staged`)
    :meth:`exits_until` runs stages 0..k only and :meth:`candidate_losses` lets each
    candidate's rows leave the batch after the exit it attacks; an ``attach_exits``
    model without stages stops its backbone after exit k
    (:func:`~neokd_losses.models.staged.run_until`); other models run their full forward
    (autograd then skips what the loss does not read).

    In training mode with batch statistics (BatchNorm) a sample's output depends on the
    rows run with it, so truncated and full forwards differ there; attacks run the model
    in eval mode by default.

    Args:
        model: the multi-exit network (a sequence of E logits tensors (B, K) per forward).
        transform: applied to every input batch before the model; None for none.

    Example:
        >>> fwd = ExitForward(TwoExits())
        >>> [z.shape for z in fwd.exits_until(torch.rand(5, 4), 1)]
        [torch.Size([5, 3]), torch.Size([5, 3])]

    Shape:
        - inputs: (B, ...), as the model takes them after ``transform``.
        - outputs: lists of (B, K) logits.
    """

    def __init__(self, model: nn.Module, transform: Callable[[Tensor], Tensor] | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"`model` must be an nn.Module returning a list of exit logits, "
                f"got {type(model).__name__}."
            )
        self.model = model
        self.name = type(model).__name__
        self.staged = is_staged(model)
        self.split = has_exit_split(model)
        self.transform = transform
        self.dtype = _model_dtype(model)

    def prepare(self, x: Tensor) -> Tensor:
        """``x`` transformed and cast to the model's dtype: what the model's first layer sees."""
        if self.transform is not None:
            x = self.transform(x)
        if self.dtype is not None and x.dtype != self.dtype:
            x = x.to(self.dtype)
        return x

    def num_exits(self) -> int | None:
        """E for a staged model, else None (known only from an output)."""
        return int(getattr(self.model, "num_exits")) if self.staged else None  # noqa: B009

    def checked_exits(self, x: Tensor, last: int | None = None) -> list[Tensor]:
        """The first forward of an attack: exits 0..``last`` (all for None), kind-checked.

        A failure of the model on (B, H, W) images is re-raised as a ValueError that
        names the missing channel dimension.
        """
        try:
            if self.staged and last is not None:
                return run_stages(self.model, self.prepare(x), last)  # type: ignore[arg-type]
            return as_exit_list(self.model(self.prepare(x)), self.name)
        except RuntimeError as err:
            if x.dim() != 3:
                raise
            raise ValueError(
                f"{self.name} failed on images of shape {tuple(x.shape)} (B, H, W): image "
                "models take (B, C, H, W). Add the channel dimension with "
                f"`images.unsqueeze(1)`. The model's error: {err}"
            ) from err

    def all_exits(self, x: Tensor) -> Sequence[Tensor]:
        """Every exit's logits (the full forward)."""
        out: Sequence[Tensor] = self.model(self.prepare(x))
        return out

    def exits_until(self, x: Tensor, last: int) -> Sequence[Tensor]:
        """The logits of exits 0..``last`` (>= 0), computing nothing deeper where it can.

        :func:`~neokd_losses.models.staged.run_until`: stages 0..``last`` of a staged
        model, the backbone stopped after exit ``last``'s layer for ``attach_exits``
        models, the full forward otherwise.
        """
        return run_until(self.model, self.prepare(x), last)

    def _block(self, index: int, state: Any) -> Any:
        """Stage ``index``'s next state (staged models), without its head where split."""
        if self.split:
            return self.model.forward_block(index, state)  # type: ignore[operator]
        return self.model.forward_stage(index, state)[0]  # type: ignore[operator]

    def _exit_of(self, index: int, state: Any) -> Tensor:
        """Exit ``index``'s logits from the state stage ``index`` takes (staged models)."""
        if self.split:
            features = self.model.forward_block(index, state)  # type: ignore[operator]
            logits: Tensor = self.model.forward_exit(index, features)  # type: ignore[operator]
            return logits
        return self.model.forward_stage(index, state)[1]  # type: ignore[operator,no-any-return]

    def exit_loss(self, x: Tensor, labels: Tensor, index: int) -> Tensor:
        """Every row's CE at exit ``index`` (>= 0), (N,).

        A model with split stages (:func:`~neokd_losses.models.staged.has_exit_split`)
        runs blocks 0..``index`` and head ``index`` only; others :meth:`exits_until`.
        """
        if self.split:
            state: Any = self.prepare(x)
            for stage in range(index):
                state = self._block(stage, state)
            logits = self._exit_of(index, state)
        else:
            logits = self.exits_until(x, index)[index]
        return F.cross_entropy(upcast(logits), labels, reduction="none")

    def candidate_losses(self, x: Tensor, labels: Tensor, first: int, last: int) -> Tensor:
        """Rows of candidates ``first..last-1`` (B rows each), each row's CE at its own exit.

        Row r of the batch belongs to candidate ``first + r // B`` and its loss reads that
        exit. A staged model runs stages 0..``first - 1`` on all rows together; at each
        later stage s the rows of candidate s run it apart and leave at exit s, the others
        go on, so no row is computed (or back-propagated) past its exit. A lone candidate
        (``last == first + 1``) is :meth:`exit_loss`.

        Shape:
            - x: (C·B, ...) with C = last - first; labels: (C·B,).
            - output: (C·B,).
        """
        copies = last - first
        if copies == 1:
            return self.exit_loss(x, labels, first)
        batch = x.shape[0] // copies
        if not self.staged:
            # Row r reads exit first + r // B of the full forward; the other exits' logits
            # of that row get zero gradient.
            logits = torch.stack(tuple(self.exits_until(x, last - 1)))
            logits = upcast(logits)
            own = torch.arange(first, last, device=x.device).repeat_interleave(batch)
            chosen = logits.gather(0, own.view(1, -1, 1).expand(1, -1, logits.shape[2]))
            return F.cross_entropy(chosen.squeeze(0), labels, reduction="none")
        state: Any = self.prepare(x)
        losses: list[Tensor] = []
        for stage in range(last):
            if stage < first:
                state = self._block(stage, state)
                continue
            # The rows of candidate `stage` leave through this exit; the others run the
            # stage apart from them (without the head when the model splits its stages).
            # One call on all rows would be the same arithmetic (with a split model) but
            # larger working sets, which measured slower on CPU (bench_attacks.py (b)).
            # Either way no row runs, or back-propagates through, a layer its loss does
            # not read, with 2E - 1 block calls per step, not E(E + 1) / 2.
            mine, rest = _split_rows(state, batch) if stage + 1 < last else (state, None)
            own = self._exit_of(stage, mine)
            losses.append(
                F.cross_entropy(
                    upcast(own), labels[(stage - first) * batch :][:batch], reduction="none"
                )
            )
            if stage + 1 < last:
                state = self._block(stage, rest)
        return torch.cat(losses)


# --------------------------------------------------------------------------- steps


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float16 / bfloat16 images, else their own dtype (float32, float64).

    Example:
        >>> working_dtype(torch.bfloat16), working_dtype(torch.float64)
        (torch.float32, torch.float64)
    """
    return torch.promote_types(dtype, torch.float32)


def round_toward(value: Tensor, origin: Tensor, dtype: torch.dtype) -> Tensor:
    """``value`` rounded to ``dtype``, never farther from ``origin`` than it is.

    ``value`` and ``origin`` are in the working precision and ``origin`` is exactly
    representable in ``dtype`` (it came from the images). Entries that rounding to nearest
    moved away from ``origin`` step back one unit in the last place, to the representable
    neighbor between ``origin`` and ``value``: every coordinate of the perturbation shrinks
    or stays, so the rounded point stays inside the L∞ or L2 ball and inside [0, 1]. A
    no-op when ``dtype`` is the working precision.

    Example:
        >>> x0 = torch.zeros(1)
        >>> round_toward(torch.tensor([0.1]), x0, torch.bfloat16).item() <= 0.1
        True

    Shape:
        - value, origin: any shape, the same; output: that shape, in ``dtype``.
    """
    if value.dtype == dtype:
        return value
    rounded = value.to(dtype)
    away = (rounded.to(value.dtype) - origin).abs() > (value - origin).abs()
    return torch.where(away, torch.nextafter(rounded, origin.to(dtype)), rounded)


def random_start(
    x0: Tensor,
    copies: int,
    *,
    eps: float,
    norm: ThreatModel,
    enabled: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The batch repeated ``copies`` times, (copies·B, ...), at a random point of the ball.

    L∞: uniform noise in [-ε, ε]; L2: a Gaussian direction scaled to norm U(0, 1)·ε (as
    torchattacks' PGDL2); then clipped to [0, 1]. The noise is drawn in the images' dtype
    (for float32, the draws of torchattacks' PGD / PGDL2 under the same seed); half
    precision is rounded toward the clean images (:func:`round_toward`). ``enabled=False``
    returns the repeated batch.

    Example:
        >>> x = torch.rand(2, 3)
        >>> start = random_start(x, 2, eps=0.1, norm="Linf")
        >>> start.shape, bool((start - x.repeat(2, 1)).abs().max() <= 0.1)
        (torch.Size([4, 3]), True)

    Shape:
        - x0: (B, ...); output: (copies·B, ...), same dtype and device.
    """
    x = x0.repeat(copies, *([1] * (x0.dim() - 1)))
    if not enabled:
        return x
    where = x.device if generator is None else generator.device
    work = working_dtype(x.dtype)
    x_work = x.to(work)
    if norm == "Linf":
        noise = torch.empty(x.shape, dtype=x.dtype, device=where)
        noise.uniform_(-eps, eps, generator=generator)
        start = torch.clamp(x_work + noise.to(x.device, work), min=0, max=1)
        return round_toward(start, x_work, x.dtype)
    delta = torch.empty(x.shape, dtype=x.dtype, device=where).normal_(generator=generator)
    radius = torch.empty(x.shape[0], dtype=x.dtype, device=where).uniform_(generator=generator)
    delta, radius = delta.to(x.device, work), radius.to(x.device, work)
    norms = delta.flatten(1).norm(p=2, dim=1)
    scale = (radius / norms * eps).view(-1, *([1] * (x.dim() - 1)))
    start = torch.clamp(x_work + delta * scale, min=0, max=1)
    return round_toward(start, x_work, x.dtype)


def pgd_step(
    x: Tensor, grad: Tensor, x0: Tensor, *, eps: float, alpha: float, norm: ThreatModel
) -> Tensor:
    """One ascent step from ``x`` followed by the projection onto the ε-ball and [0, 1].

    L∞: x + α·sign(g), δ clamped to [-ε, ε]. L2: x + α·g/‖g‖₂ per sample, δ rescaled to
    norm ≤ ε. Half-precision inputs are stepped in float32 and rounded toward ``x0``
    (:func:`round_toward`): in float16 a small gradient's L2 norm underflows to 0 and
    torchattacks' 1e-10 guard rounds to 0 (0 / 0 = NaN), and rounding to nearest could
    leave the ball by half a unit in the last place.

    Example:
        >>> x0 = torch.full((1, 2), 0.5)
        >>> pgd_step(x0, torch.tensor([[1.0, -2.0]]), x0, eps=0.1, alpha=0.3, norm="Linf")
        tensor([[0.6000, 0.4000]])

    Shape:
        - x, grad, x0: (N, ...); output: (N, ...), in ``x``'s dtype.
    """
    dtype, work = x.dtype, working_dtype(x.dtype)
    x, grad, x0 = x.to(work), grad.to(work), x0.to(work)
    if norm == "Linf":
        x = x + alpha * grad.sign()
        delta = torch.clamp(x - x0, min=-eps, max=eps)
        return round_toward(torch.clamp(x0 + delta, min=0, max=1), x0, dtype)
    shape = (-1, *([1] * (x.dim() - 1)))
    grad_norms = grad.flatten(1).norm(p=2, dim=1) + _L2_DIVISION_EPS
    x = x + alpha * (grad / grad_norms.view(shape))
    delta = x - x0
    delta_norms = delta.flatten(1).norm(p=2, dim=1)
    # min(1, ε / ‖δ‖); the clamp keeps ‖δ‖ = 0 (and ε = 0) from producing NaN.
    factor = torch.clamp(eps / delta_norms.clamp_min(1e-30), max=1.0)
    return round_toward(torch.clamp(x0 + delta * factor.view(shape), min=0, max=1), x0, dtype)


def ascend(
    objective: Objective,
    x0: Tensor,
    start: Tensor,
    config: PGDConfig,
    model_name: str,
    first_value: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``config.steps`` PGD steps from ``start`` ascending ``objective``.

    ``first_value``, when given, is ``objective(start)`` already computed (by the first,
    validating forward) with ``start`` requiring grad; the first step reuses it.

    Returns:
        The result (detached) and a boolean tensor telling whether any gradient entry was
        non-zero (None without steps); it is read once per attack, not per step.

    Raises:
        RuntimeError: if the objective does not depend on the input.

    Example:
        >>> cfg = check_pgd_args(eps=0.1, alpha=0.05, steps=3, random_start=False,
        ...                      mode="average", exit_index=None, exit_weights=None,
        ...                      norm="Linf", max_batch=None, generator=None)
        >>> x0 = torch.full((1, 2), 0.5)
        >>> adv, moved = ascend(lambda x: x.sum(), x0, x0, cfg, "toy")
        >>> adv, bool(moved)
        (tensor([[0.6000, 0.6000]]), True)

    Shape:
        - x0, start: (N, ...); the objective maps (N, ...) to a scalar.
        - output: (N, ...) and a 0-d boolean tensor.
    """
    x = start
    moved: Tensor | None = None
    for step in range(config.steps):
        if step == 0 and first_value is not None:
            value = first_value
        else:
            x = x.detach().requires_grad_(True)
            value = objective(x)
        grad = None
        if value.requires_grad:
            (grad,) = torch.autograd.grad(value, x, allow_unused=True)
        if grad is None:
            raise RuntimeError(
                f"the exit logits of {model_name} do not depend on its input: its forward "
                "detaches the input (or runs under torch.no_grad()), so no gradient attack "
                "can move it. Make the model differentiable w.r.t. its input."
            )
        nonzero = grad.ne(0).any()
        moved = nonzero if moved is None else moved | nonzero
        x = pgd_step(x.detach(), grad, x0, eps=config.eps, alpha=config.alpha, norm=config.norm)
    return x.detach(), moved


def warn_if_stuck(moved: Sequence[Tensor | None], model_name: str, steps: int) -> None:
    """RuntimeWarning when every input gradient of every step was exactly zero.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn_if_stuck([torch.tensor(False)], "Net", 3)
        >>> caught[0].category.__name__
        'RuntimeWarning'

    Shape:
        - moved: per attack run, a 0-d boolean tensor (or None without steps).
    """
    flags = [m for m in moved if m is not None]
    if flags and not bool(torch.stack(flags).any()):
        warnings.warn(
            f"every input gradient of {model_name} was exactly zero in all {steps} steps, "
            "so the attack did not move from its start. The model may use "
            "non-differentiable operations (gradient masking) or have saturated logits; "
            "its robustness under this attack is not meaningful.",
            RuntimeWarning,
            stacklevel=4,
        )


def average_loss(exits: Sequence[Tensor], labels: Tensor, weights: Tensor) -> Tensor:
    """Every row's weighted average CE over the exits: Σ_j w_j CE(z_j, y) with Σ w = 1.

    Example:
        >>> z = [torch.zeros(2, 3), torch.zeros(2, 3)]
        >>> average_loss(z, torch.tensor([0, 1]), torch.tensor([0.5, 0.5]))
        tensor([1.0986, 1.0986])

    Shape:
        - exits: sequence of E tensors (N, K); labels: (N,); weights: (E,).
        - output: (N,).
    """
    logits = upcast(torch.stack(tuple(exits)))
    return weights @ per_exit_cross_entropy(logits, labels)


def keep_best(
    best: tuple[Tensor, Tensor] | None, candidates: Tensor, scores: Tensor
) -> tuple[Tensor, Tensor]:
    """The max-average selection: per sample, the candidate of the largest score so far.

    Ties go to the earliest candidate: within ``candidates`` the first argmax, and a new
    chunk replaces ``best`` only where it is strictly better.

    Example:
        >>> cands = torch.tensor([[[0.0], [1.0]], [[2.0], [3.0]]])  # C = 2, B = 2
        >>> adv, score = keep_best(None, cands, torch.tensor([[1.0, 5.0], [1.0, 7.0]]))
        >>> adv.flatten().tolist(), score.tolist()
        ([0.0, 3.0], [1.0, 7.0])

    Shape:
        - candidates: (C, B, ...); scores: (C, B); best: ((B, ...), (B,)) or None.
        - output: ((B, ...), (B,)).
    """
    pick = scores.argmax(0)
    rows = torch.arange(scores.shape[1], device=scores.device)
    chunk_score = scores[pick, rows]
    chunk_adv = candidates[pick, rows]
    if best is None:
        return chunk_adv, chunk_score
    best_adv, best_score = best
    better = chunk_score > best_score
    shape = (-1, *([1] * (chunk_adv.dim() - 1)))
    return (
        torch.where(better.view(shape), chunk_adv, best_adv),
        torch.where(better, chunk_score, best_score),
    )


# --------------------------------------------------------------------------- the attack


def _scaled(objective: Callable[[Tensor], Tensor], sign: float, x: Tensor) -> Tensor:
    # The sum over the batch, not torchattacks' mean: both steps (sign, or gradient over
    # its per-sample norm) ignore the loss scale, and without the 1/B factor a float16
    # model's input gradients do not underflow to zero for large batches.
    return objective(x).sum() * sign


def _one_objective(
    fwd: ExitForward, x0: Tensor, labels: Tensor, config: PGDConfig, sign: float, label_name: str
) -> Tensor:
    """Single or average mode: PGD on one loss over the batch (B, ...)."""
    rows = x0.shape[0]
    start = random_start(
        x0,
        1,
        eps=config.eps,
        norm=config.norm,
        enabled=config.random_start,
        generator=config.generator,
    )
    index: int | None = None
    last: int | None = None
    known = fwd.num_exits()
    if config.mode == "single" and known is not None:
        index = last = check_exit_index(config.exit_index, known)
    # The first forward validates the output; with steps its graph serves the first step.
    x = start.detach().requires_grad_(config.steps > 0)
    with torch.set_grad_enabled(config.steps > 0):
        exits = fwd.checked_exits(x, last)
    logits = check_output(exits, labels, rows, fwd.name, label_name)
    objective: Callable[[Tensor], Tensor]
    if config.mode == "single":
        if index is None:
            index = check_exit_index(config.exit_index, logits.shape[0])
        objective = functools.partial(fwd.exit_loss, labels=labels, index=index)
        first = F.cross_entropy(upcast(exits[index]), labels, reduction="none")
    else:
        weights = exit_weight_vector(config.exit_weights, logits.shape[0], logits)
        objective = functools.partial(_average_of, fwd, labels=labels, weights=weights)
        first = average_loss(exits, labels, weights)
    if config.steps == 0:
        return start
    adv, moved = ascend(
        functools.partial(_scaled, objective, sign), x0, x, config, fwd.name, first.sum() * sign
    )
    warn_if_stuck([moved], fwd.name, config.steps)
    return adv


def _average_of(fwd: ExitForward, x: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    return average_loss(fwd.all_exits(x), labels, weights)


def _max_average(
    fwd: ExitForward, x0: Tensor, labels: Tensor, config: PGDConfig, sign: float, label_name: str
) -> Tensor:
    """Max-average mode: E single-exit candidates, the best average loss per sample."""
    batch = x0.shape[0]
    with torch.no_grad():
        clean = check_output(fwd.checked_exits(x0), labels, batch, fwd.name, label_name)
    num_exits = clean.shape[0]
    weights = exit_weight_vector(config.exit_weights, num_exits, clean)
    starts = random_start(
        x0,
        num_exits,
        eps=config.eps,
        norm=config.norm,
        enabled=config.random_start,
        generator=config.generator,
    )
    per_chunk = num_exits if config.max_batch is None else min(config.max_batch, num_exits)
    # The best candidate so far per sample and its score, (B, ...) and (B,), rather than
    # all E candidates until the end (E·B images more at the peak of the last chunk).
    best: tuple[Tensor, Tensor] | None = None
    moved: list[Tensor | None] = []
    for first in range(0, num_exits, per_chunk):
        last = min(first + per_chunk, num_exits)
        copies = last - first
        y_rep = labels.repeat(copies)
        objective = functools.partial(fwd.candidate_losses, labels=y_rep, first=first, last=last)
        adv, chunk_moved = ascend(
            functools.partial(_scaled, objective, sign),
            x0.repeat(copies, *([1] * (x0.dim() - 1))),
            starts[first * batch : last * batch],
            config,
            fwd.name,
        )
        moved.append(chunk_moved)
        with torch.no_grad():
            scores = (sign * average_loss(fwd.all_exits(adv), y_rep, weights)).view(copies, batch)
        best = keep_best(best, adv.reshape(copies, batch, *x0.shape[1:]), scores)
        del adv, scores
    warn_if_stuck(moved, fwd.name, config.steps)
    assert best is not None
    return best[0]


def run_pgd(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    config: PGDConfig,
    *,
    targeted: bool = False,
    transform: Callable[[Tensor], Tensor] | None = None,
    label_name: str | None = None,
) -> Tensor:
    """:func:`multi_exit_pgd` with arguments already validated by :func:`check_pgd_args`.

    The result is on the model's device (``images``' device for a model without
    parameters or buffers), in the images' dtype.

    Example:
        >>> cfg = check_pgd_args(eps=0.1, alpha=0.05, steps=2, random_start=True,
        ...                      mode="single", exit_index=0, exit_weights=None,
        ...                      norm="L2", max_batch=None, generator=None)
        >>> x, y = torch.rand(3, 4), torch.tensor([0, 1, 2])
        >>> run_pgd(TwoExits(), x, y, cfg).shape
        torch.Size([3, 4])

    Shape:
        - images: (B, ...); labels: (B,); output: (B, ...).
    """
    fwd = ExitForward(model, transform)
    check_images(images)
    batch = images.shape[0]
    name = label_name or ("target labels" if targeted else "labels")
    if not isinstance(labels, Tensor):
        check_targets(labels, batch, 1, name=name)  # raises the TypeError
    device = module_device(model, images)
    with torch.inference_mode(False), torch.enable_grad():
        x0 = images.detach().to(device).clone()
        y = as_class_indices(labels.detach().to(device).clone())  # others refused below
        if batch == 0:
            check_targets(y, 0, 1, name=name)
            return x0
        sign = -1.0 if targeted else 1.0
        if config.mode == "max-average":
            adv = _max_average(fwd, x0, y, config, sign, name)
        else:
            adv = _one_objective(fwd, x0, y, config, sign, name)
    return adv.detach().to(images.dtype)


def multi_exit_pgd(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    eps: float = 8 / 255,
    alpha: float = 2 / 255,
    steps: int = 10,
    mode: AttackMode = "max-average",
    exit_index: int | None = None,
    exit_weights: ExitWeights = None,
    norm: ThreatModel = "Linf",
    random_start: bool = True,
    max_batch: int | None = None,
    generator: torch.Generator | None = None,
    targeted: bool = False,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    r"""PGD against a multi-exit network: the single, average or max-average attack.

    Projected gradient ascent (Madry et al., 2018) with the losses of Triple Wins (Hu et
    al., ICLR 2020) used by NEO-KD (Ham et al., NeurIPS 2023); the function behind
    :class:`~neokd_losses.attacks.MultiExitPGD`. From an optional random start in the
    ε-ball around x, each of the ``steps`` steps is x' ← clip₀¹(Π_ε(x' + α·sign(∇L)))
    for L∞, and x' ← clip₀¹(Π_ε(x' + α·∇L/‖∇L‖₂)) per sample for L2, where L, summed over
    the batch, is (CE = cross-entropy of the exit logits z_i, y = labels):

    - ``"single"``: :math:`\mathrm{CE}(z_i(x'), y)` for ``i = exit_index``;
    - ``"average"``: :math:`\sum_i w_i\,\mathrm{CE}(z_i(x'), y) / \sum_i w_i`;
    - ``"max-average"``: E single attacks, candidate i against exit i; per sample the
      candidate with the largest weighted average CE is kept (ties: the earliest exit).

    The model runs in its current mode (call ``model.eval()`` first, as torchattacks
    does by default). Staged models (:mod:`neokd_losses.models.staged`) are attacked
    without computing anything past the attacked exit: ``"single"`` on exit k runs
    stages 0..k, and each max-average candidate's rows leave the batch after its exit
    (in training mode with BatchNorm batch statistics this changes the statistics, as
    does ``max_batch``). Gradients come from ``torch.autograd.grad`` w.r.t. the input
    only; the inputs are never modified; it works under ``torch.no_grad()``.

    Args:
        model: a multi-exit ``nn.Module`` whose forward returns a list or tuple of E
            logits tensors (B, K).
        images: clean images in [0, 1] (any floating dtype; cast to the model's dtype for
            its forward, the attack steps in the images' dtype or float32).
        labels: true class indices; the target classes with ``targeted=True``.
        eps: radius ε of the ball (in [0, 1] pixel units), ≥ 0; an L∞ ε > 1 warns (a
            forgotten ``/ 255``).
        alpha: step size α, > 0.
        steps: PGD steps, ≥ 0; ``steps=0`` returns the (random) start.
        mode: ``"single"``, ``"average"`` or ``"max-average"``.
        exit_index: the attacked exit of ``"single"`` (negative counts from the last).
        exit_weights: E non-negative weights (not all zero) of the average, None for
            uniform; not allowed with ``"single"``.
        norm: ``"Linf"`` or ``"L2"``.
        random_start: start from a random point of the ball instead of x.
        max_batch: max-average only: the most candidate copies of the batch run at once
            (1 = one at a time); None runs all E together. Same result either way.
        generator: a ``torch.Generator`` for the random start (None: the global one).
        targeted: descend the CE to ``labels`` instead of ascending it (max-average keeps
            the candidate of the smallest average CE).
        transform: applied to the inputs before the model (e.g. a normalization); ε and
            [0, 1] are measured before it.

    Returns:
        The adversarial images, detached, in the images' dtype, on the model's device.

    Raises:
        TypeError: an argument of the wrong kind, images that are not a floating tensor,
            labels that are not integer class indices, or a model output that is not a
            list of exit logits.
        ValueError: a wrong value: eps < 0, alpha ≤ 0, steps < 0, unknown mode or norm,
            misplaced ``exit_index`` / ``exit_weights``, images outside [0, 1] or with NaN
            or (B, H, W) for an image model, labels not (B,) or outside [0, K), exit index
            outside [-E, E).
        RuntimeError: the exit logits do not depend on the input.

    Warns:
        UserWarning: L∞ eps > 1.
        RuntimeWarning: exits that look like probabilities, or input gradients that were
            all exactly zero.

    Shape:
        - images: (B, ...) in [0, 1], e.g. (B, C, H, W).
        - labels: (B,) integer class indices in [0, K).
        - output: (B, ...), like the images.

    Example:
        >>> from neokd_losses.functional import multi_exit_pgd
        >>> model = TwoExits(in_features=12, num_classes=5).eval()
        >>> images, labels = torch.rand(6, 3, 2, 2), torch.randint(0, 5, (6,))
        >>> adv = multi_exit_pgd(model, images, labels, eps=8 / 255, alpha=2 / 255, steps=5)
        >>> bool((adv - images).abs().max() <= 8 / 255 + 1e-6), adv.shape
        (True, torch.Size([6, 3, 2, 2]))
        >>> single = multi_exit_pgd(model, images, labels, eps=0.5, alpha=0.1, steps=3,
        ...                         mode="single", exit_index=-1, norm="L2")
        >>> bool((single - images).flatten(1).norm(dim=1).max() <= 0.5 + 1e-6)
        True
    """
    config = check_pgd_args(
        eps=eps,
        alpha=alpha,
        steps=steps,
        random_start=random_start,
        mode=mode,
        exit_index=exit_index,
        exit_weights=exit_weights,
        norm=norm,
        max_batch=max_batch,
        generator=generator,
    )
    if not isinstance(targeted, bool):
        raise TypeError(f"`targeted` must be a bool, got {type(targeted).__name__}.")
    return run_pgd(model, images, labels, config, targeted=targeted, transform=transform)
