"""exit_autoattack: stock torchattacks AutoAttack (or its cheap subset) on one exit."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torchattacks
from torch import Tensor, nn

from neokd_losses.attacks import ExitView, exit_autoattack

K = 5


class Heads(nn.Module):
    """Two exits with separate heads on flattened 1x3x3 images: [a(h), b(tanh(h))]."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(9, K)
        self.b = nn.Linear(9, K)

    def forward(self, x: Tensor) -> list[Tensor]:
        h = x.flatten(1)
        return [self.a(h), self.b(torch.tanh(h))]


class OnlyExit(nn.Module):
    """Exit ``i`` of ``Heads`` written as a plain single-output model (the reference)."""

    def __init__(self, model: Heads, i: int) -> None:
        super().__init__()
        self.model, self.i = model, i

    def forward(self, x: Tensor) -> Tensor:
        h = x.flatten(1)
        return self.model.a(h) if self.i == 0 else self.model.b(torch.tanh(h))


@pytest.fixture
def batch() -> tuple[Heads, Tensor, Tensor]:
    torch.manual_seed(0)
    model = Heads().eval()
    images = torch.rand(12, 1, 3, 3)
    with torch.no_grad():
        labels = model(images)[1].argmax(1)  # exit 1 classifies every image correctly
    labels[:6] = model(images)[0][:6].argmax(1).detach()
    return model, images, labels


def _cheap_reference(single: nn.Module, eps: float, seed: int) -> Any:
    """The cheap recipe built by hand from torchattacks' classes on a single-output model."""
    apgd = torchattacks.APGD(single, norm="Linf", eps=eps, steps=10, n_restarts=1, seed=seed)
    apgdt = torchattacks.APGDT(single, norm="Linf", eps=eps, steps=10, n_restarts=1, seed=seed)
    apgdt.n_target_classes = 3
    return torchattacks.MultiAttack([apgd, apgdt])


@pytest.mark.parametrize("exit_index", [0, 1, -1])
def test_cheap_equals_the_stock_attacks_on_that_exit_alone(
    batch: tuple[Heads, Tensor, Tensor], exit_index: int
) -> None:
    model, images, labels = batch
    atk = exit_autoattack(model, exit_index, eps=0.2, version="cheap", n_classes=K, seed=3)
    adv = atk(images, labels)
    reference = _cheap_reference(OnlyExit(model, exit_index % 2), eps=0.2, seed=3)
    torch.testing.assert_close(adv, reference(images, labels), rtol=0, atol=1e-6)


def test_cheap_attack_bounds_and_effect(batch: tuple[Heads, Tensor, Tensor]) -> None:
    model, images, labels = batch
    before = images.clone()
    atk = exit_autoattack(model, 1, eps=0.3, version="cheap", n_classes=K)
    adv = atk(images, labels).detach()
    assert torch.equal(images, before)
    assert float((adv - images).abs().max()) <= 0.3 + 1e-6
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    with torch.no_grad():
        clean_acc = (model(images)[1].argmax(1) == labels).float().mean()
        adv_acc = (model(adv)[1].argmax(1) == labels).float().mean()
    assert adv_acc < clean_acc
    assert not model.training


@pytest.mark.slow
def test_cheap_is_faster_than_standard(batch: tuple[Heads, Tensor, Tensor]) -> None:
    """With an eps too small to flip any prediction, standard runs all four attacks."""
    model, images, labels = batch
    x, y = images[:2], labels[:2]
    timings = {}
    for version in ("cheap", "standard"):
        atk = exit_autoattack(model, 0, eps=1e-4, version=version, n_classes=K)  # type: ignore[arg-type]
        started = time.perf_counter()
        adv = atk(x, y).detach()
        timings[version] = time.perf_counter() - started
        assert float((adv - x).abs().max()) <= 1e-4 + 1e-6
        with torch.no_grad():
            assert torch.equal(model(adv)[0].argmax(1), y)
    assert timings["cheap"] < timings["standard"]


def test_standard_is_torchattacks_autoattack_on_the_view() -> None:
    model = Heads()
    atk = exit_autoattack(model, -1, eps=0.1, norm="L2", n_classes=K, seed=7)
    assert isinstance(atk, torchattacks.AutoAttack)
    assert (atk.eps, atk.norm, atk.version, atk.n_classes, atk.seed) == (
        0.1,
        "L2",
        "standard",
        K,
        7,
    )
    assert isinstance(atk.model, ExitView) and atk.model.model is model
    assert atk.model.exit_index == -1


def test_cheap_targets_at_most_k_minus_one_classes() -> None:
    atk = exit_autoattack(Heads(), 0, version="cheap", n_classes=4)
    apgd, apgdt = atk.attacks
    assert (type(apgd), type(apgdt)) == (torchattacks.APGD, torchattacks.APGDT)
    assert (apgd.loss, apgd.steps, apgd.n_restarts) == ("ce", 10, 1)
    assert (apgdt.steps, apgdt.n_restarts, apgdt.n_target_classes) == (10, 1, 3)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"eps": 0.0}, ValueError, "eps"),
        ({"eps": "0.1"}, TypeError, "eps"),
        ({"eps": float("nan")}, ValueError, "eps"),
        ({"n_classes": 3}, ValueError, "n_classes` must be >= 4"),
        ({"n_classes": 10.0}, TypeError, "n_classes"),
        ({"seed": True}, TypeError, "seed"),
        ({"norm": "L1"}, ValueError, "norm"),
        ({"version": "fast"}, ValueError, "version"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        exit_autoattack(Heads(), 0, **kwargs)


def test_model_must_be_a_module() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        exit_autoattack(lambda x: [x], 0)  # type: ignore[arg-type]


def test_exit_index_is_checked_at_the_first_call(batch: tuple[Heads, Tensor, Tensor]) -> None:
    model, images, labels = batch
    atk = exit_autoattack(model, 2, version="cheap", n_classes=K)
    with pytest.raises(ValueError, match="exit_index"):
        atk(images, labels)


@pytest.mark.parametrize(
    "make",
    [
        lambda m: torchattacks.PGD(m, eps=0.1, alpha=0.05, steps=1),
        lambda m: torchattacks.CW(m, steps=1),
        lambda m: torchattacks.APGD(m, eps=0.1, steps=1),
        lambda m: torchattacks.AutoAttack(m, eps=0.1, n_classes=K),
    ],
    ids=["PGD", "CW", "APGD", "AutoAttack"],
)
def test_faq_lists_what_stock_attacks_say_on_a_multi_exit_model(
    make: Any, batch: tuple[Heads, Tensor, Tensor]
) -> None:
    """The FAQ's common-errors table quotes the real message and points to ExitView."""
    model, images, labels = batch
    with pytest.raises((TypeError, AttributeError)) as info:
        make(model)(images, labels)
    faq = (Path(__file__).parents[2] / "docs" / "faq.md").read_text(encoding="utf-8")
    row = next((line for line in faq.splitlines() if str(info.value) in line), None)
    assert row is not None, f"docs/faq.md does not quote {str(info.value)!r}"
    assert "ExitView" in row
