from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from neokd_losses import NEOKDLoss, NEOKDTerms, orthogonal_label_mask
from neokd_losses.functional import exitwise_orthogonal_kd, neighbor_kd, neokd_loss
from tests.helpers import random_exits

from . import _reference as ref


def _problem(
    num_exits: int = 3, batch: int = 5, classes: int = 9, dtype: torch.dtype = torch.float64
):
    adv = random_exits(num_exits, batch, classes, dtype=dtype)
    clean = random_exits(num_exits, batch, classes, dtype=dtype)
    targets = torch.randint(0, classes, (batch,))
    mask = orthogonal_label_mask(
        targets, num_exits, classes, generator=torch.Generator().manual_seed(2)
    )
    return adv, clean, targets, mask


@pytest.mark.parametrize(
    ("num_exits", "alpha", "beta", "gamma", "temperature"),
    [
        (3, 3.0, 1.0, [1.0, 1.0, 1.0], 1.0),
        (5, 3.0, 1.0, [1.0, 1.0, 1.0, 1.5, 1.5], 1.0),
        (7, 2.0, 0.5, [1.0, 1.0, 1.0, 1.5, 1.5, 1.5, 1.5], 2.0),
        (1, 1.0, 1.0, [2.0], 4.0),
    ],
)
def test_objective_matches_naive_loop(
    num_exits: int, alpha: float, beta: float, gamma: list[float], temperature: float
) -> None:
    adv, clean, targets, mask = _problem(num_exits)
    got = neokd_loss(
        adv,
        clean,
        targets,
        alpha=alpha,
        beta=beta,
        exit_weights=gamma,
        temperature=temperature,
        mask=mask,
    )
    expected = ref.neokd(
        adv, clean, targets, mask, alpha=alpha, beta=beta, gamma=gamma, temperature=temperature
    )
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_alpha_beta_zero_is_summed_cross_entropy() -> None:
    adv, clean, targets, _ = _problem(dtype=torch.float32)
    expected = sum(
        F.cross_entropy(c, targets) + F.cross_entropy(a, targets) for a, c in zip(adv, clean)
    )
    torch.testing.assert_close(neokd_loss(adv, clean, targets, alpha=0.0, beta=0.0), expected)


def test_terms_add_up_and_match_parts() -> None:
    adv, clean, targets, mask = _problem(dtype=torch.float32)
    gamma = [1.0, 2.0, 0.5]
    terms = neokd_loss(
        adv, clean, targets, alpha=3.0, beta=1.0, exit_weights=gamma, mask=mask, return_terms=True
    )
    assert isinstance(terms, NEOKDTerms)
    torch.testing.assert_close(
        terms.total, terms.clean_ce + terms.adv_ce + 3.0 * terms.nkd + 1.0 * terms.eokd
    )
    torch.testing.assert_close(terms.nkd, neighbor_kd(adv, clean, exit_weights=gamma))
    torch.testing.assert_close(
        terms.eokd, exitwise_orthogonal_kd(adv, clean, targets, mask=mask, exit_weights=gamma)
    )
    torch.testing.assert_close(
        terms.total, neokd_loss(adv, clean, targets, exit_weights=gamma, mask=mask)
    )


def test_ablations_skip_terms() -> None:
    # beta = 0 (NKD only) works even where orthogonal labels are impossible (K - 1 < E).
    adv, clean = random_exits(3, 4, 2), random_exits(3, 4, 2)
    targets = torch.tensor([0, 1, 1, 0])
    terms = neokd_loss(adv, clean, targets, beta=0.0, return_terms=True)
    assert terms.eokd == 0
    with pytest.raises(ValueError, match="num_classes - 1 >= num_exits"):
        neokd_loss(adv, clean, targets)
    terms = neokd_loss(*_problem()[:3], alpha=0.0, return_terms=True)
    assert terms.nkd == 0 and terms.eokd > 0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(reduction: str) -> None:
    adv, clean, targets, mask = _problem(dtype=torch.float32)
    none = neokd_loss(adv, clean, targets, mask=mask, reduction="none")
    got = neokd_loss(adv, clean, targets, mask=mask, reduction=reduction)  # type: ignore[arg-type]
    expected = {"mean": none.sum(0).mean(), "sum": none.sum(), "none": none}[reduction]
    assert none.shape == (3, 5)
    torch.testing.assert_close(got, expected)


def test_gradients() -> None:
    adv = random_exits(3, 3, 6, dtype=torch.float64, requires_grad=True)
    clean = random_exits(3, 3, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 2, 5])
    mask = orthogonal_label_mask(targets, 3, 6, generator=torch.Generator().manual_seed(0))
    assert torch.autograd.gradcheck(
        lambda *z: neokd_loss(
            list(z[:3]),
            list(z[3:]),
            targets,
            mask=mask,
            temperature=2.0,
            exit_weights=[1, 1, 1.5],
            detach_teacher=False,
        ),
        (*adv, *clean),
    )
    # With detached teachers the clean logits get exactly the gradient of their CE.
    loss = neokd_loss(adv, clean, targets, mask=mask)
    grads = torch.autograd.grad(loss, clean)
    ce = sum(F.cross_entropy(c, targets) for c in clean)
    torch.testing.assert_close(grads, torch.autograd.grad(ce, clean))


def test_module_equals_function_and_moves_buffers() -> None:
    adv, clean, targets, mask = _problem(dtype=torch.float32)
    module = NEOKDLoss(alpha=2.0, beta=0.5, exit_weights=[1, 1, 1.5], temperature=2.0)
    expected = neokd_loss(
        adv,
        clean,
        targets,
        alpha=2.0,
        beta=0.5,
        exit_weights=[1, 1, 1.5],
        temperature=2.0,
        mask=mask,
    )
    torch.testing.assert_close(module(adv, clean, targets, mask=mask), expected)
    assert torch.equal(module.state_dict()["exit_weights"], torch.tensor([1.0, 1.0, 1.5]))
    assert "alpha=2.0, beta=0.5" in repr(module)


def test_module_generator_reproducible() -> None:
    adv, clean, targets, _ = _problem(dtype=torch.float32)
    a = NEOKDLoss(generator=torch.Generator().manual_seed(1))(adv, clean, targets)
    b = NEOKDLoss(generator=torch.Generator().manual_seed(1))(adv, clean, targets)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_returns_float32(dtype: torch.dtype) -> None:
    adv, clean, targets, mask = _problem(dtype=torch.float32)
    low = neokd_loss([z.to(dtype) for z in adv], [z.to(dtype) for z in clean], targets, mask=mask)
    assert low.dtype == torch.float32
    ref_value = neokd_loss(
        [z.to(dtype).float() for z in adv], [z.to(dtype).float() for z in clean], targets, mask=mask
    )
    torch.testing.assert_close(low, ref_value)


def test_under_autocast() -> None:
    lin = torch.nn.Linear(6, 9)
    x = torch.randn(5, 6)
    targets = torch.randint(0, 9, (5,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [lin(x), lin(x * 2)]
        assert outs[0].dtype == torch.bfloat16
        loss = neokd_loss(outs, outs, targets)
    assert loss.dtype == torch.float32
    # Autocast must not push any part of the loss back to bf16: the value equals the one
    # computed outside autocast from the same (bf16) logits, to float32 accuracy.
    mask = orthogonal_label_mask(targets, 2, 9, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = neokd_loss(outs, outs, targets, mask=mask, temperature=2.0)
    outside = neokd_loss(outs, outs, targets, mask=mask, temperature=2.0)
    torch.testing.assert_close(inside, outside)
    loss.backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


def test_torch_compile_aot_eager() -> None:
    adv, clean, targets, mask = _problem(dtype=torch.float32)
    compiled = torch.compile(neokd_loss, backend="aot_eager")
    torch.testing.assert_close(
        compiled(adv, clean, targets, mask=mask), neokd_loss(adv, clean, targets, mask=mask)
    )


@pytest.mark.slow
def test_torch_compile_inductor() -> None:
    adv, clean, targets, mask = _problem(dtype=torch.float32)
    module = torch.compile(NEOKDLoss(exit_weights=[1, 1, 1.5]))
    expected = neokd_loss(adv, clean, targets, mask=mask, exit_weights=[1, 1, 1.5])
    torch.testing.assert_close(module(adv, clean, targets, mask=mask), expected)


def test_negative_coefficient_message() -> None:
    adv, clean, targets, _ = _problem()
    with pytest.raises(ValueError, match=r"`alpha` must be a finite number >= 0, got -1.0"):
        neokd_loss(adv, clean, targets, alpha=-1.0)


@pytest.mark.parametrize(
    ("alpha", "beta", "temperature", "gamma", "detach"),
    [
        (3.0, 1.0, 1.0, None, True),
        (2.0, 0.5, 3.0, [1.0, 1.5, 0.5], True),
        (0.0, 1.0, 2.0, [1.0, 2.0, 1.0], False),
        (1.5, 0.0, 1.0, None, False),
        (2.0, 1.0, 1.0, [1.0, 1.5, 0.5], False),
    ],
)
def test_total_equals_the_sum_of_the_terms_in_value_and_gradient(
    alpha: float, beta: float, temperature: float, gamma: list[float] | None, detach: bool
) -> None:
    # Without return_terms the distillation terms (and, at T = 1, the adversarial
    # cross-entropy) are one soft cross-entropy against a mixed target; with it, each
    # term is computed on its own and summed.
    adv, clean, targets, mask = _problem()
    leaves = [z.clone().requires_grad_(True) for z in [*adv, *clean]]
    kwargs = {
        "alpha": alpha,
        "beta": beta,
        "temperature": temperature,
        "exit_weights": gamma,
        "mask": mask,
        "detach_teacher": detach,
    }
    fast = neokd_loss(leaves[:3], leaves[3:], targets, **kwargs)
    terms = neokd_loss(leaves[:3], leaves[3:], targets, **kwargs, return_terms=True)
    torch.testing.assert_close(fast, terms.total)
    per = neokd_loss(leaves[:3], leaves[3:], targets, **kwargs, return_terms=True, reduction="none")
    assert torch.equal(per.total, per.clean_ce + per.adv_ce + alpha * per.nkd + beta * per.eokd)
    grads_fast = torch.autograd.grad(fast, leaves)
    grads_terms = torch.autograd.grad(terms.total, leaves)
    for got, expected in zip(grads_fast, grads_terms, strict=True):
        torch.testing.assert_close(got, expected)
