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
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from neokd_losses._validation import check_module, first_device
from neokd_losses.attacks.exit_view import as_exit_list
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


def _storage_key(tensor: Tensor) -> int:
    """The tensor's storage, as an int: views and in-place writes share it."""
    try:
        return int(tensor.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # e.g. tensors without storage
        return -id(tensor)


class _MacCounter(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Counts multiply-adds of every ATen call and stamps each produced tensor with the count.

    It also tracks data dependence: every operator with a cost gets a bit, and each
    storage the bits of every operator its values were computed from (its ancestors), so
    that ``dependence_cost`` can say what an exit needs regardless of execution order.
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.total = 0.0
        self.stamps: dict[int, float] = {}
        self.ancestors: dict[int, int] = {}  # id(output tensor) -> bits of its ancestors
        self.op_macs: list[float] = []  # the multiply-adds of the operator with bit i
        self._storages: dict[int, int] = {}  # storage key -> bits of what was written
        self._keep_alive: list[Tensor] = []  # ids and storages stay unique while read

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        macs = _op_macs(func, args, kwargs, out)
        self.total += macs
        bits = 0
        for value in tree_flatten((args, kwargs))[0]:
            if isinstance(value, Tensor):
                bits |= self._storages.get(_storage_key(value), 0)
        if macs:
            bits |= 1 << len(self.op_macs)
            self.op_macs.append(macs)
        for value in tree_flatten(out)[0]:
            if isinstance(value, Tensor):
                key = _storage_key(value)
                self._storages[key] = self._storages.get(key, 0) | bits
                self.stamps[id(value)] = self.total
                self.ancestors[id(value)] = self._storages[key]
                self._keep_alive.append(value)
        return out

    def dependence_cost(self, bits: int) -> float:
        """The multiply-adds of the operators in ``bits``."""
        return sum(m for i, m in enumerate(self.op_macs) if bits >> i & 1)


# Warn when an exit is charged more than this multiple of the work its logits (and the
# earlier exits') depend on. Models that compute exits in order stay below it (MSDNet:
# at most about 1.33, for exit 1 of the ImageNet model, since the finer scales of a
# block's last layer feed only later blocks; SmallCNN and attach_exits wrappers: 1.0);
# the trunk-first TinyMultiExit of the tests charges exit 1 10.5 times what it needs.
_OUT_OF_ORDER_RATIO = 1.5


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
    wrappers): each head right after the block it reads. A model that runs its whole
    trunk before the first head would charge the whole trunk to exit 1; the data
    dependence of each exit's logits is tracked as well, and when an exit is charged
    more than 1.5 times the work it (and the earlier exits) depend on, a
    ``RuntimeWarning`` names the fix and the costs by data dependence. Pass the model
    itself, not a ``torch.compile`` wrapper.

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
        ValueError: if the batch is empty, the model returns no exits, or an exit's
            first dimension is not the batch size (an input without batch dimension).
        RuntimeError: if the model fails on ``example_input``; the message adds the
            input's shape and how to add a batch dimension.

    Warns:
        RuntimeWarning: if the model computes exit heads after work they do not depend
            on (its trunk before its heads), so that the costs overstate early exits.

    Shape:
        - example_input: (B, ...), e.g. (B, C, H, W) for images.
        - output: a list of E floats.

    Example:
        >>> # TwoExits: [a(h), b(tanh(h))] with two Linear(4, 3)
        >>> exit_costs(TwoExits(in_features=4, num_classes=3), torch.zeros(2, 4))
        [15.0, 34.0]

        Exit 1 costs a: 4·3 + 3; exit 2 adds tanh (4) and b (4·3 + 3).
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
    name = type(model).__name__
    # eval_mode restores every submodule's own mode (a frozen BatchNorm inside a model in
    # train mode stays frozen); model.train(was_training) would reset them all.
    with eval_mode(model), torch.no_grad(), counter:
        try:
            outputs = model(example_input)
        except RuntimeError as err:  # torch's shape errors: say what was passed
            raise RuntimeError(
                f"{name}(example_input) failed for `example_input` of shape "
                f"{tuple(example_input.shape)}: {err}\n`example_input` must be one batch "
                "(B, ...) that the model accepts; for a single sample without a batch "
                "dimension pass `example_input.unsqueeze(0)`."
            ) from err
    exits = as_exit_list(
        outputs, name, "For a single-exit model the cost of its one exit is the total count."
    )
    costs: list[float] = []
    needed: list[float] = []
    running, bits = 0.0, 0
    for i, logits in enumerate(exits):
        if logits.dim() == 0 or logits.shape[0] != batch:
            raise ValueError(
                f"exit {i} of {name} has shape {tuple(logits.shape)}, not (B, K) with the "
                f"B = {batch} samples of `example_input` {tuple(example_input.shape)}. "
                "`example_input` must be a batch (B, ...); for a single sample without a "
                "batch dimension pass `example_input.unsqueeze(0)`."
            )
        # A tensor no operator produced (e.g. the input returned as is) cost nothing.
        running = max(running, counter.stamps.get(id(logits), 0.0))
        bits |= counter.ancestors.get(id(logits), 0)
        costs.append(running / batch)
        needed.append(counter.dependence_cost(bits) / batch)
    _warn_if_out_of_order(name, costs, needed)
    return costs


def _warn_if_out_of_order(name: str, costs: list[float], needed: list[float]) -> None:
    """RuntimeWarning when an exit is charged much more than its logits depend on."""
    for k, (charged, need) in enumerate(zip(costs, needed)):
        if charged > _OUT_OF_ORDER_RATIO * need:
            exits = "exit 1 does" if k == 0 else f"exits 1..{k + 1} do"
            warnings.warn(
                f"exit_costs charges each exit what the model computed before that exit's "
                f"logits, but {name} computes exit {k + 1}'s logits after work that {exits} "
                f"not depend on: {charged:.6g} multiply-adds charged, "
                f"{need:.6g} by data dependence. The model probably runs its whole trunk "
                "before its exit heads, so these costs (and any budget curve built on "
                "them) overstate the early exits. Compute each exit's head right after the "
                "block it reads, in forward's order (see ThreeExitNet on the concepts "
                f"page). Costs by data dependence: {[round(c, 6) for c in needed]}.",
                RuntimeWarning,
                stacklevel=3,
            )
            return
