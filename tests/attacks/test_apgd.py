"""Multi-exit APGD against torchattacks' APGD (single exit, same start) and naive
references written here, plus the usual attack properties."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torchattacks
from torch import Tensor, nn

from neokd_losses.attacks import ExitView, MultiExitAPGD, multi_exit_apgd
from neokd_losses.attacks.apgd import attack_losses
from tests.helpers import TinyMultiExit

EPS = {"Linf": 0.1, "L2": 0.5}


class OneExit(nn.Module):
    """A single-output CNN wrapped as a 1-exit model (a list of one logits tensor)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5)
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        return [self.net(x)]


def _data(batch: int = 12) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.rand(batch, 1, 6, 6, generator=g), torch.randint(0, 5, (batch,), generator=g)


def _torchattacks_best(
    model: nn.Module, x: Tensor, y: Tensor, seed: int, **kwargs: object
) -> Tensor:
    """torchattacks' APGD best-loss point (``perturb(best_loss=True)``) from the global seed."""
    atk = torchattacks.APGD(model, n_restarts=1, seed=seed, **kwargs)
    torch.manual_seed(seed)
    _, adv = atk.perturb(x, y, best_loss=True)
    return adv


def _naive_margin(z: Tensor, y: Tensor) -> Tensor:
    """max_{j != y} z_j - z_y, one row at a time."""
    out = []
    for row, label in zip(z, y):
        others = [row[j] for j in range(row.shape[0]) if j != int(label)]
        out.append(torch.stack(others).max() - row[label])
    return torch.stack(out)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_single_exit_equals_torchattacks(norm: str, loss: str) -> None:
    model = OneExit().eval()
    x, y = _data()
    ref = _torchattacks_best(model.net, x, y, 7, norm=norm, eps=EPS[norm], steps=25, loss=loss)
    for mode in ("average", "max-average", "single"):
        ours = multi_exit_apgd(
            model,
            x,
            y,
            eps=EPS[norm],
            norm=norm,
            steps=25,
            loss=loss,
            mode=mode,  # type: ignore[arg-type]
            exit_index=0 if mode == "single" else None,
            generator=torch.Generator().manual_seed(7),
        )
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    # The adapter runs the same function.
    atk = MultiExitAPGD(
        model,
        eps=EPS[norm],
        norm=norm,
        steps=25,
        loss=loss,
        mode="average",  # type: ignore[arg-type]
        generator=torch.Generator().manual_seed(7),
    )
    torch.testing.assert_close(atk(x, y), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_cw_margin_equals_torchattacks_schedule_with_margin_loss(norm: str) -> None:
    # torchattacks has no margin-loss APGD; its APGD with the DLR loss replaced by the
    # margin (read from the instance at call time) is the reference schedule.
    model = OneExit().eval()
    x, y = _data()
    atk = torchattacks.APGD(model.net, norm=norm, eps=EPS[norm], steps=20, n_restarts=1, loss="dlr")
    atk.dlr_loss = _naive_margin
    torch.manual_seed(11)
    _, ref = atk.perturb(x, y, best_loss=True)
    ours = multi_exit_apgd(
        model,
        x,
        y,
        eps=EPS[norm],
        norm=norm,
        steps=20,
        loss="cw",  # type: ignore[arg-type]
        mode="average",
        generator=torch.Generator().manual_seed(11),
    )
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_losses_against_naive_formulas() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (6,), generator=g)
    for e in range(2):
        torch.testing.assert_close(attack_losses(z, y, "cw")[e], _naive_margin(z[e], y))
        for r in range(6):
            row, label = z[e, r], int(y[r])
            top = sorted(row.tolist(), reverse=True)
            other = max(v for j, v in enumerate(row.tolist()) if j != label)
            expected = -(row[label].item() - other) / (top[0] - top[2] + 1e-12)
            assert attack_losses(z, y, "dlr")[e, r].item() == pytest.approx(expected)
            ce = torch.logsumexp(row, 0) - row[label]
            assert attack_losses(z, y, "ce")[e, r].item() == pytest.approx(ce.item())


def test_single_mode_on_a_multi_exit_model_equals_torchattacks_on_the_exit_view() -> None:
    torch.manual_seed(0)
    model = TinyMultiExit(num_classes=5).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(6, 1, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g)
    for i in range(3):
        ref = _torchattacks_best(ExitView(model, i), x, y, 4, norm="Linf", eps=0.1, steps=15)
        ours = multi_exit_apgd(
            model,
            x,
            y,
            eps=0.1,
            steps=15,
            mode="single",
            exit_index=i,
            generator=torch.Generator().manual_seed(4),
        )
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_max_average_is_the_best_average_of_per_exit_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Naive max-average: torchattacks' APGD on each exit from the candidate's own start
    (fed through torch.rand), then per sample the candidate of largest mean CE."""
    torch.manual_seed(0)
    model = TinyMultiExit(num_classes=5).eval()
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(5, 1, 8, 8, generator=g), torch.randint(0, 5, (5,), generator=g)
    num_exits, batch = 3, 5
    noise = torch.rand(num_exits * batch, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    blocks: Iterator[Tensor] = iter(noise.split(batch))
    real_rand = torch.rand

    def fake_rand(*shape: object, **kwargs: object) -> Tensor:
        if kwargs or tuple(shape[0]) != tuple(x.shape):  # type: ignore[arg-type]
            return real_rand(*shape, **kwargs)  # type: ignore[arg-type]
        return next(blocks)

    candidates = []
    with monkeypatch.context() as m:
        m.setattr(torch, "rand", fake_rand)
        for i in range(num_exits):
            atk = torchattacks.APGD(ExitView(model, i), eps=0.1, steps=10, n_restarts=1)
            candidates.append(atk.perturb(x, y, best_loss=True)[1])
    scores = []
    for c in candidates:
        with torch.no_grad():
            z = torch.stack(model(c))
        scores.append(attack_losses(z, y, "ce").mean(0))
    score = torch.stack(scores)  # (E, B)
    expected = torch.stack([candidates[int(score[:, r].argmax())][r] for r in range(batch)])
    ours = multi_exit_apgd(
        model,
        x,
        y,
        eps=0.1,
        steps=10,
        mode="max-average",
        generator=torch.Generator().manual_seed(9),
    )
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("loss", ["ce", "dlr", "cw"])
def test_bound_range_and_loss_increase(norm: str, loss: str) -> None:
    torch.manual_seed(0)
    model = TinyMultiExit(num_classes=5).eval()
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(8, 1, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)
    eps = EPS[norm]
    adv = multi_exit_apgd(
        model,
        x,
        y,
        eps=eps,
        norm=norm,
        steps=10,
        loss=loss,
        mode="average",  # type: ignore[arg-type]
        generator=torch.Generator().manual_seed(0),
    )
    delta = (adv - x).flatten(1)
    dist = delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)
    assert float(dist.max()) <= eps + 1e-5
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    # The start, rebuilt here from the reference formula: a point on the sphere, clipped.
    t = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    if norm == "Linf":
        start = x + eps * t / t.flatten(1).abs().amax(1).view(-1, 1, 1, 1)
    else:
        t = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
        start = x + eps * t / (t.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-12)
    start = start.clamp(0, 1)
    with torch.no_grad():
        before = attack_losses(torch.stack(model(start)), y, loss).mean(0)  # type: ignore[arg-type]
        after = attack_losses(torch.stack(model(adv)), y, loss).mean(0)  # type: ignore[arg-type]
    assert bool((after >= before - 1e-6).all())
    assert float(after.sum()) > float(before.sum())


def test_determinism_modes_restored_and_input_untouched() -> None:
    torch.manual_seed(0)
    model = TinyMultiExit(num_classes=5).train()
    model.head1.eval()
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 5, (4,))
    copy = x.clone()
    runs = [
        MultiExitAPGD(model, eps=0.1, steps=5, generator=torch.Generator().manual_seed(1))(x, y)
        for _ in range(2)
    ]
    torch.testing.assert_close(runs[0], runs[1], atol=0, rtol=0)
    assert torch.equal(x, copy)
    assert model.training and not model.head1.training and model.block1.training
    assert all(p.grad is None for p in model.parameters())


def test_restarts_never_lower_the_loss() -> None:
    torch.manual_seed(0)
    model = TinyMultiExit(num_classes=5).eval()
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 5, (6,))
    one = multi_exit_apgd(
        model, x, y, eps=0.05, steps=6, mode="average", generator=torch.Generator().manual_seed(2)
    )
    two = multi_exit_apgd(
        model,
        x,
        y,
        eps=0.05,
        steps=6,
        mode="average",
        restarts=2,
        generator=torch.Generator().manual_seed(2),
    )
    with torch.no_grad():
        l1 = attack_losses(torch.stack(model(one)), y, "ce").mean(0)
        l2 = attack_losses(torch.stack(model(two)), y, "ce").mean(0)
    assert bool((l2 >= l1 - 1e-6).all())


def test_bad_arguments() -> None:
    model = TinyMultiExit(num_classes=5)
    with pytest.raises(ValueError, match="`loss` must be one of"):
        MultiExitAPGD(model, loss="hinge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exit_index"):
        MultiExitAPGD(model, mode="single")
    with pytest.raises(ValueError, match="exit_index"):
        MultiExitAPGD(model, mode="average", exit_index=0)
    with pytest.raises(ValueError, match="`eps`"):
        MultiExitAPGD(model, eps=-1.0)
    with pytest.raises(TypeError, match="`steps`"):
        MultiExitAPGD(model, steps=2.5)  # type: ignore[arg-type]
    two_classes = TinyMultiExit(num_classes=2)
    with pytest.raises(ValueError, match="at least 3 classes"):
        MultiExitAPGD(two_classes, loss="dlr", steps=1)(
            torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)
        )
    with pytest.raises(ValueError, match="labels"):
        MultiExitAPGD(model, steps=1)(torch.rand(2, 1, 8, 8), torch.tensor([0, 7]))


def test_labels_out_of_range_name_the_real_number_of_classes() -> None:
    atk = MultiExitAPGD(TinyMultiExit(num_classes=10), eps=0.1, steps=1)
    images = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"class indices in \[0, K\), got values in \[-1, 0\]"):
        atk(images, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match=r"\[0, 10\) for K = 10 classes"):
        atk(images, torch.tensor([10, 0]))


def test_functional_apgd_validates_images_labels_and_weights() -> None:
    model = TinyMultiExit(num_classes=5).eval()
    y = torch.zeros(2, dtype=torch.long)
    normalized = (torch.rand(2, 1, 8, 8) - 0.5) / 0.25  # values outside [0, 1]
    with pytest.raises(ValueError, match=r"`images` must lie in \[0, 1\]"):
        multi_exit_apgd(model, normalized, y, eps=8 / 255, steps=1)
    with pytest.raises(ValueError, match="contain NaN"):
        multi_exit_apgd(model, torch.full((2, 1, 8, 8), float("nan")), y, steps=1)
    with pytest.raises(TypeError, match="labels"):
        multi_exit_apgd(model, torch.rand(2, 1, 8, 8), [0, 1], steps=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode='single' has none"):
        multi_exit_apgd(
            model, torch.rand(2, 1, 8, 8), y, mode="single", exit_index=0, exit_weights=[1, 2, 3]
        )


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_stays_in_the_ball(norm: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = TinyMultiExit(num_classes=5).eval().to(dtype)
    x = torch.rand(16, 1, 8, 8).to(dtype)
    y = torch.randint(0, 5, (16,))
    eps = 8 / 255 if norm == "Linf" else 0.5
    for mode in ("single", "max-average"):
        adv = MultiExitAPGD(
            model,
            eps=eps,
            norm=norm,  # type: ignore[arg-type]
            steps=10,
            mode=mode,  # type: ignore[arg-type]
            exit_index=0 if mode == "single" else None,
        )(x, y)
        assert adv.dtype == dtype
        delta = (adv.double() - x.double()).flatten(1)
        size = delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)
        assert bool((size <= eps).all()), float(size.max() - eps)
        assert bool((adv >= 0).all() and (adv <= 1).all())
        assert bool((adv != x).any())


def test_images_in_another_dtype_than_the_model() -> None:
    # float64 images, float32 model: every adapter attack casts what the model sees.
    from neokd_losses.attacks import ExitPolicyAttack, SlowdownAttack

    torch.manual_seed(0)
    model = TinyMultiExit(num_classes=5).eval()
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (6,))
    thresholds = [0.5, 0.5, 0.0]
    attacks = [
        MultiExitAPGD(model, eps=0.1, steps=3),
        ExitPolicyAttack(model, thresholds, eps=0.1, alpha=0.02, steps=3),
        SlowdownAttack(model, thresholds, eps=0.1, alpha=0.02, steps=3),
    ]
    for atk in attacks:
        adv = atk(x, y)
        assert adv.dtype == torch.float64
        assert float((adv - x).abs().max()) <= 0.1
    functional = multi_exit_apgd(model, x, y, eps=0.1, steps=3)
    assert functional.dtype == torch.float64 and float((functional - x).abs().max()) <= 0.1


def test_integer_labels_of_any_width() -> None:
    from neokd_losses.attacks import MultiExitPGD
    from neokd_losses.functional import multi_exit_pgd

    model = TinyMultiExit(num_classes=5).eval()
    x = torch.rand(4, 1, 8, 8)
    y = torch.tensor([0, 3, 4, 1])
    for attack in (
        lambda labels: MultiExitPGD(model, eps=0.1, alpha=0.02, steps=2, random_start=False)(
            x, labels
        ),
        lambda labels: multi_exit_pgd(
            model, x, labels, eps=0.1, alpha=0.02, steps=2, random_start=False
        ),
        lambda labels: MultiExitAPGD(
            model, eps=0.1, steps=2, generator=torch.Generator().manual_seed(0)
        )(x, labels),
    ):
        reference = attack(y)
        for dtype in (torch.int32, torch.uint8):
            assert torch.equal(attack(y.to(dtype)), reference)
    with pytest.raises(TypeError, match="labels"):
        multi_exit_pgd(model, x, y.float(), eps=0.1, alpha=0.02, steps=1)
