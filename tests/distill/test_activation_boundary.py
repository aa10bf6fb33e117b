"""Tests of the activation-boundary loss, its connector and the feature recorder."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neokd_losses.distill.activation_boundary import (
    ActivationBoundaryLoss,
    FeatureRecorder,
    ab_connector,
    activation_boundary_loss,
)
from tests.helpers import TinyMultiExit


def ref_ab(student: torch.Tensor, teacher: torch.Tensor, margin: float) -> list[float]:
    """The AB surrogate per sample, one neuron at a time, from the formula."""
    out = []
    for s_row, t_row in zip(student.flatten(1).tolist(), teacher.flatten(1).tolist(), strict=True):
        total = 0.0
        for s, t in zip(s_row, t_row, strict=True):
            if s > -margin and t <= 0:
                total += (s + margin) ** 2
            if s <= margin and t > 0:
                total += (s - margin) ** 2
        out.append(total)
    return out


def test_hand_built_features_including_margin_edges() -> None:
    m = 1.0
    teacher = torch.tensor([[-0.5, 0.0, -2.0, 0.7, 3.0, 0.2, 0.0, 1.0]])
    student = torch.tensor([[0.5, -1.0, -0.5, 1.0, 2.0, -3.0, -1.5, 0.999]])
    # neuron by neuron:
    #   t=-0.5 off, s=0.5 > -1      -> (0.5+1)^2   = 2.25
    #   t= 0   off, s=-1 (edge -m)   -> 0 (s > -m is false)
    #   t=-2   off, s=-0.5 > -1     -> (0.5)^2     = 0.25
    #   t=0.7  on,  s=1 (edge m)     -> (1-1)^2     = 0 (s <= m is true, value 0)
    #   t=3    on,  s=2 > m          -> 0
    #   t=0.2  on,  s=-3             -> (-3-1)^2    = 16
    #   t=0    off, s=-1.5 <= -m     -> 0
    #   t=1    on,  s=0.999          -> (0.999-1)^2 = 1e-6
    expected = 2.25 + 0.25 + 16 + 1e-6
    got = activation_boundary_loss(student.double(), teacher.double(), margin=m, reduction="none")
    torch.testing.assert_close(got, torch.tensor([expected], dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor(ref_ab(student, teacher, m), dtype=torch.float64))


def test_margin_edges_have_no_jump() -> None:
    # At s = -m (teacher off) and s = m (teacher on) the surrogate is 0 on both sides of
    # the indicator: just inside the margin it is tiny, never a jump.
    for s, t in [(-1.0, -1.0), (1.0, 1.0)]:
        at = activation_boundary_loss(torch.tensor([[s]]), torch.tensor([[t]]))
        assert float(at) == 0.0
    inside = activation_boundary_loss(torch.tensor([[-0.999]]), torch.tensor([[-1.0]]))
    torch.testing.assert_close(inside, torch.tensor(1e-6), atol=1e-9, rtol=1e-3)


@pytest.mark.parametrize("margin", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 3, 3)])
def test_matches_naive_on_random_features(margin, shape) -> None:
    s = 2 * torch.randn(shape, dtype=torch.float64)
    t = torch.randn(shape, dtype=torch.float64)
    got = activation_boundary_loss(s, t, margin=margin, reduction="none")
    torch.testing.assert_close(got, torch.tensor(ref_ab(s, t, margin), dtype=torch.float64))


def test_student_beyond_the_margin_on_the_right_side_costs_zero() -> None:
    t = torch.randn(4, 6, 3, 3)
    s = torch.where(t > 0, 1.5, -1.5)
    assert float(activation_boundary_loss(s, t, margin=1.0)) == 0.0
    assert float(activation_boundary_loss(-s, t, margin=1.0)) > 0


def test_several_layers_one_row_each_with_weights() -> None:
    s = [torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)]
    t = [torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)]
    rows = torch.tensor([ref_ab(s[0], t[0], 1.0), ref_ab(s[1], t[1], 1.0)], dtype=torch.float64)
    torch.testing.assert_close(activation_boundary_loss(s, t, reduction="none"), rows)
    weighted = activation_boundary_loss(s, t, exit_weights=[0.5, 2.0], reduction="none")
    torch.testing.assert_close(weighted, rows * torch.tensor([[0.5], [2.0]], dtype=torch.float64))
    torch.testing.assert_close(activation_boundary_loss(s, t, reduction="sum"), rows.sum())
    torch.testing.assert_close(activation_boundary_loss(s, t), rows.sum(0).mean())


def test_tensor_reductions() -> None:
    s, t = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    none = activation_boundary_loss(s, t, reduction="none")
    assert none.shape == (4,)
    torch.testing.assert_close(activation_boundary_loss(s, t), none.mean())
    torch.testing.assert_close(activation_boundary_loss(s, t, reduction="sum"), none.sum())


def test_teacher_detached_and_gradcheck() -> None:
    s = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    activation_boundary_loss(s, t).backward()
    assert t.grad is None and s.grad is not None
    assert torch.autograd.gradcheck(lambda x: activation_boundary_loss(x, t, margin=0.7), (s,))


def test_half_precision_computes_in_float32() -> None:
    s, t = torch.randn(2, 8), torch.randn(2, 8)
    got = activation_boundary_loss(s.half(), t.half())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, activation_boundary_loss(s.half().float(), t.half().float()))


# --- connector and module ---------------------------------------------------------------------------


def test_connector_maps_widths() -> None:
    conv = ab_connector(3, 7)
    assert isinstance(conv[0], nn.Conv2d) and conv[0].kernel_size == (1, 1) and conv[0].bias is None
    assert isinstance(conv[1], nn.BatchNorm2d)
    assert conv(torch.randn(2, 3, 5, 5)).shape == (2, 7, 5, 5)
    flat = ab_connector(3, 7, spatial=False)
    assert (
        isinstance(flat[0], nn.Linear)
        and flat[0].bias is None
        and isinstance(flat[1], nn.BatchNorm1d)
    )
    assert flat(torch.randn(4, 3)).shape == (4, 7)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((0, 3), ValueError, "`student_channels` must be >= 1, got 0"),
        ((3, 2.0), TypeError, "`teacher_channels` must be an int, got float"),
    ],
)
def test_connector_errors(args, error, match) -> None:
    with pytest.raises(error, match=match):
        ab_connector(*args)


def test_module_with_connectors_equals_function_on_connected_features() -> None:
    connectors = [ab_connector(2, 4), None]
    criterion = ActivationBoundaryLoss(
        margin=0.5, connectors=connectors, exit_weights=[1.0, 3.0], reduction="none"
    )
    s = [torch.randn(3, 2, 4, 4), torch.randn(3, 6)]
    t = [torch.randn(3, 4, 4, 4), torch.randn(3, 6)]
    got = criterion(s, t)
    expected = activation_boundary_loss(
        [connectors[0](s[0]), s[1]], t, margin=0.5, exit_weights=[1.0, 3.0], reduction="none"
    )
    torch.testing.assert_close(got, expected)
    assert {n for n, _ in criterion.named_parameters()} == {
        "connectors.0.0.weight",
        "connectors.0.1.weight",
        "connectors.0.1.bias",
    }
    assert "exit_weights" in dict(criterion.named_buffers())
    criterion.double()
    assert criterion.connectors[0][0].weight.dtype == torch.float64


def test_module_single_connector_and_no_connector() -> None:
    connector = ab_connector(3, 5)
    s, t = torch.randn(2, 3, 2, 2), torch.randn(2, 5, 2, 2)
    torch.testing.assert_close(
        ActivationBoundaryLoss(connectors=connector)(s, t),
        activation_boundary_loss(connector(s), t),
    )
    torch.testing.assert_close(ActivationBoundaryLoss()(t, t * -1), activation_boundary_loss(t, -t))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"margin": -1.0}, ValueError, "`margin` must be a finite number >= 0, got -1.0"),
        ({"margin": True}, TypeError, "`margin` must be a real number, got bool"),
        ({"reduction": "avg"}, ValueError, "reduction"),
        (
            {"connectors": [nn.Identity(), 3]},
            TypeError,
            r"`connectors\[1\]` must be an nn.Module or None, got int",
        ),
        ({"connectors": []}, ValueError, "`connectors` must not be empty"),
        (
            {"connectors": "conv"},
            TypeError,
            "`connectors` must be None, an nn.Module or a sequence",
        ),
    ],
)
def test_module_constructor_errors(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        ActivationBoundaryLoss(**kwargs)


def test_module_connector_count_error() -> None:
    criterion = ActivationBoundaryLoss(connectors=[None, None])
    with pytest.raises(ValueError, match="got 1 student feature layers for 2 connectors"):
        criterion([torch.randn(2, 3)], [torch.randn(2, 3)])


def test_input_errors() -> None:
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    with pytest.raises(
        ValueError, match=r"same shape, got \(2, 3, 4, 4\) and \(2, 5, 4, 4\).*ab_connector"
    ):
        activation_boundary_loss(s, torch.randn(2, 5, 4, 4))
    # A teacher without the student's layout: the message names both shapes (it used to
    # raise an IndexError while building the connector hint) and offers no connector.
    with pytest.raises(ValueError, match=r"same shape, got \(2, 3\) and \(6,\)\.$"):
        activation_boundary_loss(torch.randn(2, 3), torch.randn(6))
    with pytest.raises(ValueError, match=r"got \(2, 3, 4, 4\) and \(2, 3, 2, 2\)\.$"):
        activation_boundary_loss(s, torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match="both be tensors or both be sequences"):
        activation_boundary_loss([s], t)
    with pytest.raises(ValueError, match="same length, got 2 student and 1 teacher"):
        activation_boundary_loss([s, s], [t])
    with pytest.raises(ValueError, match="at least one feature tensor"):
        activation_boundary_loss([], [])
    with pytest.raises(TypeError, match=r"`student_features\[1\]` must be a Tensor"):
        activation_boundary_loss([s, 3], [t, t])
    with pytest.raises(TypeError, match="must be a Tensor .* or a list"):
        activation_boundary_loss({"a": s}, t)
    with pytest.raises(TypeError, match="`teacher_features` must be floating point"):
        activation_boundary_loss(s, (t > 0).long())
    with pytest.raises(ValueError, match="batch dimension"):
        activation_boundary_loss(torch.randn(3), torch.randn(3))
    with pytest.raises(ValueError, match="same batch size, got 2 and 3"):
        activation_boundary_loss([s, torch.randn(3, 2)], [t, torch.randn(3, 2)])
    with pytest.raises(ValueError, match="one weight per exit: expected 1, got 2"):
        activation_boundary_loss([s], [t], exit_weights=[1.0, 2.0])


# --- recorder and multi-exit use ----------------------------------------------------------------------


def test_recorder_records_pre_activations_and_removes_hooks() -> None:
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3), nn.ReLU())
    x = torch.randn(5, 4)
    with FeatureRecorder([net[0], net[2]]) as recorder:
        with pytest.raises(RuntimeError, match=r"modules \[0, 1\] have not run yet"):
            _ = recorder.features
        net(x)
        first, second = recorder.features
    torch.testing.assert_close(first, net[0](x))
    torch.testing.assert_close(second, net[2](torch.relu(net[0](x))))
    assert bool((first < 0).any())  # before the ReLU
    net(torch.randn(5, 4))  # hooks are gone: nothing recorded any more
    torch.testing.assert_close(recorder.features[0], first)
    recorder.remove()
    with pytest.raises(RuntimeError, match="have not run yet"):
        _ = recorder.features


def test_recorder_keeps_pre_activations_before_an_in_place_relu() -> None:
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3))
    x = torch.randn(8, 4)
    with FeatureRecorder([net[0]]) as recorder:
        net(x)
        (recorded,) = recorder.features
    torch.testing.assert_close(recorded, net[0](x))  # not overwritten by the ReLU
    assert bool((recorded < 0).any())
    recorded.sum().backward()  # the copy is differentiable
    assert net[0].weight.grad is not None


@pytest.mark.parametrize(
    ("modules", "error", "match"),
    [
        (nn.Linear(2, 2), TypeError, "wrap a single module in a list"),
        ([], ValueError, "at least one module"),
        ([nn.ReLU(), "fc"], TypeError, r"`modules\[1\]` must be an nn.Module, got str"),
    ],
)
def test_recorder_errors(modules, error, match) -> None:
    with pytest.raises(error, match=match):
        FeatureRecorder(modules)


def test_multi_exit_student_learns_teacher_boundaries_layer_per_exit() -> None:
    # Teacher: a wider TinyMultiExit; student: a narrow one. The conv before each ReLU
    # feeding exit i is paired between the two, through a connector per exit.
    teacher = TinyMultiExit(width=8).eval()
    student = TinyMultiExit(width=4)
    t_layers = [teacher.block1[0], teacher.block2[0], teacher.block3[0]]
    s_layers = [student.block1[0], student.block2[0], student.block3[0]]
    criterion = ActivationBoundaryLoss(
        connectors=[ab_connector(4, 8), ab_connector(4, 8), ab_connector(8, 16)]
    )
    params = [p for layer in s_layers for p in layer.parameters()] + list(criterion.parameters())
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad(), FeatureRecorder(t_layers) as rec_t:
        teacher(x)
        t_feats = rec_t.features
    losses = []
    with FeatureRecorder(s_layers) as rec_s:
        for _ in range(12):
            student(x)
            loss = criterion(rec_s.features, t_feats)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is None for p in teacher.parameters())
    assert student.head1[2].weight.grad is None  # exit heads are not part of the AB stage
