"""What every loss module shares: reduction, the exit_weights buffer, repr, state_dict."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from neokd_losses import (
    ARDLoss,
    ExitwiseOrthogonalKD,
    LWLoss,
    NeighborKD,
    NEOKDLoss,
    SKDLoss,
    TripleWinsLoss,
)

MODULES = [NeighborKD, ExitwiseOrthogonalKD, NEOKDLoss, TripleWinsLoss, SKDLoss, ARDLoss, LWLoss]


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (NeighborKD(), "NeighborKD(temperature=1.0, reduction='mean')"),
        (
            ExitwiseOrthogonalKD(temperature=2),
            "ExitwiseOrthogonalKD(temperature=2.0, reduction='mean')",
        ),
        (NEOKDLoss(), "NEOKDLoss(alpha=3.0, beta=1.0, temperature=1.0, reduction='mean')"),
        (
            NEOKDLoss(exit_weights=[1, 1, 1.5], reduction="sum"),
            "NEOKDLoss(alpha=3.0, beta=1.0, temperature=1.0, exit_weights=[1.0, 1.0, 1.5], "
            "reduction='sum')",
        ),
        (TripleWinsLoss(), "TripleWinsLoss(clean_weight=1.0, adv_weight=1.0, reduction='mean')"),
        (
            SKDLoss(),
            "SKDLoss(alpha=1.0, temperature=1.0, clean_weight=1.0, adv_weight=1.0, "
            "teacher='last', reduction='mean')",
        ),
        (ARDLoss(teacher=0), "ARDLoss(alpha=0.5, temperature=1.0, teacher=0, reduction='mean')"),
        (LWLoss(lambda_=0.01), "LWLoss(lambda_=0.01, reduction='mean')"),
    ],
)
def test_repr(module: nn.Module, expected: str) -> None:
    assert repr(module) == expected


@pytest.mark.parametrize("cls", MODULES)
def test_exit_weights_buffer(cls: type[nn.Module]) -> None:
    plain = cls()
    assert plain.exit_weights is None
    assert "exit_weights" not in plain.state_dict()
    weighted = cls(exit_weights=[1.0, 2.0, 1.5])
    assert list(weighted.state_dict()) == ["exit_weights"]
    assert weighted.double().exit_weights.dtype == torch.float64
    # The same key as before the base class: old checkpoints load.
    fresh = cls(exit_weights=[0.0, 0.0, 0.0])
    fresh.load_state_dict({"exit_weights": torch.tensor([1.0, 2.0, 1.5])})
    assert fresh.exit_weights.tolist() == [1.0, 2.0, 1.5]
    assert copy.deepcopy(weighted).exit_weights.tolist() == [1.0, 2.0, 1.5]


@pytest.mark.cuda
@pytest.mark.parametrize("cls", MODULES)
def test_exit_weights_move_with_the_module(cls: type[nn.Module]) -> None:
    assert cls(exit_weights=[1.0, 2.0]).cuda().exit_weights.device.type == "cuda"


@pytest.mark.parametrize("cls", MODULES)
def test_reduction_is_checked_and_stored(cls: type[nn.Module]) -> None:
    assert cls(reduction="none").reduction == "none"
    with pytest.raises(ValueError, match="`reduction` must be one of 'mean', 'sum', 'none'"):
        cls(reduction="batchmean")
    with pytest.raises(ValueError, match="non-negative"):
        cls(exit_weights=[1.0, -1.0])


@pytest.mark.parametrize("cls", [NeighborKD, ExitwiseOrthogonalKD, NEOKDLoss, SKDLoss, ARDLoss])
def test_flags_are_bools(cls: type[nn.Module]) -> None:
    with pytest.raises(TypeError, match="`detach_teacher` must be a bool, got int 1"):
        cls(detach_teacher=1)


@pytest.mark.parametrize("cls", [ExitwiseOrthogonalKD, NEOKDLoss])
def test_generator_is_checked(cls: type[nn.Module]) -> None:
    with pytest.raises(TypeError, match="`generator` must be a torch.Generator or None, got int"):
        cls(generator=0)
