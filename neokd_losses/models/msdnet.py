"""MSDNet: the Multi-Scale DenseNet of Huang et al. (ICLR 2018), any number of exits.

The network keeps a pyramid of S feature maps (scales), finest first. Every layer adds
densely connected features at each scale: the finest kept scale from a 3×3 convolution
of itself, every coarser scale from a strided convolution of the next-finer scale
concatenated with a convolution of itself. Scales are pruned from the fine end as depth
grows (the reference's ``prune = "max"``), each pruning followed by a 1×1 transition that
compresses the width. After every block an exit head reads the coarsest scale. The
forward returns a list of E = ``num_blocks`` logits (not probabilities), earliest first.

This is an independent implementation of the architecture of MSDNet (Huang et al., ICLR
2018); the factories reproduce the parameter counts of the public reference
implementation exactly and its per-exit costs within 0.1 %.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from neokd_losses._validation import check_image_input, check_positive_int, check_real
from neokd_losses.models.staged import StageState, run_stages

__all__ = [
    "MSDNet",
    "msdnet_cifar10",
    "msdnet_cifar100",
    "msdnet_imagenet",
    "msdnet_tinyimagenet",
]

Stem = Literal["cifar", "imagenet"]
StepMode = Literal["even", "lin_grow"]

_DEFAULT_IMAGE_SIZE = {"cifar": 32, "imagenet": 224}


def _conv_basic(c_in: int, c_out: int, kernel: int, stride: int, padding: int) -> nn.Sequential:
    """ConvBasic: conv (no bias) → BN → ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def _conv_bn(c_in: int, c_out: int, down: bool, bottleneck: bool, bn_width: int) -> nn.Sequential:
    """ConvBN: [1×1 conv c_in→m, BN, ReLU] → 3×3 conv m→c_out (stride 2 if down) → BN → ReLU."""
    layers: list[nn.Module] = []
    inner = c_in
    if bottleneck:
        inner = min(c_in, bn_width * c_out)
        layers += [
            nn.Conv2d(c_in, inner, 1, bias=False),
            nn.BatchNorm2d(inner),
            nn.ReLU(inplace=True),
        ]
    layers += [
        nn.Conv2d(inner, c_out, 3, stride=2 if down else 1, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]
    return nn.Sequential(*layers)


def _halve(size: int) -> int:
    """Output size of a stride-2 convolution or pooling with 'same' padding: ⌈size / 2⌉."""
    return (size + 1) // 2


class _Stem(nn.Module):
    """The first layer: one feature map per scale, each from the previous one."""

    def __init__(self, in_channels: int, width: int, gr_factor: Sequence[int], stem: Stem) -> None:
        super().__init__()
        first: nn.Module
        if stem == "cifar":
            first = _conv_basic(in_channels, width * gr_factor[0], 3, 1, 1)
        else:
            first = nn.Sequential(
                nn.Conv2d(in_channels, width * gr_factor[0], 7, stride=2, padding=3),
                nn.BatchNorm2d(width * gr_factor[0]),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        scales = [first]
        for s in range(1, len(gr_factor)):
            scales.append(_conv_basic(width * gr_factor[s - 1], width * gr_factor[s], 3, 2, 1))
        self.scales = nn.ModuleList(scales)

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for scale in self.scales:
            x = scale(x)
            features.append(x)
        return features


class _ScaleUnit(nn.Module):
    """One output scale of a layer: concat(same, down(finer), normal(same)); no down at the top."""

    def __init__(self, down: nn.Module | None, normal: nn.Module) -> None:
        super().__init__()
        self.down = down
        self.normal = normal

    def forward(self, same: Tensor, finer: Tensor) -> Tensor:
        if self.down is None:
            return torch.cat([same, self.normal(same)], dim=1)
        return torch.cat([same, self.down(finer), self.normal(same)], dim=1)


class _Layer(nn.Module):
    """An MSDNet layer: ``in_scales`` feature maps in, ``out_scales`` out (one fewer if pruned)."""

    def __init__(
        self,
        width: int,
        growth_rate: int,
        gr_factor: Sequence[int],
        bn_factor: Sequence[int],
        in_scales: int,
        out_scales: int,
        bottleneck: bool,
    ) -> None:
        super().__init__()
        num_scales = len(gr_factor)
        self.discard = in_scales - out_scales
        offset = num_scales - out_scales
        units = []
        for a in range(offset, num_scales):
            new = growth_rate * gr_factor[a]
            if a == offset and self.discard == 0:
                normal = _conv_bn(width * gr_factor[a], new, False, bottleneck, bn_factor[a])
                units.append(_ScaleUnit(None, normal))
            else:
                down = _conv_bn(
                    width * gr_factor[a - 1], new // 2, True, bottleneck, bn_factor[a - 1]
                )
                normal = _conv_bn(width * gr_factor[a], new // 2, False, bottleneck, bn_factor[a])
                units.append(_ScaleUnit(down, normal))
        self.units = nn.ModuleList(units)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        out = []
        for s, unit in enumerate(self.units):
            same = s + self.discard
            # The top unit of an unpruned layer has no finer input; it ignores `finer`.
            out.append(unit(features[same], features[max(same - 1, 0)]))
        return out


class _Transition(nn.Module):
    """1×1 ConvBasic per kept scale that compresses the base width (after a pruning layer)."""

    def __init__(self, width: int, new_width: int, gr_factor: Sequence[int], offset: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            _conv_basic(width * gr_factor[a], new_width * gr_factor[a], 1, 1, 0)
            for a in range(offset, len(gr_factor))
        )

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        return [conv(x) for conv, x in zip(self.convs, features, strict=True)]


class _Head(nn.Module):
    """Exit head: two stride-2 ConvBasic, 2×2 average pooling, linear."""

    def __init__(self, in_channels: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_basic(in_channels, hidden, 3, 2, 1),
            _conv_basic(hidden, hidden, 3, 2, 1),
            nn.AvgPool2d(2),
        )
        self.linear = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.linear(self.features(x).flatten(1))
        return logits


def _check_factors(values: Sequence[int], name: str) -> tuple[int, ...]:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
        raise TypeError(
            f"`{name}` must be a non-empty sequence of ints (one per scale), got {values!r}."
        )
    return tuple(check_positive_int(v, f"{name}[{i}]") for i, v in enumerate(values))


class MSDNet(nn.Module):
    """Multi-Scale Dense Network (Huang et al., "Multi-Scale Dense Networks for Resource
    Efficient Image Classification", ICLR 2018), the multi-exit backbone of NEO-KD.

    Block b has ``base`` layers if b = 1, else ``step`` layers (``step_mode="even"``) or
    ``step·(b−1) + 1`` layers (``"lin_grow"``). With N layers in all, S = len(gr_factor)
    scales and interval = ⌈N/S⌉, layer n reads S − ⌊max(0, n−2)/interval⌋ scales and
    writes S − ⌊(n−1)/interval⌋; each written scale s gains ``growth_rate·gr_factor[s]``
    channels. A layer that drops a scale is followed by a 1×1 transition to
    ⌊reduction·c⌋ base channels. Convolutions have no bias; every ConvBN's 1×1
    bottleneck is at most ``bn_factor[s]`` times its output width.

    Exit heads, on the coarsest scale of width w: ``stem="cifar"`` uses
    ConvBasic(w, 128, 3, 2) → ConvBasic(128, 128, 3, 2) → avgpool 2 → linear 128→K;
    ``stem="imagenet"`` uses ConvBasic(w, w, 3, 2) twice → avgpool 2 → linear w→K. The
    CIFAR stem is ConvBasic(C, nChannels·gr[0], 3, 1, 1); the ImageNet stem is conv 7×7
    stride 2 (with bias) → BN → ReLU → maxpool 3 stride 2.

    Staged (see :class:`~neokd_losses.models.staged.StagedModel`): stage b runs block b
    (stage 0 also the stem) and exit head b; the state between stages is the list of
    the kept scales' feature maps (B, C_s, H_s, W_s), finest first.

    Initialization: conv weights N(0, 2/(k·k·C_out)), BN weight 1 and bias 0, linear
    bias 0 (PyTorch's default for linear weights and the ImageNet stem's conv bias).

    The factories build the paper's settings; their parameter counts and costs (measured
    with :func:`~neokd_losses.evaluation.flops.exit_costs`) are in their docstrings.

    Args:
        num_classes: K, the classes of every exit.
        num_blocks: E, the number of blocks, one exit after each.
        base: layers in the first block.
        step: layer step of the later blocks (see ``step_mode``).
        num_channels: base width nChannels of the stem.
        growth_rate: g, channels added per layer at the finest scale.
        gr_factor: width multiplier per scale, finest first; its length is S.
        bn_factor: bottleneck width factor per scale (same length as ``gr_factor``).
        stem: ``"cifar"`` (stride-1 3×3 stem, 128-wide heads) or ``"imagenet"``
            (stride-4 7×7 stem, full-width heads).
        step_mode: ``"even"`` or ``"lin_grow"`` block lengths.
        reduction: width compression of the transitions, in [0, 1]; 0 disables them.
        bottleneck: use the 1×1 bottleneck in every ConvBN.
        in_channels: C, channels of the input images.
        image_size: (H, W) or one int; default 32 for ``stem="cifar"``, 224 for
            ``"imagenet"``. The heads need the coarsest scale to pool down to 1×1.

    Raises:
        TypeError: if an integer argument, a factor list, ``reduction`` or ``image_size``
            has the wrong type.
        ValueError: if a value is out of range, ``gr_factor`` and ``bn_factor`` differ
            in length, ``growth_rate·gr_factor[s]`` is odd for a scale s ≥ 1 (its new
            channels are split in halves), ``image_size`` does not reach 1×1 in the
            heads, or ``reduction`` leaves a transition without channels; at call time,
            if the input is not (B, C, H, W).

    Shape:
        - input: (B, C, H, W) with (H, W) = ``image_size``, values in [0, 1].
        - output: a list of E = ``num_blocks`` tensors (B, K).

    Example:
        >>> import torch
        >>> model = MSDNet(num_classes=10, num_blocks=2, base=2, step=1, num_channels=8)
        >>> [tuple(z.shape) for z in model(torch.rand(2, 3, 32, 32))]
        [(2, 10), (2, 10)]
    """

    def __init__(
        self,
        num_classes: int,
        num_blocks: int,
        base: int,
        step: int,
        num_channels: int,
        growth_rate: int = 6,
        gr_factor: Sequence[int] = (1, 2, 4),
        bn_factor: Sequence[int] = (1, 2, 4),
        stem: Stem = "cifar",
        step_mode: StepMode = "even",
        reduction: float = 0.5,
        bottleneck: bool = True,
        in_channels: int = 3,
        image_size: int | tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = check_positive_int(num_classes, "num_classes")
        self.num_blocks = check_positive_int(num_blocks, "num_blocks")
        self.num_exits = self.num_blocks
        check_positive_int(base, "base")
        check_positive_int(step, "step")
        check_positive_int(num_channels, "num_channels")
        check_positive_int(growth_rate, "growth_rate")
        self.in_channels = check_positive_int(in_channels, "in_channels")
        gr = _check_factors(gr_factor, "gr_factor")
        bn = _check_factors(bn_factor, "bn_factor")
        if len(gr) != len(bn):
            raise ValueError(
                f"`gr_factor` and `bn_factor` need one entry per scale each, got "
                f"{len(gr)} and {len(bn)} entries."
            )
        if stem not in get_args(Stem):
            raise ValueError(f"`stem` must be 'cifar' or 'imagenet', got {stem!r}.")
        if step_mode not in get_args(StepMode):
            raise ValueError(f"`step_mode` must be 'even' or 'lin_grow', got {step_mode!r}.")
        if not 0.0 <= check_real(reduction, "reduction") <= 1.0:
            raise ValueError(
                f"`reduction` must lie in [0, 1] (0 disables transitions), got {reduction!r}."
            )
        for s in range(1, len(gr)):
            if growth_rate * gr[s] % 2:
                raise ValueError(
                    f"`growth_rate * gr_factor[{s}]` must be even (the new channels of scale "
                    f"{s} come half from each of two convolutions), got {growth_rate} * {gr[s]}."
                )
        self.image_size = self._check_image_size(image_size, stem, len(gr))

        self.steps = [base] + [
            step if step_mode == "even" else step * b + 1 for b in range(1, num_blocks)
        ]
        num_scales, total = len(gr), sum(self.steps)
        interval = math.ceil(total / num_scales)
        self.stem = _Stem(in_channels, num_channels, gr, stem)
        width, n = num_channels, 0
        blocks, heads = [], []
        for length in self.steps:
            layers: list[nn.Module] = []
            for _ in range(length):
                n += 1
                in_scales = num_scales - max(0, n - 2) // interval
                out_scales = num_scales - (n - 1) // interval
                layers.append(_Layer(width, growth_rate, gr, bn, in_scales, out_scales, bottleneck))
                width += growth_rate
                if in_scales > out_scales and reduction > 0:
                    new_width = math.floor(reduction * width)
                    if new_width < 1:
                        raise ValueError(
                            f"`reduction`={reduction!r} leaves no channel in the transition "
                            f"after layer {n}: floor({reduction!r} * {width}) = 0 base "
                            "channels. Raise `reduction` (or `num_channels` / `growth_rate`), "
                            "or pass 0 to disable transitions."
                        )
                    layers.append(_Transition(width, new_width, gr, num_scales - out_scales))
                    width = new_width
            blocks.append(nn.Sequential(*layers))
            coarsest = width * gr[-1]
            hidden = 128 if stem == "cifar" else coarsest
            heads.append(_Head(coarsest, hidden, num_classes))
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(heads)
        self.reset_parameters()

    @staticmethod
    def _check_image_size(
        image_size: int | tuple[int, int] | None, stem: Stem, num_scales: int
    ) -> tuple[int, int]:
        if image_size is None:
            image_size = _DEFAULT_IMAGE_SIZE[stem]
        if isinstance(image_size, int):
            size: tuple[object, ...] = (image_size, image_size)
        elif isinstance(image_size, Sequence) and not isinstance(image_size, str | bytes):
            size = tuple(image_size)
        else:
            raise TypeError(
                f"`image_size` must be an int or a pair of ints (H, W), got "
                f"{type(image_size).__name__} {image_size!r}."
            )
        if len(size) != 2:
            raise ValueError(f"`image_size` must be an int or (H, W), got {image_size!r}.")
        height, width = (check_positive_int(v, "image_size") for v in size)
        for extent in (height, width):
            coarsest = extent if stem == "cifar" else _halve(_halve(extent))
            for _ in range(num_scales - 1):
                coarsest = _halve(coarsest)
            pooled = _halve(_halve(coarsest)) // 2
            if pooled != 1:
                raise ValueError(
                    f"`image_size` {image_size!r} gives a {coarsest}-pixel coarsest scale with "
                    f"stem={stem!r} and {num_scales} scales, which the exit heads (two stride-2 "
                    f"convolutions, 2×2 pooling) reduce to {pooled} instead of 1 pixel; the "
                    f"coarsest scale must be 5 to 12 pixels. Change `image_size`, `stem` or "
                    f"the number of scales."
                )
        return (height, width)

    def reset_parameters(self) -> None:
        """Reference initialization: conv N(0, 2/(k·k·C_out)), BN (1, 0), linear bias 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward_block(self, index: int, state: StageState) -> list[Tensor]:
        """Block ``index`` (after the stem for 0): the feature maps of every scale it keeps.

        Block 0 takes the images (B, C, H, W) and checks them; later blocks take the list
        of feature maps the previous block returned.
        """
        if not 0 <= index < self.num_blocks:
            raise ValueError(f"MSDNet has stages 0..{self.num_blocks - 1}, got index {index!r}.")
        if index == 0:
            check_image_input(state, self.in_channels, self.image_size, type(self).__name__)
            state = self.stem(state)
        features: list[Tensor] = self.blocks[index](state)
        return features

    def forward_exit(self, index: int, features: Sequence[Tensor]) -> Tensor:
        """Exit ``index``'s logits from block ``index``'s feature maps (its coarsest scale)."""
        if not 0 <= index < self.num_blocks:
            raise ValueError(f"MSDNet has stages 0..{self.num_blocks - 1}, got index {index!r}.")
        logits: Tensor = self.heads[index](features[-1])
        return logits

    def forward_stage(self, index: int, state: StageState) -> tuple[StageState, Tensor]:
        """Stage ``index``: block ``index`` (after the stem for 0) and its exit head.

        Stage 0 takes the images (B, C, H, W) and checks them; later stages take the
        list of feature maps the previous stage returned.
        """
        features = self.forward_block(index, state)
        return features, self.forward_exit(index, features)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Logits of the E exits, earliest first; see the class docstring for shapes."""
        return run_stages(self, x)


def msdnet_cifar10(num_classes: int = 10, in_channels: int = 3) -> MSDNet:
    """MSDNet with 3 exits for CIFAR-10 (32×32): the NEO-KD CIFAR-10 setting.

    Configuration: nBlocks 3, base 4, step 2 (even), nChannels 16, growth rate 6,
    grFactor = bnFactor = (1, 2, 4), CIFAR stem and heads, reduction 0.5, bottleneck.
    The NEO-KD paper does not print it; this is the 3-block analogue of its 7-exit
    CIFAR-100 network.

    Parameters: 991,222 (K = 10). Cost per exit for one 3×32×32 input, measured with
    :func:`~neokd_losses.evaluation.flops.exit_costs`, in millions of multiply-adds:
    14.755, 21.767, 27.670.

    Args:
        num_classes: K (10 for CIFAR-10).
        in_channels: channels of the input images.

    Returns:
        The MSDNet; its forward returns a list of 3 tensors (B, K).

    Example:
        >>> sum(p.numel() for p in msdnet_cifar10().parameters())
        991222
    """
    return MSDNet(num_classes, 3, 4, 2, 16, in_channels=in_channels)


def msdnet_cifar100(num_classes: int = 100, in_channels: int = 3) -> MSDNet:
    """MSDNet with 7 exits for CIFAR-100 (32×32): the NEO-KD CIFAR-100 setting.

    Configuration: nBlocks 7, base 4, step 2 (even), nChannels 16, growth rate 6,
    grFactor = bnFactor = (1, 2, 4), CIFAR stem and heads, reduction 0.5, bottleneck.

    Parameters: 3,067,960 (K = 100). Cost per exit for one 3×32×32 input, measured with
    :func:`~neokd_losses.evaluation.flops.exit_costs`, in millions of multiply-adds:
    15.140, 25.506, 37.096, 46.331, 57.336, 66.961, 75.938.

    Args:
        num_classes: K (100 for CIFAR-100).
        in_channels: channels of the input images.

    Returns:
        The MSDNet; its forward returns a list of 7 tensors (B, K).

    Example:
        >>> sum(p.numel() for p in msdnet_cifar100().parameters())
        3067960
    """
    return MSDNet(num_classes, 7, 4, 2, 16, in_channels=in_channels)


def msdnet_imagenet(num_classes: int = 1000, in_channels: int = 3) -> MSDNet:
    """MSDNet with 5 exits for ImageNet (224×224): the NEO-KD ImageNet setting.

    Configuration: nBlocks 5, base 4, step 4 (even), nChannels 32, growth rate 16,
    grFactor = bnFactor = (1, 2, 4, 4), ImageNet stem and heads, reduction 0.5,
    bottleneck.

    Parameters: 23,958,440 (K = 1000). Cost per exit for one 3×224×224 input, measured
    with :func:`~neokd_losses.evaluation.flops.exit_costs`, in millions of
    multiply-adds: 339.903, 685.457, 1008.156, 1254.473, 1360.530.

    Args:
        num_classes: K (1000 for ImageNet).
        in_channels: channels of the input images.

    Returns:
        The MSDNet; its forward returns a list of 5 tensors (B, K).

    Example:
        >>> sum(p.numel() for p in msdnet_imagenet().parameters())
        23958440
    """
    return MSDNet(
        num_classes,
        5,
        4,
        4,
        32,
        growth_rate=16,
        gr_factor=(1, 2, 4, 4),
        bn_factor=(1, 2, 4, 4),
        stem="imagenet",
        in_channels=in_channels,
    )


def msdnet_tinyimagenet(num_classes: int = 200, in_channels: int = 3) -> MSDNet:
    """MSDNet with 5 exits for Tiny-ImageNet (64×64), for the NEO-KD Tiny-ImageNet setting.

    The NEO-KD paper trains a 5-exit MSDNet on Tiny-ImageNet but does not print its
    configuration. Chosen here: the CIFAR network (stride-1 3×3 stem, nChannels 16,
    growth rate 6, base 4, step 2, 128-wide heads) with a fourth scale,
    grFactor = bnFactor = (1, 2, 4, 4) as in the ImageNet setting, and 5 blocks. Why:
    64×64 images are small enough for the CIFAR stem (the ImageNet stem would shrink
    them to 16×16 at once), and the fourth scale brings the coarsest map to 8×8,
    exactly what the CIFAR exit heads are built for (32×32 CIFAR images reach 8×8 with
    three scales); 5 blocks give the paper's 5 exits with the CIFAR block spacing.

    Parameters: 1,990,856 (K = 200). Cost per exit for one 3×64×64 input, measured with
    :func:`~neokd_losses.evaluation.flops.exit_costs`, in millions of multiply-adds:
    64.892, 88.290, 109.853, 125.084, 131.172.

    Args:
        num_classes: K (200 for Tiny-ImageNet).
        in_channels: channels of the input images.

    Returns:
        The MSDNet; its forward returns a list of 5 tensors (B, K).

    Example:
        >>> sum(p.numel() for p in msdnet_tinyimagenet().parameters())
        1990856
    """
    return MSDNet(
        num_classes,
        5,
        4,
        2,
        16,
        gr_factor=(1, 2, 4, 4),
        bn_factor=(1, 2, 4, 4),
        image_size=64,
        in_channels=in_channels,
    )
