"""SmallCNN: exact size, shapes, initialization, cost by hand, input checks, compile, PGD."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from neokd_losses.evaluation.flops import exit_costs
from neokd_losses.models import SmallCNN


def _conv(c_in: int, c_out: int, k: int = 3) -> int:
    return c_in * c_out * k * k + c_out


def _linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def _params_by_hand(num_classes: int, in_channels: int) -> int:
    """docs/paper.md#smallcnn-3-exits, layer by layer."""
    trunk = (
        _conv(in_channels, 32)
        + _conv(32, 32)
        + _conv(32, 64)
        + _conv(64, 64)
        + _linear(1024, 200)
        + _linear(200, 200)
        + _linear(200, num_classes)
    )
    exit1 = _conv(32, 16) + _linear(576, 200) + _linear(200, 200) + _linear(200, num_classes)
    exit2 = _linear(1600, 200) + _linear(200, 200) + _linear(200, num_classes)
    return trunk + exit1 + exit2


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_default_parameter_count_is_the_papers() -> None:
    assert _n_params(SmallCNN()) == 836_846 == _params_by_hand(10, 1)


@pytest.mark.parametrize(("num_classes", "in_channels"), [(10, 1), (7, 3), (2, 2)])
def test_parameter_count_matches_hand_count(num_classes: int, in_channels: int) -> None:
    model = SmallCNN(num_classes=num_classes, in_channels=in_channels)
    assert _n_params(model) == _params_by_hand(num_classes, in_channels)


@pytest.mark.parametrize(("batch", "num_classes", "in_channels"), [(1, 10, 1), (3, 4, 3)])
def test_output_is_three_exits_of_shape_batch_by_classes(
    batch: int, num_classes: int, in_channels: int
) -> None:
    out = SmallCNN(num_classes, in_channels)(torch.rand(batch, in_channels, 28, 28))
    assert isinstance(out, list) and len(out) == 3
    assert all(z.shape == (batch, num_classes) for z in out)


def test_cost_per_exit_matches_count_by_hand() -> None:
    conv = lambda c_in, c_out, side: side * side * c_out * c_in * 9  # noqa: E731
    # exit 1: conv1 + ReLU, head conv s2 (12×12), maxpool 2 (6×6), three linear layers
    exit1 = conv(1, 32, 26) + 26 * 26 * 32
    exit1 += conv(32, 16, 12) + 16 * 6 * 6 * 4 + (576 * 200 + 200) + (200 * 200 + 200) + 2010
    # exit 2: conv2 + ReLU, maxpool, conv3 + ReLU; head maxpool (5×5) and linear layers
    trunk2 = conv(32, 32, 24) + 24 * 24 * 32 + 32 * 12 * 12 * 4 + conv(32, 64, 10) + 6400
    exit2 = exit1 + trunk2 + 64 * 5 * 5 * 4 + (1600 * 200 + 200) + (200 * 200 + 200) + 2010
    # exit 3: conv4 + ReLU, maxpool (4×4), fc + ReLU, fc + ReLU, fc
    trunk3 = conv(64, 64, 8) + 64 * 8 * 8 + 64 * 4 * 4 * 4
    exit3 = exit2 + trunk3 + (1024 * 200 + 200) + 200 + (200 * 200 + 200) + 200 + 2010
    costs = exit_costs(SmallCNN(), torch.rand(2, 1, 28, 28))
    assert costs == [float(exit1), float(exit2), float(exit3)]


def _exits_by_hand(model: SmallCNN, x: torch.Tensor) -> list[torch.Tensor]:
    """docs/paper.md#smallcnn-3-exits written out with torch.nn.functional (eval: no dropout)."""
    F = nn.functional
    t, e1, e2 = model.block3, model.exit1, model.exit2
    h1 = F.relu(F.conv2d(x, model.block1[0].weight, model.block1[0].bias))  # exit 1 reads this
    h = F.relu(F.conv2d(h1, model.block2[0].weight, model.block2[0].bias))
    h2 = F.relu(F.conv2d(F.max_pool2d(h, 2), model.block2[3].weight, model.block2[3].bias))
    h = F.max_pool2d(F.relu(F.conv2d(h2, t[0].weight, t[0].bias)), 2).flatten(1)
    h = F.relu(F.linear(h, t[4].weight, t[4].bias))
    h = F.relu(F.linear(h, t[7].weight, t[7].bias))
    z3 = F.linear(h, t[9].weight, t[9].bias)
    # exit heads: no nonlinearity between the linear layers
    g = F.max_pool2d(F.conv2d(h1, e1[0].weight, e1[0].bias, stride=2), 2).flatten(1)
    lin1 = e1[2]
    z1 = F.linear(
        F.linear(F.linear(g, lin1[1].weight, lin1[1].bias), lin1[3].weight, lin1[3].bias),
        lin1[4].weight,
        lin1[4].bias,
    )
    g = F.max_pool2d(h2, 2).flatten(1)
    lin2 = e2[1]
    z2 = F.linear(
        F.linear(F.linear(g, lin2[1].weight, lin2[1].bias), lin2[3].weight, lin2[3].bias),
        lin2[4].weight,
        lin2[4].bias,
    )
    return [z1, z2, z3]


def test_exits_sit_where_reference_md_puts_them() -> None:
    model = SmallCNN().eval()
    nn.init.normal_(model.block3[-1].weight, std=0.1)
    nn.init.normal_(model.block3[-1].bias, std=0.1)
    for module in model.modules():  # non-zero biases, so a dropped bias would show
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.bias, std=0.1)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        for got, expected in zip(model(x), _exits_by_hand(model, x), strict=True):
            torch.testing.assert_close(got, expected)


def test_initialization_follows_triple_wins() -> None:
    model = SmallCNN()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 5
    for conv in convs:
        assert conv.bias is not None and torch.all(conv.bias == 0)
    # Kaiming normal (fan-in, gain √2): std √(2 / (C_in·9)). Checked on the convolutions
    # with enough weights for a 5 % bound (> 6 sigma); conv3 (32→64) and the exit-1 conv
    # (32→16) have fan-in ≠ fan-out, so a fan-out or a uniform init would fail.
    checked = 0
    for conv in convs:
        if conv.weight.numel() >= 4000:
            expected = math.sqrt(2 / (conv.in_channels * 9))
            assert conv.weight.std().item() == pytest.approx(expected, rel=0.05), conv
            assert abs(conv.weight.mean().item()) < 0.1 * expected
            checked += 1
    assert checked == 4
    last = model.block3[-1]
    assert torch.all(last.weight == 0) and torch.all(last.bias == 0)
    model.eval()
    z3 = model(torch.rand(2, 1, 28, 28))[2]
    assert torch.all(z3 == 0)


def test_initialization_is_deterministic_under_a_seed() -> None:
    torch.manual_seed(3)
    a = SmallCNN().state_dict()
    torch.manual_seed(3)
    b = SmallCNN().state_dict()
    torch.manual_seed(4)
    c = SmallCNN().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["block1.0.weight"], c["block1.0.weight"])


def test_state_dict_round_trip_reproduces_outputs() -> None:
    source, target = SmallCNN().eval(), SmallCNN().eval()
    nn.init.normal_(source.block3[-1].weight)  # make exit 3 non-trivial
    x = torch.rand(2, 1, 28, 28)
    target.load_state_dict(source.state_dict())
    for a, b in zip(source(x), target(x), strict=True):
        assert torch.equal(a, b)


def test_forward_backward_reaches_every_layer_on_cpu() -> None:
    model = SmallCNN()
    nn.init.normal_(model.block3[-1].weight, std=0.1)  # zero init would block exit 3's gradient
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    loss = sum(nn.functional.cross_entropy(z, y) for z in model(x))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_dropout_is_active_in_train_mode_only() -> None:
    model, x = SmallCNN(), torch.rand(2, 1, 28, 28)
    model.train()
    assert not torch.equal(model(x)[0], model(x)[0])
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])


@pytest.mark.parametrize(
    ("shape", "error", "match"),
    [
        (
            (2, 3, 28, 28),
            ValueError,
            r"expects input of shape \(B, 1, 28, 28\), got \(2, 3, 28, 28\)",
        ),
        ((2, 1, 32, 32), ValueError, r"\(B, 1, 28, 28\), got \(2, 1, 32, 32\)"),
        ((1, 28, 28), ValueError, r"unsqueeze\(0\)"),
    ],
)
def test_wrong_input_shape_raises(shape: tuple[int, ...], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        SmallCNN()(torch.rand(*shape))


def test_integer_images_raise_type_error() -> None:
    with pytest.raises(TypeError, match=r"floating-point images, got dtype torch.uint8"):
        SmallCNN()(torch.zeros(1, 1, 28, 28, dtype=torch.uint8))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_classes": 0}, ValueError, r"`num_classes` must be >= 1, got 0"),
        ({"in_channels": 1.0}, TypeError, r"`in_channels` must be an int, got float"),
        ({"dropout": 1.0}, ValueError, r"`dropout` must lie in \[0, 1\)"),
        ({"dropout": "0.5"}, TypeError, r"`dropout` must be a real number, got str '0.5'"),
        ({"dropout": None}, TypeError, r"`dropout` must be a real number, got NoneType"),
    ],
)
def test_bad_constructor_arguments_raise(
    kwargs: dict[str, object], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        SmallCNN(**kwargs)  # type: ignore[arg-type]


def test_channels_last_gives_the_same_logits() -> None:
    model, x = SmallCNN().eval(), torch.rand(2, 1, 28, 28)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    got = model(x.to(memory_format=torch.channels_last))
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(a, b)


def test_autocast_runs_in_bfloat16_close_to_float32() -> None:
    model, x = SmallCNN().eval(), torch.rand(2, 1, 28, 28)
    expected = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(x)
    assert all(z.dtype == torch.bfloat16 for z in got)
    for a, b in zip(expected[:2], got[:2], strict=True):
        torch.testing.assert_close(b.float(), a, atol=0.1, rtol=0.05)


def test_torch_compile_traces_in_one_graph() -> None:
    torch._dynamo.reset()
    model, x = SmallCNN().eval(), torch.rand(2, 1, 28, 28)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    for a, b in zip(model(x), compiled(x), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_torch_compile_inductor_forward_backward() -> None:
    torch._dynamo.reset()
    model, x = SmallCNN(), torch.rand(2, 1, 28, 28)
    nn.init.normal_(model.block3[-1].weight, std=0.1)
    model.eval()
    compiled = torch.compile(model)
    out = compiled(x)
    for a, b in zip(model(x), out, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    sum(z.sum() for z in out).backward()
    assert model.block1[0].weight.grad is not None


@pytest.mark.cuda
def test_runs_on_cuda_with_amp_and_channels_last() -> None:
    model = SmallCNN().cuda().to(memory_format=torch.channels_last)
    x = torch.rand(4, 1, 28, 28, device="cuda").to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.float16):
        out = model(x)
    assert [z.shape for z in out] == [(4, 10)] * 3 and out[0].is_cuda
    sum(z.float().sum() for z in out).backward()


def test_multi_exit_pgd_attacks_it() -> None:
    from neokd_losses.attacks.pgd import MultiExitPGD

    model = SmallCNN()
    nn.init.normal_(model.block3[-1].weight, std=0.1)
    x, y = torch.rand(3, 1, 28, 28), torch.randint(0, 10, (3,))
    adv = MultiExitPGD(model, eps=0.3, alpha=20 / 255, steps=2)(x, y)
    assert adv.shape == x.shape
    assert (adv - x).abs().max() <= 0.3 + 1e-6 and not torch.equal(adv, x)
    assert adv.min() >= 0 and adv.max() <= 1
    assert all(p.grad is None for p in model.parameters())
