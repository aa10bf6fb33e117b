"""Tests of the BSS distillation loss and the reference weight schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from neokd_losses.distill.boundary import BoundarySupportingAttack
from neokd_losses.distill.bss import BSSDistillationLoss, bss_kd_loss, bss_weight_schedule
from tests.helpers import random_exits

# --- naive reference from the formula, one exit and one sample at a time ----------------


def _log_softmax(z: list[float], t: float = 1.0) -> list[float]:
    top = max(v / t for v in z)
    lse = top + math.log(sum(math.exp(v / t - top) for v in z))
    return [v / t - lse for v in z]


def _j(teacher: list[float], student: list[float], t: float) -> float:
    """J(σ(teacher/T), σ(student/T)) = -Σ_k q_k log p_k."""
    q = [math.exp(v) for v in _log_softmax(teacher, t)]
    return -sum(qk * lp for qk, lp in zip(q, _log_softmax(student, t), strict=True))


def ref_bss(
    student,
    teacher,
    targets,
    bss_student=None,
    bss_teacher=None,
    index=None,
    weight=None,
    *,
    alpha=1.0,
    beta=1.0,
    t=1.0,
    gamma=None,
    ce_weight=1.0,
):
    num_exits, batch = len(student), student[0].shape[0]
    gamma = gamma or [1.0] * num_exits
    out = []
    for i in range(num_exits):
        row = []
        for j in range(batch):
            value = -ce_weight * _log_softmax(student[i][j].tolist())[int(targets[j])]
            kd = alpha * _j(teacher[j].tolist(), student[i][j].tolist(), t)
            if bss_student is not None:
                for m in range(len(index)):
                    if int(index[m]) == j:
                        w = 1.0 if weight is None else float(weight[m])
                        kd += beta * w * _j(bss_teacher[m].tolist(), bss_student[i][m].tolist(), t)
            row.append(value + gamma[i] * t * t * kd)
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


def _inputs(num_exits=3, batch=4, rows=6, classes=5, requires_grad=False):
    student = random_exits(
        num_exits, batch, classes, dtype=torch.float64, requires_grad=requires_grad
    )
    teacher = 3 * torch.randn(batch, classes, dtype=torch.float64)
    targets = torch.randint(0, classes, (batch,))
    bss_student = random_exits(
        num_exits, rows, classes, dtype=torch.float64, requires_grad=requires_grad
    )
    bss_teacher = 3 * torch.randn(rows, classes, dtype=torch.float64)
    # base 2 has no boundary-supporting sample, base 0 has three
    index = torch.tensor([0, 0, 1, 3, 0, 3])[:rows]
    weight = torch.rand(rows, dtype=torch.float64)
    return student, teacher, targets, bss_student, bss_teacher, index, weight


@pytest.mark.parametrize("num_exits", [1, 3])
@pytest.mark.parametrize(
    ("alpha", "beta", "temperature"),
    [(1.0, 1.0, 1.0), (4.0, 2.0, 3.0), (0.5, 0.0, 2.0), (0.0, 1.5, 0.5)],
)
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_naive(num_exits, alpha, beta, temperature, weighted) -> None:
    student, teacher, y, s_hat, t_hat, index, weight = _inputs(num_exits)
    w = weight if weighted else None
    got = bss_kd_loss(
        student,
        teacher,
        y,
        s_hat,
        t_hat,
        index,
        w,
        alpha=alpha,
        beta=beta,
        temperature=temperature,
        reduction="none",
    )
    expected = ref_bss(
        student, teacher, y, s_hat, t_hat, index, w, alpha=alpha, beta=beta, t=temperature
    )
    torch.testing.assert_close(got, expected)


def test_without_samples_is_cross_entropy_plus_hinton_kd() -> None:
    student, teacher, y, *_ = _inputs()
    got = bss_kd_loss(student, teacher, y, alpha=2.0, temperature=4.0, reduction="none")
    torch.testing.assert_close(got, ref_bss(student, teacher, y, alpha=2.0, t=4.0))


def test_ce_weight_scales_the_cross_entropy_only() -> None:
    student, teacher, y, s_hat, t_hat, index, weight = _inputs()
    for w_ce in (0.0, 0.3):
        got = bss_kd_loss(
            student,
            teacher,
            y,
            s_hat,
            t_hat,
            index,
            weight,
            alpha=2.0,
            beta=0.5,
            temperature=2.0,
            ce_weight=w_ce,
            reduction="none",
        )
        expected = ref_bss(
            student,
            teacher,
            y,
            s_hat,
            t_hat,
            index,
            weight,
            alpha=2.0,
            beta=0.5,
            t=2.0,
            ce_weight=w_ce,
        )
        torch.testing.assert_close(got, expected)


def test_zero_weights_give_summed_cross_entropies() -> None:
    student, teacher, y, s_hat, t_hat, index, weight = _inputs()
    got = bss_kd_loss(student, teacher, y, s_hat, t_hat, index, weight, alpha=0.0, beta=0.0)
    expected = sum(nn.functional.cross_entropy(s, y) for s in student)
    torch.testing.assert_close(got, expected)


def test_exit_weights_scale_the_distillation_terms() -> None:
    student, teacher, y, s_hat, t_hat, index, weight = _inputs()
    gamma = [0.5, 1.0, 2.0]
    got = bss_kd_loss(
        student,
        teacher,
        y,
        s_hat,
        t_hat,
        index,
        weight,
        alpha=1.5,
        beta=0.7,
        temperature=2.0,
        exit_weights=gamma,
        reduction="none",
    )
    expected = ref_bss(
        student, teacher, y, s_hat, t_hat, index, weight, alpha=1.5, beta=0.7, t=2.0, gamma=gamma
    )
    torch.testing.assert_close(got, expected)


def test_perfect_student_pays_the_teacher_entropy() -> None:
    teacher = torch.randn(4, 5, dtype=torch.float64)
    y = teacher.argmax(1)
    got = bss_kd_loss([teacher], teacher, y, alpha=1.0, beta=0.0, reduction="none")[0]
    p = teacher.softmax(-1)
    ce = nn.functional.cross_entropy(teacher, y, reduction="none")
    torch.testing.assert_close(got, ce - (p * p.log()).sum(-1))


def test_reductions() -> None:
    student, teacher, y, s_hat, t_hat, index, weight = _inputs()
    none = bss_kd_loss(student, teacher, y, s_hat, t_hat, index, weight, reduction="none")
    assert none.shape == (3, 4)
    torch.testing.assert_close(
        bss_kd_loss(student, teacher, y, s_hat, t_hat, index, weight, reduction="sum"), none.sum()
    )
    # "mean" divides the BSS term by B = 4 clean samples, not by M = 6 samples.
    mean = bss_kd_loss(student, teacher, y, s_hat, t_hat, index, weight)
    torch.testing.assert_close(mean, none.sum() / 4)


def test_teacher_detached_by_default() -> None:
    student, teacher, y, s_hat, t_hat, index, weight = _inputs(requires_grad=True)
    teacher.requires_grad_(True)
    t_hat.requires_grad_(True)
    bss_kd_loss(student, teacher, y, s_hat, t_hat, index, weight).backward()
    assert teacher.grad is None and t_hat.grad is None
    assert all(s.grad is not None for s in student + s_hat)
    bss_kd_loss(student, teacher, y, s_hat, t_hat, index, weight, detach_teacher=False).backward()
    assert teacher.grad is not None and t_hat.grad is not None


def test_gradcheck() -> None:
    student, teacher, y, s_hat, t_hat, index, weight = _inputs(
        num_exits=2, batch=3, rows=3, classes=4, requires_grad=True
    )
    index = index[:3].clamp_max(2)

    def fn(s0, s1, h0, h1):
        return bss_kd_loss(
            [s0, s1],
            teacher,
            y,
            [h0, h1],
            t_hat,
            index,
            weight,
            alpha=2.0,
            beta=0.5,
            temperature=3.0,
        )

    assert torch.autograd.gradcheck(fn, (*student, *s_hat), fast_mode=True)


def test_half_precision_computes_in_float32() -> None:
    student, teacher, y, s_hat, t_hat, index, weight = _inputs()
    got = bss_kd_loss(
        [s.half() for s in student],
        teacher.half(),
        y,
        [s.half() for s in s_hat],
        t_hat.half(),
        index,
        weight.half(),
    )
    assert got.dtype == torch.float32
    expected = bss_kd_loss(student, teacher, y, s_hat, t_hat, index, weight)
    torch.testing.assert_close(got.double(), expected, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_module_equals_function(reduction) -> None:
    student, teacher, y, s_hat, t_hat, index, weight = _inputs()
    criterion = BSSDistillationLoss(
        alpha=2.0,
        beta=0.5,
        temperature=3.0,
        ce_weight=0.5,
        exit_weights=[1, 2, 3],
        reduction=reduction,
    )
    assert "exit_weights" in dict(criterion.named_buffers())
    expected = bss_kd_loss(
        student,
        teacher,
        y,
        s_hat,
        t_hat,
        index,
        weight,
        alpha=2.0,
        beta=0.5,
        temperature=3.0,
        ce_weight=0.5,
        exit_weights=[1, 2, 3],
        reduction=reduction,
    )
    torch.testing.assert_close(
        criterion(student, teacher, y, s_hat, t_hat, index, weight), expected
    )
    criterion.alpha, criterion.beta, criterion.ce_weight = 0.0, 0.0, 1.0
    ce = sum(nn.functional.cross_entropy(s, y, reduction="none") for s in student)
    if reduction == "mean":
        torch.testing.assert_close(
            criterion(student, teacher, y, s_hat, t_hat, index, weight), ce.mean()
        )


def test_attack_weights_give_the_papers_weighted_sum() -> None:
    # With every target (sampling="all"), the BSS term of base n is Σ_k p_n^k J_k exactly.
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(6, 4)).double()
    student = nn.Sequential(nn.Flatten(), nn.Linear(6, 4)).double()
    x = torch.rand(3, 6, dtype=torch.float64)
    y = teacher(x).argmax(1)
    bss = BoundarySupportingAttack(teacher, sampling="all").generate(x, y)
    with torch.no_grad():
        got = bss_kd_loss(
            [student(x)],
            teacher(x),
            y,
            [student(bss.samples)],
            teacher(bss.samples),
            bss.batch_index,
            bss.weight,
            alpha=0.0,
            beta=1.0,
            reduction="none",
        )[0]
        got = got - nn.functional.cross_entropy(student(x), y, reduction="none")
        for n in range(3):
            logits = teacher(x[n : n + 1])[0].tolist()
            e = [math.exp(v) for v in logits]
            b = int(y[n])
            expected = 0.0
            for k in range(4):
                if k == b:
                    continue
                p_nk = e[k] / (sum(e) - e[b])
                row = int(((bss.batch_index == n) & (bss.target == k)).nonzero())
                expected += p_nk * _j(
                    teacher(bss.samples[row : row + 1])[0].tolist(),
                    student(bss.samples[row : row + 1])[0].tolist(),
                    1.0,
                )
            assert math.isclose(float(got[n]), expected, rel_tol=1e-9)


# --- schedule ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("epoch", [0, 1, 10, 29.5, 59, 60, 61, 75, 80])
def test_schedule_matches_reference(epoch) -> None:
    n = 80
    alpha, beta = bss_weight_schedule(epoch, n)
    assert math.isclose(alpha, 3 * (1 - epoch / n) + 1, abs_tol=1e-12)
    assert math.isclose(beta, max(2 * (1 - 4 / 3 * epoch / n), 0), abs_tol=1e-12)


def test_schedule_custom_ends() -> None:
    assert bss_weight_schedule(
        0, 10, alpha_start=2.0, alpha_end=0.5, beta_start=1.0, beta_end=0.2, beta_stop=0.5
    ) == (2.0, 1.0)
    assert bss_weight_schedule(
        10, 10, alpha_start=2.0, alpha_end=0.5, beta_start=1.0, beta_end=0.2, beta_stop=0.5
    ) == (0.5, 0.2)
    alpha, beta = bss_weight_schedule(
        2.5, 10, alpha_start=2.0, alpha_end=0.5, beta_start=1.0, beta_end=0.2, beta_stop=0.5
    )
    assert math.isclose(alpha, 0.5 + 1.5 * 0.75) and math.isclose(beta, 0.2 + 0.8 * 0.5)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((1, 0), {}, "`num_epochs` must be a finite number > 0, got 0"),
        ((11, 10), {}, r"`epoch` must lie in \[0, num_epochs\] = \[0, 10\], got 11"),
        ((-1, 10), {}, r"`epoch` must lie in"),
        ((1, 10), {"beta_stop": 0.0}, r"`beta_stop` must be a number in \(0, 1\], got 0.0"),
        ((1, 10), {"alpha_end": -1.0}, "`alpha_end` must be a finite number >= 0"),
    ],
)
def test_schedule_errors(args, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        bss_weight_schedule(*args, **kwargs)


# --- errors ----------------------------------------------------------------------------------------------


def test_input_errors() -> None:
    student, teacher, y, s_hat, t_hat, index, weight = _inputs()
    with pytest.raises(TypeError, match="list or tuple"):
        bss_kd_loss(student[0], teacher, y)
    with pytest.raises(TypeError, match=r"single-output teacher, got a list.*teacher_logits\[-1\]"):
        bss_kd_loss(student, [teacher], y)
    with pytest.raises(ValueError, match=r"`teacher_logits` must have shape \(4, 5\)"):
        bss_kd_loss(student, teacher[:3], y)
    with pytest.raises(TypeError, match="floating-point logits"):
        bss_kd_loss(student, teacher.long(), y)
    with pytest.raises(ValueError, match=r"must lie in \[0, 5\)"):
        bss_kd_loss(student, teacher, torch.tensor([0, 1, 2, 9]))
    with pytest.raises(ValueError, match="together.*got only bss_student_logits, bss_index"):
        bss_kd_loss(student, teacher, y, s_hat, None, index)
    with pytest.raises(ValueError, match="`bss_weight` was given without"):
        bss_kd_loss(student, teacher, y, bss_weight=weight)
    with pytest.raises(
        ValueError,
        match=r"`bss_index` must lie in \[0, 4\) for a batch of B = 4, got values in \[1, 4\]",
    ):
        bss_kd_loss(student, teacher, y, s_hat, t_hat, index + 1)
    with pytest.raises(TypeError, match="`bss_index` must hold integer batch positions"):
        bss_kd_loss(student, teacher, y, s_hat, t_hat, index.float())
    with pytest.raises(ValueError, match=r"`bss_index` must have shape \(M,\) = \(6,\)"):
        bss_kd_loss(student, teacher, y, s_hat, t_hat, index[:5])
    with pytest.raises(ValueError, match=r"`bss_teacher_logits` must have shape \(6, 5\)"):
        bss_kd_loss(student, teacher, y, s_hat, t_hat[:5], index)
    with pytest.raises(ValueError, match="E = 3 exits"):
        bss_kd_loss(student, teacher, y, s_hat[:2], t_hat, index)
    with pytest.raises(ValueError, match="`bss_weight` must be finite and non-negative"):
        bss_kd_loss(student, teacher, y, s_hat, t_hat, index, -weight)
    with pytest.raises(ValueError, match=r"`bss_weight` must have shape \(M,\) = \(6,\)"):
        bss_kd_loss(student, teacher, y, s_hat, t_hat, index, weight[:2])
    with pytest.raises(TypeError, match="`bss_weight` must be a floating-point Tensor"):
        bss_kd_loss(student, teacher, y, s_hat, t_hat, index, index)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"alpha": -1.0}, ValueError, "`alpha` must be a finite number >= 0, got -1.0"),
        ({"beta": float("inf")}, ValueError, "`beta` must be a finite number >= 0"),
        ({"beta": "x"}, TypeError, "`beta` must be a real number, got str"),
        ({"temperature": 0.0}, ValueError, "`temperature` must be a finite number > 0"),
        ({"ce_weight": -0.5}, ValueError, "`ce_weight` must be a finite number >= 0"),
        ({"reduction": "avg"}, ValueError, "reduction"),
        ({"exit_weights": [1.0, -1.0]}, ValueError, "non-negative"),
    ],
)
def test_hyper_parameter_errors(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        BSSDistillationLoss(**kwargs)
    student, teacher, y, *_ = _inputs(num_exits=2)
    with pytest.raises(error, match=match):
        bss_kd_loss(student, teacher, y, **kwargs)


def test_never_casts_an_input_down() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (4,), generator=g)
    student = [torch.randn(4, 5, generator=g) for _ in range(2)]
    teacher = torch.randn(4, 5, generator=g, dtype=torch.float64)
    loss = bss_kd_loss(student, teacher, y, reduction="none")
    assert loss.dtype == torch.float64
    reference = bss_kd_loss([z.double() for z in student], teacher, y, reduction="none")
    torch.testing.assert_close(loss, reference, rtol=0, atol=0)
    half = bss_kd_loss([z.half() for z in student], teacher.half(), y)
    assert half.dtype == torch.float32
    rows = [torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    with_bss = bss_kd_loss(
        student,
        teacher.float(),
        y,
        bss_student_logits=rows,
        bss_teacher_logits=torch.randn(3, 5, generator=g),
        bss_index=torch.tensor([0, 1, 3]),
    )
    assert with_bss.dtype == torch.float64


def test_empty_batch_raises() -> None:
    from neokd_losses.distill.activation_boundary import activation_boundary_loss

    with pytest.raises(ValueError, match=r"empty batch \(B = 0"):
        bss_kd_loss(
            [torch.randn(0, 10) for _ in range(2)],
            torch.randn(0, 10),
            torch.zeros(0, dtype=torch.long),
        )
    with pytest.raises(ValueError, match=r"empty batch \(B = 0"):
        activation_boundary_loss([torch.randn(0, 4)], [torch.randn(0, 4)])
