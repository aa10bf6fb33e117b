"""The controlled baseline: NEO-KD with alpha = beta = 0 is Triple Wins at weights 1 and 1.

The NEO-KD paper describes its "Adv. w/o distill" baseline as the sum of the clean and
adversarial cross-entropies of all exits, the two terms NEO-KD itself has at weight 1.
``TripleWinsLoss()`` (defaults 1 and 1) and ``NEOKDLoss(alpha=0, beta=0)`` must therefore
be the same loss, value for value and step for step.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neokd_losses import NEOKDLoss, TripleWinsLoss
from neokd_losses.functional import neokd_loss, triple_wins_loss
from tests.helpers import TinyMLPExits, random_exits


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("num_exits", [1, 3, 5])
@pytest.mark.parametrize("exit_weights", [None, [1.0, 1.0, 1.0, 1.5, 1.5]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_neokd_without_distillation_equals_triple_wins_exactly(
    reduction: str, num_exits: int, exit_weights: list[float] | None, dtype: torch.dtype
) -> None:
    adv = random_exits(num_exits, 6, 10, dtype=dtype)
    clean = random_exits(num_exits, 6, 10, dtype=dtype)
    targets = torch.randint(0, 10, (6,))
    # NEO-KD's γ weigh only its distillation terms, so with α = β = 0 they change nothing:
    # the controlled baseline is TripleWinsLoss() without exit weights.
    gamma = None if exit_weights is None else exit_weights[:num_exits]
    neokd = NEOKDLoss(alpha=0.0, beta=0.0, exit_weights=gamma, reduction=reduction)
    baseline = TripleWinsLoss(reduction=reduction)
    expected = baseline(adv, clean, targets)
    assert torch.equal(neokd(adv, clean, targets), expected)
    assert torch.equal(
        neokd_loss(adv, clean, targets, alpha=0, beta=0, reduction=reduction),  # type: ignore[arg-type]
        triple_wins_loss(adv, clean, targets, reduction=reduction),  # type: ignore[arg-type]
    )
    # And both are the paper's sum over exits of clean + adversarial cross-entropy.
    naive = torch.stack(
        [
            F.cross_entropy(c, targets, reduction="none")
            + F.cross_entropy(a, targets, reduction="none")
            for a, c in zip(adv, clean, strict=True)
        ]
    )
    reduced = {"none": naive, "sum": naive.sum(), "mean": naive.sum(0).mean()}[reduction]
    torch.testing.assert_close(expected, reduced)


def test_triple_wins_half_weights_are_half_the_controlled_baseline() -> None:
    adv, clean = random_exits(3, 4, 7), random_exits(3, 4, 7)
    targets = torch.randint(0, 7, (4,))
    half = TripleWinsLoss(clean_weight=0.5, adv_weight=0.5)(adv, clean, targets)
    torch.testing.assert_close(half, 0.5 * TripleWinsLoss()(adv, clean, targets))


def _fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """One signed-gradient step on the summed per-exit cross-entropy, detached."""
    x = x.clone().requires_grad_(True)
    loss = sum(F.cross_entropy(z, y) for z in model(x))
    (grad,) = torch.autograd.grad(loss, x)
    return (x + eps * grad.sign()).detach()


def _train(criterion: nn.Module, steps: int = 4) -> list[Tensor]:
    torch.manual_seed(0)
    model = TinyMLPExits(in_features=8, num_classes=5, num_exits=3, width=12)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 8, generator=data)
        y = torch.randint(0, 5, (16,), generator=data)
        x_adv = _fgsm(model, x, y, eps=0.1)
        loss = criterion(model(x_adv), model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def test_training_steps_give_the_same_weights() -> None:
    baseline = _train(TripleWinsLoss())
    neokd = _train(NEOKDLoss(alpha=0.0, beta=0.0, exit_weights=[1.0, 1.0, 1.5]))
    for got, expected in zip(neokd, baseline, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # The half-weighted Triple Wins baseline takes smaller steps: different weights.
    half = _train(TripleWinsLoss(clean_weight=0.5, adv_weight=0.5))
    assert any(not torch.allclose(h, b) for h, b in zip(half, baseline, strict=True))
