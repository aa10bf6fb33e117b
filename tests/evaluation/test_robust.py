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
    # Naive reference: each attack on all samples, every output scored at every exit; a
    # prediction survives only if no attack broke it; the credit goes to the first
    # attack (in order) that broke it.
    with torch.no_grad():
        alive = torch.stack(model(x)).argmax(-1) == y
    clean = alive.sum(1)
    credit, expected_seen = [], []
    for atk in suite:
        expected_seen.append(int(alive.any(0).sum()))
        with torch.no_grad():
            hits = torch.stack(model(atk(x, y))).argmax(-1) == y
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
    # ... which is only a speed-up: without it, and in any order, the same worst case.
    full = robust_accuracy(
        model, _batches(x, y, 32), suite, eps=eps, skip_broken=False, progress=False
    )
    assert list(full.seen.values()) == [96, 96, 96]
    assert full.robust_correct == result.robust_correct
    reordered = robust_accuracy(model, _batches(x, y, 32), suite[::-1], eps=eps, progress=False)
    assert reordered.robust_correct == result.robust_correct
    table = result.to_markdown()
    assert "worst case" in table and "MultiExitPGD (average)" in table
    assert json.loads(json.dumps(result.to_dict()))["num_samples"] == 96


def test_single_exit_attack_counts_at_every_exit() -> None:
    """An attack aimed at exit 0 that also breaks exit 1 breaks it in the worst case,
    also for samples an earlier attack had already broken at exit 0 only."""
    x = torch.rand(4, 1, 8, 8)
    y = torch.zeros(4, dtype=torch.long)

    class Fixed(torch.nn.Module):
        """Logits that read the attack's mark in pixel (0, 0): 0 clean, 1 or 2 attacked."""

        def forward(self, images: Tensor) -> list[Tensor]:
            mark = images[:, 0, 0, 0]
            right = torch.tensor([5.0, 0.0, 0.0]).expand(images.shape[0], 3)
            wrong = torch.tensor([0.0, 5.0, 0.0]).expand(images.shape[0], 3)
            exit0 = torch.where((mark > 0.5).unsqueeze(1), wrong, right)
            exit1 = torch.where((mark > 0.9).unsqueeze(1), wrong, right)
            return [exit0, exit1]

    fixed = Fixed()
    clean = x.clone()
    clean[:, 0, 0, 0] = 0.0

    def breaks_exit0(images: Tensor, labels: Tensor) -> Tensor:
        out = images.clone()
        out[:, 0, 0, 0] = 0.6
        return out

    def breaks_both(images: Tensor, labels: Tensor) -> Tensor:
        out = images.clone()
        out[:, 0, 0, 0] = 1.0
        return out

    breaks_both.mode = "single"  # type: ignore[attr-defined]
    breaks_both.exit_index = 0  # type: ignore[attr-defined]
    data = [(clean, y)]
    for order in ([breaks_exit0, breaks_both], [breaks_both, breaks_exit0]):
        for skip in (True, False):
            result = robust_accuracy(fixed, data, order, eps=1.0, skip_broken=skip, progress=False)
            assert result.clean_correct == (4, 4)
            assert result.robust_correct == (0, 0), (order, skip)


def test_nan_logits_are_refused() -> None:
    class NaNAtLabel(torch.nn.Module):
        def forward(self, images: Tensor) -> list[Tensor]:
            z = images.flatten(1)[:, :3].clone()
            z[:, 0] = float("nan")
            return [z, z]

    data = [(torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(ValueError, match=r"`model\(images\)` contain NaN"):
        robust_accuracy(NaNAtLabel(), data, ["pgd-average"], eps=0.1, progress=False)
    with pytest.raises(ValueError, match=r"`images` contain NaN"):
        robust_accuracy(
            TinyMultiExit(num_classes=5).eval(),
            [(torch.full((2, 1, 8, 8), float("nan")), torch.zeros(2, dtype=torch.long))],
            ["pgd-average"],
            eps=0.1,
            progress=False,
        )


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
    # The steps are checked as given, before the strong suite doubles them.
    with pytest.raises(TypeError, match="`steps` must be an int, got str '7'"):
        make_suite(model, "strong", eps=0.1, steps="7", num_exits=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`steps` must be >= 1, got -3"):
        make_suite(model, "strong", eps=0.1, steps=-3, num_exits=3)
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
