"""Activation-boundary (AB) transfer (Heo et al., AAAI 2019), for one or many layers.

Instead of matching the magnitude of hidden responses, AB distillation teaches the student
*which neurons fire*: the activation boundaries of the teacher's ReLU layers. Inputs are
**pre-activation** features (the outputs of the convolution or linear layer, before the
ReLU), never probabilities or logits. For a multi-exit student, pair a teacher layer with
the student layer that feeds each exit and pass the features as sequences, one per exit.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .._exits import reduce_exits
from .._validation import (
    ExitWeights,
    Reduction,
    as_exit_weights,
    check_bool,
    check_positive_int,
    check_real,
    check_reduction,
    upcast,
)

__all__ = [
    "ActivationBoundaryLoss",
    "FeatureRecorder",
    "ab_connector",
    "activation_boundary_loss",
]

Features = Tensor | Sequence[Tensor]
"""One feature tensor (B, ...) or a sequence of E of them (one per layer / exit)."""


def _as_layers(features: Features, name: str) -> tuple[list[Tensor], bool]:
    """The features as a list of tensors and whether a single tensor was given."""
    if isinstance(features, Tensor):
        return [features], True
    if not isinstance(features, Sequence) or isinstance(features, (str, bytes)):
        raise TypeError(
            f"`{name}` must be a Tensor (B, ...) or a list of E such tensors, "
            f"got {type(features).__name__}."
        )
    if len(features) == 0:
        raise ValueError(f"`{name}` must hold at least one feature tensor, got an empty sequence.")
    for i, f in enumerate(features):
        if not isinstance(f, Tensor):
            raise TypeError(f"`{name}[{i}]` must be a Tensor (B, ...), got {type(f).__name__}.")
    return list(features), False


def _hinge_squared(student: Tensor, teacher: Tensor, margin: float) -> Tensor:
    """Per-sample AB surrogate (B,) of one layer, summed over every neuron."""
    s = upcast(student)
    t = teacher.to(s.dtype)
    off = (s + margin).pow(2) * ((s > -margin) & (t <= 0))
    on = (s - margin).pow(2) * ((s <= margin) & (t > 0))
    return (off + on).flatten(1).sum(1)


def activation_boundary_loss(
    student_features: Features,
    teacher_features: Features,
    *,
    margin: float = 1.0,
    exit_weights: ExitWeights = None,
    reduction: Reduction = "mean",
    detach_teacher: bool = True,
) -> Tensor:
    r"""Activation-boundary transfer loss (Heo et al., AAAI 2019).

    AB distillation transfers the teacher's activation pattern
    :math:`ρ(T(I)) = 1[T(I) > 0]` rather than its magnitudes. The non-differentiable
    :math:`\lVert ρ(T(I)) - ρ(S(I)) \rVert_1` is replaced by a hinge-squared surrogate with
    margin m on the pre-activation features t of the teacher and s of the student (after
    the connector, see :func:`ab_connector`), summed over every neuron n:

    .. math::
        \mathcal{L}(s, t) = \sum_n (s_n + m)^2 \, 1[s_n > -m \wedge t_n \le 0]
            + (s_n - m)^2 \, 1[s_n \le m \wedge t_n > 0]

    A neuron costs nothing once the student's response agrees with the teacher's on the
    correct side with at least the margin: :math:`s_n \le -m` where the teacher is off
    (:math:`t_n \le 0`), :math:`s_n > m` where it is on. Per sample the loss is a sum
    over neurons; several layers (a sequence, one per exit of a multi-exit student) give
    one row each, weighted by ``exit_weights``. The loss is not normalized by the layer
    size: scale it with the weights if layers differ much in size. The teacher's features
    are detached by default.

    Args:
        student_features: the student's pre-activation features, already mapped to the
            teacher's width: a tensor (B, ...) or a sequence of E tensors.
        teacher_features: the teacher's pre-activation features, same shapes.
        margin: m >= 0 (the paper uses 1).
        exit_weights: per-layer weights (E,) for sequence inputs; default all ones.
        reduction: ``"mean"`` (sum over layers and neurons, mean over the batch),
            ``"sum"`` or ``"none"``.
        detach_teacher: stop gradients through the teacher's features.

    Returns:
        A scalar; for ``reduction="none"``, (B,) for tensor inputs or (E, B) for sequence
        inputs. float32 for half-precision features.

    Raises:
        TypeError: for features that are not tensors or sequences of tensors, integer
            features, or a non-numeric margin.
        ValueError: for an empty sequence, sequences of different lengths, mismatched
            shapes (use a connector), features without a batch dimension or with an
            empty batch, a negative margin, bad ``exit_weights`` or ``reduction``.

    Shape:
        - student_features, teacher_features: (B, ...) each, or sequences of E tensors
          (B, C_i, H_i, W_i) whose shapes may differ between layers.
        - output: (), or (B,) / (E, B) for ``reduction="none"``.

    Example:
        >>> import torch
        >>> teacher = torch.tensor([[2.0, -1.0, 0.5]])
        >>> student = torch.tensor([[1.5, -2.0, 0.0]], requires_grad=True)
        >>> activation_boundary_loss(student, teacher, margin=1.0)
        tensor(1., grad_fn=<MeanBackward0>)
        >>> feats_s = [torch.randn(4, 8, 5, 5), torch.randn(4, 16, 3, 3)]
        >>> feats_t = [torch.randn(4, 8, 5, 5), torch.randn(4, 16, 3, 3)]
        >>> activation_boundary_loss(feats_s, feats_t, reduction="none").shape
        torch.Size([2, 4])
    """
    m = check_real(margin, "margin", low=0.0)
    check_reduction(reduction)
    students, single = _as_layers(student_features, "student_features")
    teachers, single_t = _as_layers(teacher_features, "teacher_features")
    if single != single_t or len(students) != len(teachers):
        raise ValueError(
            "`student_features` and `teacher_features` must both be tensors or both be "
            f"sequences of the same length, got {len(students)} student and "
            f"{len(teachers)} teacher layers."
        )
    weights = as_exit_weights(exit_weights, len(students), name="exit_weights")
    rows = []
    for i, (s, t) in enumerate(zip(students, teachers, strict=True)):
        where = "" if single else f"[{i}]"
        for name, f in (("student_features", s), ("teacher_features", t)):
            if not f.is_floating_point():
                raise TypeError(
                    f"`{name}{where}` must be floating point (pre-activation features), "
                    f"got dtype {f.dtype}."
                )
        if s.dim() < 2:
            raise ValueError(
                f"`student_features{where}` must be (B, ...) with a batch dimension, got "
                f"shape {tuple(s.shape)}."
            )
        if s.shape != t.shape:
            hint = ""
            if t.dim() == s.dim() and s.shape[0] == t.shape[0] and s.shape[2:] == t.shape[2:]:
                hint = (
                    f" Map the student's {s.shape[1]} channels to the teacher's {t.shape[1]} "
                    "with ab_connector(student_channels, teacher_channels)."
                )
            raise ValueError(
                f"`student_features{where}` and `teacher_features{where}` must have the same "
                f"shape, got {tuple(s.shape)} and {tuple(t.shape)}.{hint}"
            )
        if s.shape[0] != students[0].shape[0]:
            raise ValueError(
                f"every layer must have the same batch size, got {students[0].shape[0]} and "
                f"{s.shape[0]} (layer {i})."
            )
        if s.shape[0] == 0:
            raise ValueError(
                f"`student_features{where}` hold an empty batch (B = 0, shape "
                f"{tuple(s.shape)}): a loss over no samples is undefined (its mean is NaN). "
                "Skip empty batches before the loss."
            )
        rows.append(_hinge_squared(s, t.detach() if detach_teacher else t, m))
    loss = torch.stack([r.to(rows[0].dtype) for r in rows])
    if weights is not None:
        loss = loss * weights.to(loss)[:, None]
    if single and reduction == "none":
        return loss[0]
    return reduce_exits(loss, reduction)


def ab_connector(
    student_channels: int, teacher_channels: int, *, spatial: bool = True
) -> nn.Sequential:
    """The AB connector: a 1x1 convolution (no bias) and batch norm, student → teacher width.

    AB transfer compares pre-activation features neuron by neuron, so the student's
    features are first mapped to the teacher's number of channels. The connector is
    trained with the student during the AB stage and discarded afterwards.

    Args:
        student_channels: C_s, the student layer's channels (or features).
        teacher_channels: C_t, the teacher layer's channels.
        spatial: ``True`` for (B, C, H, W) maps (``Conv2d`` 1x1 + ``BatchNorm2d``);
            ``False`` for (B, C) vectors (``Linear`` without bias + ``BatchNorm1d``, the
            same map on a vector).

    Returns:
        ``nn.Sequential(map, batch_norm)``, with Kaiming-normal weights and the batch
        norm at weight 1, bias 0.

    Raises:
        TypeError: if a channel count is not an int.
        ValueError: if a channel count is < 1.

    Shape:
        - input: (B, C_s, H, W), or (B, C_s) with ``spatial=False``.
        - output: (B, C_t, H, W), or (B, C_t).

    Example:
        >>> import torch
        >>> connector = ab_connector(8, 32)
        >>> connector(torch.randn(4, 8, 5, 5)).shape
        torch.Size([4, 32, 5, 5])
    """
    student_channels = check_positive_int(student_channels, "student_channels")
    teacher_channels = check_positive_int(teacher_channels, "teacher_channels")
    check_bool(spatial, "spatial")
    mapping: nn.Module
    norm: nn.Module
    if spatial:
        mapping = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)
        norm = nn.BatchNorm2d(teacher_channels)
    else:
        mapping = nn.Linear(student_channels, teacher_channels, bias=False)
        norm = nn.BatchNorm1d(teacher_channels)
    nn.init.kaiming_normal_(mapping.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(mapping, norm)


class ActivationBoundaryLoss(nn.Module):
    """Activation-boundary transfer with optional connectors; see
    :func:`activation_boundary_loss`.

    With ``connectors`` the student's features of layer i pass through ``connectors[i]``
    (e.g. :func:`ab_connector`) before the comparison; the connectors are submodules, so
    ``criterion.parameters()`` holds them for the optimizer and ``.to()`` moves them.

    Args:
        margin: m >= 0 (paper: 1).
        connectors: ``None``, one module (for tensor features), or a sequence with one
            module or ``None`` (identity) per layer.
        exit_weights: per-layer weights (E,), a registered buffer; default all ones.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        detach_teacher: stop gradients through the teacher's features.

    Shape:
        - student_features: (B, C_s, ...) or a sequence of E tensors; teacher_features:
          the same with the teacher's channels.
        - output: (), or (B,) / (E, B) for ``reduction="none"``.

    Example:
        >>> import torch
        >>> criterion = ActivationBoundaryLoss(
        ...     margin=1.0, connectors=[ab_connector(4, 8), ab_connector(8, 16)]
        ... )
        >>> student = [torch.randn(2, 4, 6, 6), torch.randn(2, 8, 3, 3)]
        >>> teacher = [torch.randn(2, 8, 6, 6), torch.randn(2, 16, 3, 3)]
        >>> criterion(student, teacher).backward()
        >>> sum(p.numel() for p in criterion.parameters())
        208
    """

    exit_weights: Tensor | None

    def __init__(
        self,
        margin: float = 1.0,
        connectors: nn.Module | Sequence[nn.Module | None] | None = None,
        exit_weights: ExitWeights = None,
        reduction: Reduction = "mean",
        detach_teacher: bool = True,
    ) -> None:
        super().__init__()
        self.margin = check_real(margin, "margin", low=0.0)
        self.reduction: Reduction = check_reduction(reduction)
        self.detach_teacher = detach_teacher
        self.register_buffer("exit_weights", as_exit_weights(exit_weights))
        self.connectors: nn.ModuleList | None
        if connectors is None:
            self.connectors = None
        elif isinstance(connectors, nn.Module) and not isinstance(connectors, nn.ModuleList):
            self.connectors = nn.ModuleList([connectors])
        elif isinstance(connectors, nn.ModuleList) or (
            isinstance(connectors, Sequence) and not isinstance(connectors, (str, bytes))
        ):
            items: list[nn.Module] = []
            for i, c in enumerate(connectors):
                if c is None:
                    items.append(nn.Identity())
                elif isinstance(c, nn.Module):
                    items.append(c)
                else:
                    raise TypeError(
                        f"`connectors[{i}]` must be an nn.Module or None, got {type(c).__name__}."
                    )
            if not items:
                raise ValueError("`connectors` must not be empty; pass None for no connectors.")
            self.connectors = nn.ModuleList(items)
        else:
            raise TypeError(
                "`connectors` must be None, an nn.Module or a sequence of modules, "
                f"got {type(connectors).__name__}."
            )

    def forward(self, student_features: Features, teacher_features: Features) -> Tensor:
        if self.connectors is not None:
            students, single = _as_layers(student_features, "student_features")
            if len(students) != len(self.connectors):
                raise ValueError(
                    f"got {len(students)} student feature layers for {len(self.connectors)} "
                    "connectors; pass one connector (or None) per layer."
                )
            mapped = [c(s) for c, s in zip(self.connectors, students, strict=True)]
            student_features = mapped[0] if single else mapped
        return activation_boundary_loss(
            student_features,
            teacher_features,
            margin=self.margin,
            exit_weights=self.exit_weights,
            reduction=self.reduction,
            detach_teacher=self.detach_teacher,
        )

    def extra_repr(self) -> str:
        return f"margin={self.margin}, reduction={self.reduction!r}"


class FeatureRecorder:
    """Record the outputs of chosen submodules during a forward pass (forward hooks).

    AB transfer needs pre-activation features from inside a network; hooking the layer
    before each ReLU (a convolution or linear layer) records exactly those, without
    changing the model's forward. ``features`` lists the latest output of every module,
    in the order given: a copy taken when the module ran, so an in-place operation after
    it (``ReLU(inplace=True)``) does not change what was recorded. Use as a context manager to remove the hooks on exit (the last
    recorded features stay readable), or call :meth:`remove`.

    Args:
        modules: the submodules whose outputs to record.

    Raises:
        TypeError: if an entry is not an ``nn.Module``.
        ValueError: if ``modules`` is empty.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> with FeatureRecorder([net[0]]) as recorder:
        ...     _ = net(torch.randn(2, 4))
        ...     pre_relu = recorder.features[0]
        >>> pre_relu.shape
        torch.Size([2, 8])
    """

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        if isinstance(modules, nn.Module) or not isinstance(modules, Sequence):
            raise TypeError(
                f"`modules` must be a sequence of nn.Module, got {type(modules).__name__}; "
                "wrap a single module in a list."
            )
        if len(modules) == 0:
            raise ValueError("`modules` must hold at least one module, got an empty sequence.")
        for i, module in enumerate(modules):
            if not isinstance(module, nn.Module):
                raise TypeError(
                    f"`modules[{i}]` must be an nn.Module, got {type(module).__name__}."
                )
        self._outputs: list[Tensor | None] = [None] * len(modules)
        self._handles: list[RemovableHandle] = [
            module.register_forward_hook(self._hook(i)) for i, module in enumerate(modules)
        ]

    def _hook(self, slot: int) -> Any:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"FeatureRecorder records tensor outputs, but {type(module).__name__} "
                    f"returned {type(output).__name__}."
                )
            # A copy: an in-place op after the module (ReLU(inplace=True), as in MSDNet
            # and torchvision's ResNets) would otherwise overwrite the recorded
            # pre-activations with their ReLU. The copy is differentiable.
            self._outputs[slot] = output.clone()

        return record

    @property
    def features(self) -> list[Tensor]:
        """The latest output of every recorded module, in order."""
        missing = [i for i, out in enumerate(self._outputs) if out is None]
        if missing:
            raise RuntimeError(
                f"modules {missing} have not run yet: call the model inside the recorder "
                "before reading `features`."
            )
        return [out for out in self._outputs if out is not None]

    def clear(self) -> None:
        """Forget the recorded outputs (they hold the autograd graph)."""
        self._outputs = [None] * len(self._outputs)

    def remove(self) -> None:
        """Remove the hooks and forget the outputs."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> FeatureRecorder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
