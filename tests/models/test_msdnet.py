"""MSDNet: parameter counts and costs of docs/paper.md#msdnet, structure, checks, PGD."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from neokd_losses.evaluation.flops import exit_costs
from neokd_losses.models import (
    MSDNet,
    msdnet_cifar10,
    msdnet_cifar100,
    msdnet_imagenet,
    msdnet_tinyimagenet,
)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _mini(**kwargs: object) -> MSDNet:
    """2 scales, 2 blocks of 1 layer (the second prunes a scale), 16×16 inputs."""
    config: dict[str, object] = {
        "num_classes": 10,
        "num_blocks": 2,
        "base": 1,
        "step": 1,
        "num_channels": 4,
        "growth_rate": 2,
        "gr_factor": (1, 2),
        "bn_factor": (1, 2),
        "image_size": 16,
    }
    config.update(kwargs)
    return MSDNet(**config)  # type: ignore[arg-type]


# Figures measured on the public reference implementation (docs/paper.md#msdnet).
_TABLE = [
    pytest.param(msdnet_cifar10, 32, 991_222, [14.76, 21.77, 27.67], id="cifar10"),
    pytest.param(
        msdnet_cifar100,
        32,
        3_067_960,
        [15.14, 25.51, 37.10, 46.33, 57.34, 66.96, 75.94],
        id="cifar100",
    ),
    pytest.param(
        msdnet_imagenet,
        224,
        23_958_440,
        [339.90, 685.46, 1008.16, 1254.47, 1360.53],
        id="imagenet",
    ),
]


@pytest.mark.parametrize(("factory", "size", "params", "costs"), _TABLE)
def test_parameter_count_is_exact(factory, size, params, costs) -> None:
    assert _n_params(factory()) == params


@pytest.mark.parametrize(("factory", "size", "params", "costs"), _TABLE)
def test_cost_per_exit_matches_reference_table(factory, size, params, costs) -> None:
    measured = exit_costs(factory(), torch.zeros(1, 3, size, size))
    assert len(measured) == len(costs)
    # The issue asks for 3 %; the table is rounded to 0.01 M, so 0.1 % is already loose.
    for got, expected in zip(measured, costs, strict=True):
        assert got / 1e6 == pytest.approx(expected, rel=1e-3)


def test_parameter_count_by_hand_for_a_pruning_network() -> None:
    stem = (3 * 4 * 9 + 2 * 4) + (4 * 8 * 9 + 2 * 8)  # ConvBasic 3→4; ConvBasic 4→8 stride 2
    # layer 1 (width 4, both scales): normal 4→2 via 1×1 to min(4, 1·2)=2;
    # scale 2: down 4→2 (bottleneck 2), normal 8→2 (bottleneck min(8, 2·2)=4)
    layer1 = (4 * 2 + 4 + 2 * 2 * 9 + 4) + (4 * 2 + 4 + 2 * 2 * 9 + 4) + (8 * 4 + 8 + 4 * 2 * 9 + 4)
    head = lambda w: (w * 128 * 9 + 256) + (128 * 128 * 9 + 256) + (128 * 10 + 10)  # noqa: E731
    # layer 2 (width 6) drops scale 1: down 6→2 (bottleneck 2), normal 12→2 (bottleneck 4)
    layer2 = (6 * 2 + 4 + 2 * 2 * 9 + 4) + (12 * 4 + 8 + 4 * 2 * 9 + 4)
    transition = 16 * 8 + 2 * 8  # width 8 → ⌊0.5·8⌋ = 4, at scale 2: 16 → 8 channels
    expected = stem + layer1 + head(12) + layer2 + transition + head(8)
    assert _n_params(_mini()) == expected == 322_528


def test_scales_are_pruned_as_reference_md_says() -> None:
    model = msdnet_cifar100()
    total, num_scales = sum(model.steps), 3
    interval = math.ceil(total / num_scales)
    features = model.stem(torch.zeros(1, 3, 32, 32))
    n = 0
    for block, length in zip(model.blocks, model.steps, strict=True):
        features = block(features)
        n += length
        assert len(features) == num_scales - (n - 1) // interval
        assert features[-1].shape[-1] == 8  # the coarsest scale, read by every head
    assert model.steps == [4, 2, 2, 2, 2, 2, 2]


@pytest.mark.parametrize(
    ("factory", "size", "num_exits", "num_classes"),
    [
        (msdnet_cifar10, 32, 3, 10),
        (msdnet_cifar100, 32, 7, 100),
        (msdnet_tinyimagenet, 64, 5, 200),
    ],
)
def test_factories_output_one_logits_tensor_per_exit(factory, size, num_exits, num_classes) -> None:
    model = factory()
    out = model(torch.rand(2, 3, size, size))
    assert len(out) == num_exits == model.num_blocks
    assert all(z.shape == (2, num_classes) for z in out)
    out = factory(num_classes=7).eval()(torch.rand(1, 3, size, size))
    assert all(z.shape == (1, 7) for z in out)


def test_tinyimagenet_configuration_as_documented() -> None:
    model = msdnet_tinyimagenet()
    assert _n_params(model) == 1_990_856
    assert model.image_size == (64, 64) and len(model.stem.scales) == 4
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\), got \(1, 3, 32, 32\)"):
        model(torch.rand(1, 3, 32, 32))


def test_lin_grow_block_lengths() -> None:
    model = MSDNet(10, 4, 2, 1, 8, step_mode="lin_grow")
    assert model.steps == [2, 2, 3, 4]  # [base] + [step·b + 1 for b = 1..3]
    assert len(model(torch.rand(1, 3, 32, 32))) == 4


def test_initialization_follows_reference_md() -> None:
    model = msdnet_cifar10()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        elif isinstance(m, nn.Linear):
            assert torch.all(m.bias == 0)
    # conv weights N(0, 2/(k·k·C_out)): checked on every convolution with enough weights
    # for a 5 % bound (> 6 sigma). Fan-out, not fan-in: the set includes 1×1 and 3×3
    # convolutions whose input and output widths differ by 2× or more, where a fan-in or
    # PyTorch's default (uniform) init gives a different std.
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is None for c in convs)
    big = [c for c in convs if c.weight.numel() >= 4000]
    assert any(
        max(c.in_channels, c.out_channels) >= 2 * min(c.in_channels, c.out_channels) for c in big
    )
    for conv in big:
        k = conv.kernel_size[0] * conv.kernel_size[1]
        expected = math.sqrt(2 / (k * conv.out_channels))
        assert conv.weight.std().item() == pytest.approx(expected, rel=0.05), conv
        assert abs(conv.weight.mean().item()) < 0.1 * expected


def test_imagenet_stem_has_a_biased_7x7_stride_2_convolution() -> None:
    model = MSDNet(
        5, 1, 1, 1, 8, gr_factor=(1, 2), bn_factor=(1, 2), stem="imagenet", image_size=64
    )
    conv = model.stem.scales[0][0]
    assert conv.kernel_size == (7, 7) and conv.stride == (2, 2) and conv.bias is not None
    assert isinstance(model.stem.scales[0][3], nn.MaxPool2d)
    assert [tuple(z.shape) for z in model(torch.rand(2, 3, 64, 64))] == [(2, 5)]


def test_initialization_is_deterministic_under_a_seed() -> None:
    torch.manual_seed(5)
    a = _mini().state_dict()
    torch.manual_seed(5)
    b = _mini().state_dict()
    torch.manual_seed(6)
    c = _mini().state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_state_dict_round_trip_reproduces_outputs() -> None:
    source = _mini()
    source.train()
    source(torch.rand(4, 3, 16, 16))  # move the BN running statistics off their defaults
    target = _mini()
    target.load_state_dict(source.state_dict())
    x = torch.rand(2, 3, 16, 16)
    for a, b in zip(source.eval()(x), target.eval()(x), strict=True):
        assert torch.equal(a, b)


def test_forward_backward_on_cpu_reaches_every_parameter() -> None:
    model = msdnet_cifar10()
    x, y = torch.rand(2, 3, 32, 32), torch.randint(0, 10, (2,))
    loss = sum(nn.functional.cross_entropy(z, y) for z in model(x))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # the first exit's loss alone reaches the stem but not the last head
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x)[0], y).backward()
    assert model.stem.scales[0][0].weight.grad.abs().sum() > 0
    assert model.heads[-1].linear.weight.grad is None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_blocks": 0}, ValueError, r"`num_blocks` must be >= 1, got 0"),
        ({"base": 2.0}, TypeError, r"`base` must be an int, got float"),
        ({"gr_factor": (1, 2, 4)}, ValueError, r"one entry per scale each, got 3 and 2"),
        ({"gr_factor": "12"}, TypeError, r"`gr_factor` must be a non-empty sequence of ints"),
        (
            {"growth_rate": 3, "gr_factor": (1, 3), "bn_factor": (1, 3)},
            ValueError,
            r"`growth_rate \* gr_factor\[1\]` must be even .* got 3 \* 3",
        ),
        ({"stem": "mnist"}, ValueError, r"`stem` must be 'cifar' or 'imagenet', got 'mnist'"),
        ({"step_mode": "odd"}, ValueError, r"`step_mode` must be 'even' or 'lin_grow'"),
        ({"reduction": 1.5}, ValueError, r"`reduction` must lie in \[0, 1\]"),
        ({"image_size": 32}, ValueError, r"16-pixel coarsest scale .* 5 to 12 pixels"),
        ({"image_size": (16, 16, 3)}, ValueError, r"`image_size` must be an int or \(H, W\)"),
        ({"image_size": 16.0}, TypeError, r"`image_size` must be an int or a pair .* float 16.0"),
        ({"image_size": "16"}, TypeError, r"`image_size` must be an int or a pair .* str '16'"),
        ({"reduction": "0.5"}, TypeError, r"`reduction` must be a real number, got str"),
        ({"reduction": 0.05}, ValueError, r"`reduction`=0.05 leaves no channel in the transition"),
    ],
)
def test_bad_constructor_arguments_raise(
    kwargs: dict[str, object], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        _mini(**kwargs)


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((2, 1, 16, 16), r"MSDNet expects input of shape \(B, 3, 16, 16\), got \(2, 1, 16, 16\)"),
        ((2, 3, 32, 32), r"\(B, 3, 16, 16\), got \(2, 3, 32, 32\)"),
        ((3, 16, 16), r"unsqueeze"),
    ],
)
def test_wrong_input_raises_value_error(shape: tuple[int, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _mini()(torch.rand(*shape))


def test_reduction_zero_disables_transitions() -> None:
    model = _mini(reduction=0.0)
    assert len(model.blocks[1]) == 1  # the pruning layer alone, no transition after it
    assert [z.shape for z in model(torch.rand(2, 3, 16, 16))] == [(2, 10), (2, 10)]


def test_without_bottleneck_every_convbn_is_a_single_3x3_convolution() -> None:
    model = _mini(bottleneck=False)
    layer = model.blocks[0][0]
    assert len(layer.units[0].normal) == 3  # conv 3×3, BN, ReLU
    assert layer.units[0].normal[0].kernel_size == (3, 3)
    assert [z.shape for z in model(torch.rand(2, 3, 16, 16))] == [(2, 10), (2, 10)]


def test_channels_last_gives_the_same_logits() -> None:
    model, x = _mini().eval(), torch.rand(2, 3, 16, 16)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    got = model(x.to(memory_format=torch.channels_last))
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(a, b)


def test_autocast_runs_in_bfloat16_close_to_float32() -> None:
    model, x = _mini().eval(), torch.rand(2, 3, 16, 16)
    expected = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(x)
    assert all(z.dtype == torch.bfloat16 for z in got)
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(b.float(), a, atol=0.1, rtol=0.05)


def test_torch_compile_traces_in_one_graph() -> None:
    torch._dynamo.reset()
    model, x = _mini().eval(), torch.rand(2, 3, 16, 16)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    for a, b in zip(model(x), compiled(x), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_torch_compile_aot_forward_backward() -> None:
    torch._dynamo.reset()
    model, x = _mini(), torch.rand(2, 3, 16, 16)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    sum(z.sum() for z in compiled(x)).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.cuda
def test_runs_on_cuda_with_amp_and_channels_last() -> None:
    model = msdnet_cifar100().cuda().to(memory_format=torch.channels_last)
    x = torch.rand(4, 3, 32, 32, device="cuda").to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.float16):
        out = model(x)
    assert len(out) == 7 and all(z.shape == (4, 100) and z.is_cuda for z in out)
    sum(z.float().sum() for z in out).backward()


def test_multi_exit_pgd_attacks_it() -> None:
    from neokd_losses.attacks.pgd import MultiExitPGD

    model = _mini()
    x, y = torch.rand(2, 3, 16, 16), torch.randint(0, 10, (2,))
    was_training = model.training
    adv = MultiExitPGD(model, eps=8 / 255, alpha=2 / 255, steps=2)(x, y)
    assert adv.shape == x.shape and not torch.equal(adv, x)
    assert (adv - x).abs().max() <= 8 / 255 + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert model.training == was_training
    assert all(p.grad is None for p in model.parameters())
