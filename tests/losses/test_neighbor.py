from __future__ import annotations

import pytest
import torch

from neokd_losses import NeighborKD
from neokd_losses.functional import neighbor_kd, neighbor_weights
from tests.helpers import random_exits

from . import _reference as ref


@pytest.mark.parametrize("num_exits", [1, 2, 3, 7])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_matches_naive_loop(num_exits: int, temperature: float) -> None:
    adv = random_exits(num_exits, 5, 6, dtype=torch.float64)
    clean = random_exits(num_exits, 5, 6, dtype=torch.float64)
    got = neighbor_kd(adv, clean, temperature=temperature, reduction="none")
    expected = torch.tensor(ref.nkd(adv, clean, temperature), dtype=torch.float64)
    torch.testing.assert_close(got, expected)


def test_two_exits_share_one_teacher() -> None:
    # With E = 2 both exits are distilled from the average of the two clean predictions.
    clean = random_exits(2, 4, 5)
    adv = random_exits(1, 4, 5) * 2
    got = neighbor_kd(adv, clean, reduction="none")
    torch.testing.assert_close(got[0], got[1])


def test_single_exit_is_self_distillation() -> None:
    adv, clean = random_exits(1, 6, 4), random_exits(1, 6, 4)
    teacher = clean[0].softmax(-1)
    expected = -(teacher * adv[0].log_softmax(-1)).sum(-1)
    torch.testing.assert_close(neighbor_kd(adv, clean, reduction="none")[0], expected)


def test_perfect_match_gives_teacher_entropy() -> None:
    clean = random_exits(1, 6, 4)
    p = clean[0].softmax(-1)
    entropy = -(p * p.log()).sum(-1)
    torch.testing.assert_close(neighbor_kd(clean, clean, reduction="none")[0], entropy)


@pytest.mark.parametrize("num_exits", [1, 2, 5])
def test_weights_rows(num_exits: int) -> None:
    w = neighbor_weights(num_exits)
    for i in range(num_exits):
        expected = torch.zeros(num_exits)
        members = ref.neighbors(i, num_exits)
        expected[members] = 1.0 / len(members)
        torch.testing.assert_close(w[i], expected)


def test_reductions_and_exit_weights() -> None:
    adv, clean = random_exits(3, 4, 5), random_exits(3, 4, 5)
    per = torch.tensor(ref.nkd(adv, clean), dtype=torch.float32)
    gamma = torch.tensor([1.0, 0.5, 2.0])
    none = neighbor_kd(adv, clean, exit_weights=gamma, reduction="none")
    assert none.shape == (3, 4)
    torch.testing.assert_close(none, per * gamma[:, None])
    torch.testing.assert_close(
        neighbor_kd(adv, clean, exit_weights=[1.0, 0.5, 2.0]), (per * gamma[:, None]).sum() / 4
    )
    torch.testing.assert_close(neighbor_kd(adv, clean, reduction="sum"), per.sum())


def test_teacher_detached_by_default() -> None:
    adv = random_exits(3, 4, 5, requires_grad=True)
    clean = random_exits(3, 4, 5, requires_grad=True)
    neighbor_kd(adv, clean).backward()
    assert all(z.grad is not None for z in adv)
    assert all(z.grad is None for z in clean)
    neighbor_kd(adv, clean, detach_teacher=False).backward()
    assert all(z.grad is not None and z.grad.abs().sum() > 0 for z in clean)


def test_gradcheck() -> None:
    adv = random_exits(3, 3, 4, dtype=torch.float64, requires_grad=True)
    clean = random_exits(3, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *z: neighbor_kd(list(z[:3]), list(z[3:]), temperature=2.0, detach_teacher=False),
        (*adv, *clean),
    )


def test_module_equals_function() -> None:
    adv, clean = random_exits(3, 4, 5), random_exits(3, 4, 5)
    module = NeighborKD(temperature=2.0, exit_weights=[1, 2, 3], reduction="sum")
    expected = neighbor_kd(adv, clean, temperature=2.0, exit_weights=[1, 2, 3], reduction="sum")
    torch.testing.assert_close(module(adv, clean), expected)
    assert "exit_weights" in module.state_dict()
    assert module.to(torch.float64).exit_weights.dtype == torch.float64


def test_stable_at_extreme_logits() -> None:
    adv = [torch.tensor([[100.0, -100.0, 0.0]]), torch.tensor([[-100.0, 100.0, 0.0]])]
    clean = [torch.tensor([[-100.0, 100.0, 0.0]]), torch.tensor([[100.0, -100.0, 0.0]])]
    # Both exits share the teacher [1/2, 1/2, 0]; each student's log-probabilities on the
    # two teacher classes are ~0 and ~-200, so NKD = 1/2 * 0 + 1/2 * 200 = 100 for both.
    adv = [z.requires_grad_() for z in adv]
    loss = neighbor_kd(adv, clean, reduction="none")
    torch.testing.assert_close(loss, torch.tensor([[100.0], [100.0]]))
    loss.sum().backward()
    assert all(z.grad is not None and torch.isfinite(z.grad).all() for z in adv)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computes_in_float32(dtype: torch.dtype) -> None:
    adv, clean = random_exits(3, 4, 5), random_exits(3, 4, 5)
    low = neighbor_kd([z.to(dtype) for z in adv], [z.to(dtype) for z in clean])
    assert low.dtype == torch.float32
    full = neighbor_kd([z.to(dtype).float() for z in adv], [z.to(dtype).float() for z in clean])
    torch.testing.assert_close(low, full)


def test_torch_compile() -> None:
    adv, clean = random_exits(3, 4, 5), random_exits(3, 4, 5)
    compiled = torch.compile(neighbor_kd, backend="aot_eager", fullgraph=False)
    torch.testing.assert_close(compiled(adv, clean), neighbor_kd(adv, clean))


def test_invalid_num_exits() -> None:
    with pytest.raises(ValueError, match="num_exits"):
        neighbor_weights(0)
    for wrong_kind in (2.0, True, "3"):
        with pytest.raises(TypeError, match="`num_exits` must be an int"):
            neighbor_weights(wrong_kind)


def test_autocast_keeps_the_teacher_mix_in_float32() -> None:
    # The neighbor average used to be an einsum, which CPU/CUDA autocast runs in bf16/fp16:
    # the loss then drifted by ~1e-3 relative from the float32 value.
    adv, clean = random_exits(5, 16, 10), random_exits(5, 16, 10)
    expected = torch.tensor(ref.nkd(adv, clean, 2.0), dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = neighbor_kd(adv, clean, temperature=2.0, reduction="none")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


def test_non_contiguous_inputs() -> None:
    adv = [(3 * torch.randn(6, 4)).t() for _ in range(3)]
    clean = [(3 * torch.randn(8, 6))[::2] for _ in range(3)]
    assert not adv[0].is_contiguous() and not clean[0].is_contiguous()
    expected = torch.tensor(ref.nkd(adv, clean), dtype=torch.float32)
    torch.testing.assert_close(neighbor_kd(adv, clean, reduction="none"), expected)
