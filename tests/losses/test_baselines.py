"""Tests of the baseline losses (Triple Wins, SKD, ARD) against naive per-sample loops."""

from __future__ import annotations

import math

import pytest
import torch

from neokd_losses.losses.baselines import (
    ARDLoss,
    SKDLoss,
    TripleWinsLoss,
    ard_loss,
    skd_loss,
    triple_wins_loss,
)
from tests.helpers import random_exits

# --- naive references: one exit and one sample at a time, plain Python floats ----------


def _softmax(z: list[float], t: float = 1.0) -> list[float]:
    top = max(v / t for v in z)
    e = [math.exp(v / t - top) for v in z]
    return [v / sum(e) for v in e]


def _log_softmax(z: list[float], t: float = 1.0) -> list[float]:
    top = max(v / t for v in z)
    lse = top + math.log(sum(math.exp(v / t - top) for v in z))
    return [v / t - lse for v in z]


def _ce(z: list[float], label: int) -> float:
    return -_log_softmax(z)[label]


def _kl(teacher: list[float], student: list[float], t: float) -> float:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T))."""
    q = _softmax(teacher, t)
    log_q = _log_softmax(teacher, t)
    log_p = _log_softmax(student, t)
    return t * t * sum(qk * (lq - lp) for qk, lq, lp in zip(q, log_q, log_p, strict=True) if qk > 0)


def ref_triple_wins(adv, clean, targets, wc=1.0, wa=1.0, gamma=None):
    num_exits, batch = len(adv), adv[0].shape[0]
    gamma = gamma or [1.0] * num_exits
    return [
        [
            gamma[i]
            * (
                wc * _ce(clean[i][j].tolist(), int(targets[j]))
                + wa * _ce(adv[i][j].tolist(), int(targets[j]))
            )
            for j in range(batch)
        ]
        for i in range(num_exits)
    ]


def ref_skd(adv, clean, targets, alpha=1.0, t=1.0, wc=1.0, wa=1.0, gamma=None):
    num_exits, batch = len(adv), adv[0].shape[0]
    gamma = gamma or [1.0] * num_exits
    out = []
    for i in range(num_exits):
        row = []
        for j in range(batch):
            y = int(targets[j])
            value = wc * _ce(clean[i][j].tolist(), y) + wa * _ce(adv[i][j].tolist(), y)
            if i < num_exits - 1:
                value += gamma[i] * alpha * _kl(adv[-1][j].tolist(), adv[i][j].tolist(), t)
            row.append(value)
        out.append(row)
    return out


def ref_ard(adv, clean, targets, alpha=0.5, t=1.0, gamma=None):
    num_exits, batch = len(adv), adv[0].shape[0]
    gamma = gamma or [1.0] * num_exits
    out = []
    for i in range(num_exits):
        row = []
        for j in range(batch):
            y = int(targets[j])
            if i < num_exits - 1:
                slot = _kl(clean[-1][j].tolist(), adv[i][j].tolist(), t)
            else:
                slot = _ce(adv[i][j].tolist(), y)
            row.append(gamma[i] * alpha * slot + (1 - alpha) * _ce(clean[i][j].tolist(), y))
        out.append(row)
    return out


def _inputs(num_exits=3, batch=5, classes=6, dtype=torch.float64, requires_grad=False):
    adv = random_exits(num_exits, batch, classes, dtype=dtype, requires_grad=requires_grad)
    clean = random_exits(num_exits, batch, classes, dtype=dtype, requires_grad=requires_grad)
    targets = torch.randint(0, classes, (batch,))
    return adv, clean, targets


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# --- agreement with the naive references --------------------------------------------------


@pytest.mark.parametrize("num_exits", [1, 2, 4])
@pytest.mark.parametrize(("wc", "wa"), [(1.0, 1.0), (0.5, 0.5), (1.0, 0.0), (0.2, 1.7)])
def test_triple_wins_matches_naive(num_exits: int, wc: float, wa: float) -> None:
    adv, clean, y = _inputs(num_exits)
    got = triple_wins_loss(adv, clean, y, clean_weight=wc, adv_weight=wa, reduction="none")
    torch.testing.assert_close(got, _t(ref_triple_wins(adv, clean, y, wc, wa)))


@pytest.mark.parametrize("num_exits", [1, 2, 4])
@pytest.mark.parametrize(("alpha", "temperature"), [(1.0, 1.0), (0.3, 4.0), (2.0, 0.5)])
def test_skd_matches_naive(num_exits: int, alpha: float, temperature: float) -> None:
    adv, clean, y = _inputs(num_exits)
    got = skd_loss(adv, clean, y, alpha=alpha, temperature=temperature, reduction="none")
    torch.testing.assert_close(got, _t(ref_skd(adv, clean, y, alpha, temperature)))


@pytest.mark.parametrize("num_exits", [1, 2, 4])
@pytest.mark.parametrize(("alpha", "temperature"), [(0.5, 1.0), (0.9, 4.0), (1.0, 2.0), (0.0, 3.0)])
def test_ard_matches_naive(num_exits: int, alpha: float, temperature: float) -> None:
    adv, clean, y = _inputs(num_exits)
    got = ard_loss(adv, clean, y, alpha=alpha, temperature=temperature, reduction="none")
    torch.testing.assert_close(got, _t(ref_ard(adv, clean, y, alpha, temperature)))


def test_exit_weights_follow_each_documented_rule() -> None:
    adv, clean, y = _inputs(3)
    gamma = [1.0, 0.5, 2.0]
    torch.testing.assert_close(
        triple_wins_loss(adv, clean, y, exit_weights=gamma, reduction="none"),
        _t(ref_triple_wins(adv, clean, y, gamma=gamma)),
    )
    torch.testing.assert_close(
        skd_loss(adv, clean, y, alpha=0.7, temperature=2.0, exit_weights=gamma, reduction="none"),
        _t(ref_skd(adv, clean, y, 0.7, 2.0, gamma=gamma)),
    )
    torch.testing.assert_close(
        ard_loss(adv, clean, y, alpha=0.8, temperature=3.0, exit_weights=gamma, reduction="none"),
        _t(ref_ard(adv, clean, y, 0.8, 3.0, gamma=gamma)),
    )


# --- special cases ---------------------------------------------------------------------------


def test_skd_alpha_zero_is_summed_cross_entropies() -> None:
    adv, clean, y = _inputs(3)
    got = skd_loss(adv, clean, y, alpha=0.0, reduction="none")
    torch.testing.assert_close(got, _t(ref_triple_wins(adv, clean, y)))


def test_skd_last_exit_has_no_distillation() -> None:
    adv, clean, y = _inputs(3)
    base = skd_loss(adv, clean, y, alpha=0.0, reduction="none")
    big = skd_loss(adv, clean, y, alpha=100.0, temperature=3.0, reduction="none")
    torch.testing.assert_close(big[-1], base[-1])
    assert bool((big[:-1] > base[:-1]).all())


def test_skd_perfect_match_adds_zero() -> None:
    # Every exit predicts what the last exit predicts on the adversarial input: KL = 0.
    adv = [random_exits(1, 5, 6, dtype=torch.float64)[0]] * 3
    clean, y = random_exits(3, 5, 6, dtype=torch.float64), torch.randint(0, 6, (5,))
    got = skd_loss(adv, clean, y, alpha=5.0, temperature=2.0, reduction="none")
    torch.testing.assert_close(got, skd_loss(adv, clean, y, alpha=0.0, reduction="none"))


def test_ard_alpha_zero_is_clean_cross_entropy() -> None:
    adv, clean, y = _inputs(3)
    got = ard_loss(adv, clean, y, alpha=0.0, reduction="none")
    expected = triple_wins_loss(adv, clean, y, clean_weight=1.0, adv_weight=0.0, reduction="none")
    torch.testing.assert_close(got, expected)


def test_ard_alpha_one_single_exit_is_adversarial_training() -> None:
    adv, clean, y = _inputs(1)
    got = ard_loss(adv, clean, y, alpha=1.0, reduction="none")
    expected = torch.nn.functional.cross_entropy(adv[0], y, reduction="none")
    torch.testing.assert_close(got[0], expected)


def test_ard_teacher_is_the_clean_last_exit() -> None:
    # Earlier exits equal to the last exit's clean logits on the adversarial input: KL = 0.
    clean = random_exits(3, 5, 6, dtype=torch.float64)
    adv = [clean[-1], clean[-1], random_exits(1, 5, 6, dtype=torch.float64)[0]]
    y = torch.randint(0, 6, (5,))
    got = ard_loss(adv, clean, y, alpha=0.6, temperature=3.0, reduction="none")
    ce_clean = torch.stack(
        [torch.nn.functional.cross_entropy(c, y, reduction="none") for c in clean]
    )
    torch.testing.assert_close(got[:2], 0.4 * ce_clean[:2])


@pytest.mark.parametrize("loss_fn", [triple_wins_loss, skd_loss, ard_loss])
def test_stable_at_extreme_logits(loss_fn) -> None:
    adv = [torch.tensor([[100.0, -100.0, 0.0], [-100.0, 100.0, 100.0]]) for _ in range(3)]
    clean = [torch.tensor([[-100.0, 100.0, 0.0], [100.0, -100.0, 0.0]]) for _ in range(3)]
    y = torch.tensor([0, 2])
    adv = [a.clone().requires_grad_(True) for a in adv]
    loss = loss_fn(adv, clean, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(a.grad).all() for a in adv)


# --- teachers, gradients, dtypes ---------------------------------------------------------------


def test_skd_teacher_is_detached_by_default() -> None:
    adv, clean, y = _inputs(3, requires_grad=True)
    skd_loss(adv, clean, y, alpha=1.0, clean_weight=0.0, adv_weight=0.0).backward()
    assert adv[-1].grad is None or bool((adv[-1].grad == 0).all())
    assert adv[0].grad is not None and bool(adv[0].grad.abs().sum() > 0)
    assert all(c.grad is None or bool((c.grad == 0).all()) for c in clean)


def test_skd_teacher_gets_gradient_when_not_detached() -> None:
    adv, clean, y = _inputs(3, requires_grad=True)
    skd_loss(adv, clean, y, clean_weight=0.0, adv_weight=0.0, detach_teacher=False).backward()
    assert adv[-1].grad is not None and bool(adv[-1].grad.abs().sum() > 0)


def test_ard_teacher_is_detached_by_default() -> None:
    adv, clean, y = _inputs(3, requires_grad=True)
    ard_loss(adv, clean, y, alpha=1.0).backward()
    # With α = 1 the clean side only enters as the teacher, so it gets no gradient.
    assert all(c.grad is None or bool((c.grad == 0).all()) for c in clean)
    ard_loss(adv, clean, y, alpha=1.0, detach_teacher=False).backward()
    assert clean[-1].grad is not None and bool(clean[-1].grad.abs().sum() > 0)


@pytest.mark.parametrize(
    ("loss_fn", "kwargs", "constant"),
    [
        (triple_wins_loss, {"exit_weights": [1.0, 2.0, 0.5]}, None),
        # A detached teacher is a constant for autograd: hold it fixed in the check too.
        (skd_loss, {"alpha": 0.7, "temperature": 2.0, "exit_weights": [1.0, 2.0, 0.5]}, 2),
        (skd_loss, {"detach_teacher": False}, None),
        (ard_loss, {"alpha": 0.4, "temperature": 3.0, "exit_weights": [1.0, 2.0, 0.5]}, 5),
        (ard_loss, {"detach_teacher": False}, None),
    ],
)
def test_gradcheck(loss_fn, kwargs, constant) -> None:
    adv, clean, y = _inputs(3, batch=3, classes=4, requires_grad=True)
    tensors = [*adv, *clean]
    free = [k for k in range(6) if k != constant]

    def fn(*variables):
        values = list(tensors)
        for k, v in zip(free, variables, strict=True):
            values[k] = v
        return loss_fn(values[:3], values[3:], y, **kwargs)

    assert torch.autograd.gradcheck(fn, tuple(tensors[k] for k in free), fast_mode=True)


@pytest.mark.parametrize("loss_fn", [triple_wins_loss, skd_loss, ard_loss])
@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_compute_in_float32(loss_fn, low) -> None:
    adv, clean, y = _inputs(3, dtype=torch.float32)
    expected = loss_fn(adv, clean, y)
    got = loss_fn([a.to(low) for a in adv], [c.to(low) for c in clean], y)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=0.1, rtol=0.05)


def test_device_and_dtype(device, dtype) -> None:
    adv = [a.to(device) for a in random_exits(3, 4, 5, dtype=dtype)]
    clean = [c.to(device) for c in random_exits(3, 4, 5, dtype=dtype)]
    y = torch.randint(0, 5, (4,), device=device)
    for module in (
        TripleWinsLoss(exit_weights=[1, 1, 2]),
        SKDLoss(exit_weights=[1, 1, 2]),
        ARDLoss(exit_weights=[1, 1, 2]),
    ):
        out = module.to(device)(adv, clean, y)
        assert out.device.type == device.type
        assert out.dtype == dtype


# --- reductions, module == function --------------------------------------------------------------


@pytest.mark.parametrize("loss_fn", [triple_wins_loss, skd_loss, ard_loss])
def test_reductions(loss_fn) -> None:
    adv, clean, y = _inputs(3, batch=5)
    none = loss_fn(adv, clean, y, reduction="none")
    assert none.shape == (3, 5)
    torch.testing.assert_close(loss_fn(adv, clean, y, reduction="sum"), none.sum())
    torch.testing.assert_close(loss_fn(adv, clean, y), none.sum(0).mean())


@pytest.mark.parametrize(
    ("module", "loss_fn", "kwargs"),
    [
        (TripleWinsLoss, triple_wins_loss, {"clean_weight": 0.3, "adv_weight": 0.9}),
        (
            SKDLoss,
            skd_loss,
            {"alpha": 0.7, "temperature": 2.0, "clean_weight": 0.5, "adv_weight": 2.0},
        ),
        (ARDLoss, ard_loss, {"alpha": 0.8, "temperature": 3.0}),
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_module_equals_function(module, loss_fn, kwargs, reduction) -> None:
    adv, clean, y = _inputs(3)
    gamma = [1.0, 1.5, 0.5]
    criterion = module(**kwargs, exit_weights=gamma, reduction=reduction)
    assert isinstance(criterion.exit_weights, torch.Tensor)
    assert "exit_weights" in dict(criterion.named_buffers())
    expected = loss_fn(adv, clean, y, **kwargs, exit_weights=gamma, reduction=reduction)
    torch.testing.assert_close(criterion(adv, clean, y), expected)
    assert repr(criterion).startswith(module.__name__)


# --- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_fn", [triple_wins_loss, skd_loss, ard_loss])
def test_input_errors(loss_fn) -> None:
    adv, clean, y = _inputs(3, batch=4, classes=5)
    with pytest.raises(TypeError, match="list or tuple"):
        loss_fn(adv[0], clean, y)
    with pytest.raises(ValueError, match="same number of exits"):
        loss_fn(adv[:2], clean, y)
    with pytest.raises(ValueError, match="same shape"):
        loss_fn(adv, [c[:, :4] for c in clean], y)
    with pytest.raises(TypeError, match="integer class indices"):
        loss_fn(adv, clean, y.float())
    with pytest.raises(ValueError, match=r"must lie in \[0, 5\)"):
        loss_fn(adv, clean, torch.tensor([0, 1, 2, 5]))
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        loss_fn(adv, clean, y[:3])
    with pytest.raises(ValueError, match="reduction"):
        loss_fn(adv, clean, y, reduction="avg")
    with pytest.raises(ValueError, match="one weight per exit: expected 3, got 2"):
        loss_fn(adv, clean, y, exit_weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="non-negative"):
        loss_fn(adv, clean, y, exit_weights=[1.0, -1.0, 1.0])


@pytest.mark.parametrize(
    ("loss_fn", "kwargs", "error", "match"),
    [
        (
            triple_wins_loss,
            {"clean_weight": -0.1},
            ValueError,
            "`clean_weight` must be a finite number >= 0, got -0.1",
        ),
        (
            triple_wins_loss,
            {"adv_weight": float("inf")},
            ValueError,
            "`adv_weight` must be a finite number",
        ),
        (
            triple_wins_loss,
            {"adv_weight": "half"},
            TypeError,
            "`adv_weight` must be a real number, got str",
        ),
        (skd_loss, {"alpha": -1.0}, ValueError, "`alpha` must be a finite number >= 0"),
        (skd_loss, {"alpha": True}, TypeError, "`alpha` must be a real number, got bool"),
        (skd_loss, {"temperature": 0.0}, ValueError, "`temperature` must be a finite number > 0"),
        (skd_loss, {"clean_weight": float("nan")}, ValueError, "`clean_weight` must be"),
        (ard_loss, {"alpha": 1.5}, ValueError, r"`alpha` must be a number in \[0, 1\], got 1.5"),
        (ard_loss, {"alpha": -0.5}, ValueError, r"`alpha` must be a number in \[0, 1\]"),
        (ard_loss, {"temperature": -2.0}, ValueError, "`temperature` must be a finite number > 0"),
    ],
)
def test_hyper_parameter_errors(loss_fn, kwargs, error, match) -> None:
    adv, clean, y = _inputs(3)
    with pytest.raises(error, match=match):
        loss_fn(adv, clean, y, **kwargs)


@pytest.mark.parametrize(
    ("module", "kwargs", "error", "match"),
    [
        (TripleWinsLoss, {"clean_weight": -1.0}, ValueError, "clean_weight"),
        (TripleWinsLoss, {"reduction": "avg"}, ValueError, "reduction"),
        (SKDLoss, {"temperature": 0.0}, ValueError, "temperature"),
        (SKDLoss, {"exit_weights": [1.0, -2.0]}, ValueError, "non-negative"),
        (SKDLoss, {"exit_weights": "ones"}, TypeError, "exit_weights"),
        (ARDLoss, {"alpha": 2.0}, ValueError, r"\[0, 1\]"),
        (ARDLoss, {"reduction": "batchmean"}, ValueError, "reduction"),
    ],
)
def test_constructor_errors(module, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        module(**kwargs)
