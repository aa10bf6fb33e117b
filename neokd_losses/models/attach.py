"""Turn any network into a multi-exit network by attaching exit heads to named layers."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn

from neokd_losses._validation import check_exit_index, check_positive_int, preserved_modes
from neokd_losses.models.staged import StageState, run_stages

__all__ = ["AttachedExits", "HeadFactory", "attach_exits"]

_STAGE_METHODS = frozenset({"forward_stage", "forward_block", "forward_exit"})

HeadFactory = Callable[[int, int], nn.Module]
"""A callable ``(in_channels, num_classes) -> nn.Module`` building one exit head."""

HeadSpec = Literal["pool", "msdnet"] | HeadFactory


class _PoolHead(nn.Module):
    """Global average pooling over all dimensions after the channels, then linear C→K."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() > 2:
            x = x.flatten(2).mean(-1)
        logits: Tensor = self.linear(x)
        return logits


def _conv_basic(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class _MSDNetHead(nn.Module):
    """MSDNet-style head: 2 × (3×3 stride-2 conv → BN → ReLU) to 128 channels, pool, linear."""

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 128) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_basic(in_channels, hidden),
            _conv_basic(hidden, hidden),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.linear = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(
                f"the 'msdnet' exit head needs image features (B, C, H, W), got shape "
                f"{tuple(x.shape)}; use head='pool' or a custom head factory."
            )
        logits: Tensor = self.linear(self.features(x))
        return logits


_HEADS: dict[str, HeadFactory] = {"pool": _PoolHead, "msdnet": _MSDNetHead}

_WIDTH_ATTRIBUTES = ("out_channels", "out_features", "num_features", "num_channels")


def _declared_width(module: nn.Module) -> int | None:
    for attribute in _WIDTH_ATTRIBUTES:
        value = getattr(module, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _static_channels(backbone: nn.Module, target: nn.Module) -> int | None:
    """Output channels of ``target`` guessed from the layers defined up to its end.

    Walks the backbone's modules in definition order up to ``target`` and then through
    ``target``'s own submodules, and returns the width declared last: ``target``'s last
    convolution / linear / norm layer, or the one just before it for width-preserving
    layers such as ReLU or pooling.
    """
    channels = None
    order = list(backbone.modules())
    position = next(i for i, m in enumerate(order) if m is target)
    for module in [*order[:position], *target.modules()]:
        width = _declared_width(module)
        if width is not None:
            channels = width
    return channels


class _TapSession(threading.local):
    """What the forward hooks of one :class:`AttachedExits` need while its forward runs.

    The hooks on the backbone hold this object, not the wrapper, so the backbone keeps no
    wrapper (nor its heads) alive once the wrapper is gone. ``taps`` and ``heads`` are set
    for the duration of one forward and are per thread: ``nn.DataParallel`` runs its
    replicas, which share these hooks, in threads at once, each with its own heads.
    Copies and pickles start empty, as the state only exists during a forward.
    """

    def __init__(self) -> None:
        self.taps: list[tuple[int, Tensor]] | None = None
        self.heads: nn.ModuleList | None = None
        self.stop_after = 0  # > 0: stop the backbone once this many exits have been tapped
        self.channels: tuple[int, ...] = ()
        self.layers: tuple[str, ...] = ()

    def __reduce__(self) -> tuple[type[_TapSession], tuple[()]]:
        return (_TapSession, ())


def _tap(session: _TapSession, index: int, module: nn.Module, args: Any, output: Any) -> None:
    """Forward hook of exit ``index``: apply its head while the wrapper's forward runs."""
    taps, heads = session.taps, session.heads
    if taps is None or heads is None:  # the backbone runs on its own: do nothing
        return
    name = session.layers[index]
    if not isinstance(output, Tensor):
        raise TypeError(
            f"layer {name!r} returned {type(output).__name__}, but an exit head needs a "
            "Tensor (B, C, ...); attach the exit to a layer that returns one tensor."
        )
    if output.dim() < 2 or output.shape[1] != session.channels[index]:
        raise ValueError(
            f"layer {name!r} produced features of shape {tuple(output.shape)}, but its exit "
            f"head was built for {session.channels[index]} channels (dimension 1). Pass "
            "`example_input=` to attach_exits to measure the channels instead of guessing."
        )
    taps.append((index, heads[index](output)))
    if len(taps) == session.stop_after:
        raise _StopForward


class _StopForward(Exception):
    """Raised by a tap to stop the backbone once the last exit wanted has been computed."""


def _sequential_stages(
    backbone: nn.Module, layers: Sequence[str], include_output: bool
) -> tuple[tuple[int, tuple[str, ...]], ...] | None:
    """The stages of an ``nn.Sequential`` backbone with exits on direct children, or None.

    Stage k is ``(head index, names of the children it runs)``: the children after the
    previous exit's layer up to and including exit k's layer (in execution order); with
    ``include_output`` a last stage (head index -1) runs the remaining children.
    """
    if (
        not isinstance(backbone, nn.Sequential)
        or type(backbone).forward is not nn.Sequential.forward
    ):
        return None
    children = list(backbone._modules)
    if any(name not in children for name in layers):
        return None
    every = [m for _, m in backbone.named_modules(remove_duplicate=False)]
    for name in layers:  # each tapped layer must run exactly once
        if sum(m is backbone._modules[name] for m in every) != 1:
            return None
    order = sorted(range(len(layers)), key=lambda i: children.index(layers[i]))
    stages, start = [], 0
    for head in order:
        end = children.index(layers[head]) + 1
        stages.append((head, tuple(children[start:end])))
        start = end
    if include_output:
        stages.append((-1, tuple(children[start:])))
    return tuple(stages)


class AttachedExits(nn.Module):
    """A backbone with exit heads attached to named layers; built by :func:`attach_exits`.

    Forward hooks on the named layers apply each head as soon as its layer has run, so the
    exits are computed in execution order (which is what
    :func:`~neokd_losses.evaluation.flops.exit_costs` and early exiting expect). The hooks
    act only while this wrapper runs; calling the backbone on its own is unaffected. They
    hold no reference to the wrapper (a discarded wrapper and its heads are freed, leaving
    inert hooks on the backbone), and their state is per thread, so ``nn.DataParallel``
    replicas and concurrent calls from several threads are safe. ``copy.deepcopy``,
    ``torch.save`` and ``torch.compile`` (one graph) work on the wrapper.

    Stages (see :class:`~neokd_losses.models.staged.StagedModel`): when the backbone is
    a plain ``nn.Sequential`` (not a subclass with its own ``forward``) and every exit
    sits on one of its direct children (names without a dot, each module used once), the
    wrapper is staged: ``has_stages`` is True and ``forward_stage(k, state)`` runs the
    children after exit k − 1's layer up to exit k's layer, then exit k's head (with
    ``include_output``, the last stage runs the remaining children). The state is the
    tensor flowing through the Sequential. Any other backbone (a torchvision ResNet,
    exits on nested layers) has no ``forward_stage``; :func:`~neokd_losses.models.run_until`
    still computes nothing past exit k on it, by stopping the backbone right after exit
    k's head (a private exception raised by the hook and caught by the wrapper).
    ``forward`` always runs the whole backbone through the hooks, as before; its exits
    equal those of the stages.

    Attributes:
        backbone: the wrapped network (shared, not copied).
        layers: the names of the layers that carry an exit.
        heads: one head per entry of ``layers``, in the same order.
        include_output: whether the backbone's own output is the last exit.
        num_classes: K.
        num_exits: E = ``len(layers)`` (+1 with ``include_output``).
        has_stages: whether the wrapper implements the staged-model protocol.

    Shape:
        - input: (B, ...), whatever the backbone accepts.
        - output: a list of E tensors (B, K), E = ``len(layers)`` (+1 with
          ``include_output``), earliest exit first.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(288, 5))
        >>> model = attach_exits(net, ["1"], num_classes=5, include_output=True)
        >>> isinstance(model, AttachedExits), model.layers
        (True, ('1',))
        >>> [tuple(z.shape) for z in model(torch.rand(2, 3, 8, 8))]
        [(2, 5), (2, 5)]
        >>> net(torch.rand(2, 3, 8, 8)).shape  # the backbone alone is unchanged
        torch.Size([2, 5])
        >>> model.has_stages, [tuple(z.shape) for z in model.forward_stage(0, torch.rand(2, 3, 8, 8))]
        (True, [(2, 8, 6, 6), (2, 5)])
    """

    def __init__(
        self,
        backbone: nn.Module,
        layers: Sequence[str],
        heads: Sequence[nn.Module],
        channels: Sequence[int],
        num_classes: int,
        include_output: bool,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.layers = tuple(layers)
        self.heads = nn.ModuleList(heads)
        self.num_classes = num_classes
        self.include_output = include_output
        self.num_exits = len(self.layers) + int(include_output)
        self._channels = tuple(channels)
        self._session = _TapSession()
        self._stages = _sequential_stages(backbone, self.layers, include_output)
        self.has_stages = self._stages is not None
        modules = dict(backbone.named_modules())
        for index, name in enumerate(self.layers):
            modules[name].register_forward_hook(partial(_tap, self._session, index))

    @property
    def forward_stage(self) -> Callable[[int, StageState], tuple[StageState, Tensor]]:
        """Stage ``index`` of a staged wrapper: ``(index, state) -> (next state, logits)``.

        Only present (``has_stages``) for an ``nn.Sequential`` backbone with exits on its
        direct children; otherwise reading it raises AttributeError, so that
        :func:`~neokd_losses.models.staged.is_staged` is False.
        """
        self._require_stages()
        return self._forward_stage

    @property
    def forward_block(self) -> Callable[[int, StageState], StageState]:
        """Stage ``index``'s backbone children alone: ``(index, state) -> next state``.

        Present exactly when :attr:`forward_stage` is; the exit head is
        :attr:`forward_exit`.
        """
        self._require_stages()
        return self._forward_block

    @property
    def forward_exit(self) -> Callable[[int, Tensor], Tensor]:
        """Exit ``index``'s head on its layer's output: ``(index, features) -> logits``.

        Present exactly when :attr:`forward_stage` is.
        """
        self._require_stages()
        return self._forward_exit

    def __getattr__(self, name: str) -> Any:
        # A property that raises AttributeError falls back to __getattr__, whose generic
        # "has no attribute" message would hide why the stages are missing.
        if name in _STAGE_METHODS and self.__dict__.get("_stages", 0) is None:
            self._require_stages()
        return super().__getattr__(name)

    def _require_stages(self) -> None:
        if self._stages is None:
            raise AttributeError(
                "this AttachedExits has no stages: its backbone is not an nn.Sequential with "
                "exits on direct children (see AttachedExits)."
            )

    def _stage(self, index: int) -> tuple[int, tuple[str, ...]]:
        assert self._stages is not None
        if (
            isinstance(index, bool)
            or not isinstance(index, int)
            or not 0 <= index < len(self._stages)
        ):
            raise ValueError(
                f"this AttachedExits has stages 0..{len(self._stages) - 1}, got index {index!r}."
            )
        return self._stages[index]

    def _forward_block(self, index: int, state: StageState) -> StageState:
        modules = self.backbone._modules
        for name in self._stage(index)[1]:
            module = modules[name]
            assert module is not None
            state = module(state)
        return state

    def _forward_exit(self, index: int, features: Tensor) -> Tensor:
        head = self._stage(index)[0]
        if head >= 0:
            logits: Tensor = self.heads[head](features)
            return logits
        return self._check_output(features)

    def _forward_stage(self, index: int, state: StageState) -> tuple[StageState, Tensor]:
        state = self._forward_block(index, state)
        return state, self._forward_exit(index, state)

    def _run_until(self, x: Tensor, exit_index: int) -> list[Tensor]:
        """Exits 0..``exit_index``; the backbone stops right after that exit's head."""
        last = check_exit_index(exit_index, self.num_exits)
        if self._stages is not None:
            return run_stages(self, x, last)
        if last == self.num_exits - 1:
            full: list[Tensor] = self(x)
            return full
        session = self._session
        session.taps, session.heads = [], self.heads
        session.channels, session.layers = self._channels, self.layers
        session.stop_after = last + 1
        try:
            self.backbone(x)
        except _StopForward:
            pass
        finally:
            taps = session.taps
            session.taps = session.heads = None
            session.stop_after = 0
        if taps is None or len(taps) != last + 1:
            raise ValueError(
                f"the backbone finished after {0 if taps is None else len(taps)} of the "
                f"{last + 1} exits wanted; every layer with an exit must run once per forward."
            )
        return [z for _, z in taps]

    def _check_output(self, output: Any) -> Tensor:
        """The backbone's own output as the last exit: logits (B, K)."""
        if not isinstance(output, Tensor) or output.dim() != 2:
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(
                f"with include_output=True the backbone must return logits (B, K), got {shape}."
            )
        if output.shape[1] != self.num_classes:
            raise ValueError(
                f"the backbone returns {output.shape[1]} classes but the exits have "
                f"num_classes={self.num_classes}; replace the backbone's classifier "
                "(e.g. `model.fc = nn.Linear(512, K)`) or set include_output=False."
            )
        return output

    def forward(self, x: Tensor) -> list[Tensor]:
        """Exit logits in execution order, then the backbone's output if ``include_output``.

        Raises:
            ValueError: if a named layer did not run exactly once, or the backbone's own
                output (with ``include_output``) is not (B, K).
        """
        session = self._session
        session.taps, session.heads = [], self.heads
        session.channels, session.layers = self._channels, self.layers
        try:
            output = self.backbone(x)
            taps = session.taps
        finally:
            session.taps = session.heads = None
        fired = [index for index, _ in taps]
        if len(fired) != len(self.layers) or len(set(fired)) != len(fired):
            runs = {name: fired.count(i) for i, name in enumerate(self.layers)}
            raise ValueError(
                "every layer with an exit must run exactly once per forward; runs per layer: "
                f"{runs}. Attach exits to layers that run once (not to a module reused "
                "several times, such as a shared ReLU)."
            )
        logits = [z for _, z in taps]
        if self.include_output:
            logits.append(self._check_output(output))
        return logits


def _measure_channels(
    backbone: nn.Module, names: Sequence[str], modules: Sequence[nn.Module], example: Tensor
) -> list[int]:
    """Run the backbone once (eval, no grad, mode restored) and read each layer's channels."""
    seen: dict[int, list[Tensor]] = {i: [] for i in range(len(modules))}

    def record(index: int, module: nn.Module, args: Any, output: Any) -> None:
        seen[index].append(output)

    handles = [m.register_forward_hook(partial(record, i)) for i, m in enumerate(modules)]
    try:
        with preserved_modes(backbone), torch.no_grad():  # every submodule's own mode back
            backbone.eval()
            backbone(example)
    finally:
        for handle in handles:
            handle.remove()
    channels = []
    for index, outputs in seen.items():
        if len(outputs) != 1:
            raise ValueError(
                f"layer {names[index]!r} ran {len(outputs)} times on `example_input`; an exit "
                "needs a layer that runs exactly once per forward."
            )
        output = outputs[0]
        if not isinstance(output, Tensor) or output.dim() < 2:
            raise TypeError(
                f"layer {names[index]!r} returned {type(output).__name__}; an exit head needs "
                "a Tensor (B, C, ...)."
            )
        channels.append(int(output.shape[1]))
    return channels


def attach_exits(
    backbone: nn.Module,
    layers: Sequence[str],
    num_classes: int,
    head: HeadSpec = "pool",
    *,
    include_output: bool = False,
    example_input: Tensor | None = None,
) -> AttachedExits:
    """Wrap a network so that its forward returns one exit's logits per named layer.

    Multi-exit networks (BranchyNet, SDN, MSDNet) attach small classifiers to
    intermediate features; this does that for any ``nn.Module`` without editing it. Each
    head reads its layer's output, channels first (B, C, ...), as soon as the layer runs.

    Heads: ``"pool"`` (default) averages over every dimension after the channels and
    applies a linear C→K layer; ``"msdnet"`` is the MSDNet exit head
    (3×3 stride-2 conv → BN → ReLU twice, 128 channels, global average pooling, linear
    128→K) for image features; any callable ``(in_channels, num_classes) -> nn.Module``
    can replace them. Heads are placed on the device and dtype of the backbone's first
    parameter.

    The input channels of every head are measured by one forward pass of
    ``example_input`` when it is given; otherwise they are the width declared
    (``out_channels``, ``out_features``, ``num_features`` or ``num_channels``) by the
    last layer defined up to the end of the named module: its own last convolution or
    norm layer, or the one before it for a ReLU or pooling layer. That guess is right for
    ResNet stages and plain layer stacks; a wrong guess is reported at the first forward
    with a ValueError that points to ``example_input``.

    Stages: the wrapper is a staged model (``has_stages``; see
    :class:`~neokd_losses.models.staged.StagedModel`) exactly when ``backbone`` is a
    plain ``nn.Sequential`` (not a subclass with its own ``forward``) and every named
    layer is one of its direct children, used once. Then
    :class:`~neokd_losses.inference.EarlyExitClassifier` accepts it and
    :func:`~neokd_losses.models.run_until` runs only the children up to exit k. For any
    other backbone ``run_until`` still stops the backbone right after exit k's head.

    Args:
        backbone: the network; it is shared, not copied, and gains forward hooks that
            act only while the wrapper runs.
        layers: names from ``backbone.named_modules()`` (e.g. ``"layer1"``) whose
            outputs carry an exit; list them in execution order, the order in which the
            exits are returned.
        num_classes: K, the classes of every exit head.
        head: ``"pool"``, ``"msdnet"`` or a head factory.
        include_output: append the backbone's own output as the last exit; it must then
            be logits (B, K).
        example_input: an input batch to measure the head widths with (recommended).

    Returns:
        An :class:`AttachedExits` module; its forward returns a list of
        E = len(layers) + include_output logits tensors (B, K).

    Raises:
        TypeError: if ``backbone`` is not an ``nn.Module``, ``layers`` is a string or
            holds a non-string, ``head`` is neither a known name nor callable, or a head
            factory returns something other than an ``nn.Module``.
        ValueError: if a layer name is unknown (the message lists the valid names) or
            repeated, there would be no exit, ``head`` is an unknown name, the channels
            cannot be inferred without ``example_input``, or a layer does not run once.

    Shape:
        - input: whatever the backbone accepts, batch first (B, ...).
        - output: a list of E tensors (B, K).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU())
        >>> model = attach_exits(net, ["1", "3"], num_classes=10)
        >>> [tuple(z.shape) for z in model(torch.rand(2, 3, 16, 16))]
        [(2, 10), (2, 10)]
    """
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"`backbone` must be an nn.Module, got {type(backbone).__name__}.")
    if isinstance(layers, str | bytes) or not isinstance(layers, Sequence):
        raise TypeError(
            f"`layers` must be a list of layer names, got {type(layers).__name__} {layers!r}; "
            f"for one layer write [{layers!r}]."
        )
    check_positive_int(num_classes, "num_classes")
    names = list(layers)
    for name in names:
        if not isinstance(name, str):
            raise TypeError(
                f"`layers` must hold layer names (str), got {type(name).__name__} {name!r}."
            )
    if not names and not include_output:
        raise ValueError(
            "`layers` is empty and include_output=False: the model would have no exit."
        )
    if len(set(names)) != len(names):
        raise ValueError(f"`layers` must not repeat a name, got {names}.")
    modules = dict(backbone.named_modules())
    valid = [n for n in modules if n]
    unknown = [n for n in names if n not in modules or not n]
    if unknown:
        raise ValueError(
            f"unknown layer name(s) {unknown} for {type(backbone).__name__}; valid names are: "
            f"{', '.join(valid)}."
        )
    if isinstance(head, str):
        if head not in _HEADS:
            raise ValueError(f"`head` must be 'pool', 'msdnet' or a callable, got {head!r}.")
        factory = _HEADS[head]
    elif callable(head):
        factory = head
    else:
        raise TypeError(
            f"`head` must be 'pool', 'msdnet' or a callable (in_channels, num_classes) -> "
            f"nn.Module, got {type(head).__name__}."
        )

    targets = [modules[n] for n in names]
    if example_input is not None:
        channels = _measure_channels(backbone, names, targets, example_input)
    else:
        guessed = [_static_channels(backbone, m) for m in targets]
        missing = [n for n, c in zip(names, guessed, strict=True) if c is None]
        if missing:
            raise ValueError(
                f"cannot infer the output channels of layer(s) {missing}: they declare no "
                "out_channels / out_features / num_features. Pass `example_input=` (one "
                "input batch) to measure them."
            )
        channels = [c for c in guessed if c is not None]

    heads = []
    reference = next(backbone.parameters(), None)
    for name, width in zip(names, channels, strict=True):
        built = factory(width, num_classes)
        if not isinstance(built, nn.Module):
            raise TypeError(
                f"the head factory must return an nn.Module, got {type(built).__name__} for "
                f"layer {name!r}."
            )
        if reference is not None:
            built = built.to(device=reference.device, dtype=reference.dtype)
        heads.append(built)
    return AttachedExits(backbone, names, heads, channels, num_classes, include_output)
