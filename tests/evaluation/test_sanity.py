"""Sanity checks flag gradient-masked models and pass a normal one."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from neokd_losses.attacks.pgd import MultiExitPGD
from neokd_losses.evaluation.sanity import (
    GradientMaskingWarning,
    SanityCheck,
    SanityReport,
    exit_sanity_checks,
    sanity_checks,
)
from tests.helpers import TinyMLPExits

NUM_CLASSES, DIM = 5, 16
PROTOTYPES = torch.tensor(
    [[1.0 if (j * 7 + c * 3) % 5 < 2 else 0.0 for j in range(DIM)] for c in range(NUM_CLASSES)]
)


def blobs(n: int, seed: int, noise: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs in [0, 1] around binary class prototypes (0.1 / 0.9), labels (n,)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(NUM_CLASSES, (n,), generator=g)
    x = (PROTOTYPES[y] * 0.8 + 0.1 + noise * torch.randn(n, DIM, generator=g)).clamp(0, 1)
    return x, y


class PrototypeExits(nn.Module):
    """A well-behaved 3-exit classifier: scores each class by its prototype, no training."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(2 * PROTOTYPES - 1)  # (K, D), +-1
        self.scale = nn.Parameter(torch.tensor([2.0, 3.0, 4.0]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = x - 0.5
        return [
            self.scale[0] * h @ self.weight.T,
            self.scale[1] * torch.tanh(2 * h) @ self.weight.T,
            self.scale[2] * torch.relu(h @ self.weight.T + 0.5),
        ]


@pytest.fixture
def trained() -> nn.Module:
    return PrototypeExits().eval()


class RoundInput(nn.Module):
    """Gradient masking by quantisation: rounds its input, so every input gradient is 0."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model(torch.round(x))


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return -grad


class ReversedGradient(nn.Module):
    """Obfuscated gradients: the backward pass points the attack the wrong way."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model(_Reverse.apply(x))


def _batches(x: torch.Tensor, y: torch.Tensor, size: int = 24):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def test_normal_model_passes_without_warning(trained: nn.Module) -> None:
    x, y = blobs(48, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientMaskingWarning)
        report = sanity_checks(trained, _batches(x, y), eps=0.4, progress=False)
    assert report.passed, report.to_markdown()
    assert report.failures == ()
    curve = report["accuracy_decreases_with_eps"].values
    assert curve["eps"] == pytest.approx([0.0, 0.1, 0.2, 0.4, 0.8])
    assert curve["accuracy"][0] > 0.9  # the model is accurate on clean inputs
    assert report["large_eps_breaks_model"].values["accuracy"] <= 0.05


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # MultiExitPGD's own zero-gradient warning
def test_rounding_model_is_flagged(trained: nn.Module) -> None:
    x, y = blobs(48, seed=1, noise=0.1)
    masked = RoundInput(trained)
    with pytest.warns(GradientMaskingWarning, match="gradients_nonzero"):
        report = sanity_checks(masked, _batches(x, y), eps=0.4, steps=(3, 12), progress=False)
    assert not report.passed
    assert not report["gradients_nonzero"].passed
    assert report["gradients_nonzero"].values["zero_fraction"] == 1.0
    assert not report["large_eps_breaks_model"].passed
    assert "large_eps_breaks_model" in {c.name for c in report.failures}


def test_reversed_gradient_model_is_flagged(trained: nn.Module) -> None:
    # With 30 % of the labels wrong, an attack that descends the loss raises accuracy.
    x, y = blobs(48, seed=1)
    g = torch.Generator().manual_seed(2)
    flip = torch.rand(48, generator=g) < 0.3
    y = torch.where(flip, (y + 1) % NUM_CLASSES, y)
    with pytest.warns(GradientMaskingWarning, match="accuracy_decreases_with_eps"):
        report = sanity_checks(
            ReversedGradient(trained),
            _batches(x, y),
            eps=0.4,
            steps=(5, 20),
            tolerance=0.0,
            progress=False,
        )
    failed = {c.name for c in report.failures}
    assert {"accuracy_decreases_with_eps", "large_eps_breaks_model"} <= failed
    assert "gradients_nonzero" not in failed
    accs = report["accuracy_decreases_with_eps"].values["accuracy"]
    assert max(accs[1:]) > accs[0]


def _direct_mean_accuracy(model: nn.Module, x, y, attack=None) -> float:
    """Mean over exits of the per-exit accuracy, on the whole set at once."""
    inputs = x if attack is None else attack(x, y)
    with torch.no_grad():
        return sum(float((z.argmax(-1) == y).double().mean()) for z in model(inputs)) / 3


def test_reported_accuracies_equal_direct_attacks(trained: nn.Module) -> None:
    # Each run is MultiExitPGD(mode, eps, alpha = 2.5 eps / steps, a start drawn from a
    # generator seeded with `seed`); one batch so the random starts line up.
    x, y = blobs(32, seed=6)
    eps, few, many = 0.2, 2, 5
    report = sanity_checks(
        trained,
        [(x, y)],
        eps=eps,
        eps_factors=(0.5, 1.0),
        steps=(few, many),
        large_eps=0.6,
        seed=7,
        progress=False,
        warn=False,
    )

    def pgd(run_eps: float, run_steps: int) -> MultiExitPGD:
        return MultiExitPGD(
            trained,
            eps=run_eps,
            alpha=2.5 * run_eps / run_steps,
            steps=run_steps,
            random_start=True,
            mode="average",
            generator=torch.Generator().manual_seed(7),
        )

    curve = report["accuracy_decreases_with_eps"].values["accuracy"]
    expected = [
        _direct_mean_accuracy(trained, x, y),
        _direct_mean_accuracy(trained, x, y, pgd(0.1, few)),
        _direct_mean_accuracy(trained, x, y, pgd(0.2, few)),
    ]
    assert curve == pytest.approx(expected, abs=1e-12)
    steps_check = report["more_steps_not_weaker"].values["accuracy"]
    assert steps_check == pytest.approx(
        [expected[2], _direct_mean_accuracy(trained, x, y, pgd(0.2, many))], abs=1e-12
    )
    large = report["large_eps_breaks_model"].values["accuracy"]
    assert large == pytest.approx(_direct_mean_accuracy(trained, x, y, pgd(0.6, many)), abs=1e-12)


def test_zero_gradient_fraction_counts_samples(trained: nn.Module) -> None:
    # Inputs rounded to {0, 1} have zero gradient except where they sit exactly on 0.5
    # (round's gradient is zero everywhere); a model passing half of the batch through
    # the rounding and half untouched gives a zero fraction of exactly 1/2.
    class HalfRounded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = trained

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            half = x.shape[0] // 2
            return self.inner(torch.cat([torch.round(x[:half]), x[half:]]))

    x, y = blobs(16, seed=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = sanity_checks(
            HalfRounded(), [(x, y)], eps=0.1, steps=(1, 2), progress=False, warn=False
        )
    assert report["gradients_nonzero"].values == {"zero_fraction": 0.5, "nonfinite_fraction": 0.0}


def test_more_steps_check_compares_the_two_runs(trained: nn.Module) -> None:
    x, y = blobs(48, seed=1)
    report = sanity_checks(trained, _batches(x, y), eps=0.2, steps=(2, 8), progress=False)
    check = report["more_steps_not_weaker"]
    few, many = check.values["accuracy"]
    assert check.values["steps"] == [2, 8]
    assert check.passed == (many <= few + 0.02)


def test_max_batches_and_mode_restored(trained: nn.Module) -> None:
    x, y = blobs(72, seed=3)
    seen = []

    def loader():
        for i, batch in enumerate(_batches(x, y)):
            seen.append(i)
            yield batch

    trained.train()
    try:
        report = sanity_checks(
            trained, loader(), eps=0.2, steps=(2, 4), max_batches=1, progress=False, warn=False
        )
        assert trained.training and all(m.training for m in trained.modules())
    finally:
        trained.eval()
    assert seen == [0]
    assert isinstance(report, SanityReport)


def test_report_serialization() -> None:
    report = SanityReport(
        (
            SanityCheck("a", True, "fine", {"x": [1.0, 2.0]}),
            SanityCheck("b", False, "broken", {"y": 0.5}),
        )
    )
    assert not report.passed
    assert [c.name for c in report.failures] == ["b"]
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data == {
        "passed": False,
        "checks": [
            {"name": "a", "passed": True, "message": "fine", "values": {"x": [1.0, 2.0]}},
            {"name": "b", "passed": False, "message": "broken", "values": {"y": 0.5}},
        ],
    }
    assert "| b | FAIL | broken |" in str(report)
    with pytest.raises(KeyError, match="no check named 'c'"):
        report["c"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"eps": 0.0}, ValueError, "`eps` must be a finite number > 0"),
        ({"eps": "big"}, TypeError, "`eps` must be a real number"),
        ({"mode": "single"}, ValueError, "'average' or 'max-average'"),
        ({"eps_factors": (1.0, 0.5)}, ValueError, "increasing"),
        ({"steps": (50, 7)}, ValueError, "few < many"),
        ({"tolerance": 1.5}, ValueError, "tolerance"),
        ({"max_batches": 0}, ValueError, "max_batches"),
        ({"max_batches": 2.5}, TypeError, r"`max_batches` must be an int, got float 2.5"),
        ({"max_accuracy_at_large_eps": -0.1}, ValueError, "max_accuracy_at_large_eps"),
    ],
)
def test_sanity_checks_errors(kwargs, error, match: str) -> None:
    args = {"eps": 0.1}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        sanity_checks(TinyMLPExits(), _batches(*blobs(8, 0)), progress=False, **args)


def test_sanity_checks_empty_loader_and_wrong_model() -> None:
    with pytest.raises(ValueError, match="no samples"):
        sanity_checks(TinyMLPExits(), [], eps=0.1, progress=False)
    with pytest.raises(TypeError, match="nn.Module"):
        sanity_checks(lambda x: [x], [], eps=0.1, progress=False)  # type: ignore[arg-type]


def test_eps_factors_without_one_still_compare_steps_at_eps(trained: nn.Module) -> None:
    x, y = blobs(24, seed=4)
    report = sanity_checks(
        trained,
        [(x, y)],
        eps=0.2,
        eps_factors=(0.5, 2.0),
        steps=(2, 6),
        large_eps=0.4,
        progress=False,
        warn=False,
    )
    assert report["accuracy_decreases_with_eps"].values["eps"] == pytest.approx([0.0, 0.1, 0.4])
    assert report["more_steps_not_weaker"].values["eps"] == 0.2
    assert report["large_eps_breaks_model"].values["eps"] == 0.4


@pytest.mark.cuda
def test_sanity_checks_on_cuda() -> None:
    model = PrototypeExits().cuda().eval()
    x, y = blobs(24, seed=5)  # batches on the CPU are moved to the model's device
    report = sanity_checks(model, [(x, y)], eps=0.4, steps=(3, 12), progress=False)
    assert report.passed, report.to_markdown()


# ------------------------------------------------------------ exit-wise and deployed checks


def test_exit_sanity_checks_pass_on_every_exit_and_the_deployed_model(trained: nn.Module) -> None:
    x, y = blobs(48, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientMaskingWarning)
        report = exit_sanity_checks(
            trained,
            _batches(x, y),
            eps=0.4,
            thresholds=[0.8, 0.8, 0.0],
            steps=(5, 20),
            progress=False,
        )
    assert report.passed, report.to_markdown()
    targets = ["exit 1", "exit 2", "exit 3", "deployed"]
    checks = ["more_steps_not_weaker", "large_eps_breaks_model", "transfer_weaker_than_white_box"]
    assert [c.name for c in report.checks] == [f"{t}: {c}" for t in targets for c in checks]
    for t in targets:
        assert report[f"{t}: large_eps_breaks_model"].values["accuracy"] <= 0.05


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_exit_sanity_checks_flag_masked_models(trained: nn.Module) -> None:
    x, y = blobs(48, seed=1, noise=0.1)
    with pytest.warns(GradientMaskingWarning, match="large_eps_breaks_model"):
        report = exit_sanity_checks(
            RoundInput(trained),
            _batches(x, y),
            eps=0.4,
            thresholds=[0.8, 0.8, 0.0],
            steps=(3, 6),
            surrogate=trained,
            progress=False,
        )
    failed = {c.name for c in report.failures}
    for t in ("exit 1", "exit 2", "exit 3", "deployed"):
        assert f"{t}: large_eps_breaks_model" in failed
        # The unmasked surrogate's examples transfer better than the (stuck) white box.
        assert f"{t}: transfer_weaker_than_white_box" in failed


def test_exit_sanity_checks_bad_input(trained: nn.Module) -> None:
    x, y = blobs(8, seed=1)
    with pytest.raises(ValueError, match="one threshold per exit of the model: it has 3 exits"):
        exit_sanity_checks(trained, _batches(x, y), eps=0.1, thresholds=[0.5, 0.0], progress=False)
    with pytest.raises(ValueError, match="no samples"):
        exit_sanity_checks(trained, [], eps=0.1, progress=False)
    with pytest.raises(ValueError, match="`steps`"):
        exit_sanity_checks(trained, _batches(x, y), eps=0.1, steps=(5, 2), progress=False)
    with pytest.raises(TypeError, match="`surrogate` must be an nn.Module"):
        exit_sanity_checks(trained, _batches(x, y), eps=0.1, surrogate="x", progress=False)  # type: ignore[arg-type]

    class TwoExits(nn.Module):
        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            return trained(x)[:2]

    with pytest.raises(ValueError, match="`surrogate` must have the model's 3 exits .* got 2"):
        exit_sanity_checks(trained, _batches(x, y), eps=0.1, surrogate=TwoExits(), progress=False)


class WithBatchNorm(nn.Module):
    """PrototypeExits behind a BatchNorm1d: a forward in training mode moves its statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(DIM, affine=False)
        self.exits = PrototypeExits()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.exits(self.norm(x) * 0.1 + 0.5)


def test_checks_leave_a_training_model_untouched() -> None:
    model = WithBatchNorm().train()
    x, y = blobs(8, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exit_sanity_checks(model, _batches(x, y), eps=0.1, steps=(1, 1), progress=False)
        sanity_checks(model, _batches(x, y), eps=0.1, steps=(1, 2), progress=False)
    assert model.training and model.norm.training
    assert int(model.norm.num_batches_tracked) == 0  # no forward ran in training mode


def test_empty_batches_inference_mode_and_integer_labels(trained: nn.Module) -> None:
    x, y = blobs(16, seed=3)
    empty = (x[:0], y[:0])
    data = [empty, (x[:8], y[:8].int()), (x[8:], y[8:].to(torch.uint8))]
    kwargs = {"eps": 0.1, "steps": (1, 2), "progress": False, "warn": False}
    reference = sanity_checks(trained, [(x[:8], y[:8]), (x[8:], y[8:])], **kwargs)
    assert sanity_checks(trained, data, **kwargs) == reference
    with torch.inference_mode():
        assert sanity_checks(trained, data, **kwargs) == reference
    deployed = exit_sanity_checks(
        trained, data, eps=0.1, steps=(1, 1), thresholds=[0.5, 0.5, 0.0], progress=False, warn=False
    )
    assert len(deployed.checks) == 12


def test_one_exit_model_has_no_transfer_check() -> None:
    class OneExit(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.exits = PrototypeExits()

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            return self.exits(x)[:1]

    x, y = blobs(8, seed=4)
    report = exit_sanity_checks(
        OneExit().eval(),
        _batches(x, y),
        eps=0.1,
        steps=(1, 1),
        thresholds=[0.0],
        progress=False,
        warn=False,
    )
    assert [c.name for c in report.checks] == [
        "exit 1: more_steps_not_weaker",
        "exit 1: large_eps_breaks_model",
        "deployed: more_steps_not_weaker",
        "deployed: large_eps_breaks_model",
    ]
