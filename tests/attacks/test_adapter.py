"""The torchattacks conventions every multi-exit attack shares (``_adapter.MultiExitAttack``).

MultiExitPGD had them first; APGD, the exit-policy and the slow-down attacks now get the
same: a validated ``set_normalization_used``, the channel check on normalized inputs, one
final-exit view per network (so ``torchattacks.MultiAttack`` mixes them), ``save()`` with
outputs on the model's device while it runs, and the model's modes restored.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torchattacks
from torch import nn

from neokd_losses.attacks import (
    ExitPolicyAttack,
    MultiExitAPGD,
    MultiExitPGD,
    SlowdownAttack,
)
from neokd_losses.attacks._adapter import MultiExitAttack
from tests.helpers import TinyMultiExit

FACTORIES: dict[str, Callable[[nn.Module], MultiExitAttack]] = {
    "pgd": lambda m: MultiExitPGD(m, eps=0.05, alpha=0.02, steps=2),
    "apgd": lambda m: MultiExitAPGD(m, eps=0.05, steps=2),
    "policy": lambda m: ExitPolicyAttack(m, thresholds=[0.9, 0.9, 0.0], eps=0.05, steps=2),
    "slowdown": lambda m: SlowdownAttack(m, thresholds=[0.9, 0.9, 0.0], eps=0.05, steps=2),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return TinyMultiExit(in_channels=3).eval()


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_every_attack_shares_the_adapter(kind: str) -> None:
    atk = FACTORIES[kind](_model())
    assert isinstance(atk, MultiExitAttack)


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_normalization_is_validated(kind: str) -> None:
    atk = FACTORIES[kind](_model())
    with pytest.raises(ValueError, match="non-zero"):
        atk.set_normalization_used(mean=[0.5, 0.5, 0.5], std=[0.2, 0.0, 0.2])
    with pytest.raises(ValueError, match="one value per image channel"):
        atk.set_normalization_used(mean=[0.5, 0.5], std=[0.2, 0.2, 0.2])
    with pytest.raises(TypeError, match="sequence of numbers"):
        atk.set_normalization_used(mean="abc", std=[0.2])  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_normalized_inputs_with_the_wrong_channels_say_so(kind: str) -> None:
    atk = FACTORIES[kind](_model())
    atk.set_normalization_used(mean=[0.5, 0.5], std=[0.25, 0.25])
    with pytest.raises(ValueError, match=r"\(B, 2, H, W\), got shape \(2, 3, 8, 8\)"):
        atk(torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]))


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_normalized_round_trip_equals_the_attack_on_raw_images(kind: str) -> None:
    model = _model()
    x, y = torch.rand(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    class Normalizing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
            return self.inner((z - m.to(z.dtype)) / s.to(z.dtype))

    atk = FACTORIES[kind](model.double())
    atk.set_normalization_used(mean=mean, std=std)
    torch.manual_seed(3)
    normalized = atk((x - m) / s, y) * s + m
    torch.manual_seed(3)
    raw = FACTORIES[kind](Normalizing().double())(x, y)
    torch.testing.assert_close(normalized, raw, rtol=0, atol=1e-9)


def test_multi_attack_accepts_a_mix_of_the_attacks_on_one_network() -> None:
    model = _model()
    attacks = [FACTORIES[kind](model) for kind in ("pgd", "apgd")]
    assert attacks[0].model is attacks[1].model  # one final-exit view per network
    combined = torchattacks.MultiAttack(attacks)
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    adv = combined(x, y)
    assert adv.shape == x.shape and float((adv - x).abs().max()) <= 0.05 + 1e-6


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_modes_restored_even_when_the_model_raises(kind: str) -> None:
    model = _model().train()
    model.block1.eval()
    atk = FACTORIES[kind](model)
    with pytest.raises(RuntimeError, match="channels"):
        atk(torch.rand(2, 5, 8, 8), torch.tensor([0, 1]))  # wrong channels: the model fails
    assert model.training and not model.block1.training and model.block2.training


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_save_writes_the_adversarial_images_and_restores_modes(kind: str, tmp_path) -> None:
    model = _model()
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 10, (8,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    atk = FACTORIES[kind](model)
    model.train()
    rob_acc, _, _ = atk.save(
        loader, save_path=tmp_path / "adv.pt", verbose=False, return_verbose=True
    )
    assert model.training and all(m.training for m in model.modules())
    saved = torch.load(tmp_path / "adv.pt")
    assert saved["adv_inputs"].shape == x.shape and torch.equal(saved["labels"], y)
    assert float((saved["adv_inputs"] - x).abs().max()) <= 0.05 + 1e-6
    assert 0 <= rob_acc <= 100


@pytest.mark.cuda
@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_save_with_a_cuda_model_and_a_cpu_loader(kind: str, tmp_path) -> None:
    model = _model().cuda()
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 10, (8,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    atk = FACTORIES[kind](model)
    rob_acc, _, _ = atk.save(
        loader, save_path=tmp_path / "adv.pt", verbose=False, return_verbose=True
    )
    saved = torch.load(tmp_path / "adv.pt")
    assert saved["adv_inputs"].device.type == "cpu" and saved["adv_inputs"].shape == x.shape
    assert 0 <= rob_acc <= 100
    assert atk(x, y).device == x.device  # outside save(), outputs stay on the input's device
