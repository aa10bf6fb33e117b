"""Cumulative cost per exit of a multi-exit model, measured from one forward pass.

Budgeted prediction (MSDNet's dynamic evaluation, Huang et al., ICLR 2018) weighs each exit
by the cost of reaching it: a sample that leaves at exit k has run the trunk up to exit k
*and* every earlier exit head. :func:`exit_costs` measures that cost by running the model
once under a ``TorchDispatchMode`` that sees every ATen operator the forward executes,
keeps a running multiply-add count, and reads the count at the moment each exit's logits
are produced.

What is counted, per ATen operator (the convention of the FLOP counter of the public MSDNet
reference implementation, kalviny/MSDNet-PyTorch; one multiply-add counts 1, not 2 FLOPs):

- convolution (any dimension, grouped, transposed): output elements × (C_in / groups) ×
  kernel elements (transposed: input elements × (C_out / groups) × kernel elements);
  the convolution bias is not counted.
- ``mm``, ``bmm``, ``mv``, ``dot``: one per multiply-add of the product.
- ``addmm``, ``baddbmm``, ``addmv``: the product plus one per bias element added, so a
  linear layer costs (weight + bias elements) per input.
- ReLU and other pointwise activations (gelu, silu, sigmoid, tanh, hardtanh, leaky
  ReLU, ...): one per output element.
- max and average pooling with a window: window elements per output element.
- adaptive pooling and ``mean`` over dimensions (global average pooling): one per input
  element.
- scaled dot-product attention: QKᵀ plus attention × V, B·H·L·S·(E + E_v) on CPU; fused
  CUDA kernels and other operators that ``torch.utils.flop_counter`` knows: its FLOPs / 2.
- everything else is free: batch norm, additions, concatenation, views, softmax,
  dropout.

Counts are for the whole batch of ``example_input`` and are divided by its batch size,
so the result is the cost for ONE input.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from neokd_losses._validation import check_module, first_device
from neokd_losses.evaluation._loader import eval_mode

__all__ = ["exit_costs"]

_aten = torch.ops.aten

_ACTIVATIONS = (
    "relu",
    "relu6",
    "gelu",
    "silu",
    "mish",
    "sigmoid",
    "tanh",
    "hardtanh",
    "hardswish",
    "hardsigmoid",
    "leaky_relu",
    "elu",
    "celu",
    "selu",
    "rrelu",
    "softplus",
    "prelu",
    "_prelu_kernel",
    "threshold",
)
_WINDOW_POOLS = (
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "max_pool2d_with_indices",
    "max_pool3d_with_indices",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
)
_INPUT_POOLS = (
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "_adaptive_avg_pool2d",
    "_adaptive_avg_pool3d",
    "adaptive_max_pool1d",
    "adaptive_max_pool2d",
    "adaptive_max_pool3d",
    "mean",
)


def _packets(names: Sequence[str], inplace: bool = False) -> frozenset[Any]:
    """The ATen overload packets named ``names`` (and their in-place ``name_``) that exist."""
    found = set()
    for name in names:
        for candidate in (name, name + "_") if inplace else (name,):
            packet = getattr(_aten, candidate, None)
            if packet is not None:
                found.add(packet)
    return frozenset(found)


_ACTIVATION_OPS = _packets(_ACTIVATIONS, inplace=True)
_WINDOW_POOL_OPS = _packets(_WINDOW_POOLS)
_INPUT_POOL_OPS = _packets(_INPUT_POOLS)
_CPU_ATTENTION_OPS = _packets(("_scaled_dot_product_flash_attention_for_cpu",))


def _first_tensor(value: Any) -> Tensor:
    """The tensor itself, or the first element of a tuple of tensors (values, indices)."""
    first: Tensor = value[0] if isinstance(value, tuple | list) else value
    return first


def _conv_macs(args: Sequence[Any], out: Any) -> float:
    x, weight = args[0], args[1]
    transposed = bool(args[6]) if len(args) > 6 else False
    kernel = math.prod(weight.shape[2:])
    if transposed:  # weight (C_in, C_out / groups, *kernel): every input spreads to outputs
        return float(x.numel() * weight.shape[1] * kernel)
    return float(_first_tensor(out).numel() * weight.shape[1] * kernel)


def _product_macs(a: Tensor, b: Tensor) -> float:
    """Multiply-adds of dot (k)(k), mv (n, k)(k), mm (n, k)(k, m) or bmm (b, n, k)(b, k, m)."""
    batch = a.shape[0] if a.dim() == 3 else 1
    rows = a.shape[-2] if a.dim() >= 2 else 1
    cols = b.shape[-1] if b.dim() >= 2 else 1
    return float(batch * rows * cols * a.shape[-1])


def _window(kernel_size: Any, spatial_dims: int) -> int:
    sizes = [int(kernel_size)] if isinstance(kernel_size, int) else [int(k) for k in kernel_size]
    if len(sizes) == 1:
        return int(sizes[0] ** spatial_dims)
    return math.prod(sizes)


_FlopFormula = Callable[..., int]


def _fallback_registry() -> dict[Any, _FlopFormula]:
    """``torch.utils.flop_counter``'s formulas (2 FLOPs per multiply-add), if available."""
    try:
        from torch.utils.flop_counter import flop_registry
    except ImportError:  # pragma: no cover - very old torch
        return {}
    return dict(flop_registry)


_FALLBACK = _fallback_registry()


def _op_macs(func: Any, args: Sequence[Any], kwargs: dict[str, Any], out: Any) -> float:
    """Multiply-adds of one ATen call, following the table in the module docstring."""
    packet = func.overloadpacket
    if packet in (_aten.convolution, _aten._convolution):
        return _conv_macs(args, out)
    if packet in (_aten.mm, _aten.bmm, _aten.mv, _aten.dot):
        return _product_macs(args[0], args[1])
    if packet in (_aten.addmm, _aten.baddbmm, _aten.addmv):
        return _product_macs(args[1], args[2]) + float(_first_tensor(out).numel())
    if packet in _CPU_ATTENTION_OPS:
        query, key, value = args[0], args[1], args[2]
        scores = query.shape[:-1].numel() * key.shape[-2]  # B·H·L·S
        return float(scores * (query.shape[-1] + value.shape[-1]))
    if packet in _ACTIVATION_OPS:
        return float(_first_tensor(out).numel())
    if packet in _WINDOW_POOL_OPS:
        result = _first_tensor(out)
        spatial = 1 if "1d" in packet.__name__ else 3 if "3d" in packet.__name__ else 2
        kernel_size = args[1] if len(args) > 1 else kwargs["kernel_size"]
        return float(result.numel() * _window(kernel_size, spatial))
    if packet in _INPUT_POOL_OPS:
        return float(args[0].numel())
    formula = _FALLBACK.get(packet)
    if formula is not None:
        try:
            return formula(*args, **kwargs, out_val=out) / 2.0
        except Exception:  # an unusual signature must not break the measurement
            return 0.0
    return 0.0


class _MacCounter(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Counts multiply-adds of every ATen call and stamps each produced tensor with the count."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.total = 0.0
        self.stamps: dict[int, float] = {}
        self._keep_alive: list[Tensor] = []  # ids stay unique while the stamps are read

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.total += _op_macs(func, args, kwargs, out)
        for value in tree_flatten(out)[0]:
            if isinstance(value, Tensor):
                self.stamps[id(value)] = self.total
                self._keep_alive.append(value)
        return out


def exit_costs(model: nn.Module, example_input: Tensor) -> list[float]:
    """Cumulative multiply-adds needed to produce each exit, for one input.

    Runs ``model(example_input)`` once (in eval mode, without gradients; the mode of the
    model and of every submodule is restored afterwards, also on error) and counts the
    multiply-adds of every operator executed, as listed in the module docstring. The cost
    of exit k is the count when exit k's logits are produced, i.e. the trunk up to exit k
    plus every exit head computed before it, which is what a sample leaving at exit k has
    paid in budgeted prediction. If a model returns its exits in an order other than the
    one it computes them in, exit k is charged the most expensive of exits 1..k, so the
    costs never decrease.

    The measurement assumes the model computes its exits in order, as it would when
    inputs leave early (MSDNet, SmallCNN, :func:`~neokd_losses.models.attach_exits`
    wrappers). A model that runs its whole trunk before the first head charges the
    whole trunk to exit 1. Pass the model itself, not a ``torch.compile`` wrapper.

    With the counting convention of the public MSDNet reference implementation
    (convolutions, linear layers with their bias, ReLUs and pooling; batch norm free) the
    figures match the per-exit costs measured on that implementation within 0.1 % for the
    CIFAR-10, CIFAR-100 and ImageNet MSDNets.

    Args:
        model: a multi-exit model whose ``forward`` returns a list or tuple of E logits
            tensors (B, K).
        example_input: one batch the model accepts, (B, ...); only its shape matters, and
            it is moved to the device of the model's parameters.
            Counts are divided by B.

    Returns:
        E floats: the cumulative multiply-adds for one input to reach exits 1..E.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``, ``example_input`` is not a
            tensor with a batch dimension, or the model does not return a sequence of
            tensors.
        ValueError: if the batch is empty or the model returns no exits.

    Shape:
        - example_input: (B, ...), e.g. (B, C, H, W) for images.
        - output: a list of E floats.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class TwoExits(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.body = nn.Linear(8, 8)
        ...         self.head1, self.head2 = nn.Linear(8, 3), nn.Linear(8, 3)
        ...     def forward(self, x):
        ...         z1 = self.head1(x)
        ...         return [z1, self.head2(torch.relu(self.body(x)))]
        >>> exit_costs(TwoExits(), torch.zeros(4, 8))  # 8*3+3; then + 8*8+8 + 8 + 8*3+3
        [27.0, 134.0]
    """
    check_module(model)
    if not isinstance(example_input, Tensor):
        raise TypeError(
            f"`example_input` must be a Tensor batch (B, ...), got {type(example_input).__name__}."
        )
    if example_input.dim() == 0:
        raise TypeError("`example_input` must have a batch dimension (B, ...), got a 0-d tensor.")
    batch = example_input.shape[0]
    if batch == 0:
        raise ValueError(
            "`example_input` must hold at least one sample, got shape "
            f"{tuple(example_input.shape)}."
        )
    # Only the shape matters: follow the model's device, so that a model on the GPU can
    # be measured with a CPU batch.
    device = first_device(model)
    if device is not None and example_input.device != device:
        example_input = example_input.to(device)
    counter = _MacCounter()
    # eval_mode restores every submodule's own mode (a frozen BatchNorm inside a model in
    # train mode stays frozen); model.train(was_training) would reset them all.
    with eval_mode(model), torch.no_grad(), counter:
        outputs = model(example_input)
    if isinstance(outputs, Tensor) or not isinstance(outputs, Sequence):
        raise TypeError(
            "`model` must return a list or tuple of E exit logits tensors (B, K), got "
            f"{type(outputs).__name__}. For a single-exit model the cost is the total count."
        )
    if len(outputs) == 0:
        raise ValueError("`model` returned no exits (an empty sequence); expected E >= 1 logits.")
    costs: list[float] = []
    running = 0.0
    for i, logits in enumerate(outputs):
        if not isinstance(logits, Tensor):
            raise TypeError(
                f"exit {i} of the model's output must be a Tensor, got {type(logits).__name__}."
            )
        # A tensor no operator produced (e.g. the input returned as is) cost nothing.
        stamp = counter.stamps.get(id(logits), 0.0)
        running = max(running, stamp)
        costs.append(running / batch)
    return costs
