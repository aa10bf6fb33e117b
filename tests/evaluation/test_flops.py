"""exit_costs: per-operator counts in closed form, cumulation over exits, side effects, errors."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from neokd_losses.evaluation.flops import exit_costs
from tests.helpers import TinyMultiExit


class _One(nn.Module):
    """A single-exit model applying ``fn`` and flattening the result."""

    def __init__(self, fn: Callable[[Tensor], Tensor], *modules: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        self.parts = nn.ModuleList(modules)

    def forward(self, x: Tensor) -> list[Tensor]:
        return [self.fn(x).flatten(1)]


def _cost(fn: Callable[[Tensor], Tensor], x: Tensor, *modules: nn.Module) -> float:
    return exit_costs(_One(fn, *modules), x)[0]


# Each case: layer, input shape (batch 2), multiply-adds for ONE input computed by hand.
_conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)  # 8×8 -> 4×4
_grouped = nn.Conv2d(4, 6, 3, groups=2)  # 8×8 -> 6×6, 2 inputs per output channel
_transposed = nn.ConvTranspose2d(4, 6, 3, stride=2)  # every input spreads to 6·9 outputs
_conv1d = nn.Conv1d(4, 5, 3)  # length 10 -> 8
_linear = nn.Linear(12, 7)
_linear_nobias = nn.Linear(12, 7, bias=False)
_CASES = [
    pytest.param(_conv, (4, 8, 8), 4 * 4 * 6 * 4 * 9, id="conv-stride-pad"),
    pytest.param(_grouped, (4, 8, 8), 6 * 6 * 6 * 2 * 9, id="conv-groups"),
    pytest.param(_transposed, (4, 8, 8), 4 * 8 * 8 * 6 * 9, id="conv-transposed"),
    pytest.param(_conv1d, (4, 10), 5 * 8 * 4 * 3, id="conv1d"),
    pytest.param(_linear, (12,), 12 * 7 + 7, id="linear-with-bias"),
    pytest.param(_linear_nobias, (12,), 12 * 7, id="linear-no-bias"),
    pytest.param(_linear, (5, 12), 5 * (12 * 7 + 7), id="linear-on-tokens"),
    pytest.param(nn.ReLU(), (3, 4, 4), 48, id="relu"),
    pytest.param(nn.ReLU(inplace=True), (3, 4, 4), 48, id="relu-inplace"),
    pytest.param(nn.GELU(), (3, 4, 4), 48, id="gelu"),
    pytest.param(nn.Sigmoid(), (10,), 10, id="sigmoid"),
    pytest.param(nn.MaxPool2d(2), (3, 8, 8), 3 * 4 * 4 * 4, id="maxpool"),
    pytest.param(nn.MaxPool2d(3, stride=2, padding=1), (3, 8, 8), 3 * 4 * 4 * 9, id="maxpool-3-s2"),
    pytest.param(nn.AvgPool2d((2, 3)), (3, 8, 9), 3 * 4 * 3 * 6, id="avgpool-rect"),
    pytest.param(nn.AdaptiveAvgPool2d(1), (3, 8, 8), 3 * 8 * 8, id="adaptive-avgpool"),
    pytest.param(nn.AdaptiveAvgPool2d(2), (3, 8, 8), 3 * 8 * 8, id="adaptive-avgpool-2"),
    pytest.param(nn.BatchNorm2d(3), (3, 4, 4), 0, id="batchnorm-free"),
    pytest.param(nn.Softmax(dim=1), (10,), 0, id="softmax-free"),
    pytest.param(nn.Dropout(0.5), (10,), 0, id="dropout-free"),
]


@pytest.mark.parametrize(("layer", "shape", "expected"), _CASES)
def test_single_operator_counts_match_closed_forms(
    layer: nn.Module, shape: tuple[int, ...], expected: int
) -> None:
    assert _cost(layer, torch.rand(2, *shape), layer) == expected


@pytest.mark.parametrize(
    ("fn", "shape", "expected"),
    [
        pytest.param(lambda x: x.mean(dim=(2, 3)), (3, 4, 4), 48, id="mean"),
        pytest.param(lambda x: x + x * 2.0, (3, 4, 4), 0, id="pointwise-arithmetic-free"),
        pytest.param(lambda x: torch.cat([x, x], 1), (3, 4), 0, id="cat-free"),
        pytest.param(lambda x: torch.bmm(x, x.transpose(1, 2)), (5, 4), 5 * 5 * 4, id="bmm"),
        pytest.param(lambda x: x @ x.transpose(-1, -2), (3, 5, 4), 3 * 5 * 5 * 4, id="matmul-4d"),
        pytest.param(
            lambda x: F.scaled_dot_product_attention(x, x, x),
            (2, 5, 4),
            2 * 5 * 5 * (4 + 4),
            id="attention",
        ),
    ],
)
def test_functional_operator_counts(
    fn: Callable[[Tensor], Tensor], shape: tuple[int, ...], expected: int
) -> None:
    assert _cost(fn, torch.rand(2, *shape)) == expected


class _ThreeExits(nn.Module):
    """trunk (linear 6→6, ReLU) with heads after each of three stages, computed in order."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(nn.Linear(6, 6), nn.ReLU()) for _ in range(3))
        self.heads = nn.ModuleList(nn.Linear(6, 4) for _ in range(3))

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for stage, head in zip(self.stages, self.heads, strict=True):
            x = stage(x)
            out.append(head(x))
        return out


def test_costs_accumulate_trunk_and_earlier_heads() -> None:
    stage, head = (6 * 6 + 6) + 6, 6 * 4 + 4
    costs = exit_costs(_ThreeExits(), torch.rand(3, 6))
    assert costs == [stage + head, 2 * (stage + head), 3 * (stage + head)]


def test_costs_are_per_input_whatever_the_batch() -> None:
    model = _ThreeExits()
    assert exit_costs(model, torch.rand(1, 6)) == exit_costs(model, torch.rand(7, 6))


def test_the_input_follows_the_model_device() -> None:
    # A model on the meta device (no data, shapes only) stands in for one on a GPU: the
    # CPU batch is moved to it, and the closed-form costs come out.
    stage, head = (6 * 6 + 6) + 6, 6 * 4 + 4
    model = _ThreeExits().to("meta")
    assert exit_costs(model, torch.rand(2, 6)) == [
        stage + head,
        2 * (stage + head),
        3 * (stage + head),
    ]


def test_exits_returned_out_of_computation_order_are_made_cumulative() -> None:
    class Reversed(_ThreeExits):
        def forward(self, x: Tensor) -> list[Tensor]:
            return super().forward(x)[::-1]

    stage, head = (6 * 6 + 6) + 6, 6 * 4 + 4
    assert exit_costs(Reversed(), torch.rand(2, 6)) == [3 * (stage + head)] * 3


def test_a_model_computing_its_trunk_first_charges_it_to_exit_one_and_warns() -> None:
    model = TinyMultiExit(in_channels=1, num_classes=10, width=8)  # trunk, then the heads
    with pytest.warns(RuntimeWarning, match="runs its whole trunk before its exit heads") as rec:
        costs = exit_costs(model, torch.rand(2, 1, 8, 8))
    block1 = 8 * 8 * 8 * 9 + 8 * 8 * 8  # conv 1→8 and ReLU
    block2 = 8 * 8 * 8 * 8 * 9 + 8 * 8 * 8 + 8 * 4 * 4 * 4  # conv, ReLU, maxpool
    block3 = 4 * 4 * 16 * 8 * 9 + 4 * 4 * 16 + 16 * 2 * 2 * 4
    head1 = 8 * 8 * 8 + 32 * 10 + 10  # adaptive pooling counts its input, then linear
    assert costs[0] == block1 + block2 + block3 + head1
    assert costs[0] < costs[1] < costs[2]
    # The warning names the fix and the costs by data dependence: exit 1 needs block 1
    # and its head only.
    message = str(rec[0].message)
    assert "Compute each exit's head right after the block it reads" in message
    assert f"{float(block1 + head1)}" in message.split("data dependence:")[-1]
    assert "exit 1's logits" in message


class _ThreeExitNetInOrder(TinyMultiExit):
    """TinyMultiExit with each head computed right after its block (the fix)."""

    def forward(self, x: Tensor) -> list[Tensor]:
        h1 = self.block1(x)
        z1 = self.head1(h1)
        h2 = self.block2(h1)
        z2 = self.head2(h2)
        return [z1, z2, self.dropout(self.head3(self.block3(h2)))]


def test_computing_exits_in_order_gives_the_true_costs_without_warning() -> None:
    block1 = 8 * 8 * 8 * 9 + 8 * 8 * 8
    block2 = 8 * 8 * 8 * 8 * 9 + 8 * 8 * 8 + 8 * 4 * 4 * 4
    block3 = 4 * 4 * 16 * 8 * 9 + 4 * 4 * 16 + 16 * 2 * 2 * 4
    head1, head2, head3 = 8 * 8 * 8 + 32 * 10 + 10, 8 * 4 * 4 + 32 * 10 + 10, 64 * 10 + 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        costs = exit_costs(_ThreeExitNetInOrder(), torch.rand(2, 1, 8, 8))
    assert costs == [
        block1 + head1,
        block1 + head1 + block2 + head2,
        block1 + head1 + block2 + head2 + block3 + head3,
    ]


def test_dependence_follows_in_place_writes_and_views() -> None:
    # Writing into a slice of a buffer (a view) makes the buffer depend on what was
    # written: exit 2 reads the buffer, so it needs the costly product, and no warning.
    class Buffered(nn.Module):
        def forward(self, x: Tensor) -> list[Tensor]:
            z1 = x @ torch.ones(3, 2)
            buffer = torch.zeros(x.shape[0], 4)
            buffer[:, :2] = torch.relu(x @ torch.ones(3, 2))
            return [z1, buffer @ torch.ones(4, 2)]

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        costs = exit_costs(Buffered(), torch.rand(5, 3))
    assert costs == [6.0, 6.0 + 6.0 + 2.0 + 8.0]


def test_an_exit_no_operator_produced_costs_nothing() -> None:
    model = _Returns(lambda x: [x, (x @ x.T)[:, :3]])
    assert exit_costs(model, torch.rand(4, 3)) == [0.0, 4 * 4 * 3 / 4]


def test_mode_buffers_and_gradients_are_left_untouched() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, x: Tensor) -> tuple[Tensor, ...]:
            return (self.net(x),)

    wrapped = Wrap().train()
    running = model[1].running_mean.clone()
    x = torch.rand(2, 1, 4, 4, requires_grad=True)
    assert exit_costs(wrapped, x) == [2 * 2 * 2 * 9 + 8 * 3 + 3]
    assert wrapped.training and model[1].training
    assert torch.equal(model[1].running_mean, running)
    assert model[1].num_batches_tracked == 0
    assert all(p.grad is None for p in wrapped.parameters()) and x.grad is None
    wrapped.eval()
    exit_costs(wrapped, x)
    assert not wrapped.training


def test_every_submodule_mode_is_restored_also_on_error() -> None:
    model = _ThreeExits().train()
    model.stages[1].eval()  # e.g. a frozen stage inside a model being trained
    exit_costs(model, torch.rand(2, 6))
    modes = {name: m.training for name, m in model.named_modules()}
    assert modes["stages.1"] is False and modes["stages.1.0"] is False
    assert all(training for name, training in modes.items() if not name.startswith("stages.1"))

    class Broken(_ThreeExits):
        def forward(self, x: Tensor) -> list[Tensor]:
            assert not self.training and not self.heads[0].training
            raise RuntimeError("boom")

    broken = Broken().train()
    broken.heads[0].eval()
    with pytest.raises(RuntimeError, match="boom"):
        exit_costs(broken, torch.rand(2, 6))
    assert broken.training and broken.stages[0].training and not broken.heads[0].training


class _Returns(nn.Module):
    def __init__(self, fn: Callable[[Tensor], object]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> object:
        return self.fn(x)


def test_an_input_without_batch_dimension_names_the_fix() -> None:
    # A linear model accepts one sample (D,) but returns (K,): not one row per sample.
    with pytest.raises(ValueError, match=r"exit 0 of _ThreeExits has shape \(4,\), not \(B, K\)"):
        exit_costs(_ThreeExits(), torch.rand(6))
    with pytest.raises(ValueError, match=r"`example_input.unsqueeze\(0\)`"):
        exit_costs(_ThreeExits(), torch.rand(6))
    # A model that fails on it: torch's error, with what was passed and the fix.
    with pytest.raises(
        RuntimeError,
        match=r"(?s)TinyMultiExit\(example_input\) failed for `example_input` of shape "
        r"\(1, 8, 8\): .*`example_input.unsqueeze\(0\)`",
    ):
        exit_costs(TinyMultiExit(), torch.rand(1, 8, 8))


@pytest.mark.parametrize(
    ("model", "x", "error", "match"),
    [
        (lambda x: [x], torch.rand(2, 3), TypeError, r"`model` must be an nn.Module, got function"),
        (_Returns(lambda x: [x * 2]), [1.0], TypeError, r"`example_input` must be a Tensor batch"),
        (_Returns(lambda x: [x * 2]), torch.tensor(1.0), TypeError, r"batch dimension .* 0-d"),
        (
            _Returns(lambda x: [x * 2]),
            torch.rand(0, 3),
            ValueError,
            r"at least one sample, got shape \(0, 3\)",
        ),
        (
            _Returns(lambda x: x * 2),
            torch.rand(2, 3),
            TypeError,
            r"list or tuple of E exit logits .* single Tensor of shape \(2, 3\)\. For a "
            "single-exit model the cost of its one exit is the total count",
        ),
        (_Returns(lambda x: []), torch.rand(2, 3), ValueError, r"returned an empty list"),
        (
            _Returns(lambda x: [x * 2, 3]),
            torch.rand(2, 3),
            TypeError,
            r"exit 1 of _Returns's output must be a Tensor \(B, K\), got int",
        ),
        (
            _Returns(lambda x: torch.stack([x, x])),
            torch.rand(2, 3),
            TypeError,
            r"E = 2 exits stacked as \(E, B, K\).*`list\(out.unbind\(0\)\)`",
        ),
    ],
)
def test_bad_arguments_raise(model: object, x: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        exit_costs(model, x)  # type: ignore[arg-type]
