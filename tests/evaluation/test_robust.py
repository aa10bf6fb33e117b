"""Worst case over a suite against a naive reference (every attack on every sample), the
skipping of broken samples, resumption, bad input, and the deployed evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor

from neokd_losses.attacks import MultiExitPGD, deployed_decision
from neokd_losses.evaluation import (
    deployed_evaluation,
    exit_proportions,
    fit_thresholds,
    robust_accuracy,
    strong_evaluation,
)
from neokd_losses.evaluation.robust import SUITES, make_suite
from tests.attacks.test_policy import trained_digits
from tests.helpers import TinyMultiExit


def _batches(x: Tensor, y: Tensor, size: int) -> list[tuple[Tensor, Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, x.shape[0], size)]


def _deterministic_suite(model: torch.nn.Module, eps: float) -> list[MultiExitPGD]:
    """Attacks without random start: each sample's result does not depend on its batch."""
    common = {"eps": eps, "alpha": eps / 4, "steps": 5, "random_start": False}
    return [
        MultiExitPGD(model, mode="single", exit_index=0, **common),  # type: ignore[arg-type]
        MultiExitPGD(model, mode="average", **common),  # type: ignore[arg-type]
        MultiExitPGD(model, mode="single", exit_index=2, **common),  # type: ignore[arg-type]
    ]


def test_worst_case_equals_every_attack_on_every_sample() -> None:
    model, _, _, xt, yt = trained_digits()
    x, y = xt[:96], yt[:96]
    eps = 0.08
    suite = _deterministic_suite(model, eps)
    # Naive reference: each attack on all samples, a prediction survives only if no attack
    # broke it; the credit goes to the first attack (in order) that broke it.
    with torch.no_grad():
        alive = torch.stack(model(x)).argmax(-1) == y
    clean = alive.sum(1)
    # A single-exit attack only counts on the samples still correct at its exit.
    credit, expected_seen = [], []
    for atk in suite:
        needed = alive.any(0) if atk.mode != "single" else alive[atk.exit_index].clone()
        expected_seen.append(int(needed.sum()))
        with torch.no_grad():
            hits = torch.stack(model(atk(x, y))).argmax(-1) == y
        hits |= ~needed  # rows the attack does not run on keep their state
        credit.append(int((alive & ~hits).sum()))
        alive &= hits
    result = robust_accuracy(model, _batches(x, y, 32), suite, eps=eps, progress=False)
    assert result.num_samples == 96
    assert list(result.clean_correct) == clean.tolist()
    assert list(result.robust_correct) == alive.sum(1).tolist()
    assert list(result.broken.values()) == credit
    # Skipping: an attack sees only the samples still correct at one exit or more.
    assert list(result.seen.values()) == expected_seen
    assert expected_seen[-1] < expected_seen[0] <= 96
    full = robust_accuracy(
        model, _batches(x, y, 32), suite, eps=eps, skip_broken=False, progress=False
    )
    assert list(full.seen.values()) == [96, 96, 96]
    assert all(f <= r for f, r in zip(full.robust_correct, result.robust_correct))
    table = result.to_markdown()
    assert "worst case" in table and "MultiExitPGD (average)" in table
    assert json.loads(json.dumps(result.to_dict()))["num_samples"] == 96


def test_named_suite_is_deterministic_and_resumable(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyMultiExit(num_classes=5).eval()
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.rand(6, 1, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g))
        for _ in range(3)
    ]
    kwargs = {"eps": 0.05, "steps": 3, "progress": False}
    attacks = ["pgd-max-average", "apgd-dlr", "pgd-exit"]
    one = robust_accuracy(model, data, attacks, **kwargs)  # type: ignore[arg-type]
    two = robust_accuracy(model, data, attacks, **kwargs)  # type: ignore[arg-type]
    assert one == two
    assert one.attacks == ("pgd-max-average", "apgd-dlr", "pgd-exit-0", "pgd-exit-1", "pgd-exit-2")
    path = str(tmp_path / "state.json")
    partial = robust_accuracy(model, data, attacks, max_batches=2, checkpoint=path, **kwargs)  # type: ignore[arg-type]
    assert partial.num_samples == 12
    resumed = robust_accuracy(model, data, attacks, checkpoint=path, **kwargs)  # type: ignore[arg-type]
    assert resumed == one
    with pytest.raises(ValueError, match="belongs to another evaluation"):
        robust_accuracy(model, data, ["pgd-average"], checkpoint=path, **kwargs)  # type: ignore[arg-type]


def test_bad_input() -> None:
    model = TinyMultiExit(num_classes=5).eval()
    data = [(torch.rand(4, 1, 8, 8), torch.randint(0, 5, (4,)))]
    with pytest.raises(ValueError, match="Did you mean 'apgd-ce'"):
        robust_accuracy(model, data, ["apgd_ce"], eps=0.1, progress=False)
    with pytest.raises(ValueError, match="unknown suite 'strongest'.*Did you mean 'strong'"):
        robust_accuracy(model, data, "strongest", eps=0.1, progress=False)
    with pytest.raises(ValueError, match="no samples"):
        robust_accuracy(model, [], ["pgd-average"], eps=0.1, progress=False)
    with pytest.raises(TypeError, match="attack name or a callable"):
        robust_accuracy(model, data, [3], eps=0.1, progress=False)  # type: ignore[list-item]

    def too_far(images: Tensor, labels: Tensor) -> Tensor:
        return (images + 0.3).clamp(0, 1)

    with pytest.raises(ValueError, match="attack 'too_far' returned images outside the Linf ball"):
        robust_accuracy(model, data, [too_far], eps=0.1, progress=False)

    def out_of_range(images: Tensor, labels: Tensor) -> Tensor:
        return images - 0.05

    with pytest.raises(
        ValueError, match="attack 'out_of_range' returned images outside \\[0, 1\\]"
    ):
        robust_accuracy(model, data, [out_of_range], eps=0.1, progress=False)
    with pytest.raises(ValueError, match="one cumulative cost per exit: the model has 3"):
        deployed_evaluation(model, data, data, [1.0, 2.0], eps=0.1, steps=1, progress=False)
    with pytest.raises(ValueError, match="no samples"):
        deployed_evaluation(model, data, [], [1.0, 2.0, 3.0], eps=0.1, steps=1, progress=False)
    assert set(SUITES) == {"standard", "strong"}
    names = [n for n, _ in make_suite(model, "strong", eps=0.1, num_exits=3)]
    assert "apgd-cw" in names and "pgd-exit-2" in names


def test_deployed_evaluation_against_direct_computation() -> None:
    model, xv, yv, xt, yt = trained_digits()
    val, test = _batches(xv, yv, 100), _batches(xt[:64], yt[:64], 32)
    costs = [1.0, 2.0, 4.0]
    result = deployed_evaluation(
        model, val, test, costs, eps=0.1, steps=5, budgets=(10, 30), progress=False
    )
    with torch.no_grad():
        v = torch.stack(model(xv))
        clean = torch.stack(model(xt[:64]))
    for i, p in enumerate((10, 30)):
        t = fit_thresholds(v, exit_proportions(p, 3))
        assert result.thresholds[i] == pytest.approx(t.tolist())
        exits, answers = deployed_decision(clean, t.tolist())
        assert result.clean_accuracy[i] == pytest.approx(float((answers == yt[:64]).float().mean()))
        assert result.clean_cost[i] == pytest.approx(float(torch.tensor(costs)[exits].mean()))
        assert result.worst_accuracy[i] <= min(
            result.exit_policy_accuracy[i], result.max_average_accuracy[i]
        )
        assert result.slowdown_factor[i] >= 1.0
        assert result.slowdown_last_share[i] >= result.clean_last_share[i]
    assert "| 10 |" in result.to_markdown()


def test_strong_evaluation_returns_the_numbers_the_examples_report() -> None:
    torch.manual_seed(0)
    model = TinyMultiExit(num_classes=5).eval()
    data = [(torch.rand(8, 1, 8, 8), torch.randint(0, 5, (8,)))]
    out = strong_evaluation(
        model,
        data,
        data,
        [1.0, 2.0, 3.0],
        eps=0.05,
        steps=2,
        suite=["pgd-average", "apgd-ce"],
        progress=False,
    )
    summary = out["summary"]
    assert len(summary["worst_case_accuracy"]) == 3 and len(summary["budgets"]) == 3
    assert len(summary["budgeted_exit_policy"]) == 3 and len(summary["slowdown_factor"]) == 3
    assert json.loads(json.dumps(out))["summary"] == summary
