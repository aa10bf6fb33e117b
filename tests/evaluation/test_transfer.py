"""Transferability matrix: the diagonal is each exit's own single-attack success rate."""

from __future__ import annotations

import pytest
import torch
import torchattacks

from neokd_losses.attacks.exit_view import ExitView
from neokd_losses.attacks.pgd import MultiExitPGD
from neokd_losses.evaluation.transfer import off_diagonal_mean, transferability_matrix
from tests.helpers import TinyMultiExit

EPS, ALPHA, STEPS = 0.1, 0.02, 4


@pytest.fixture
def setup():
    model = TinyMultiExit().double().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 8, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)[1].argmax(-1)  # exit 2 is right on every clean input
    y[::4] = (y[::4] + 1) % 10  # ... except a quarter of them
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    return model, x, y, batches


def _error_rates(model, images, labels) -> list[float]:
    with torch.no_grad():
        return [float((z.argmax(-1) != labels).double().mean()) for z in model(images)]


def test_diagonal_equals_direct_single_attack_success_rate(setup) -> None:
    model, x, y, batches = setup
    m = transferability_matrix(
        model, batches, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=False, progress=False
    )
    assert m.shape == (3, 3) and m.dtype == torch.float64
    for i in range(3):
        # Stock torchattacks PGD on exit i, on the whole set at once.
        atk = torchattacks.PGD(
            ExitView(model, i), eps=EPS, alpha=ALPHA, steps=STEPS, random_start=False
        )
        adv = atk(x, y)
        with torch.no_grad():
            direct = float((model(adv)[i].argmax(-1) != y).double().mean())
        assert m[i, i].item() == pytest.approx(direct, abs=1e-12)
        # The whole row: the same adversarial inputs scored at every exit.
        assert m[i].tolist() == pytest.approx(_error_rates(model, adv, y), abs=1e-12)
    assert m[1, 1] > 0.25  # the attack on exit 2 works beyond the clean errors


def test_matches_multi_exit_pgd_single_mode(setup) -> None:
    model, x, y, batches = setup
    m = transferability_matrix(
        model, batches, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=False, progress=False
    )
    for i in range(3):
        atk = MultiExitPGD(
            model,
            eps=EPS,
            alpha=ALPHA,
            steps=STEPS,
            random_start=False,
            mode="single",
            exit_index=i,
        )
        assert m[i].tolist() == pytest.approx(_error_rates(model, atk(x, y), y), abs=1e-12)


def test_zero_eps_rows_are_the_clean_error_rate(setup) -> None:
    model, x, y, batches = setup
    m = transferability_matrix(model, batches, eps=0.0, alpha=ALPHA, steps=STEPS, progress=False)
    clean = _error_rates(model, x, y)
    for i in range(3):
        assert m[i].tolist() == pytest.approx(clean, abs=1e-12)


def test_inside_no_grad_and_with_empty_batches(setup) -> None:
    model, x, y, batches = setup
    kwargs = {"eps": EPS, "alpha": ALPHA, "steps": STEPS, "random_start": False}
    reference = transferability_matrix(model, batches, progress=False, **kwargs)
    empty = (x[:0], y[:0])
    with torch.no_grad():
        got = transferability_matrix(model, [empty, *batches, empty], progress=False, **kwargs)
    assert torch.equal(got, reference)
    assert all(p.grad is None for p in model.parameters())


def test_labels_are_checked_before_attacking(setup) -> None:
    model, x, y, _ = setup
    bad = y.clone()
    bad[3] = 10  # K = 10 classes
    with pytest.raises(ValueError, match=r"\[0, 10\) for K = 10 classes, got values in \[0, 10\]"):
        transferability_matrix(model, [(x, bad)], eps=EPS, alpha=ALPHA, steps=1, progress=False)


def test_seeded_random_start_is_reproducible(setup) -> None:
    model, _, _, batches = setup
    runs = [
        transferability_matrix(
            model,
            batches,
            eps=EPS,
            alpha=ALPHA,
            steps=2,
            generator=torch.Generator().manual_seed(3),
            progress=False,
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])


def test_mode_restored_and_progress(setup) -> None:
    model, _, _, batches = setup
    model.train()
    transferability_matrix(model, batches[:1], eps=EPS, alpha=ALPHA, steps=1, progress=True)
    assert model.training and all(mod.training for mod in model.modules())


def test_off_diagonal_mean_closed_form() -> None:
    m = torch.tensor([[0.9, 0.1, 0.2], [0.3, 0.8, 0.4], [0.5, 0.6, 0.7]], dtype=torch.float64)
    assert off_diagonal_mean(m) == pytest.approx((0.1 + 0.2 + 0.3 + 0.4 + 0.5 + 0.6) / 6)


@pytest.mark.parametrize(
    ("matrix", "error", "match"),
    [
        ([[0.5, 0.5], [0.5, 0.5]], TypeError, "Tensor"),
        (torch.zeros(2, 3), ValueError, r"square \(E, E\)"),
        (torch.zeros(1, 1), ValueError, "E >= 2"),
    ],
)
def test_off_diagonal_mean_errors(matrix, error, match: str) -> None:
    with pytest.raises(error, match=match):
        off_diagonal_mean(matrix)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"eps": -0.1}, ValueError, "eps"),
        ({"alpha": 0.0}, ValueError, "alpha"),
        ({"norm": "L1"}, ValueError, "norm"),
    ],
)
def test_transferability_argument_errors(setup, kwargs, error, match: str) -> None:
    model, _, _, batches = setup
    args = {"eps": EPS, "alpha": ALPHA, "steps": STEPS}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        transferability_matrix(model, batches, progress=False, **args)


def test_transferability_empty_loader_and_wrong_model(setup) -> None:
    model = setup[0]
    with pytest.raises(ValueError, match="no samples"):
        transferability_matrix(model, [], eps=EPS, alpha=ALPHA, steps=STEPS, progress=False)
    with pytest.raises(TypeError, match="nn.Module"):
        transferability_matrix(lambda x: [x], [], eps=EPS, alpha=ALPHA, steps=STEPS)  # type: ignore[arg-type]


@pytest.mark.cuda
def test_cuda_model_with_cpu_batches_and_generator(setup) -> None:
    model, x, y, batches = setup
    cpu = transferability_matrix(
        model, batches, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=False, progress=False
    )
    gpu = transferability_matrix(
        model.cuda(),
        batches,
        eps=EPS,
        alpha=ALPHA,
        steps=STEPS,
        random_start=False,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    assert gpu.device.type == "cpu"
    torch.testing.assert_close(gpu, cpu, atol=1 / 16, rtol=0)  # at most one sample flips
