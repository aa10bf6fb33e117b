"""examples/_methods.py: the controlled baseline, the 0.5/0.5 weighting and the LW method."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _config import ConfigError, LossConfig
from _methods import PAPER_NAMES, build_criterion, model_exit_classifiers
from _models import DigitsCNN, Normalized

from neokd_losses.losses.neokd import NEOKDLoss


def _logits(seed: int, exits: int = 3, batch: int = 6, classes: int = 10):
    g = torch.Generator().manual_seed(seed)
    adv = [torch.randn(batch, classes, generator=g, dtype=torch.float64) for _ in range(exits)]
    clean = [torch.randn(batch, classes, generator=g, dtype=torch.float64) for _ in range(exits)]
    return adv, clean, torch.randint(classes, (batch,), generator=g)


def _ce_sum(logits, targets) -> torch.Tensor:
    """Sum over exits of the batch-mean cross-entropy, one exit at a time."""
    return sum(
        (F.cross_entropy(z, targets) for z in logits), torch.tensor(0.0, dtype=torch.float64)
    )


def test_adv_is_the_controlled_baseline_and_adv_half_the_triple_wins_weighting() -> None:
    adv, clean, y = _logits(0)
    reference = _ce_sum(clean, y) + _ce_sum(adv, y)
    controlled, terms = build_criterion(LossConfig(method="adv"))(adv, clean, y)
    assert terms == {}
    torch.testing.assert_close(controlled, reference, rtol=1e-12, atol=1e-12)
    # ... which is NEO-KD's objective without its distillation terms.
    neokd0 = NEOKDLoss(alpha=0.0, beta=0.0)(adv, clean, y)
    torch.testing.assert_close(controlled, neokd0, rtol=1e-12, atol=1e-12)
    half, _ = build_criterion(LossConfig(method="adv-half"))(adv, clean, y)
    torch.testing.assert_close(half, 0.5 * reference, rtol=1e-12, atol=1e-12)
    assert PAPER_NAMES["adv-half"] == "Adv. w/o distill (0.5/0.5)"


def test_adv_half_weights_are_fixed() -> None:
    cfg = LossConfig(method="adv-half", adv={"clean_weight": 1.0})
    module = build_criterion(cfg).module
    assert (module.clean_weight, module.adv_weight) == (0.5, 0.5)


def test_lw_is_adversarial_ce_plus_squared_classifier_norms() -> None:
    torch.manual_seed(0)
    model = DigitsCNN().double()
    lam = 0.01
    criterion = build_criterion(LossConfig(method="lw", lw={"lambda_": lam}), model=model)
    own = [model.head1[-1], model.head2[-1], model.block3[-1]]
    assert all(a is b for a, b in zip(criterion.classifiers, own, strict=True))
    adv, clean, y = _logits(1)
    loss, terms = criterion(adv, clean, y)
    penalty = sum(float((layer.weight.detach() ** 2).sum()) for layer in own)
    expected = float(_ce_sum(adv, y)) + lam * penalty
    assert terms == {} and float(loss.detach()) == pytest.approx(expected, rel=1e-12)
    # The clean logits do not enter LW.
    assert float(criterion(adv, [2 * z for z in clean], y)[0].detach()) == float(loss.detach())
    # The penalty's gradient reaches the classifiers: d/dW (lam ||W||^2) = 2 lam W.
    loss.backward()
    torch.testing.assert_close(model.head1[-1].weight.grad, 2 * lam * model.head1[-1].weight)


def test_lw_classifiers_through_normalized_and_errors() -> None:
    model = Normalized(DigitsCNN(), [0.5], [0.5])
    assert model_exit_classifiers(model)[2] is model.model.block3[-1]
    criterion = build_criterion(LossConfig(method="lw"))  # config check, no model
    with pytest.raises(RuntimeError, match="model=model"):
        criterion(*_logits(2)[:2], _logits(2)[2])
    with pytest.raises(ConfigError, match="loss.method = 'lw'"):
        build_criterion(LossConfig(method="lw"), model=torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="unknown key `loss.lw.lam`"):
        build_criterion(LossConfig(method="lw", lw={"lam": 1.0}))


@pytest.mark.parametrize("method", ["adv-half", "lw"])
def test_new_methods_train_and_evaluate(tiny_config, method: str) -> None:
    import train

    outcome = train.run(tiny_config(loss__method=method), progress=False, quiet=True)
    results = outcome.results
    assert outcome.status == "finished" and results["method"] == method
    assert results["method_name"] == PAPER_NAMES[method]
    budgets = results["budget"]
    assert sorted(budgets) == sorted(
        f"{name}{suffix}"
        for name in ("clean", "max-average", "average")
        for suffix in ("", ", ensemble")
    )
    assert all(budgets[k]["ensemble"] == k.endswith("ensemble") for k in budgets)
    t = results["transferability"]
    assert t["count"] == "clean-correct" and "success rate" in t["definition"]
