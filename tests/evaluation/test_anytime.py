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


def test_one_attack_per_batch_scores_every_exit_and_leaks_no_gradient() -> None:
    model = TinyMultiExit().double()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(10, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(10, (10,), generator=g)
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    originals = [b[0].clone() for b in batches]
    pgd = MultiExitPGD(model, eps=0.1, alpha=0.02, steps=3, random_start=False, mode="average")
    outputs: list[torch.Tensor] = []

    def attack(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        outputs.append(pgd(images, labels))
        return outputs[-1]

    result = anytime_accuracy(model, batches, attack, progress=False)
    assert len(outputs) == 2  # one adversarial batch, shared by the three exits
    expected = [0, 0, 0]
    for adv, (_, labels) in zip(outputs, batches):
        for i, count in enumerate(_direct_counts(model.eval(), adv, labels)):
            expected[i] += count
    assert result.correct == tuple(expected)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(b[0], o) for b, o in zip(batches, originals))


def test_labels_are_checked_before_the_attack() -> None:
    calls = []

    def attack(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return images

    with pytest.raises(ValueError, match=r"\[0, 2\) for K = 2 classes, got values in \[0, 2\]"):
        anytime_accuracy(HandModel(), [(X, torch.tensor([0, 1, 2, 0, 1]))], attack, progress=False)
    assert calls == []
    with pytest.raises(ValueError, match=r"got values in \[-1, 1\]"):
        anytime_accuracy(HandModel(), [(X, torch.tensor([0, 1, -1, 0, 1]))], progress=False)
    with pytest.raises(TypeError, match="integer class indices"):
        anytime_accuracy(HandModel(), [(X, Y.float())], progress=False)


def test_empty_batches_are_skipped() -> None:
    empty = (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    result = anytime_accuracy(HandModel(), [empty, *hand_batches(), empty], progress=False)
    assert result.correct == HAND_CORRECT and result.num_samples == 5
    with pytest.raises(ValueError, match="no samples"):
        anytime_accuracy(HandModel(), [empty], swap_attack, progress=False)


def test_dict_batches_are_rejected_with_their_keys() -> None:
    loader = [{"image": X, "label": Y}]
    with pytest.raises(TypeError, match=r"got a dict with keys \['image', 'label'\] at batch 0"):
        anytime_accuracy(HandModel(), loader, progress=False)
    # The fix the message suggests works.
    fixed = ((b["image"], b["label"]) for b in loader)
    assert anytime_accuracy(HandModel(), fixed, progress=False).correct == HAND_CORRECT


def test_list_batches_and_explicit_device() -> None:
    batches = [[X[:2], Y[:2]], [X[2:], Y[2:]]]
    result = anytime_accuracy(HandModel(), batches, device="cpu", progress=False)
    assert result.correct == HAND_CORRECT


@pytest.mark.cuda
def test_cuda_model_with_cpu_loader_and_attack() -> None:
    model = HandModel().cuda()
    seen = []

    def attack(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        seen.append((images.device.type, labels.device.type))
        return images.flip(-1)

    result = anytime_accuracy(model, hand_batches(), attack, progress=False)
    assert result.correct == HAND_CORRECT_SWAPPED
    assert seen == [("cuda", "cuda")] * 2


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


def test_nan_images_are_reported_not_scored() -> None:
    # Formerly a NaN image was scored as an ordinary prediction (a plausible accuracy).
    model = TinyMultiExit().eval()
    images = torch.rand(4, 1, 8, 8)
    images[1, 0, 2, 3] = float("nan")
    labels = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"`images` contain NaN \(1 of 256 values\)"):
        anytime_accuracy(model, [(images, labels)], progress=False)


def test_nan_logits_are_reported_not_scored() -> None:
    # Formerly NaN logits were scored (argmax of NaN is an ordinary class index).
    class NaNExit(nn.Module):
        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            z = x.flatten(1)[:, :3]
            return [z, z * float("nan")]

    batches = [(torch.rand(4, 1, 2, 2), torch.tensor([0, 1, 2, 0]))]
    with pytest.raises(ValueError, match=r"`model\(images\)` contain NaN"):
        anytime_accuracy(NaNExit(), batches, progress=False)


def test_iterable_dataset_loader_with_a_progress_bar() -> None:
    # len() of a DataLoader over an IterableDataset raises TypeError: the bar has no total.
    pytest.importorskip("tqdm")

    class Stream(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
        def __iter__(self):  # type: ignore[no-untyped-def]
            g = torch.Generator().manual_seed(0)
            for _ in range(10):
                yield torch.rand(4, generator=g), int(torch.randint(0, 3, (1,), generator=g))

    class Exits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            return [self.a(x), self.b(x)]

    model = Exits().eval()
    loader = DataLoader(Stream(), batch_size=4)
    with_bar = anytime_accuracy(model, loader, progress=True)
    assert with_bar == anytime_accuracy(model, loader, progress=False)
    assert with_bar.num_samples == 10
