"""One rule for every number the public API takes, and unit tests of ``_validation``.

Every public constructor and function that takes a number refuses a string, a bool and a
complex number with ``TypeError`` and NaN and infinity with ``ValueError``. For
integer arguments (counts, indices) any float is the wrong kind, so NaN and infinity
raise ``TypeError`` there. Each case below first runs the call with valid values (so a
case cannot pass because the call fails for another reason), then once per bad value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import neokd_losses
from neokd_losses import _validation as V
from neokd_losses import functional as F
from neokd_losses import models
from neokd_losses._exits import stack_exits
from neokd_losses.attacks import ExitView, MultiExitPGD
from neokd_losses.distill import BoundarySupportingAttack, ab_connector, bss_weight_schedule
from neokd_losses.evaluation import (
    anytime_accuracy,
    anytime_table,
    budget_curve,
    budgeted_accuracy,
    budgeted_evaluation,
    deployed_evaluation,
    exit_assignment,
    exit_costs,
    exit_proportions,
    exit_sanity_checks,
    fit_thresholds,
    robust_accuracy,
    sanity_checks,
    strong_evaluation,
    transferability_matrix,
)
from neokd_losses.evaluation.anytime import AnytimeResult

E, B, K = 2, 4, 3


class _Linear2(nn.Module):
    """Two linear exits on flat inputs (B, 4) in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, K), nn.Linear(4, K)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.a(x), self.b(torch.tanh(x))]


class _Single(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _logits() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(B, K, generator=g) for _ in range(E)]


def _targets() -> torch.Tensor:
    return torch.tensor([0, 1, 2, 1])


def _images() -> torch.Tensor:
    return torch.rand(B, 4, generator=torch.Generator().manual_seed(2))


def _loader() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(_images(), _targets())]


def _stacked() -> torch.Tensor:
    return torch.stack(_logits())


def _plots() -> Any:
    pytest.importorskip("matplotlib")
    from neokd_losses.evaluation import plots

    return plots


def _call(fn: Callable[..., Any], *args: Any) -> Callable[[dict[str, Any]], Any]:
    """A case body: ``fn(*args(), **kwargs)`` with arguments built fresh for every call."""

    def run(kwargs: dict[str, Any]) -> Any:
        return fn(
            *(a() if callable(a) and not isinstance(a, nn.Module) else a for a in args), **kwargs
        )

    return run


def _loss_module(cls: type[nn.Module], *args: Any) -> Callable[[dict[str, Any]], Any]:
    def run(kwargs: dict[str, Any]) -> Any:
        return cls(**kwargs)(_logits(), _logits(), *(a() for a in args))

    return run


@dataclass
class Case:
    """``run(kwargs)`` calls the API; ``reals`` and ``ints`` name its numeric arguments.

    A name ``"costs[1]"`` puts the bad value into element 1 of the sequence ``costs``.
    """

    name: str
    run: Callable[[dict[str, Any]], Any]
    base: dict[str, Any] = field(default_factory=dict)
    reals: tuple[str, ...] = ()
    ints: tuple[str, ...] = ()
    infinite_ok: bool = False


class _Staged2(nn.Module):
    """``_Linear2`` as a staged model (two stages on flat inputs)."""

    num_exits = 2

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, K), nn.Linear(4, K)

    def forward_stage(self, index: int, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if index == 0:
            return state, self.a(state)
        return state, self.b(torch.tanh(state))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return models.run_stages(self, x)


def _attack_call(cls: Any, *args: Any) -> Callable[[dict[str, Any]], Any]:
    def run(kwargs: dict[str, Any]) -> Any:
        return cls(_Linear2(), *args, **kwargs)(_images(), _targets())

    return run


def _pgd(**kwargs: Any) -> Any:
    return MultiExitPGD(_Linear2(), **kwargs)(_images(), _targets())


CASES = [
    # ------------------------------------------------------------------ loss modules
    Case(
        "NEOKDLoss",
        _loss_module(neokd_losses.NEOKDLoss, _targets),
        {"exit_weights": [1.0, 1.0]},
        reals=("alpha", "beta", "temperature", "exit_weights[0]"),
    ),
    Case("NeighborKD", _loss_module(neokd_losses.NeighborKD), reals=("temperature",)),
    Case(
        "ExitwiseOrthogonalKD",
        _loss_module(neokd_losses.ExitwiseOrthogonalKD, _targets),
        reals=("temperature",),
    ),
    Case(
        "TripleWinsLoss",
        _loss_module(neokd_losses.TripleWinsLoss, _targets),
        reals=("clean_weight", "adv_weight"),
    ),
    Case(
        "SKDLoss",
        _loss_module(neokd_losses.SKDLoss, _targets),
        reals=("alpha", "temperature", "clean_weight", "adv_weight"),
    ),
    Case("ARDLoss", _loss_module(neokd_losses.ARDLoss, _targets), reals=("alpha", "temperature")),
    Case(
        "BSSDistillationLoss",
        lambda kw: neokd_losses.BSSDistillationLoss(**kw)(_logits(), _logits()[0], _targets()),
        reals=("alpha", "beta", "temperature", "ce_weight"),
    ),
    Case(
        "ActivationBoundaryLoss",
        lambda kw: neokd_losses.ActivationBoundaryLoss(**kw)(_logits(), _logits()),
        reals=("margin",),
    ),
    # ------------------------------------------------------------------ functional
    Case(
        "neokd_loss",
        _call(F.neokd_loss, _logits, _logits, _targets),
        reals=("alpha", "beta", "temperature"),
    ),
    Case("neighbor_kd", _call(F.neighbor_kd, _logits, _logits), reals=("temperature",)),
    Case(
        "exitwise_orthogonal_kd",
        _call(F.exitwise_orthogonal_kd, _logits, _logits, _targets),
        reals=("temperature",),
    ),
    Case(
        "triple_wins_loss",
        _call(F.triple_wins_loss, _logits, _logits, _targets),
        reals=("clean_weight", "adv_weight"),
    ),
    Case(
        "skd_loss",
        _call(F.skd_loss, _logits, _logits, _targets),
        reals=("alpha", "temperature", "clean_weight", "adv_weight"),
    ),
    Case("ard_loss", _call(F.ard_loss, _logits, _logits, _targets), reals=("alpha", "temperature")),
    Case(
        "bss_kd_loss",
        lambda kw: F.bss_kd_loss(_logits(), _logits()[0], _targets(), **kw),
        reals=("alpha", "beta", "temperature", "ce_weight"),
    ),
    Case(
        "activation_boundary_loss",
        _call(F.activation_boundary_loss, _logits, _logits),
        reals=("margin",),
    ),
    Case("neighbor_weights", _call(F.neighbor_weights), {"num_exits": 3}, ints=("num_exits",)),
    Case(
        "orthogonal_label_mask",
        _call(F.orthogonal_label_mask, _targets),
        {"num_exits": E, "num_classes": K},
        ints=("num_exits", "num_classes"),
    ),
    Case(
        "ab_connector",
        _call(ab_connector),
        {"student_channels": 2, "teacher_channels": 3},
        ints=("student_channels", "teacher_channels"),
    ),
    Case(
        "bss_weight_schedule",
        _call(bss_weight_schedule),
        {"epoch": 1, "num_epochs": 4},
        reals=(
            "epoch",
            "num_epochs",
            "alpha_start",
            "alpha_end",
            "beta_start",
            "beta_end",
            "beta_stop",
        ),
    ),
    # ------------------------------------------------------------------ attacks
    Case(
        "MultiExitPGD",
        lambda kw: _pgd(**kw),
        {"eps": 0.1, "alpha": 0.05, "steps": 1, "exit_weights": [1.0, 1.0]},
        reals=("eps", "alpha", "exit_weights[1]"),
        ints=("steps", "max_batch"),
    ),
    Case(
        "MultiExitPGD(single)",
        lambda kw: _pgd(**kw),
        {"eps": 0.1, "alpha": 0.05, "steps": 1, "mode": "single", "exit_index": 0},
        ints=("exit_index",),
    ),
    Case(
        "ExitView",
        lambda kw: ExitView(_Linear2(), **kw)(_images()),
        {"exit_index": 1},
        ints=("exit_index",),
    ),
    Case(
        "BoundarySupportingAttack",
        lambda kw: BoundarySupportingAttack(_Single(), **kw)(_images(), _targets()),
        {"max_steps": 1},
        reals=("eta",),
        ints=("max_steps", "num_targets"),
    ),
    # ------------------------------------------------------------------ models
    Case(
        "SmallCNN",
        lambda kw: models.SmallCNN(**kw),
        reals=("dropout",),
        ints=("num_classes", "in_channels"),
    ),
    Case(
        "MSDNet",
        lambda kw: models.MSDNet(**kw),
        {
            "num_classes": 3,
            "num_blocks": 2,
            "base": 1,
            "step": 1,
            "num_channels": 4,
            "growth_rate": 2,
            "gr_factor": (1, 2),
            "bn_factor": (1, 2),
            "image_size": 16,
        },
        reals=("reduction",),
        ints=(
            "num_classes",
            "num_blocks",
            "base",
            "step",
            "num_channels",
            "growth_rate",
            "in_channels",
            "image_size",
            "gr_factor[0]",
            "bn_factor[0]",
        ),
    ),
    Case(
        "msdnet_cifar10",
        lambda kw: models.msdnet_cifar10(**kw),
        ints=("num_classes", "in_channels"),
    ),
    Case(
        "attach_exits",
        lambda kw: models.attach_exits(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), ["0"], **kw),
        {"num_classes": K, "head": nn.Linear},
        ints=("num_classes",),
    ),
    # ------------------------------------------------------------------ evaluation
    Case(
        "exit_proportions",
        _call(exit_proportions),
        {"budget_index": 2, "num_exits": 3},
        reals=("budget_index", "center"),
        ints=("num_exits",),
    ),
    Case(
        "fit_thresholds",
        _call(fit_thresholds, _stacked),
        {"proportions": [0.5, 0.5]},
        reals=("proportions[0]",),
    ),
    # Thresholds may be infinite: +inf never exits early, -inf always does.
    Case(
        "exit_assignment",
        _call(exit_assignment, _stacked),
        {"thresholds": [0.5, -math.inf]},
        reals=("thresholds[0]",),
        infinite_ok=True,
    ),
    Case(
        "budgeted_accuracy",
        _call(budgeted_accuracy, _stacked, _targets),
        {"thresholds": [0.5, -math.inf], "costs": [1.0, 2.0]},
        reals=("costs[0]",),
    ),
    Case(
        "budget_curve",
        _call(budget_curve, _stacked, _targets, _stacked, _targets),
        {"costs": [1.0, 2.0], "num_points": 3},
        reals=("costs[1]",),
        ints=("num_points",),
    ),
    Case(
        "budgeted_evaluation",
        _call(budgeted_evaluation, _Linear2(), _loader, _loader),
        {"costs": [1.0, 2.0], "num_points": 3, "progress": False},
        reals=("costs[0]",),
        ints=("num_points",),
    ),
    Case(
        "anytime_table",
        lambda kw: anytime_table({"clean": AnytimeResult((1, 2), 4)}, **kw),
        ints=("digits",),
    ),
    Case(
        "plot_exit_accuracies",
        lambda kw: _plots().plot_exit_accuracies({"clean": [0.5, 0.75]}, **kw),
        ints=("dpi",),
    ),
    Case(
        "plot_transferability",
        lambda kw: _plots().plot_transferability([[0.5, 0.25], [0.0, 1.0]], **kw),
        ints=("dpi", "digits"),
    ),
    Case(
        "plot_budget_curves",
        lambda kw: _plots().plot_budget_curves(
            {"a": {"mean_costs": [1.0, 2.0], "accuracies": [0.5, 0.7]}}, **kw
        ),
        ints=("dpi",),
    ),
    Case(
        "sanity_checks",
        _call(sanity_checks, _Linear2(), _loader),
        {
            "eps": 0.1,
            "steps": [1, 2],
            "eps_factors": [0.5, 1.0],
            "max_batches": 1,
            "progress": False,
            "warn": False,
        },
        reals=(
            "eps",
            "step_factor",
            "tolerance",
            "max_accuracy_at_large_eps",
            "large_eps",
            "eps_factors[0]",
        ),
        ints=("steps[0]", "max_batches", "seed"),
    ),
    Case(
        "transferability_matrix",
        _call(transferability_matrix, _Linear2(), _loader),
        {"eps": 0.1, "alpha": 0.05, "steps": 1, "progress": False},
        reals=("eps", "alpha"),
        ints=("steps",),
    ),
    # ------------------------------------------------------------------ round two
    Case(
        "EarlyExitClassifier",
        lambda kw: neokd_losses.EarlyExitClassifier(_Staged2(), **kw)(_images()),
        {"thresholds": [0.5, 0.0], "costs": [1.0, 2.0]},
        reals=("thresholds[0]", "costs[0]"),
        infinite_ok=True,
    ),
    Case(
        "run_until",
        lambda kw: neokd_losses.run_until(_Staged2(), _images(), **kw),
        {"exit_index": 1},
        ints=("exit_index",),
    ),
    Case(
        "run_stages",
        lambda kw: models.run_stages(_Staged2(), _images(), **kw),
        {"last": 1},
        ints=("last",),
    ),
    Case(
        "MultiExitAPGD",
        _attack_call(neokd_losses.MultiExitAPGD),
        {"eps": 0.1, "steps": 2},
        reals=("eps", "rho"),
        ints=("steps", "restarts"),
    ),
    Case(
        "ExitPolicyAttack",
        _attack_call(neokd_losses.ExitPolicyAttack, [0.5, 0.0]),
        {"eps": 0.1, "alpha": 0.05, "steps": 2},
        reals=("eps", "alpha", "push_weight"),
        ints=("steps", "restarts"),
    ),
    Case(
        "SlowdownAttack",
        _attack_call(neokd_losses.SlowdownAttack),
        {"eps": 0.1, "alpha": 0.05, "steps": 2},
        reals=("eps", "alpha", "margin"),
        ints=("steps", "restarts"),
    ),
    Case(
        "LWLoss",
        lambda kw: neokd_losses.LWLoss(**kw)(_logits(), _targets(), [nn.Linear(4, K)] * E),
        reals=("lambda_",),
    ),
    Case(
        "lw_loss",
        lambda kw: F.lw_loss(_logits(), _targets(), [nn.Linear(4, K)] * E, **kw),
        reals=("lambda_",),
    ),
    Case(
        "multi_exit_pgd",
        lambda kw: F.multi_exit_pgd(_Linear2(), _images(), _targets(), **kw),
        {"eps": 0.1, "alpha": 0.05, "steps": 1},
        reals=("eps", "alpha"),
        ints=("steps",),
    ),
    Case(
        "robust_accuracy",
        _call(robust_accuracy, _Linear2(), _loader, ["pgd-average"]),
        {"eps": 0.1, "steps": 1, "progress": False},
        reals=("eps",),
        ints=("steps", "seed"),
    ),
    Case(
        "deployed_evaluation",
        _call(deployed_evaluation, _Linear2(), _loader, _loader, [1.0, 2.0]),
        {"eps": 0.1, "steps": 1, "budgets": [20.0], "progress": False},
        reals=("eps", "budgets[0]", "center"),
        ints=("steps", "seed"),
    ),
    Case(
        "strong_evaluation",
        _call(strong_evaluation, _Linear2(), _loader, _loader, [1.0, 2.0]),
        {"eps": 0.1, "steps": 1, "suite": ["pgd-average"], "budgets": [20.0], "progress": False},
        reals=("eps", "budgets[0]"),
        ints=("steps", "seed"),
    ),
    Case(
        "exit_sanity_checks",
        _call(exit_sanity_checks, _Linear2(), _loader),
        {
            "eps": 0.1,
            "steps": [1, 2],
            "restarts": 1,
            "max_batches": 1,
            "progress": False,
            "warn": False,
        },
        reals=("eps", "step_factor", "tolerance"),
        ints=("restarts",),
    ),
]

BAD_VALUES: list[tuple[str, object]] = [
    ("str", "3"),
    ("bool", True),
    ("complex", 1 + 0j),
    ("nan", math.nan),
    ("inf", math.inf),
]


# Cases with a known gap (strict xfail marks, so each fails as soon as the gap is fixed);
# none today.
_KNOWN_GAPS: dict[tuple[str, str, str], str] = {}


def _with(base: dict[str, Any], name: str, value: object) -> dict[str, Any]:
    kwargs = dict(base)
    if "[" in name:
        seq, index = name[:-1].split("[")
        items = list(kwargs[seq])
        items[int(index)] = value
        kwargs[seq] = items
    else:
        kwargs[name] = value
    return kwargs


def _params() -> list[Any]:
    params = []
    for case in CASES:
        for kind, names in (("real", case.reals), ("int", case.ints)):
            for name in names:
                for label, value in BAD_VALUES:
                    if label == "inf" and case.infinite_ok:
                        continue
                    value_error = kind == "real" and label in ("nan", "inf")
                    error = ValueError if value_error else TypeError
                    reason = _KNOWN_GAPS.get((case.name, name, label)) or _KNOWN_GAPS.get(
                        (case.name, name, "*")
                    )
                    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
                    params.append(
                        pytest.param(
                            case, name, value, error, id=f"{case.name}-{name}-{label}", marks=marks
                        )
                    )
    return params


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("case", "name", "value", "error"), _params())
def test_every_public_number_refuses_bad_values(
    case: Case, name: str, value: object, error: type[Exception]
) -> None:
    case.run(dict(case.base))  # the valid call runs
    with pytest.raises(error, match=f"`{name.split('[')[0]}"):
        case.run(_with(case.base, name, value))


def test_cases_cover_every_public_callable_with_a_number() -> None:
    """A new public function or class taking a number must get a case above."""
    import inspect

    covered = {case.name.split("(")[0] for case in CASES}
    # Result containers and callables whose numbers come from the library itself.
    exempt = {
        "AnytimeResult",
        "BudgetCurve",
        "SanityCheck",
        "SanityReport",
        "NEOKDTerms",
        "BoundarySupportingSamples",
        "AttachedExits",
        "msdnet_cifar100",
        "msdnet_imagenet",
        "msdnet_tinyimagenet",
        "exit_costs",
        "anytime_accuracy",
        "collect_logits",
        "off_diagonal_mean",
        "FeatureRecorder",
        "DeployedResult",
        "RobustResult",
        "TransferResult",
    }
    numeric = ("int", "float", "Numbers", "ExitWeights", "Sequence[float]", "tuple[int, int]")
    missing = []
    for module in (neokd_losses, F, models, neokd_losses.evaluation, neokd_losses.distill):
        for public in module.__all__:
            obj = getattr(module, public)
            if not callable(obj) or public in covered or public in exempt:
                continue
            try:
                parameters = inspect.signature(obj).parameters.values()
            except (TypeError, ValueError):
                continue
            if any(any(t in str(p.annotation) for t in numeric) for p in parameters):
                missing.append(public)
    assert not missing, f"no validation case for {sorted(set(missing))}"


# --------------------------------------------------------------------------- _validation


@pytest.mark.parametrize(
    "value",
    [
        0,
        3,
        -2.5,
        1e300,
        np.float32(0.25),
        np.int64(7),
        Fraction(1, 4),
        torch.tensor(0.5),
        torch.tensor([2]),
    ],
    ids=[
        "int",
        "int3",
        "float",
        "huge",
        "np.float32",
        "np.int64",
        "Fraction",
        "tensor0d",
        "tensor1",
    ],
)
def test_check_real_accepts_real_numbers(value: object) -> None:
    result = V.check_real(value, "x")
    assert type(result) is float
    assert result == float(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ("3", TypeError, r"`x` must be a real number, got str '3'"),
        (True, TypeError, "got bool True"),
        (1 + 0j, TypeError, "got complex"),
        (None, TypeError, "got NoneType"),
        (torch.tensor([1.0, 2.0]), TypeError, "got Tensor"),
        (torch.tensor(True), TypeError, "got Tensor"),
        (torch.tensor(1 + 0j), TypeError, "got Tensor"),
        (math.nan, ValueError, "`x` must be finite, got nan"),
        (-math.inf, ValueError, "`x` must be finite, got -inf"),
        (torch.tensor(math.nan), ValueError, "must be finite"),
    ],
)
def test_check_real_refuses(value: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        V.check_real(value, "x")


@pytest.mark.parametrize(
    ("value", "kwargs", "ok"),
    [
        (0.0, {"low": 0.0}, True),
        (0.0, {"low": 0.0, "low_open": True}, False),
        (1.0, {"high": 1.0}, True),
        (1.0, {"high": 1.0, "high_open": True}, False),
        (-1e-9, {"low": 0.0}, False),
        (0.5, {"low": 0.0, "high": 1.0, "low_open": True, "high_open": True}, True),
        (math.inf, {"low": 0.0}, False),
    ],
)
def test_check_real_bounds(value: float, kwargs: dict[str, Any], ok: bool) -> None:
    if ok:
        assert V.check_real(value, "x", **kwargs) == value
    else:
        with pytest.raises(ValueError, match="`x` must be a"):
            V.check_real(value, "x", **kwargs)


def test_check_real_messages_name_the_interval() -> None:
    with pytest.raises(ValueError, match=r"`x` must be a number in \(0, 1\], got 0.0"):
        V.check_real(0.0, "x", low=0.0, high=1.0, low_open=True)
    with pytest.raises(ValueError, match=r"`x` must be a finite number >= 2, got 1"):
        V.check_real(1, "x", low=2.0)
    with pytest.raises(TypeError, match=r"`x` must be a real number > 0, got str"):
        V.check_real("1", "x", low=0.0, low_open=True)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (True, TypeError),
        (2.0, TypeError),
        ("2", TypeError),
        (math.nan, TypeError),
        (1 + 0j, TypeError),
        (None, TypeError),
        (-1, ValueError),
    ],
)
def test_check_int_refuses(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="`n` must be"):
        V.check_int(value, "n", low=0)


def test_check_int_accepts_index_types() -> None:
    assert V.check_int(np.int64(3), "n") == 3
    assert V.check_int(torch.tensor(4), "n") == 4
    assert V.check_positive_int(1, "n") == 1
    with pytest.raises(ValueError, match="`n` must be >= 1, got 0"):
        V.check_positive_int(0, "n")


def test_check_bool_refuses_truthy_values() -> None:
    assert V.check_bool(False, "flag") is False
    for value in (0, 1, "yes", None, np.bool_(True)):
        with pytest.raises(TypeError, match="`flag` must be a bool"):
            V.check_bool(value, "flag")


def test_temperature_coefficient_reduction_and_choices() -> None:
    assert V.check_temperature(2) == 2.0
    with pytest.raises(ValueError, match=r"`temperature` must be a finite number > 0, got 0"):
        V.check_temperature(0)
    assert V.check_coefficient("w", 0) == 0.0
    assert V.check_coefficient("w", 1, at_most_one=True) == 1.0
    with pytest.raises(ValueError, match=r"`w` must be a number in \[0, 1\], got 1.5"):
        V.check_coefficient("w", 1.5, at_most_one=True)
    assert V.check_reduction("none") == "none"
    with pytest.raises(ValueError, match="`reduction` must be one of 'mean', 'sum', 'none'"):
        V.check_reduction("avg")
    V.check_one_of("b", "mode", ("a", "b"))
    with pytest.raises(ValueError, match=r"`mode` must be one of 'a', 'b', got 'c'"):
        V.check_one_of("c", "mode", ("a", "b"))


@pytest.mark.parametrize(("index", "expected"), [(0, 0), (2, 2), (-1, 2), (-3, 0)])
def test_check_exit_index_wraps_like_python(index: int, expected: int) -> None:
    assert V.check_exit_index(index, 3) == expected == list(range(3))[index]


@pytest.mark.parametrize("index", [3, -4])
def test_check_exit_index_out_of_range(index: int) -> None:
    with pytest.raises(ValueError, match=rf"must lie in \[-3, 3\) .* 3 exits, got {index}"):
        V.check_exit_index(index, 3)


def test_check_targets() -> None:
    V.check_targets(torch.tensor([0, 2]), 2, 3)
    with pytest.raises(TypeError, match="integer class indices"):
        V.check_targets(torch.tensor([0.0, 1.0]), 2, 3)
    with pytest.raises(TypeError, match="Tensor of class indices"):
        V.check_targets([0, 1], 2, 3)
    with pytest.raises(ValueError, match=r"shape \(B,\) = \(3,\)"):
        V.check_targets(torch.tensor([0, 1]), 3, 3)
    with pytest.raises(ValueError, match=r"\[0, 3\) for K = 3 classes, got values in \[-1, 2\]"):
        V.check_targets(torch.tensor([-1, 2]), 2, 3)


def test_as_exit_weights() -> None:
    assert V.as_exit_weights(None) is None
    w = V.as_exit_weights([1, 0.5], 2)
    assert w is not None and w.tolist() == [1.0, 0.5] and w.dtype == torch.get_default_dtype()
    t = V.as_exit_weights(torch.tensor([1, 2]))
    assert t is not None and t.is_floating_point()
    for bad, error, match in [
        ([1.0, -1.0], ValueError, "finite and non-negative"),
        (torch.tensor([1.0, math.nan]), ValueError, "finite and non-negative"),
        ([[1.0], [2.0]], ValueError, "must be 1-D"),
        ([1.0, 2.0, 3.0], ValueError, "expected 2, got 3"),
        ("12", TypeError, "sequence of E numbers"),
        ([1.0, "2"], TypeError, r"`exit_weights\[1\]` must be a real number"),
        (torch.tensor([True, False]), TypeError, "real numbers"),
    ]:
        with pytest.raises(error, match=match):
            V.as_exit_weights(bad, 2)  # type: ignore[arg-type]


def test_check_module_and_generator() -> None:
    layer = nn.Linear(1, 1)
    assert V.check_module(layer) is layer
    with pytest.raises(TypeError, match="`net` must be an nn.Module returning logits, got int"):
        V.check_module(3, "net", returns="logits")
    V.check_generator(None)
    V.check_generator(torch.Generator())
    with pytest.raises(TypeError, match="`generator` must be a torch.Generator or None, got int"):
        V.check_generator(0)


def test_image_checks() -> None:
    with pytest.raises(TypeError, match="must be a Tensor"):
        V.check_image_kind([0.0])
    with pytest.raises(TypeError, match=r"`images.float\(\) / 255`"):
        V.check_image_kind(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        V.check_image_kind(torch.zeros(3))
    V.check_image_range(torch.tensor([0.0, 1.0]), 0.0, normalized=False)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\], got values in \[0, 2\]"):
        V.check_image_range(torch.tensor([0.0, 2.0]), 0.0, normalized=False)
    with pytest.raises(ValueError, match="after un-normalizing"):
        V.check_image_range(torch.tensor([-0.5, 1.0]), 1e-5, normalized=True)
    with pytest.raises(ValueError, match=r"x.unsqueeze\(0\)"):
        V.check_image_input(torch.zeros(1, 8, 8), 1, (8, 8), "Net")


def test_upcast_and_devices_and_modes() -> None:
    assert V.upcast(torch.zeros(1, dtype=torch.bfloat16)).dtype == torch.float32
    assert V.upcast(torch.zeros(1, dtype=torch.float64)).dtype == torch.float64
    assert V.first_device(nn.ReLU()) is None
    assert V.first_device(nn.Linear(1, 1)) == torch.device("cpu")
    assert V.module_device(nn.ReLU(), torch.zeros(1)) == torch.device("cpu")
    net = nn.Sequential(nn.Linear(1, 1), nn.Dropout())
    net[1].eval()  # a frozen submodule inside a training model keeps its own mode
    with pytest.raises(RuntimeError), V.preserved_modes(net):
        net.eval()
        net.train()
        raise RuntimeError
    assert net.training and net[0].training and not net[1].training


# --------------------------------------------------------------------------- model outputs


class _Returns(nn.Module):
    """Two exits returned as a dict, stacked (E, B, K) or as ``(exits, features)``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.fc = nn.Linear(4, K)
        self.kind = kind

    def forward(self, x: torch.Tensor) -> Any:
        a, b = self.fc(x), 2 * self.fc(x)
        if self.kind == "dict":
            return {"exit1": a, "exit2": b}
        if self.kind == "stacked":
            return torch.stack([a, b])
        return [a, b], x


_FIXES = {
    "dict": r"dict with keys \['exit1', 'exit2'\]\. Return the exits as a list in exit order, "
    r"`\[{var}\[k\] for k in \['exit1', 'exit2'\]\]`, e\.g\. by wrapping the model in the "
    r"`ExitList` module of the how-to 'Wrap your own multi-exit model'",
    "stacked": r"a single Tensor of shape \(2, 4, 3\), which looks like E = 2 exits stacked as "
    r"\(E, B, K\)\. Unstack it: (pass `list\({var}\.unbind\(0\)\)`, or )?make the model's "
    r"forward return `list\(out\.unbind\(0\)\)`",
    "nested": r"tuple whose first item is a list of 2 items \(followed by Tensor\), which looks "
    r"like `\(exits, features\)`\. Return the exit logits only: `return exits` instead of "
    r"`return exits, features` in the model's forward \(or pass `{var}\[0\]`",
}


@pytest.mark.parametrize("kind", ["dict", "stacked", "nested"])
def test_losses_name_the_output_kind_and_the_fix(kind: str) -> None:
    out = _Returns(kind)(_images())
    pattern = "`adv_logits` must be a list or tuple of E exit logits tensors \\(B, K\\), got "
    with pytest.raises(TypeError, match=pattern + _FIXES[kind].format(var="adv_logits")):
        F.neokd_loss(out, _logits(), _targets())
    with pytest.raises(TypeError, match=_FIXES[kind].format(var="logits")):
        stack_exits(out)


@pytest.mark.parametrize("kind", ["dict", "stacked", "nested"])
def test_evaluation_and_costs_name_the_output_kind_and_the_fix(kind: str) -> None:
    model = _Returns(kind)
    with pytest.raises(
        TypeError, match="`model\\(images\\)` .* got " + _FIXES[kind].format(var="out")
    ):
        anytime_accuracy(model, _loader(), progress=False)
    with pytest.raises(TypeError, match="_Returns returned " + _FIXES[kind].format(var="out")):
        exit_costs(model, _images())
    with pytest.raises(TypeError, match="_Returns returned " + _FIXES[kind].format(var="out")):
        MultiExitPGD(model, eps=0.1, alpha=0.1, steps=1)(_images(), _targets())


def test_a_stacked_output_never_suggests_a_single_output_attack() -> None:
    with pytest.raises(TypeError) as info:
        MultiExitPGD(_Returns("stacked"), eps=0.1, alpha=0.1, steps=1)(_images(), _targets())
    assert "single-output" not in str(info.value) and "torchattacks.PGD" not in str(info.value)


def test_check_exit_vector_and_check_costs() -> None:
    t = V.check_exit_vector([0.5, -math.inf], 2, "thresholds", dtype=torch.float32)
    assert t.dtype == torch.float32 and t.tolist() == [0.5, -math.inf]
    assert V.check_exit_vector(torch.tensor([1, 2]), 2, "costs").dtype == torch.float64
    for bad, kwargs, error, match in [
        ("0.5", {}, TypeError, r"sequence of E numbers or a 1-D tensor.*got str"),
        ([0.5, True], {}, TypeError, r"`thresholds\[1\]` must be a real number.*real numbers"),
        (torch.tensor([True, False]), {}, TypeError, "must hold real numbers"),
        ([0.5], {}, ValueError, r"shape \(2,\) for a model with 2 exits, got shape \(1,\)"),
        ([0.5, math.nan], {}, ValueError, "must not hold NaN"),
        ([0.5, math.inf], {"finite_non_negative": True}, ValueError, "finite and non-negative"),
        ([0.5, -1.0], {"finite_non_negative": True}, ValueError, "finite and non-negative"),
    ]:
        with pytest.raises(error, match=match):
            V.check_exit_vector(bad, 2, "thresholds", **kwargs)
    assert V.check_costs([1, 1, 4], 3).tolist() == [1.0, 1.0, 4.0]
    with pytest.raises(ValueError, match=r"cumulative, so non-decreasing.*\[3\.0, 2\.0\]"):
        V.check_costs([3, 2], 2)
