"""Anytime accuracy against hand counts on tiny models, clean and attacked."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torchattacks
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from neokd_losses.attacks.exit_view import ExitView
from neokd_losses.attacks.pgd import MultiExitPGD
from neokd_losses.evaluation.anytime import AnytimeResult, anytime_accuracy, anytime_table
from tests.helpers import TinyMultiExit


class HandModel(nn.Module):
    """Three exits on (B, 2) inputs whose predictions are easy to count by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.tensor([0.0, 1.5]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x, -x, x + self.offset]


# Inputs, labels and, per exit, the argmax worked out by hand:
#   x            y   exit 1 (x)   exit 2 (-x)   exit 3 (x + [0, 1.5])
#   [2.0, 1.0]   0   0 ok         1             [2.0, 2.5] -> 1
#   [0.0, 3.0]   1   1 ok         0             [0.0, 4.5] -> 1 ok
#   [5.0, 4.0]   1   0            1 ok          [5.0, 5.5] -> 1 ok
#   [3.0, 0.5]   0   0 ok         1             [3.0, 2.0] -> 0 ok
#   [1.0, 2.0]   0   1            0 ok          [1.0, 3.5] -> 1
X = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 4.0], [3.0, 0.5], [1.0, 2.0]])
Y = torch.tensor([0, 1, 1, 0, 0])
HAND_CORRECT = (3, 2, 3)
# After swapping the two features (x -> x.flip(-1)):
#   [1.0, 2.0] 0: exit1 1, exit2 0 ok, exit3 [1.0, 3.5] 1
#   [3.0, 0.0] 1: exit1 0, exit2 1 ok, exit3 [3.0, 1.5] 0
#   [4.0, 5.0] 1: exit1 1 ok, exit2 0, exit3 [4.0, 6.5] 1 ok
#   [0.5, 3.0] 0: exit1 1, exit2 0 ok, exit3 [0.5, 4.5] 1
#   [2.0, 1.0] 0: exit1 0 ok, exit2 1, exit3 [2.0, 2.5] 1
HAND_CORRECT_SWAPPED = (2, 3, 1)


def swap_attack(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return images.flip(-1)


def hand_batches():
    # Uneven batches (2 + 3) so that the counts must be summed, not averaged.
    return [(X[:2], Y[:2]), (X[2:], Y[2:])]


def test_clean_accuracy_matches_hand_count(device: torch.device) -> None:
    model = HandModel().to(device)
    result = anytime_accuracy(model, hand_batches(), progress=False)
    assert result.correct == HAND_CORRECT
    assert result.num_samples == 5
    assert result.accuracies == (0.6, 0.4, 0.6)
    assert result.mean == pytest.approx((0.6 + 0.4 + 0.6) / 3)
    assert result.attack is None


def test_attacked_accuracy_matches_hand_count() -> None:
    result = anytime_accuracy(HandModel(), hand_batches(), swap_attack, progress=False)
    assert result.correct == HAND_CORRECT_SWAPPED
    assert result.attack == "swap_attack"


def test_dataloader_and_extra_batch_fields() -> None:
    dataset = TensorDataset(X, Y, torch.arange(5))  # a third field (e.g. indices) is ignored
    result = anytime_accuracy(HandModel(), DataLoader(dataset, batch_size=2), progress=False)
    assert result.correct == HAND_CORRECT


def _direct_counts(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[int, ...]:
    with torch.no_grad():
        return tuple(int((z.argmax(-1) == y).sum()) for z in model(x))


def test_multi_exit_pgd_accuracy_equals_direct_count() -> None:
    model = TinyMultiExit().double().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(20, 1, 8, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)[1].argmax(-1)  # labels exit 2 gets right on clean inputs
    atk = MultiExitPGD(model, eps=0.1, alpha=0.02, steps=5, random_start=False, mode="average")
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    result = anytime_accuracy(model, batches, atk, progress=False)
    # The attack on the whole set at once: PGD treats every sample independently.
    assert result.correct == _direct_counts(model, atk(x, y), y)
    assert result.attack == "MultiExitPGD (average)"
    clean = anytime_accuracy(model, batches, progress=False)
    assert clean.correct[1] == 20
    assert result.correct[1] < 20  # the attack does something


def test_torchattacks_on_exit_view() -> None:
    model = TinyMultiExit().double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(12, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(10, (12,), generator=g)
    atk = torchattacks.PGD(ExitView(model, 1), eps=0.1, alpha=0.02, steps=4, random_start=False)
    with torch.no_grad():  # the attack still gets its gradients
        result = anytime_accuracy(model, [(x, y)], atk, progress=False)
    assert result.correct == _direct_counts(model, atk(x, y), y)
    assert result.attack == "PGD"


def test_mode_restored_even_on_error() -> None:
    model = TinyMultiExit()
    model.train()
    model.head1.eval()
    anytime_accuracy(model, [(torch.rand(2, 1, 8, 8), torch.tensor([0, 1]))], progress=False)
    assert model.training and not model.head1.training

    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(2, 2)

        def forward(self, x):
            assert not self.training  # evaluated in eval mode
            raise RuntimeError("boom")

    broken = Broken().train()
    with pytest.raises(RuntimeError, match="boom"):
        anytime_accuracy(broken, hand_batches(), progress=False)
    assert broken.training and broken.inner.training


@pytest.mark.parametrize("with_tqdm", [True, False])
def test_progress_bar_with_and_without_tqdm(with_tqdm: bool, monkeypatch, capsys) -> None:
    if not with_tqdm:
        monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import now raises ImportError
    else:
        pytest.importorskip("tqdm")
    result = anytime_accuracy(HandModel(), hand_batches(), progress=True)
    assert result.correct == HAND_CORRECT
    err = capsys.readouterr().err
    assert ("anytime (clean)" in err) == with_tqdm


def test_result_to_dict_and_markdown() -> None:
    result = anytime_accuracy(HandModel(), hand_batches(), swap_attack, progress=False)
    data = json.loads(json.dumps(result.to_dict()))
    assert data == {
        "attack": "swap_attack",
        "num_samples": 5,
        "correct": [2, 3, 1],
        "per_exit": [0.4, 0.6, 0.2],
        "mean": pytest.approx(0.4),
    }
    assert result.to_markdown("swap").splitlines() == [
        "| inputs | exit 1 | exit 2 | exit 3 | mean |",
        "|---|---|---|---|---|",
        "| swap | 40.00 | 60.00 | 20.00 | 40.00 |",
    ]
    clean = AnytimeResult(HAND_CORRECT, 5)
    assert clean.to_markdown().splitlines()[-1].startswith("| clean | 60.00 | 40.00 | 60.00 |")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"correct": (1, 2), "num_samples": 0}, "num_samples"),
        ({"correct": (), "num_samples": 3}, "one count per exit"),
        ({"correct": (1, 4), "num_samples": 3}, r"\[0, num_samples = 3\]"),
    ],
)
def test_anytime_result_validation(kwargs, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AnytimeResult(**kwargs)


def test_anytime_table_errors() -> None:
    with pytest.raises(ValueError, match="at least one"):
        anytime_table({})
    with pytest.raises(ValueError, match="same number of exits"):
        anytime_table({"a": AnytimeResult((1,), 2), "b": AnytimeResult((1, 1), 2)})


@pytest.mark.parametrize(
    ("model", "loader", "attack", "error", "match"),
    [
        (lambda x: [x], [(X, Y)], None, TypeError, "nn.Module"),
        (HandModel(), [(X, Y)], "pgd", TypeError, "callable"),
        (HandModel(), [X], None, TypeError, r"tuple or list \(images, labels"),
        (HandModel(), [(X, Y.tolist())], None, TypeError, "two Tensors"),
        (HandModel(), [(X, Y[:3])], None, ValueError, r"\(B,\) = \(5,\)"),
        (HandModel(), [], None, ValueError, "no samples"),
    ],
)
def test_anytime_errors(model, loader, attack, error, match: str) -> None:
    with pytest.raises(error, match=match):
        anytime_accuracy(model, loader, attack, progress=False)


def test_model_returning_single_tensor_is_rejected() -> None:
    with pytest.raises(TypeError, match="list or tuple of E exit logits"):
        anytime_accuracy(nn.Linear(2, 2), [(X, Y)], progress=False)
