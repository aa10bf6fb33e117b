"""The functional attack core: multi_exit_pgd against the naive references, and its pieces
(step, projection, random start, rounding, selection) against closed forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neokd_losses.attacks import _pgd_core as core
from neokd_losses.attacks.pgd import MultiExitPGD
from neokd_losses.functional import multi_exit_pgd
from tests.attacks.test_pgd import (
    _data64,
    _model64,
    average_loss,
    naive_max_average,
    naive_pgd_one_sample,
    single_loss,
)
from tests.helpers import TinyMLPExits

EPS, ALPHA = 0.1, 0.03


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("mode", ["single", "average", "max-average"])
def test_functional_matches_naive_reference(mode, norm):
    model, (x, y) = _model64(), _data64()
    eps, alpha = (EPS, ALPHA) if norm == "Linf" else (0.5, 0.2)
    kwargs = {"exit_index": 2} if mode == "single" else {}
    adv = multi_exit_pgd(
        model,
        x,
        y,
        eps=eps,
        alpha=alpha,
        steps=4,
        mode=mode,
        norm=norm,
        random_start=False,
        **kwargs,
    )
    if mode == "max-average":
        expected, _, _ = naive_max_average(model, x, y, eps, alpha, 4, norm)
    else:
        loss = single_loss(2) if mode == "single" else average_loss([1.0, 1.0, 1.0])
        expected = torch.stack(
            [naive_pgd_one_sample(model, x[j], y[j], loss, eps, alpha, 4, norm) for j in range(8)]
        )
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-8)


@pytest.mark.parametrize("mode", ["single", "average", "max-average"])
def test_targeted_functional_matches_naive_reference(mode):
    model, (x, y) = _model64(), _data64()
    kwargs = {"exit_index": 0} if mode == "single" else {}
    adv = multi_exit_pgd(
        model,
        x,
        y,
        eps=EPS,
        alpha=ALPHA,
        steps=3,
        mode=mode,
        random_start=False,
        targeted=True,
        **kwargs,
    )
    if mode == "max-average":
        expected, _, _ = naive_max_average(model, x, y, EPS, ALPHA, 3, "Linf", sign=-1.0)
    else:
        loss = single_loss(0) if mode == "single" else average_loss([1.0, 1.0, 1.0])
        expected = torch.stack(
            [
                naive_pgd_one_sample(model, x[j], y[j], loss, EPS, ALPHA, 3, "Linf", sign=-1.0)
                for j in range(8)
            ]
        )
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-8)


def test_transform_is_applied_before_the_model():
    model, (x, y) = _model64(), _data64()
    shift = 0.25

    class Shifted(nn.Module):  # the model with the transform built in
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, v):
            return self.inner(v - shift)

    kwargs = dict(eps=EPS, alpha=ALPHA, steps=3, generator=None, random_start=False)
    torch.testing.assert_close(
        multi_exit_pgd(model, x, y, transform=lambda v: v - shift, **kwargs),
        multi_exit_pgd(Shifted(), x, y, **kwargs),
        rtol=0,
        atol=0,
    )


def test_functional_leaves_the_model_mode_alone():
    model = TinyMLPExits(in_features=16, num_classes=5).train()
    multi_exit_pgd(model, torch.rand(2, 16), torch.zeros(2, dtype=torch.long), steps=1)
    assert model.training and all(m.training for m in model.modules())


def test_functional_validates_its_arguments():
    model, (x, y) = _model64(), _data64()
    with pytest.raises(ValueError, match=r"`eps` must be >= 0, got -1"):
        multi_exit_pgd(model, x, y, eps=-1)
    with pytest.raises(TypeError, match=r"`targeted` must be a bool, got int"):
        multi_exit_pgd(model, x, y, targeted=1)
    with pytest.raises(TypeError, match=r"`model` must be an nn.Module .* got function"):
        multi_exit_pgd(lambda v: [v], x, y)
    with pytest.raises(TypeError, match=r"`labels` must be a Tensor of class indices"):
        multi_exit_pgd(model, x, [0] * 8)
    with pytest.warns(UserWarning, match=r"forgotten `/ 255`"):
        multi_exit_pgd(model, x, y, eps=4, steps=0)


def test_adapter_runs_the_core_bit_for_bit():
    model, (x, y) = _model64(), _data64()
    for kwargs in ({"mode": "average"}, {"mode": "max-average", "max_batch": 2}):
        ours = MultiExitPGD(model, steps=3, generator=torch.Generator().manual_seed(4), **kwargs)(
            x, y
        )
        theirs = multi_exit_pgd(
            model, x, y, steps=3, generator=torch.Generator().manual_seed(4), **kwargs
        )
        assert torch.equal(ours, theirs)


# ---------------------------------------------------------------- the pieces


def test_linf_step_and_projection_closed_form():
    x0 = torch.tensor([[0.5, 0.5, 0.98, 0.02]])
    x = torch.tensor([[0.55, 0.45, 0.98, 0.02]])
    grad = torch.tensor([[1.0, -1.0, 2.0, -3.0]])
    out = core.pgd_step(x, grad, x0, eps=0.1, alpha=0.08, norm="Linf")
    # 0.55 + 0.08 -> clamped to 0.5 + 0.1; 0.45 - 0.08 -> 0.4; the last two clip to [0, 1].
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.4, 1.0, 0.0]]))


def test_l2_step_and_projection_closed_form():
    x0 = torch.full((1, 2), 0.5, dtype=torch.float64)
    grad = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    small = core.pgd_step(x0, grad, x0, eps=1.0, alpha=0.1, norm="L2")
    torch.testing.assert_close(small, x0 + 0.1 * torch.tensor([[0.6, 0.8]], dtype=torch.float64))
    big = core.pgd_step(x0, grad, x0, eps=0.05, alpha=0.1, norm="L2")  # projected to ε
    torch.testing.assert_close(big, x0 + 0.05 * torch.tensor([[0.6, 0.8]], dtype=torch.float64))


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_random_start_in_ball_and_reproducible(norm):
    x = torch.rand(5, 7)
    start = core.random_start(x, 3, eps=0.2, norm=norm, generator=torch.Generator().manual_seed(1))
    again = core.random_start(x, 3, eps=0.2, norm=norm, generator=torch.Generator().manual_seed(1))
    delta = start - x.repeat(3, 1)
    size = delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)
    assert torch.equal(start, again) and (size <= 0.2 + 1e-6).all() and (size > 0).all()
    assert torch.equal(core.random_start(x, 2, eps=0.2, norm=norm, enabled=False), x.repeat(2, 1))


def test_round_toward_never_moves_away_from_the_origin():
    origin = torch.rand(1000, dtype=torch.float64).to(torch.bfloat16).to(torch.float32)
    value = origin + (torch.rand(1000) - 0.5) * 0.01
    rounded = core.round_toward(value, origin, torch.bfloat16).float()
    assert ((rounded - origin).abs() <= (value - origin).abs()).all()
    assert (rounded - value).abs().max() <= 2**-7  # within one bfloat16 unit near [0, 1]


def test_keep_best_first_argmax_and_strictly_better_replacement():
    cands = torch.arange(6.0).view(3, 2, 1)  # C = 3 candidates, B = 2
    adv, score = core.keep_best(None, cands, torch.tensor([[1.0, 2.0], [3.0, 2.0], [3.0, 0.0]]))
    assert adv.flatten().tolist() == [2.0, 1.0] and score.tolist() == [3.0, 2.0]
    adv2, score2 = core.keep_best((adv, score), cands[:1] + 10, torch.tensor([[3.0, 2.5]]))
    assert adv2.flatten().tolist() == [2.0, 11.0] and score2.tolist() == [3.0, 2.5]


def test_average_loss_closed_form():
    z = [torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]])]
    got = core.average_loss(z, torch.tensor([0]), torch.tensor([0.25, 0.75]))
    expected = 0.25 * torch.log(torch.tensor(2.0)) + 0.75 * torch.log1p(
        torch.exp(torch.tensor(-2.0))
    )
    torch.testing.assert_close(got, expected.view(1))
