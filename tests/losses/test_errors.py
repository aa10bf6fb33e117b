"""Every public loss rejects bad input with an error naming the expected and received value."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from neokd_losses import ExitwiseOrthogonalKD, NeighborKD, NEOKDLoss
from neokd_losses.functional import exitwise_orthogonal_kd, neighbor_kd, neokd_loss
from tests.helpers import random_exits

TARGETS = torch.tensor([0, 1, 2, 3])


def _nkd(adv: Any, clean: Any, targets: Any = TARGETS, **kw: Any) -> torch.Tensor:
    return neighbor_kd(adv, clean, **kw)


LOSSES: list[Callable[..., torch.Tensor]] = [_nkd, exitwise_orthogonal_kd, neokd_loss]
IDS = ["neighbor_kd", "exitwise_orthogonal_kd", "neokd_loss"]


@pytest.fixture
def exits() -> list[torch.Tensor]:
    return random_exits(3, 4, 10)


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
def test_bare_tensor(loss: Callable[..., torch.Tensor], exits: list[torch.Tensor]) -> None:
    with pytest.raises(
        TypeError, match=r"list or tuple of E exit logits.*single Tensor of shape \(4, 10\)"
    ):
        loss(exits[0], exits, TARGETS)


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
def test_not_a_sequence(loss: Callable[..., torch.Tensor], exits: list[torch.Tensor]) -> None:
    with pytest.raises(TypeError, match="got dict"):
        loss(exits, {"a": exits[0]}, TARGETS)


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
def test_empty(loss: Callable[..., torch.Tensor], exits: list[torch.Tensor]) -> None:
    with pytest.raises(ValueError, match="at least one exit, got an empty list"):
        loss([], exits, TARGETS)


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
def test_exit_shapes_differ(loss: Callable[..., torch.Tensor], exits: list[torch.Tensor]) -> None:
    bad = [exits[0], exits[1], torch.randn(4, 9)]
    with pytest.raises(ValueError, match=r"exit 0 is \(4, 10\), exit 2 is \(4, 9\)"):
        loss(bad, exits, TARGETS)


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
def test_not_2d(loss: Callable[..., torch.Tensor], exits: list[torch.Tensor]) -> None:
    with pytest.raises(ValueError, match=r"2-D \(B, K\), got shape \(4, 10, 1\)"):
        loss([z[..., None] for z in exits], exits, TARGETS)


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
def test_lengths_differ(loss: Callable[..., torch.Tensor], exits: list[torch.Tensor]) -> None:
    with pytest.raises(ValueError, match="same number of exits, got 2 and 3"):
        loss(exits[:2], exits, TARGETS)


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
def test_batch_differs(loss: Callable[..., torch.Tensor], exits: list[torch.Tensor]) -> None:
    with pytest.raises(ValueError, match=r"same shape \(B, K\), got \(2, 10\) and \(4, 10\)"):
        loss([z[:2] for z in exits], exits, TARGETS)


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
def test_integer_logits(loss: Callable[..., torch.Tensor], exits: list[torch.Tensor]) -> None:
    with pytest.raises(TypeError, match="floating-point logits, got dtype torch.int64"):
        loss([z.long() for z in exits], exits, TARGETS)


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([1.0, 1.0], "expected 3, got 2"),
        ([1.0, -1.0, 1.0], "non-negative"),
        ([1.0, float("nan"), 1.0], "finite"),
    ],
)
def test_bad_exit_weights(
    loss: Callable[..., torch.Tensor], exits: list[torch.Tensor], weights: list[float], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        loss(exits, exits, TARGETS, exit_weights=weights)


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_temperature(
    loss: Callable[..., torch.Tensor], exits: list[torch.Tensor], temperature: float
) -> None:
    with pytest.raises(ValueError, match="`temperature` must be a finite number > 0"):
        loss(exits, exits, TARGETS, temperature=temperature)


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
def test_unknown_reduction(loss: Callable[..., torch.Tensor], exits: list[torch.Tensor]) -> None:
    with pytest.raises(
        ValueError, match="`reduction` must be one of 'mean', 'sum', 'none', got 'avg'"
    ):
        loss(exits, exits, TARGETS, reduction="avg")


TARGETED = [exitwise_orthogonal_kd, neokd_loss]


@pytest.mark.parametrize("loss", TARGETED, ids=IDS[1:])
@pytest.mark.parametrize(
    ("targets", "error", "match"),
    [
        (torch.tensor([0, 1, 2]), ValueError, r"shape \(B,\) = \(4,\).*got \(3,\)"),
        (torch.tensor([[0, 1, 2, 3]]), ValueError, r"got \(1, 4\)"),
        (torch.tensor([0.0, 1.0, 2.0, 3.0]), TypeError, "integer class indices.*torch.float32"),
        (torch.tensor([0, 1, 2, 10]), ValueError, r"\[0, 10\).*got values in \[0, 10\]"),
        (torch.tensor([-1, 1, 2, 3]), ValueError, r"got values in \[-1, 3\]"),
        ([0, 1, 2, 3], TypeError, "Tensor of class indices"),
    ],
)
def test_bad_targets(
    loss: Callable[..., torch.Tensor],
    exits: list[torch.Tensor],
    targets: Any,
    error: type[Exception],
    match: str,
) -> None:
    with pytest.raises(error, match=match):
        loss(exits, exits, targets)


@pytest.mark.parametrize(
    ("factory", "kwargs", "match"),
    [
        (NeighborKD, {"temperature": 0}, "temperature"),
        (NeighborKD, {"reduction": "batchmean"}, "reduction"),
        (NeighborKD, {"exit_weights": [1.0, -2.0]}, "non-negative"),
        (ExitwiseOrthogonalKD, {"reduction": "batchmean"}, "reduction"),
        (NEOKDLoss, {"alpha": -1.0}, "alpha"),
        (NEOKDLoss, {"beta": float("inf")}, "beta"),
        (NEOKDLoss, {"exit_weights": [[1.0, 2.0]]}, "1-D"),
    ],
)
def test_constructor_validation(
    factory: Callable[..., torch.nn.Module], kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        factory(**kwargs)


def test_exit_weights_wrong_kind() -> None:
    with pytest.raises(TypeError, match="sequence of E numbers"):
        NEOKDLoss(exit_weights="1,1,1")  # type: ignore[arg-type]


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
@pytest.mark.parametrize(
    ("temperature", "match"),
    [("hot", "real number > 0, got str 'hot'"), (None, "got NoneType"), (True, "got bool")],
)
def test_temperature_wrong_kind(
    loss: Callable[..., torch.Tensor], exits: list[torch.Tensor], temperature: Any, match: str
) -> None:
    with pytest.raises(TypeError, match=match):
        loss(exits, exits, TARGETS, temperature=temperature)
