"""Transferability matrix: both success-rate definitions, checked against direct attacks."""

from __future__ import annotations

import pytest
import torch
import torchattacks

from neokd_losses.attacks.exit_view import ExitView
from neokd_losses.attacks.pgd import MultiExitPGD
from neokd_losses.evaluation.transfer import (
    TransferResult,
    off_diagonal_mean,
    transferability_matrix,
)
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
    result = transferability_matrix(
        model, batches, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=False, progress=False
    )
    m = result.rates("all")
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
    result = transferability_matrix(
        model, batches, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=False, progress=False
    )
    m = result.rates("all")
    with torch.no_grad():
        right = [z.argmax(-1) == y for z in model(x)]
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
        adv = atk(x, y)
        assert m[i].tolist() == pytest.approx(_error_rates(model, adv, y), abs=1e-12)
        # clean-correct: among the samples exit j gets right on clean inputs.
        with torch.no_grad():
            miss = [z.argmax(-1) != y for z in model(adv)]
        for j in range(3):
            n_right = float(right[j].sum())
            expected = float((miss[j] & right[j]).sum()) / n_right if n_right else 0.0
            assert result.matrix[i, j].item() == pytest.approx(expected, abs=1e-12)


def test_zero_eps_rows_are_the_clean_error_rate(setup) -> None:
    model, x, y, batches = setup
    r = transferability_matrix(model, batches, eps=0.0, alpha=ALPHA, steps=STEPS, progress=False)
    clean = _error_rates(model, x, y)
    for i in range(3):
        assert r.rates("all")[i].tolist() == pytest.approx(clean, abs=1e-12)
    # With eps = 0 nothing a clean input gets right is fooled: the success rate is 0.
    assert torch.equal(r.matrix, torch.zeros(3, 3, dtype=torch.float64))
    assert r.off_diagonal_mean() == 0.0 < r.off_diagonal_mean("all")


def test_inside_no_grad_and_with_empty_batches(setup) -> None:
    model, x, y, batches = setup
    kwargs = {"eps": EPS, "alpha": ALPHA, "steps": STEPS, "random_start": False}
    reference = transferability_matrix(model, batches, progress=False, **kwargs)
    empty = (x[:0], y[:0])
    with torch.no_grad():
        got = transferability_matrix(model, [empty, *batches, empty], progress=False, **kwargs)
    assert torch.equal(got.fooled, reference.fooled) and torch.equal(got.wrong, reference.wrong)
    assert torch.equal(got.clean_correct, reference.clean_correct)
    assert got.num_samples == reference.num_samples == 16
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
    assert torch.equal(runs[0].matrix, runs[1].matrix)
    assert torch.equal(runs[0].wrong, runs[1].wrong)


def test_mode_restored_and_progress(setup) -> None:
    model, _, _, batches = setup
    model.train()
    transferability_matrix(model, batches[:1], eps=EPS, alpha=ALPHA, steps=1, progress=True)
    assert model.training and all(mod.training for mod in model.modules())


def test_off_diagonal_mean_closed_form() -> None:
    m = torch.tensor([[0.9, 0.1, 0.2], [0.3, 0.8, 0.4], [0.5, 0.6, 0.7]], dtype=torch.float64)
    assert off_diagonal_mean(m) == pytest.approx((0.1 + 0.2 + 0.3 + 0.4 + 0.5 + 0.6) / 6)


class _Threshold(torch.nn.Module):
    """Two exits on a scalar input x: exit A says class 1 iff x > 0.5, exit B iff x < 0.5."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = 10 * (x.reshape(-1, 1) - 0.5)
        zero = torch.zeros_like(z)
        return [torch.cat([zero, z], 1), torch.cat([zero, -z], 1)]


def test_hand_computed_case_where_the_definitions_differ() -> None:
    # One full PGD step of size eps = 0.1 without random start moves x by exactly
    # +-0.1: the attack on A raises x for y = 0 and lowers it for y = 1, on B the opposite.
    x = torch.tensor([0.45, 0.55, 0.45, 0.55, 0.2], dtype=torch.float64).reshape(5, 1)
    y = torch.tensor([0, 0, 1, 1, 1])
    # clean: A predicts 0,1,0,1,0 (right on samples 0, 3); B predicts 1,0,1,0,1 (right on 1, 2, 4)
    # attack on A: x' = .55 .65 .35 .45 .10 -> A: 1 1 0 0 0 (5 wrong, both A-right fooled)
    #                                          B: 0 0 1 1 1 (0 wrong)
    # attack on B: x' = .35 .45 .55 .65 .30 -> A: 0 0 1 1 0 (1 wrong: sample 4, not A-right)
    #                                          B: 1 1 0 0 1 (4 wrong, B-right 1 and 2 fooled)
    r = transferability_matrix(
        _Threshold(), [(x, y)], eps=0.1, alpha=0.1, steps=1, random_start=False, progress=False
    )
    assert r.count == "clean-correct"
    assert r.clean_correct.tolist() == [2, 3]
    assert r.fooled.tolist() == [[2, 0], [0, 2]]
    assert r.wrong.tolist() == [[5, 0], [1, 4]]
    assert r.num_samples == 5
    expected_clean_correct = torch.tensor([[1.0, 0.0], [0.0, 2 / 3]], dtype=torch.float64)
    expected_all = torch.tensor([[1.0, 0.0], [0.2, 0.8]], dtype=torch.float64)
    torch.testing.assert_close(r.matrix, expected_clean_correct, atol=1e-15, rtol=0)
    torch.testing.assert_close(r.rates("all"), expected_all, atol=1e-15, rtol=0)
    assert r.denominators().tolist() == [[2, 3], [2, 3]]
    assert r.denominators("all").tolist() == [[5, 5], [5, 5]]
    assert r.off_diagonal_mean() == 0.0
    assert r.off_diagonal_mean("all") == pytest.approx(0.1, abs=1e-15)
    assert off_diagonal_mean(r) == 0.0
    old = transferability_matrix(
        _Threshold(),
        [(x, y)],
        eps=0.1,
        alpha=0.1,
        steps=1,
        random_start=False,
        count="all",
        progress=False,
    )
    assert old.count == "all"
    torch.testing.assert_close(old.matrix, expected_all, atol=1e-15, rtol=0)
    d = r.to_dict()
    assert d["count"] == "clean-correct" and d["matrix_all"] == old.matrix.tolist()
    assert d["fooled"] == [[2, 0], [0, 2]] and d["clean_correct"] == [2, 3]


def test_zero_denominator_gives_zero_rate() -> None:
    r = TransferResult(
        "clean-correct",
        clean_correct=torch.tensor([0, 2]),
        fooled=torch.tensor([[0, 1], [0, 2]]),
        wrong=torch.tensor([[3, 2], [3, 3]]),
        num_samples=3,
    )
    assert r.matrix.tolist() == [[0.0, 0.5], [0.0, 1.0]]


def test_unknown_count_and_nan_inputs(setup) -> None:
    model, x, y, batches = setup
    with pytest.raises(ValueError, match="`count` must be one of 'clean-correct', 'all'"):
        transferability_matrix(model, batches, eps=EPS, alpha=ALPHA, steps=1, count="clean")  # type: ignore[arg-type]
    bad = x.clone()
    bad[2, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="`images` contain NaN"):
        transferability_matrix(model, [(bad, y)], eps=EPS, alpha=ALPHA, steps=1, progress=False)


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
    assert gpu.matrix.device.type == "cpu"
    torch.testing.assert_close(
        gpu.rates("all"), cpu.rates("all"), atol=1 / 16, rtol=0
    )  # at most one sample flips
