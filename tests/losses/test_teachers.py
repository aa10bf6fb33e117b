"""The teacher of SKD and ARD: the last exit, a given exit, or the ensemble of all exits.

The references are naive loops over exits and samples with plain Python floats, written
from the documented rules:

- a single-exit teacher t (last or index k) gives q = softmax(z_t / T); exit t gets no
  distillation term (SKD) or adversarial cross-entropy in its slot (ARD);
- the ensemble gives q = mean over all exits of softmax(z_n / T); every exit is
  distilled from it.

SKD's teacher reads the adversarial logits, ARD's the clean logits.
"""

from __future__ import annotations

import math

import pytest
import torch

from neokd_losses import ARDLoss, SKDLoss
from neokd_losses.functional import ard_loss, skd_loss
from tests.helpers import random_exits


def _softmax(z: list[float], t: float) -> list[float]:
    top = max(v / t for v in z)
    e = [math.exp(v / t - top) for v in z]
    return [v / sum(e) for v in e]


def _log_softmax(z: list[float], t: float) -> list[float]:
    top = max(v / t for v in z)
    lse = top + math.log(sum(math.exp(v / t - top) for v in z))
    return [v / t - lse for v in z]


def _ce(z: list[float], label: int) -> float:
    return -_log_softmax(z, 1.0)[label]


def _kl(q: list[float], student: list[float], t: float) -> float:
    """T² · KL(q ‖ softmax(student / T))."""
    log_p = _log_softmax(student, t)
    return t * t * sum(qk * (math.log(qk) - lp) for qk, lp in zip(q, log_p, strict=True) if qk > 0)


def _teacher(logits, j: int, teacher, t: float) -> tuple[list[float], int | None]:
    num_exits = len(logits)
    if teacher == "ensemble":
        probs = [_softmax(logits[n][j].tolist(), t) for n in range(num_exits)]
        return [sum(p[k] for p in probs) / num_exits for k in range(len(probs[0]))], None
    index = num_exits - 1 if teacher == "last" else teacher % num_exits
    return _softmax(logits[index][j].tolist(), t), index


def ref_skd(adv, clean, targets, teacher, alpha, t, gamma):
    out = []
    for i in range(len(adv)):
        row = []
        for j in range(len(targets)):
            y = int(targets[j])
            q, index = _teacher(adv, j, teacher, t)
            value = _ce(clean[i][j].tolist(), y) + _ce(adv[i][j].tolist(), y)
            if i != index:
                value += gamma[i] * alpha * _kl(q, adv[i][j].tolist(), t)
            row.append(value)
        out.append(row)
    return out


def ref_ard(adv, clean, targets, teacher, alpha, t, gamma):
    out = []
    for i in range(len(adv)):
        row = []
        for j in range(len(targets)):
            y = int(targets[j])
            q, index = _teacher(clean, j, teacher, t)
            if i == index:
                slot = _ce(adv[i][j].tolist(), y)
            else:
                slot = _kl(q, adv[i][j].tolist(), t)
            row.append(gamma[i] * alpha * slot + (1 - alpha) * _ce(clean[i][j].tolist(), y))
        out.append(row)
    return out


TEACHERS = ["last", "ensemble", 0, 1, -1, -3]


def _inputs(num_exits=3, batch=4, classes=5):
    adv = random_exits(num_exits, batch, classes, dtype=torch.float64)
    clean = random_exits(num_exits, batch, classes, dtype=torch.float64)
    return adv, clean, torch.randint(0, classes, (batch,))


@pytest.mark.parametrize("teacher", TEACHERS)
@pytest.mark.parametrize(
    ("loss_fn", "reference", "alpha", "temperature"),
    [
        (skd_loss, ref_skd, 1.0, 1.0),
        (skd_loss, ref_skd, 0.7, 3.0),
        (ard_loss, ref_ard, 0.5, 1.0),
        (ard_loss, ref_ard, 0.9, 4.0),
        (ard_loss, ref_ard, 1.0, 2.0),
    ],
)
def test_matches_naive(teacher, loss_fn, reference, alpha: float, temperature: float) -> None:
    adv, clean, y = _inputs()
    gamma = [1.0, 0.5, 2.0]
    kwargs = {"alpha": alpha, "temperature": temperature, "teacher": teacher}
    got = loss_fn(adv, clean, y, **kwargs, exit_weights=gamma, reduction="none")
    expected = reference(adv, clean, y, teacher, alpha, temperature, gamma)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("loss_fn", [skd_loss, ard_loss])
def test_last_is_the_last_index(loss_fn) -> None:
    adv, clean, y = _inputs(4)
    last = loss_fn(adv, clean, y, temperature=2.0, reduction="none")
    assert torch.equal(loss_fn(adv, clean, y, temperature=2.0, teacher=3, reduction="none"), last)
    assert torch.equal(loss_fn(adv, clean, y, temperature=2.0, teacher=-1, reduction="none"), last)


def test_single_exit_ensemble_is_its_own_teacher() -> None:
    # With one exit the ensemble is that exit: SKD's KL against itself is zero.
    adv, clean, y = _inputs(1)
    got = skd_loss(adv, clean, y, alpha=5.0, teacher="ensemble", reduction="none")
    torch.testing.assert_close(got, skd_loss(adv, clean, y, alpha=0.0, reduction="none"))


def _G() -> torch.Generator:
    return torch.Generator().manual_seed(5)


def _distillation_grads(teacher, detach_teacher: bool) -> list[torch.Tensor | None]:
    """Gradients of SKD's distillation terms alone (both cross-entropies weighted 0)."""
    adv = [a.clone().requires_grad_(True) for a in random_exits(3, 4, 5, generator=_G())]
    clean = random_exits(3, 4, 5)
    skd_loss(
        adv,
        clean,
        torch.tensor([0, 1, 2, 3]),
        clean_weight=0.0,
        adv_weight=0.0,
        teacher=teacher,
        detach_teacher=detach_teacher,
    ).backward()
    return [a.grad for a in adv]


def test_exit_teacher_is_detached_by_default() -> None:
    grads = _distillation_grads(1, detach_teacher=True)
    # Exit 1 teaches: no distillation term of its own and, detached, no gradient.
    assert grads[1] is None or bool((grads[1] == 0).all())
    assert all(g is not None and bool(g.abs().sum() > 0) for g in (grads[0], grads[2]))
    undetached = _distillation_grads(1, detach_teacher=False)
    assert undetached[1] is not None and bool(undetached[1].abs().sum() > 0)


def test_ensemble_teacher_is_detached_by_default() -> None:
    # Every exit is a student of the ensemble; without detaching, each exit also receives
    # the gradient of its share in the teacher, so the gradients change.
    detached = _distillation_grads("ensemble", detach_teacher=True)
    undetached = _distillation_grads("ensemble", detach_teacher=False)
    assert all(g is not None and bool(g.abs().sum() > 0) for g in detached)
    assert all(
        not torch.allclose(d, u)
        for d, u in zip(detached, undetached, strict=True)  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("module", [SKDLoss, ARDLoss])
@pytest.mark.parametrize("teacher", ["ensemble", -2])
def test_module_passes_the_teacher(module, teacher) -> None:
    adv, clean, y = _inputs()
    loss_fn = skd_loss if module is SKDLoss else ard_loss
    expected = loss_fn(adv, clean, y, teacher=teacher, temperature=2.0)
    torch.testing.assert_close(module(teacher=teacher, temperature=2.0)(adv, clean, y), expected)
    assert f"teacher={teacher!r}" in repr(module(teacher=teacher))


@pytest.mark.parametrize("loss_fn", [skd_loss, ard_loss])
@pytest.mark.parametrize(
    ("teacher", "error", "match"),
    [
        ("first", ValueError, r'`teacher` must be "last", "ensemble" or an exit index'),
        (3, ValueError, r"`teacher` must lie in \[-3, 3\) for a model with 3 exits, got 3"),
        (-4, ValueError, r"`teacher` must lie in \[-3, 3\)"),
        (1.0, TypeError, r"`teacher` must be .* got float 1.0"),
        (True, TypeError, r"`teacher` must be .* got bool True"),
        (None, TypeError, r"`teacher` must be .* got NoneType"),
    ],
)
def test_teacher_errors(loss_fn, teacher, error, match) -> None:
    adv, clean, y = _inputs()
    with pytest.raises(error, match=match):
        loss_fn(adv, clean, y, teacher=teacher)


@pytest.mark.parametrize("module", [SKDLoss, ARDLoss])
def test_constructor_rejects_bad_teachers(module) -> None:
    with pytest.raises(ValueError, match="`teacher`"):
        module(teacher="all")
    with pytest.raises(TypeError, match="`teacher`"):
        module(teacher=2.5)
