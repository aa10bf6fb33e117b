from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neokd_losses import ExitwiseOrthogonalKD, orthogonal_label_mask
from neokd_losses.functional import exitwise_orthogonal_kd
from tests.helpers import random_exits

from . import _reference as ref


@st.composite
def mask_problems(draw: st.DrawFn) -> tuple[torch.Tensor, int, int, int]:
    num_exits = draw(st.integers(1, 8))
    num_classes = draw(st.integers(num_exits + 1, 40))
    batch = draw(st.integers(0, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    targets = torch.tensor(
        draw(st.lists(st.integers(0, num_classes - 1), min_size=batch, max_size=batch)),
        dtype=torch.long,
    )
    return targets, num_exits, num_classes, seed


@settings(max_examples=150, deadline=None)
@given(mask_problems())
def test_mask_properties(problem: tuple[torch.Tensor, int, int, int]) -> None:
    targets, num_exits, num_classes, seed = problem
    g = torch.Generator().manual_seed(seed)
    mask = orthogonal_label_mask(targets, num_exits, num_classes, generator=g)
    batch = len(targets)
    assert mask.shape == (num_exits, batch, num_classes)
    assert mask.dtype == torch.bool
    per_exit = (num_classes - 1) // num_exits
    for b in range(batch):
        y = int(targets[b])
        seen: set[int] = set()
        for e in range(num_exits):
            kept = {k for k in range(num_classes) if mask[e, b, k]}
            assert y in kept
            others = kept - {y}
            assert len(others) == per_exit
            assert not others & seen, "a non-target class is kept by two exits"
            seen |= others


def test_same_seed_same_mask_and_fresh_draws_differ() -> None:
    targets = torch.randint(0, 10, (64,))
    a = orthogonal_label_mask(targets, 3, 10, generator=torch.Generator().manual_seed(7))
    b = orthogonal_label_mask(targets, 3, 10, generator=torch.Generator().manual_seed(7))
    c = orthogonal_label_mask(targets, 3, 10, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Per sample the draws are independent: two samples with the same target differ.
    same = torch.zeros(64, dtype=torch.long)
    m = orthogonal_label_mask(same, 3, 10, generator=torch.Generator().manual_seed(0))
    assert len({tuple(m[:, b].flatten().tolist()) for b in range(64)}) > 1


def test_selection_is_uniform() -> None:
    # K = 4, E = 3: each exit keeps one of the three non-target classes, each with p = 1/3.
    n = 30000
    targets = torch.zeros(n, dtype=torch.long)
    mask = orthogonal_label_mask(targets, 3, 4, generator=torch.Generator().manual_seed(0))
    freq = mask[:, :, 1:].float().mean(1)  # (E, 3): P(exit e keeps class k)
    torch.testing.assert_close(freq, torch.full((3, 3), 1 / 3), atol=0.015, rtol=0)


def test_too_few_classes() -> None:
    with pytest.raises(
        ValueError, match="num_classes - 1 >= num_exits; got num_classes=3, num_exits=3"
    ):
        orthogonal_label_mask(torch.tensor([0, 1]), 3, 3)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_exits": 0}, ValueError, "num_exits"),
        ({"num_classes": 0}, ValueError, "num_classes"),
        ({"num_exits": 2.0}, TypeError, "`num_exits` must be an int, got float"),
        ({"num_classes": True}, TypeError, "`num_classes` must be an int, got bool"),
    ],
)
def test_bad_sizes(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    args = {"num_exits": 2, "num_classes": 5} | kwargs
    with pytest.raises(error, match=match):
        orthogonal_label_mask(torch.tensor([0]), **args)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_eokd_with_mask_matches_naive_loop(temperature: float) -> None:
    adv = random_exits(3, 5, 8, dtype=torch.float64)
    clean = random_exits(3, 5, 8, dtype=torch.float64)
    targets = torch.randint(0, 8, (5,))
    mask = orthogonal_label_mask(targets, 3, 8, generator=torch.Generator().manual_seed(1))
    got = exitwise_orthogonal_kd(
        adv, clean, targets, mask=mask, temperature=temperature, reduction="none"
    )
    expected = torch.tensor(ref.eokd(adv, clean, mask, temperature), dtype=torch.float64)
    torch.testing.assert_close(got, expected)


def test_fresh_mask_uses_generator() -> None:
    adv, clean = random_exits(3, 16, 10), random_exits(3, 16, 10)
    targets = torch.randint(0, 10, (16,))
    one = exitwise_orthogonal_kd(
        adv, clean, targets, generator=torch.Generator().manual_seed(3), reduction="none"
    )
    mask = orthogonal_label_mask(targets, 3, 10, generator=torch.Generator().manual_seed(3))
    two = exitwise_orthogonal_kd(adv, clean, targets, mask=mask, reduction="none")
    torch.testing.assert_close(one, two)


def test_full_mask_is_plain_self_distillation() -> None:
    # A mask that keeps every class makes EOKD the KD from each exit's own clean prediction.
    adv, clean = random_exits(2, 4, 5), random_exits(2, 4, 5)
    targets = torch.randint(0, 5, (4,))
    mask = torch.ones(2, 4, 5, dtype=torch.bool)
    got = exitwise_orthogonal_kd(adv, clean, targets, mask=mask, reduction="none")
    expected = torch.stack(
        [-(c.softmax(-1) * a.log_softmax(-1)).sum(-1) for a, c in zip(adv, clean)]
    )
    torch.testing.assert_close(got, expected)


def test_stable_at_extreme_logits() -> None:
    # The clean prediction puts all mass on a class the exit drops: the teacher must stay
    # finite. Restricted to classes {0, 2} (logits -100, -100) it is [1/2, 0, 1/2, 0]; the
    # student's log-probabilities there are ~0 and ~-100, so EOKD = 1/2 * 0 + 1/2 * 100.
    clean = [torch.tensor([[-100.0, 100.0, -100.0, -100.0]])]
    adv = [torch.tensor([[100.0, -100.0, 0.0, 0.0]], requires_grad=True)]
    mask = torch.tensor([[[True, False, True, False]]])
    loss = exitwise_orthogonal_kd(adv, clean, torch.tensor([0]), mask=mask, reduction="none")
    torch.testing.assert_close(loss, torch.tensor([[50.0]]))
    loss.sum().backward()
    assert adv[0].grad is not None and torch.isfinite(adv[0].grad).all()


def test_teacher_detached_by_default() -> None:
    adv = random_exits(3, 4, 10, requires_grad=True)
    clean = random_exits(3, 4, 10, requires_grad=True)
    targets = torch.randint(0, 10, (4,))
    mask = orthogonal_label_mask(targets, 3, 10, generator=torch.Generator().manual_seed(0))
    exitwise_orthogonal_kd(adv, clean, targets, mask=mask).backward()
    assert all(z.grad is not None and z.grad.abs().sum() > 0 for z in adv)
    assert all(z.grad is None for z in clean)
    exitwise_orthogonal_kd(adv, clean, targets, mask=mask, detach_teacher=False).backward()
    assert all(z.grad is not None and z.grad.abs().sum() > 0 for z in clean)


def test_gradcheck() -> None:
    adv = random_exits(3, 2, 7, dtype=torch.float64, requires_grad=True)
    clean = random_exits(3, 2, 7, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1, 4])
    mask = orthogonal_label_mask(targets, 3, 7, generator=torch.Generator().manual_seed(0))
    assert torch.autograd.gradcheck(
        lambda *z: exitwise_orthogonal_kd(
            list(z[:3]), list(z[3:]), targets, mask=mask, temperature=1.5, detach_teacher=False
        ),
        (*adv, *clean),
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_module_equals_function(reduction: str) -> None:
    adv, clean = random_exits(3, 4, 10), random_exits(3, 4, 10)
    targets = torch.randint(0, 10, (4,))
    module = ExitwiseOrthogonalKD(
        exit_weights=[1, 1, 1.5], reduction=reduction, generator=torch.Generator().manual_seed(5)
    )  # type: ignore[arg-type]
    got = module(adv, clean, targets)
    expected = exitwise_orthogonal_kd(
        adv,
        clean,
        targets,
        generator=torch.Generator().manual_seed(5),
        exit_weights=[1, 1, 1.5],
        reduction=reduction,  # type: ignore[arg-type]
    )
    torch.testing.assert_close(got, expected)
    assert got.shape == ((3, 4) if reduction == "none" else ())


def test_bad_mask() -> None:
    adv = random_exits(3, 4, 10)
    targets = torch.randint(0, 10, (4,))
    with pytest.raises(TypeError, match="bool Tensor"):
        exitwise_orthogonal_kd(adv, adv, targets, mask=torch.ones(3, 4, 10))
    with pytest.raises(ValueError, match=r"\(3, 4, 10\).*got \(3, 4, 9\)"):
        exitwise_orthogonal_kd(adv, adv, targets, mask=torch.ones(3, 4, 9, dtype=torch.bool))


def test_cpu_fast_argsort_matches_torch() -> None:
    from neokd_losses.losses.orthogonal import _argsort_rows

    scores = torch.rand(64, 37, generator=torch.Generator().manual_seed(0))
    got = _argsort_rows(scores)
    assert got.dtype == torch.long
    assert torch.equal(got, scores.argsort(dim=1))
