"""The slow-down attack: its objectives against naive formulas, and that it raises the
compute of a small trained early-exit model at several budgets."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from neokd_losses.attacks import SlowdownAttack, deployed_decision
from neokd_losses.evaluation import exit_proportions, fit_thresholds
from tests.attacks.test_policy import trained_digits
from tests.helpers import TinyMultiExit


def _naive_kl_to_uniform(logits: Tensor) -> Tensor:
    """Σ_k Σ_c p_kc log(p_kc K), one sample at a time: (E, N, K) -> (N,)."""
    out = []
    for n in range(logits.shape[1]):
        total = 0.0
        for k in range(logits.shape[0]):
            p = logits[k, n].softmax(-1).tolist()
            total += sum(v * math.log(v * len(p)) for v in p if v > 0)
        out.append(total)
    return torch.tensor(out, dtype=logits.dtype)


def test_objectives_against_naive_formulas() -> None:
    model = TinyMultiExit(num_classes=4)
    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    uniform = SlowdownAttack(model, objective="uniform")
    torch.testing.assert_close(uniform.slowdown_objective(z), -_naive_kl_to_uniform(z))
    t = [0.5, 0.9, -math.inf]
    hinge = SlowdownAttack(model, t, objective="hinge", margin=0.1)
    expected = []
    for n in range(5):
        total = 0.0
        for k in range(2):
            total += max(0.0, float(z[k, n].softmax(-1).max()) - t[k] + 0.1)
        expected.append(-total)
    torch.testing.assert_close(
        hinge.slowdown_objective(z), torch.tensor(expected, dtype=torch.float64)
    )


def test_bad_input() -> None:
    model = TinyMultiExit(num_classes=4)
    with pytest.raises(ValueError, match="pass `thresholds`"):
        SlowdownAttack(model, objective="hinge")
    with pytest.raises(ValueError, match="`objective`"):
        SlowdownAttack(model, objective="entropy")  # type: ignore[arg-type]
    atk = SlowdownAttack(model, [0.5, 0.0], objective="hinge", steps=1)
    with pytest.raises(ValueError, match="it has 3 exits"):
        atk(torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("objective", ["uniform", "hinge"])
def test_raises_the_cost_of_a_trained_model(objective: str) -> None:
    model, xv, _, xt, yt = trained_digits()
    xt, yt = xt[:100], yt[:100]
    with torch.no_grad():
        val = torch.stack(model(xv))
        clean = torch.stack(model(xt))
    costs = torch.tensor([1.0, 2.0, 3.0])
    for p in (10, 20, 30):
        t = fit_thresholds(val, exit_proportions(p, 3)).tolist()
        atk = SlowdownAttack(
            model,
            t,
            objective=objective,
            eps=0.1,
            alpha=0.025,
            steps=10,  # type: ignore[arg-type]
            generator=torch.Generator().manual_seed(0),
        )
        adv = atk(xt, yt)
        assert float((adv - xt).abs().max()) <= 0.1 + 1e-6
        with torch.no_grad():
            attacked = torch.stack(model(adv))
        exit_clean, _ = deployed_decision(clean, t)
        exit_adv, _ = deployed_decision(attacked, t)
        # The clean point is a candidate: no sample leaves earlier than it did.
        assert bool((exit_adv >= exit_clean).all())
        factor = float(costs[exit_adv].mean() / costs[exit_clean].mean())
        last_clean = float((exit_clean == 2).float().mean())
        last_adv = float((exit_adv == 2).float().mean())
        assert factor > 1.2, (p, factor)
        assert last_adv > last_clean
