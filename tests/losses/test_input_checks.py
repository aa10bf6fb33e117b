"""Input rules shared by every loss: empty batches, probabilities passed as logits, dtypes."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import neokd_losses.losses._base as base
from neokd_losses import NEOKDLoss
from neokd_losses.functional import (
    ard_loss,
    exitwise_orthogonal_kd,
    lw_loss,
    neighbor_kd,
    neokd_loss,
    skd_loss,
    triple_wins_loss,
)
from tests.helpers import random_exits

Loss = Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], torch.Tensor]


def _lw(adv: list[torch.Tensor], clean: list[torch.Tensor], y: torch.Tensor, **kw: Any):
    weights = [torch.ones(adv[0].shape[1], 2, dtype=adv[0].dtype) for _ in adv]
    return lw_loss(adv, y, weights, **kw)


LOSSES: dict[str, Loss] = {
    "neighbor_kd": lambda adv, clean, y, **kw: neighbor_kd(adv, clean, **kw),
    "exitwise_orthogonal_kd": exitwise_orthogonal_kd,
    "neokd_loss": neokd_loss,
    "triple_wins_loss": triple_wins_loss,
    "skd_loss": skd_loss,
    "ard_loss": ard_loss,
    "lw_loss": _lw,
}
PAIRED = [name for name in LOSSES if name != "lw_loss"]


# --- empty batches --------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch_raises_with_the_fix(name: str, reduction: str) -> None:
    empty = [torch.zeros(0, 10) for _ in range(3)]
    targets = torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError, match=r"empty batch \(B = 0.*drop_last=True"):
        LOSSES[name](empty, empty, targets, reduction=reduction)


# --- probabilities where logits are expected -----------------------------------------------


def _batch(dtype: torch.dtype = torch.float32):
    adv, clean = random_exits(3, 6, 10, dtype=dtype), random_exits(3, 6, 10, dtype=dtype)
    return adv, clean, torch.randint(0, 10, (6,))


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("side", ["adv", "clean"])
def test_probabilities_warn_once_per_call(name: str, side: str) -> None:
    if name == "lw_loss" and side == "clean":
        pytest.skip("LW reads the adversarial logits only")
    adv, clean, y = _batch()
    if side == "adv":
        adv = [z.softmax(-1) for z in adv]
    else:
        clean = [z.softmax(-1) for z in clean]
    with pytest.warns(RuntimeWarning, match=rf"`{side}_logits` look like probabilities") as record:
        LOSSES[name](adv, clean, y)
    assert len(record) == 1
    assert "remove the final softmax" in str(record[0].message)
    assert "Logits, not probabilities" in str(record[0].message)
    # The warning points at the caller, not at the package's internals.
    assert record[0].filename == __file__


def test_both_sides_are_named_in_one_warning() -> None:
    adv, clean, y = _batch()
    with pytest.warns(RuntimeWarning) as record:
        NEOKDLoss()([z.softmax(-1) for z in adv], [z.softmax(-1) for z in clean], y)
    assert len(record) == 1
    assert "`adv_logits` and `clean_logits` look like probabilities" in str(record[0].message)
    assert record[0].filename == __file__  # through nn.Module.__call__ too


@pytest.mark.parametrize("name", LOSSES)
def test_logits_and_log_probabilities_do_not_warn(name: str) -> None:
    adv, clean, y = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LOSSES[name](adv, clean, y)
        LOSSES[name]([F.log_softmax(z, -1) for z in adv], [F.log_softmax(z, -1) for z in clean], y)
        # Non-negative scores that do not sum to 1 (e.g. after a ReLU) are logits too.
        LOSSES[name]([z.relu() for z in adv], [z.relu() for z in clean], y)


def test_only_every_row_counts() -> None:
    # The first exit screens; an exit that is not a probability vector clears the suspicion.
    adv, clean, y = _batch()
    mixed = [adv[0].softmax(-1), adv[1].softmax(-1), adv[2]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        triple_wins_loss(mixed, clean, y)
    one_row_off = [z.softmax(-1) for z in adv]
    one_row_off[2] = one_row_off[2].clone()
    one_row_off[2][4] *= 1.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        triple_wins_loss(one_row_off, clean, y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_probabilities_warn(dtype: torch.dtype) -> None:
    adv, clean, y = _batch()
    probs = [z.softmax(-1).to(dtype) for z in adv]
    with pytest.warns(RuntimeWarning, match="look like probabilities"):
        triple_wins_loss(probs, clean, y)


def test_no_check_while_compiling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "is_compiling", lambda: True)
    adv, clean, y = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        neokd_loss([z.softmax(-1) for z in adv], clean, y)


def test_compiled_loss_runs_on_probabilities() -> None:
    adv, clean, y = _batch()
    probs = [z.softmax(-1) for z in adv]
    compiled = torch.compile(triple_wins_loss, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = triple_wins_loss(probs, clean, y)
    torch.testing.assert_close(compiled(probs, clean, y), expected)


# --- one dtype rule ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PAIRED)
@pytest.mark.parametrize(
    ("adv_dtype", "clean_dtype", "expected"),
    [
        (torch.float32, torch.float64, torch.float64),
        (torch.float64, torch.float32, torch.float64),
        (torch.bfloat16, torch.float16, torch.float32),
        (torch.float16, torch.float64, torch.float64),
    ],
)
def test_both_sides_are_promoted_never_cast_down(
    name: str, adv_dtype: torch.dtype, clean_dtype: torch.dtype, expected: torch.dtype
) -> None:
    adv, clean, y = _batch()
    adv, clean = [z.to(adv_dtype) for z in adv], [z.to(clean_dtype) for z in clean]
    mask = torch.rand(3, 6, 10) < 0.5
    mask[:, torch.arange(6), y] = True
    kwargs: dict[str, Any] = {"mask": mask} if "orthogonal" in name or name == "neokd_loss" else {}
    got = LOSSES[name](adv, clean, y, reduction="none", **kwargs)
    assert got.dtype == expected
    # The same as computing everything in the common dtype from the start.
    reference = LOSSES[name](
        [z.to(expected) for z in adv],
        [z.to(expected) for z in clean],
        y,
        reduction="none",
        **kwargs,
    )
    assert torch.equal(got, reference)
