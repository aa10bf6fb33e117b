"""Budgeted prediction against a naive loop transcription of docs/paper.md#budgeted-prediction."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest
import torch

from neokd_losses.evaluation.budgeted import (
    BudgetCurve,
    budget_curve,
    budgeted_accuracy,
    budgeted_evaluation,
    collect_logits,
    exit_assignment,
    exit_proportions,
    fit_thresholds,
)
from tests.helpers import TinyMLPExits

# ---------------------------------------------------------------- naive reference (section 6)


def naive_confidence(logits: torch.Tensor) -> tuple[list[list[float]], list[list[int]]]:
    conf, pred = logits.softmax(-1).max(-1)
    return conf.tolist(), pred.tolist()


def exact(value: float | Fraction) -> Fraction:
    """A proportion as an exact fraction: 0.3 is three tenths, not its binary rounding."""
    return value if isinstance(value, Fraction) else Fraction(value).limit_denominator(10**6)


def naive_fit_thresholds(logits: torch.Tensor, proportions) -> list[float]:
    """Walk the validation samples in descending confidence, one sample at a time.

    The sample counts ⌊N · q_k⌋ are computed in exact rational arithmetic.
    """
    num_exits, n, _ = logits.shape
    conf, _ = naive_confidence(logits)
    fractions = [exact(p) for p in proportions]
    total = sum(fractions)
    q = [p / total for p in fractions]
    thresholds = [math.inf] * num_exits
    left = [False] * n
    for k in range(num_exits - 1):
        wanted = math.floor(n * q[k])
        order = sorted(range(n), key=lambda i: -conf[k][i])
        count = 0
        for i in order:
            if left[i]:
                continue
            count += 1
            if count == wanted:
                thresholds[k] = conf[k][i]
                break
        for i in range(n):
            if conf[k][i] >= thresholds[k]:
                left[i] = True
    thresholds[-1] = -math.inf
    return thresholds


def naive_budgeted(logits, targets, thresholds, costs) -> tuple[float, float, list[int]]:
    num_exits, n, _ = logits.shape
    conf, pred = naive_confidence(logits)
    correct, cost, exits = 0, 0.0, []
    for i in range(n):
        for k in range(num_exits):
            if k == num_exits - 1 or conf[k][i] >= thresholds[k]:
                correct += int(pred[k][i] == int(targets[i]))
                cost += costs[k]
                exits.append(k)
                break
    return correct / n, cost / n, exits


def naive_proportions(p: float, num_exits: int, center: float = 20.0) -> list[Fraction]:
    """q_k = (p/c)^k / Σ_j (p/c)^j, exactly."""
    raw = [(Fraction(p) / Fraction(center)) ** k for k in range(1, num_exits + 1)]
    return [r / sum(raw) for r in raw]


def floats(values) -> list[float]:
    return [float(v) for v in values]


def random_logits(num_exits: int, n: int, k: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Later exits are sharper on average, as in a trained multi-exit network.
    scale = torch.linspace(1.0, 3.0, num_exits, dtype=dtype)[:, None, None]
    return scale * torch.randn(num_exits, n, k, generator=g, dtype=dtype)


# ---------------------------------------------------------------- exit_proportions


@pytest.mark.parametrize("p", [1, 7, 20, 33, 39])
@pytest.mark.parametrize("num_exits", [1, 3, 7])
def test_exit_proportions_closed_form(p: int, num_exits: int) -> None:
    q = exit_proportions(p, num_exits)
    assert q.dtype == torch.float64
    torch.testing.assert_close(
        q, torch.tensor(floats(naive_proportions(p, num_exits)), dtype=torch.float64)
    )


def test_exit_proportions_center_is_uniform() -> None:
    torch.testing.assert_close(exit_proportions(20, 5), torch.full((5,), 0.2, dtype=torch.float64))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"budget_index": 0, "num_exits": 3}, "budget_index"),
        ({"budget_index": float("nan"), "num_exits": 3}, "budget_index"),
        ({"budget_index": 3, "num_exits": 0}, "num_exits"),
        ({"budget_index": 3, "num_exits": 3, "center": -1.0}, "center"),
    ],
)
def test_exit_proportions_errors(kwargs, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        exit_proportions(**kwargs)


# ---------------------------------------------------------------- fit_thresholds


@pytest.mark.parametrize("p", [1, 5, 12, 20, 28, 39])
@pytest.mark.parametrize("num_exits", [2, 3, 5])
def test_fit_thresholds_matches_naive(p: int, num_exits: int, device: torch.device) -> None:
    logits = random_logits(num_exits, 57, 6, seed=p + 100 * num_exits)
    q = naive_proportions(p, num_exits)
    expected = naive_fit_thresholds(logits, q)
    got = fit_thresholds(logits.to(device), floats(q))
    assert got.shape == (num_exits,)
    assert got.device.type == device.type
    assert got.cpu().tolist() == expected


def distinct_confidences(num_exits: int, n: int, seed: int) -> torch.Tensor:
    """Logits (E, n, 2) whose confidences at each exit are n distinct values, shuffled."""
    g = torch.Generator().manual_seed(seed)
    margins = torch.stack([torch.randperm(n, generator=g) for _ in range(num_exits)]).double()
    logits = torch.zeros(num_exits, n, 2, dtype=torch.float64)
    logits[..., 0] = 0.05 * margins  # confidence = sigmoid(margin), strictly increasing
    return logits


@pytest.mark.parametrize("num_exits", [2, 3, 5, 7])
@pytest.mark.parametrize("n", [18, 60, 101])
def test_validation_exit_counts_are_the_closed_form(num_exits: int, n: int) -> None:
    # Without ties, fitting on a set and assigning that same set sends exactly
    # n_k = ⌊N · q_k⌋ samples (exact arithmetic) to exit k < E when that many remain
    # (none otherwise: T_k = +inf), and the rest to the last exit.
    logits = distinct_confidences(num_exits, n, seed=n + num_exits)
    for p in range(1, 40):
        q = naive_proportions(p, num_exits)
        thresholds = fit_thresholds(logits, exit_proportions(p, num_exits))
        counts = torch.bincount(exit_assignment(logits, thresholds), minlength=num_exits)
        expected, remaining = [], n
        for k in range(num_exits - 1):
            wanted = math.floor(n * q[k])
            expected.append(wanted if 0 < wanted <= remaining else 0)
            remaining -= expected[-1]
        expected.append(remaining)
        assert counts.tolist() == expected, f"p = {p}: expected {expected}, got {counts.tolist()}"


def test_fit_thresholds_count_is_not_lost_to_rounding() -> None:
    # E = 2, p = 4: q = (5/6, 1/6) and N · q_1 = 15 exactly, but 18 * (5/6 as a float)
    # is 14.999999999999998; a plain floor would send 14 samples to exit 1.
    logits = distinct_confidences(2, 18, seed=0)
    q = exit_proportions(4, 2)
    assert 18 * float(q[0] / q.sum()) < 15
    exits = exit_assignment(logits, fit_thresholds(logits, q))
    assert exits.tolist().count(0) == 15


def test_fit_thresholds_float64(dtype: torch.dtype) -> None:
    logits = random_logits(3, 40, 4, seed=3, dtype=dtype)
    q = [0.3, 0.3, 0.4]
    got = fit_thresholds(logits, q)
    assert got.dtype == dtype
    assert got.tolist() == naive_fit_thresholds(logits, q)


def test_fit_thresholds_proportion_rounding_to_zero_gives_inf() -> None:
    logits = random_logits(3, 10, 4, seed=1)
    q = [0.05, 0.5, 0.45]  # floor(10 * 0.05) = 0 samples at exit 1
    got = fit_thresholds(logits, q).tolist()
    assert got[0] == math.inf
    assert got == naive_fit_thresholds(logits, q)
    # Nobody leaves at exit 1, so exit 2 takes floor(10 * 0.5) = 5 samples.
    acc, cost = budgeted_accuracy(logits, torch.zeros(10, dtype=torch.long), got, [1.0, 2.0, 3.0])
    _, _, exits = naive_budgeted(logits, torch.zeros(10), got, [1.0, 2.0, 3.0])
    assert exits.count(0) == 0 and exits.count(1) == 5
    assert cost == pytest.approx(sum([1.0, 2.0, 3.0][k] for k in exits) / 10)


def test_fit_thresholds_ties_in_confidence() -> None:
    # Exit 1: eight samples share the same confidence, two are less confident.
    exit1 = torch.tensor([[2.0, 0.0, 0.0]] * 8 + [[0.5, 0.0, 0.0], [0.2, 0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    logits = torch.stack([exit1, torch.randn(10, 3, generator=g), torch.randn(10, 3, generator=g)])
    q = [0.2, 0.5, 0.3]  # exit 1 wants 2 samples but the tie sends 8; exit 2 wants 5 of 2
    got = fit_thresholds(logits, q).tolist()
    expected = naive_fit_thresholds(logits, q)
    assert got == expected
    assert got[0] == pytest.approx(exit1[0].softmax(-1).max().item())
    assert got[1] == math.inf  # fewer samples remain than exit 2 asks for
    exits = exit_assignment(logits, got).tolist()
    assert exits == [0] * 8 + [2, 2]


def test_fit_thresholds_ties_among_remaining() -> None:
    # Exit 2 ties: the n-th remaining sample's value is shared, every tied sample leaves.
    g = torch.Generator().manual_seed(1)
    exit2 = torch.tensor([[1.0, 0.0]] * 6 + [[0.1, 0.0]] * 6)
    logits = torch.stack([torch.randn(12, 2, generator=g), exit2, torch.randn(12, 2, generator=g)])
    for q in ([0.25, 0.25, 0.5], [0.0, 0.5, 0.5], [0.1, 0.7, 0.2]):
        assert fit_thresholds(logits, q).tolist() == naive_fit_thresholds(logits, q)


def test_fit_thresholds_single_exit() -> None:
    logits = random_logits(1, 20, 5, seed=2)
    assert fit_thresholds(logits, [1.0]).tolist() == [-math.inf]
    targets = torch.randint(5, (20,))
    acc, cost = budgeted_accuracy(logits, targets, [-math.inf], [4.5])
    assert acc == pytest.approx((logits[0].argmax(-1) == targets).double().mean().item())
    assert cost == 4.5


def test_fit_thresholds_refuses_proportions_that_do_not_sum_to_one() -> None:
    # Formerly normalized silently: [2, 2, 4] was read as [0.25, 0.25, 0.5].
    logits = random_logits(3, 30, 4, seed=4)
    with pytest.raises(ValueError, match=r"must sum to 1 .* summing to 8\. Normalize"):
        fit_thresholds(logits, [2.0, 2.0, 4.0])
    with pytest.raises(ValueError, match="summing to 0.9"):
        fit_thresholds(logits, [0.3, 0.3, 0.3])
    assert fit_thresholds(logits, [0.25, 0.25, 0.5]).tolist() == naive_fit_thresholds(
        logits, [0.25, 0.25, 0.5]
    )


def test_fit_thresholds_accepts_sequence_of_exits() -> None:
    logits = random_logits(3, 30, 4, seed=5)
    q = torch.tensor([0.3, 0.3, 0.4])
    assert torch.equal(fit_thresholds(list(logits), q), fit_thresholds(logits, q))


def test_fit_thresholds_half_precision_is_upcast() -> None:
    logits = random_logits(2, 16, 3, seed=6).to(torch.bfloat16)
    got = fit_thresholds(logits, [0.5, 0.5])
    assert got.dtype == torch.float32
    assert got.tolist() == naive_fit_thresholds(logits.float(), [0.5, 0.5])


@pytest.mark.parametrize(
    ("logits", "proportions", "error", "match"),
    [
        (torch.zeros(3, 4, 5, dtype=torch.long), [0.3, 0.3, 0.4], TypeError, "floating-point"),
        (torch.zeros(4, 5), [0.5, 0.5], ValueError, r"\(E, N, K\)"),
        (torch.zeros(3, 4, 5), [0.5, 0.5], ValueError, r"one entry per exit, shape \(3,\)"),
        (torch.zeros(3, 4, 5), [0.5, -0.1, 0.6], ValueError, "non-negative"),
        (torch.zeros(3, 4, 5), [0.0, 0.0, 0.0], ValueError, "must sum to 1"),
        (torch.zeros(3, 4, 5), "abc", TypeError, "sequence of E numbers"),
        (torch.zeros(3, 4, 5), ["a", 1, 2], TypeError, r"`proportions\[0\]` must be a real number"),
    ],
)
def test_fit_thresholds_errors(logits, proportions, error, match: str) -> None:
    with pytest.raises(error, match=match):
        fit_thresholds(logits, proportions)


# ---------------------------------------------------------------- budgeted_accuracy


@pytest.mark.parametrize("p", [2, 10, 20, 30, 38])
def test_budgeted_accuracy_matches_naive(p: int, device: torch.device) -> None:
    val, test = random_logits(4, 80, 5, seed=p), random_logits(4, 70, 5, seed=1000 + p)
    targets = torch.randint(5, (70,), generator=torch.Generator().manual_seed(p))
    costs = [1.0, 2.5, 3.5, 7.0]
    thresholds = naive_fit_thresholds(val, naive_proportions(p, 4))
    acc, cost, exits = naive_budgeted(test, targets, thresholds, costs)
    got = budgeted_accuracy(test.to(device), targets.to(device), torch.tensor(thresholds), costs)
    assert got[0] == pytest.approx(acc, abs=1e-12)
    assert got[1] == pytest.approx(cost, rel=1e-12)
    assert exit_assignment(test.to(device), thresholds).cpu().tolist() == exits


def test_budgeted_accuracy_extreme_thresholds_are_single_exits() -> None:
    # T = -inf everywhere: every sample leaves at exit 1 and pays exit 1's cost; T = +inf
    # before the last exit: everyone pays the full cumulative cost of the last exit.
    logits = random_logits(3, 40, 4, seed=8)
    targets = torch.randint(4, (40,), generator=torch.Generator().manual_seed(8))
    costs = [2.0, 5.0, 11.0]
    per_exit = [float((z.argmax(-1) == targets).double().mean()) for z in logits]
    assert budgeted_accuracy(logits, targets, [-math.inf] * 3, costs) == (
        pytest.approx(per_exit[0]),
        2.0,
    )
    assert budgeted_accuracy(logits, targets, [math.inf] * 3, costs) == (
        pytest.approx(per_exit[2]),
        11.0,
    )


def test_budgeted_cost_is_the_cumulative_cost_of_the_exit_taken() -> None:
    # Costs measured by exit_costs on a model whose exit costs are known in closed form:
    # each of 3 stages is Linear(6, 6) + ReLU, each head Linear(6, 4), in order.
    class ThreeStages(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stages = torch.nn.ModuleList(
                torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.ReLU()) for _ in range(3)
            )
            self.heads = torch.nn.ModuleList(torch.nn.Linear(6, 4) for _ in range(3))

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            out = []
            for stage, head in zip(self.stages, self.heads):
                x = stage(x)
                out.append(head(x))
            return out

    from neokd_losses.evaluation.flops import exit_costs

    step = (6 * 6 + 6) + 6 + (6 * 4 + 4)  # one stage and its head
    costs = exit_costs(ThreeStages(), torch.rand(2, 6))
    assert costs == [step, 2 * step, 3 * step]
    logits = distinct_confidences(3, 30, seed=9)
    targets = torch.zeros(30, dtype=torch.long)
    t = fit_thresholds(logits, [0.5, 0.3, 0.2])  # 15, 9 and 6 samples
    _, mean_cost = budgeted_accuracy(logits, targets, t, costs)
    assert mean_cost == pytest.approx((15 * step + 9 * 2 * step + 6 * 3 * step) / 30)


def test_budgeted_accuracy_ignores_last_threshold() -> None:
    # The last exit takes every remaining sample whatever its threshold says.
    logits = random_logits(2, 30, 3, seed=7)
    targets = torch.randint(3, (30,))
    a = budgeted_accuracy(logits, targets, [math.inf, 2.0], [1.0, 2.0])
    assert a == (pytest.approx((logits[1].argmax(-1) == targets).double().mean().item()), 2.0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"test_targets": torch.tensor([0, 1, 7])}, ValueError, r"\[0, 4\)"),
        ({"test_targets": torch.tensor([0.0, 1.0, 2.0])}, TypeError, "integer class indices"),
        ({"thresholds": [0.5, 0.5]}, ValueError, r"shape \(3,\)"),
        ({"thresholds": [0.5, float("nan"), 0.0]}, ValueError, "NaN"),
        ({"thresholds": 0.5}, TypeError, "sequence of E numbers or a 1-D tensor"),
        ({"thresholds": ["high", 0.5, 0.0]}, TypeError, r"`thresholds\[0\]` must be a real number"),
        ({"costs": [1.0, 2.0]}, ValueError, r"one entry per exit"),
        ({"costs": [1.0, float("inf"), 3.0]}, ValueError, "finite"),
    ],
)
def test_budgeted_accuracy_errors(kwargs, error, match: str) -> None:
    args = {
        "test_logits": torch.zeros(3, 3, 4),
        "test_targets": torch.tensor([0, 1, 2]),
        "thresholds": [0.5, 0.5, -math.inf],
        "costs": [1.0, 2.0, 3.0],
    }
    args.update(kwargs)
    with pytest.raises(error, match=match):
        budgeted_accuracy(**args)


def test_budgeted_accuracy_empty_raises() -> None:
    with pytest.raises(ValueError, match="at least one sample"):
        budgeted_accuracy(
            torch.zeros(2, 0, 3), torch.zeros(0, dtype=torch.long), [0.5, 0.0], [1, 2]
        )


# ---------------------------------------------------------------- budget_curve


def test_budget_curve_matches_naive() -> None:
    val, test = random_logits(3, 64, 5, seed=11), random_logits(3, 48, 5, seed=12)
    g = torch.Generator().manual_seed(13)
    y_val, y_test = torch.randint(5, (64,), generator=g), torch.randint(5, (48,), generator=g)
    costs = [14.76, 21.77, 27.67]
    curve = budget_curve(val, y_val, test, y_test, costs)
    assert isinstance(curve, BudgetCurve)
    assert curve.budget_indices == tuple(range(1, 40))
    for idx, p in enumerate(range(1, 40)):
        t = naive_fit_thresholds(val, naive_proportions(p, 3))
        acc, cost, exits = naive_budgeted(test, y_test, t, costs)
        val_acc, _, _ = naive_budgeted(val, y_val, t, costs)
        assert curve.thresholds[idx] == tuple(t)
        assert curve.accuracies[idx] == pytest.approx(acc)
        assert curve.mean_costs[idx] == pytest.approx(cost)
        assert curve.val_accuracies[idx] == pytest.approx(val_acc)
        assert curve.exit_fractions[idx] == pytest.approx([exits.count(k) / 48 for k in range(3)])
    # Small budgets send samples to early exits, large ones to late exits.
    assert curve.mean_costs[0] < curve.mean_costs[-1]


def test_budget_curve_num_points_uses_center() -> None:
    val, test = random_logits(3, 40, 4, seed=21), random_logits(3, 40, 4, seed=22)
    y = torch.randint(4, (40,))
    curve = budget_curve(val, y, test, y, [1.0, 2.0, 3.0], num_points=9)
    # Center c = (9 + 1) / 2 = 5: the middle point gives every exit the same share.
    assert curve.thresholds[4] == tuple(naive_fit_thresholds(val, [1 / 3] * 3))


def test_budget_curve_to_dict_is_strict_json() -> None:
    val, test = random_logits(3, 20, 4, seed=31), random_logits(3, 20, 4, seed=32)
    y = torch.randint(4, (20,))
    curve = budget_curve(val, y, test, y, [1.0, 2.0, 3.0], num_points=5)
    data = json.loads(json.dumps(curve.to_dict(), allow_nan=False))
    assert data["accuracies"] == list(curve.accuracies)
    assert data["mean_costs"] == list(curve.mean_costs)
    assert data["exit_fractions"] == [list(f) for f in curve.exit_fractions]
    assert data["thresholds"] == [
        [None if math.isinf(t) else t for t in ts[:2]] for ts in curve.thresholds
    ]
    assert all(ts[2] == -math.inf for ts in curve.thresholds)
    # p = 1: q_1 = 0.95, 19 of 20 samples leave at exit 1, a finite threshold.
    assert data["thresholds"][0][0] is not None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"test_logits": torch.zeros(2, 5, 4)}, ValueError, "same number of exits"),
        ({"num_points": 0}, ValueError, "num_points"),
        ({"val_targets": torch.zeros(4, dtype=torch.long)}, ValueError, r"\(B,\) = \(5,\)"),
    ],
)
def test_budget_curve_errors(kwargs, error, match: str) -> None:
    args = {
        "val_logits": torch.zeros(3, 5, 4),
        "val_targets": torch.zeros(5, dtype=torch.long),
        "test_logits": torch.zeros(3, 5, 4),
        "test_targets": torch.zeros(5, dtype=torch.long),
        "costs": [1.0, 2.0, 3.0],
    }
    args.update(kwargs)
    with pytest.raises(error, match=match):
        budget_curve(**args)


# ---------------------------------------------------------------- loaders


def _batches(n: int, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n, 16, generator=g), torch.randint(5, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def test_collect_logits_concatenates_batches_and_applies_attack() -> None:
    model = TinyMLPExits()
    batches = _batches(23, 8, seed=0)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])

    def flip(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return 1.0 - images

    logits, targets = collect_logits(model, batches, progress=False)
    assert torch.equal(targets, y)
    with torch.no_grad():
        torch.testing.assert_close(logits, torch.stack(model(x)))
        adv_logits, _ = collect_logits(model, batches, flip, progress=False)
        torch.testing.assert_close(adv_logits, torch.stack(model(1.0 - x)))


def test_budgeted_evaluation_fits_on_validation_and_scores_test() -> None:
    model = TinyMLPExits()
    val, test = _batches(30, 7, seed=1), _batches(25, 9, seed=2)

    def shift(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (images + 0.1).clamp(0, 1)

    costs = [1.0, 2.0, 3.0]
    for attack_validation in (True, False):
        curve = budgeted_evaluation(
            model,
            val,
            test,
            costs,
            attack=shift,
            attack_validation=attack_validation,
            num_points=5,
            progress=False,
        )
        xv, yv = torch.cat([b[0] for b in val]), torch.cat([b[1] for b in val])
        xt, yt = torch.cat([b[0] for b in test]), torch.cat([b[1] for b in test])
        with torch.no_grad():
            lv = torch.stack(model(shift(xv, yv) if attack_validation else xv))
            lt = torch.stack(model(shift(xt, yt)))
        for idx, p in enumerate(range(1, 6)):
            t = naive_fit_thresholds(lv, naive_proportions(p, 3, center=3.0))
            acc, cost, _ = naive_budgeted(lt, yt, t, costs)
            assert curve.accuracies[idx] == pytest.approx(acc)
            assert curve.mean_costs[idx] == pytest.approx(cost)


def test_collect_logits_checks_labels_before_the_attack() -> None:
    calls = []

    def attack(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return images

    bad = [(torch.rand(3, 16), torch.tensor([0, 5, 1]))]  # K = 5 classes
    with pytest.raises(ValueError, match=r"\[0, 5\) .* got values in \[0, 5\]"):
        collect_logits(TinyMLPExits(), bad, attack, progress=False)
    assert calls == []
    with pytest.raises(TypeError, match="integer class indices"):
        collect_logits(TinyMLPExits(), [(torch.rand(3, 16), torch.zeros(3))], progress=False)


def test_collect_logits_skips_empty_batches() -> None:
    model = TinyMLPExits()
    batches = _batches(10, 4, seed=3)
    with_empty = [(torch.rand(0, 16), torch.zeros(0, dtype=torch.long)), *batches]
    a, ya = collect_logits(model, batches, progress=False)
    b, yb = collect_logits(model, with_empty, progress=False)
    assert torch.equal(a, b) and torch.equal(ya, yb)
    with pytest.raises(ValueError, match="no samples"):
        collect_logits(model, with_empty[:1], progress=False)


def test_collect_logits_errors() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        collect_logits(lambda x: [x], [], progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no samples"):
        collect_logits(TinyMLPExits(), [], progress=False)
    with pytest.raises(TypeError, match="callable"):
        collect_logits(TinyMLPExits(), _batches(4, 4, 0), attack=3, progress=False)  # type: ignore[arg-type]


# ---------------------------------------------------------------- ensemble (mean of softmax 1..k)


def naive_ensemble_confidence(logits: torch.Tensor) -> tuple[list[list[float]], list[list[int]]]:
    """Exit k: the mean of the softmax outputs of exits 1..k, one sample at a time."""
    num_exits, n, num_classes = logits.shape
    probs = logits.double().softmax(-1).tolist()
    conf = [[0.0] * n for _ in range(num_exits)]
    pred = [[0] * n for _ in range(num_exits)]
    for k in range(num_exits):
        for i in range(n):
            mean = [sum(probs[m][i][c] for m in range(k + 1)) / (k + 1) for c in range(num_classes)]
            conf[k][i] = max(mean)
            pred[k][i] = mean.index(max(mean))
    return conf, pred


def test_ensemble_hand_made_case() -> None:
    # Two exits, two classes. softmax([0, 0]) = (1/2, 1/2); softmax([ln 3, 0]) = (3/4, 1/4);
    # softmax([0, ln 2]) = (1/3, 2/3).
    ln2, ln3 = math.log(2.0), math.log(3.0)
    logits = torch.tensor(
        [
            [[ln3, 0.0], [0.0, 0.0], [0.0, 0.0]],  # exit 1: (3/4, 1/4), (1/2, 1/2), (1/2, 1/2)
            [[0.0, ln2], [0.0, ln2], [ln3, 0.0]],  # exit 2: (1/3, 2/3), (1/3, 2/3), (3/4, 1/4)
        ],
        dtype=torch.float64,
    )
    targets = torch.tensor([0, 0, 0])
    # Ensemble exit 2 = mean of exits 1 and 2: (13/24, 11/24), (5/12, 7/12), (5/8, 3/8).
    thresholds = [0.7, -math.inf]  # only sample 0 leaves at exit 1 (confidence 3/4)
    assert exit_assignment(logits, thresholds, ensemble=True).tolist() == [0, 1, 1]
    # Plain: sample 0 right at exit 1; sample 1 wrong at exit 2 (2/3 on class 1); sample 2
    # right at exit 2. Ensemble: samples 0 and 2 right, sample 1 wrong (7/12 on class 1).
    assert budgeted_accuracy(logits, targets, thresholds, [1.0, 3.0]) == (
        pytest.approx(2 / 3),
        pytest.approx(7 / 3),
    )
    targets = torch.tensor([0, 1, 1])
    # Sample 2 now has label 1: plain exit 2 says class 0 (3/4), ensemble class 0 (5/8):
    # both wrong; sample 1 right under both.
    assert budgeted_accuracy(logits, targets, thresholds, [1.0, 3.0], ensemble=True)[0] == (
        pytest.approx(2 / 3)
    )
    # A case where they differ: exit 1 favors class 0 mildly, exit 2 class 1 mildly.
    differ = torch.tensor(
        [[[ln3, 0.0]], [[0.0, ln2]]], dtype=torch.float64
    )  # mean: (13/24, 11/24) -> class 0; exit 2 alone -> class 1
    y0 = torch.tensor([0])
    everyone_late = [math.inf, -math.inf]
    assert budgeted_accuracy(differ, y0, everyone_late, [1.0, 2.0]) == (0.0, 2.0)
    assert budgeted_accuracy(differ, y0, everyone_late, [1.0, 2.0], ensemble=True) == (1.0, 2.0)
    # Thresholds on the ensemble confidence: fit with q = (1/3, 2/3) on N = 3 samples sends
    # one sample to exit 1, the most confident one (3/4 at exit 1, unchanged by ensembling).
    t = fit_thresholds(logits, [1 / 3, 2 / 3], ensemble=True)
    assert t[0].item() == pytest.approx(0.75) and t[1].item() == -math.inf
    # The log-probabilities collect_logits(ensemble=True) returns: softmax = the mean.
    model_logits = logits.clone()

    class Fixed(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            return [model_logits[0] + 0 * x, model_logits[1] + 0 * x]

    got, _ = collect_logits(Fixed(), [(torch.zeros(3, 2), targets)], ensemble=True, progress=False)
    expected = torch.tensor(
        [
            [[3 / 4, 1 / 4], [1 / 2, 1 / 2], [1 / 2, 1 / 2]],
            [[13 / 24, 11 / 24], [5 / 12, 7 / 12], [5 / 8, 3 / 8]],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(got.exp(), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("p", [3, 20, 35])
def test_ensemble_budget_curve_matches_naive(p: int) -> None:
    val, test = random_logits(3, 60, 4, seed=50 + p), random_logits(3, 50, 4, seed=70 + p)
    y_val = torch.randint(4, (60,), generator=torch.Generator().manual_seed(p))
    y_test = torch.randint(4, (50,), generator=torch.Generator().manual_seed(p + 1))
    costs = [1.0, 2.0, 4.0]
    num_points = 39
    q = naive_proportions(p, 3)
    # Naive thresholds on the ensemble confidence, as naive_fit_thresholds does.
    conf_val, _ = naive_ensemble_confidence(val)
    n = 60
    thresholds = [math.inf] * 3
    left = [False] * n
    for k in range(2):
        wanted = math.floor(n * q[k])
        order = [i for i in sorted(range(n), key=lambda i: -conf_val[k][i]) if not left[i]]
        if 0 < wanted <= len(order):
            thresholds[k] = conf_val[k][order[wanted - 1]]
        for i in range(n):
            left[i] = left[i] or conf_val[k][i] >= thresholds[k]
    thresholds[-1] = -math.inf
    conf, pred = naive_ensemble_confidence(test)
    correct = cost = 0.0
    for i in range(50):
        k = next(k for k in range(3) if k == 2 or conf[k][i] >= thresholds[k])
        correct += pred[k][i] == int(y_test[i])
        cost += costs[k]
    curve = budget_curve(
        val.double(), y_val, test.double(), y_test, costs, num_points=num_points, ensemble=True
    )
    assert curve.ensemble and curve.to_dict()["ensemble"] is True
    assert curve.accuracies[p - 1] == pytest.approx(correct / 50, abs=1e-12)
    assert curve.mean_costs[p - 1] == pytest.approx(cost / 50, rel=1e-12)
    plain = budget_curve(val, y_val, test, y_test, costs, num_points=num_points)
    assert not plain.ensemble


def test_ensemble_budgeted_evaluation_and_flag_checks() -> None:
    model = TinyMLPExits()
    batches = _batches(24, 8, seed=3)
    curve = budgeted_evaluation(
        model, batches, batches, [1.0, 2.0, 3.0], num_points=3, ensemble=True, progress=False
    )
    logits, targets = collect_logits(model, batches, progress=False)
    assert curve == budget_curve(
        logits, targets, logits, targets, [1.0, 2.0, 3.0], 3, ensemble=True
    )
    with pytest.raises(TypeError, match="ensemble"):
        budgeted_accuracy(logits, targets, [0.5, 0.5, -math.inf], [1, 2, 3], ensemble="yes")  # type: ignore[arg-type]


# ---------------------------------------------------------------- silent no-ops refused


def test_decreasing_costs_are_refused() -> None:
    logits = random_logits(3, 10, 4, seed=9)
    targets = torch.randint(4, (10,), generator=torch.Generator().manual_seed(9))
    with pytest.raises(ValueError, match=r"`costs` must be cumulative, so non-decreasing"):
        budgeted_accuracy(logits, targets, [0.5, 0.5, -math.inf], [3.0, 2.0, 5.0])
    with pytest.raises(ValueError, match=r"got \[1.0, 4.0, 2.0\]"):
        budget_curve(logits, targets, logits, targets, [1.0, 4.0, 2.0], num_points=3)
    # Equal costs (exits sharing all computation) are allowed.
    assert budgeted_accuracy(logits, targets, [-math.inf] * 3, [2.0, 2.0, 2.0])[1] == 2.0


def test_nan_logits_and_images_are_refused() -> None:
    logits = random_logits(2, 6, 3, seed=10)
    targets = torch.zeros(6, dtype=torch.long)
    logits[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"`test_logits` contain NaN \(1 of 36 values\)"):
        budgeted_accuracy(logits, targets, [0.5, -math.inf], [1.0, 2.0])
    with pytest.raises(ValueError, match="`val_logits` contain NaN"):
        budget_curve(logits, targets, logits.nan_to_num(), targets, [1.0, 2.0], num_points=2)
    model = TinyMLPExits()
    batches = _batches(8, 4, seed=11)
    images, labels = batches[1]
    images = images.clone()
    images[0].view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="`images` contain NaN"):
        collect_logits(model, [batches[0], (images, labels)], progress=False)
