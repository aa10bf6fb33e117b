"""The reference loop (examples/train.py) against a naive training loop written here.

Both train the digits CNN for a few batches from the same initial weights, in the same
batch order, with the same attack random starts, EOKD masks and dropout draws; the
weights they end with must agree to float tolerance. What the naive loop replicates of
the reference loop's randomness (read from examples/train.py and examples/_data.py):

- ``seed_everything(seed)`` (Python, NumPy and torch's global RNG) and then the model's
  initialization from torch's global RNG: building the data splits draws only from
  dedicated generators, so the model is the first thing the global RNG makes;
- the digits split: one ``randperm`` of the 1797 images with ``split_seed`` (test, then
  validation, then training images, the first ``train_cap`` of them kept);
- the batch order of epoch e: ``randperm`` of the training images with ``seed * 1000003 + e``, the
  last batch smaller when the batch size does not divide the training set;
- the attack's random starts from a generator seeded ``1000 * seed + 1``, the EOKD masks
  from one seeded ``1000 * seed + 2``; the attack runs the model in eval mode (no dropout
  draw); the two forward passes in train mode draw dropout from the global RNG, clean
  batch first;
- SGD with momentum and weight decay, a multi-step schedule stepped after every epoch.

The losses are written here from their definitions (``docs/paper.md``): the Triple Wins
loss ``w_c Σ_i CE(clean_i) + w_a Σ_i CE(adv_i)`` with the weights a parameter, and the
NEO-KD objective ``Σ_i [CE(clean_i) + CE(adv_i) + γ_i (α NKD_i + β EOKD_i)]``, both
averaged over the batch, teachers detached. The attack is the package's ``MultiExitPGD``
(tested on its own against naive references in tests/attacks/test_pgd.py); only the
orthogonal mask is drawn with the package's ``orthogonal_label_mask`` so that the draws
line up.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomllib
import torch
import torch.nn.functional as F
import train
from _data import load_digits_arrays
from _methods import build_criterion
from _models import build_model
from torch import Tensor

from neokd_losses.attacks import MultiExitPGD
from neokd_losses.losses.orthogonal import orthogonal_label_mask

# A few batches: 80 training images in batches of 32 (32, 32, 16) for two epochs, with
# 3-step attacks, so the partial batch and the per-epoch order are both exercised.
ARGS = [
    "--epochs",
    "2",
    "--train-cap",
    "80",
    "--batch-size",
    "32",
    "--seed",
    "3",
    "--device",
    "cpu",
    "--workers",
    "0",
    "--no-eval",
    "--no-progress",
    "--set",
    "attack.train_steps=3",
]


def _neighbors(i: int, num_exits: int) -> list[int]:
    """The paper's neighbors of exit i (0-based): {0, 1} first, {E-2, E-1} last."""
    if num_exits == 1:
        return [0]
    if i == 0:
        return [0, 1]
    if i == num_exits - 1:
        return [num_exits - 2, num_exits - 1]
    return [i - 1, i, i + 1]


def _soft_ce(student: Tensor, teacher: Tensor) -> Tensor:
    return -(teacher * F.log_softmax(student, dim=-1)).sum(-1)


def naive_triple_wins(
    adv: list[Tensor], clean: list[Tensor], y: Tensor, clean_weight: float, adv_weight: float
) -> Tensor:
    total = clean[0].new_zeros(())
    for c, a in zip(clean, adv, strict=True):
        total = total + clean_weight * F.cross_entropy(c, y) + adv_weight * F.cross_entropy(a, y)
    return total


def naive_neokd(
    adv: list[Tensor],
    clean: list[Tensor],
    y: Tensor,
    mask: Tensor | None,
    alpha: float,
    beta: float,
    gamma: list[float],
) -> Tensor:
    num_exits = len(adv)
    probs = [F.softmax(c, dim=-1).detach() for c in clean]
    per_sample = clean[0].new_zeros(y.shape[0])
    for i in range(num_exits):
        terms = F.cross_entropy(clean[i], y, reduction="none") + F.cross_entropy(
            adv[i], y, reduction="none"
        )
        near = _neighbors(i, num_exits)
        nkd = _soft_ce(adv[i], sum(probs[n] for n in near) / len(near))
        eokd = torch.zeros_like(nkd)
        if beta:
            assert mask is not None
            kept = probs[i] * mask[i]
            eokd = _soft_ce(adv[i], kept / kept.sum(-1, keepdim=True))
        per_sample = per_sample + terms + gamma[i] * (alpha * nkd + beta * eokd)
    return per_sample.mean()


def naive_loop(
    cfg: dict[str, Any], method: str, adv_weights: tuple[float, float]
) -> dict[str, Tensor]:
    """Train as the reference loop does, written out step by step."""
    seed = cfg["run"]["seed"]
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002
    torch.manual_seed(seed)
    model = build_model(cfg["model"]["name"], 10, 1)

    data = cfg["data"]
    raw_images, raw_labels = load_digits_arrays()
    images = torch.as_tensor(raw_images, dtype=torch.float32).div(16.0).unsqueeze(1)
    labels = torch.as_tensor(raw_labels, dtype=torch.int64)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(data["split_seed"]))
    train_idx = perm[data["test_size"] + data["val_size"] :][: data["train_cap"]]
    x_train, y_train = images[train_idx], labels[train_idx]

    o, a = cfg["optim"], cfg["attack"]
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=o["lr"],
        momentum=o["momentum"],
        weight_decay=o["weight_decay"],
        nesterov=o["nesterov"],
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, o["milestones"], o["gamma"])
    attack = MultiExitPGD(
        model,
        eps=a["eps"],
        alpha=a["step_size"],
        steps=a["train_steps"],
        random_start=a["random_start"],
        mode=a["train_mode"],
        generator=torch.Generator().manual_seed(1000 * seed + 1),
    )
    loss_generator = torch.Generator().manual_seed(1000 * seed + 2)
    neokd = cfg["loss"]["neokd"]
    n, batch = len(y_train), o["batch_size"]
    for epoch in range(o["epochs"]):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            x, y = x_train[idx], y_train[idx]
            model.eval()
            x_adv = attack(x, y)
            model.train()
            clean = model(x)
            adv = model(x_adv)
            if method == "adv":
                loss = naive_triple_wins(adv, clean, y, *adv_weights)
            else:
                mask = (
                    orthogonal_label_mask(y, len(adv), 10, generator=loss_generator)
                    if neokd["beta"]
                    else None
                )
                loss = naive_neokd(
                    adv, clean, y, mask, neokd["alpha"], neokd["beta"], neokd["exit_weights"]
                )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _adv_weights() -> tuple[float, float]:
    """The clean / adversarial weights the reference loop's ``adv`` method uses."""
    from _config import load

    config = load(Path(train.__file__).parent / "configs" / "digits.toml", {"loss.method": "adv"})
    module = build_criterion(config.loss).module
    return float(module.clean_weight), float(module.adv_weight)


@pytest.mark.parametrize("method", ["adv", "neokd"])
def test_reference_loop_equals_a_naive_loop(tmp_path: Path, method: str) -> None:
    out = tmp_path / method
    assert train.main([*ARGS, "--method", method, "--out-dir", str(out)]) == 0
    cfg = tomllib.loads((out / "config.toml").read_text())
    assert cfg["model"]["name"] == "digits_cnn" and cfg["data"]["dataset"] == "digits"
    assert not cfg["data"]["normalize"] and cfg["run"]["amp"] == "none"
    reference = torch.load(out / train.CHECKPOINT, map_location="cpu", weights_only=False)
    assert reference["epoch"] == 2 and reference["batch"] == 0

    naive = naive_loop(cfg, method, _adv_weights() if method == "adv" else (1.0, 1.0))
    assert reference["model"].keys() == naive.keys()
    for name, value in naive.items():
        torch.testing.assert_close(reference["model"][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_a_different_loss_weight_is_detected(tmp_path: Path) -> None:
    """The comparison is sharp: the naive loop with the weights doubled ends elsewhere."""
    out = tmp_path / "adv"
    assert train.main([*ARGS, "--method", "adv", "--out-dir", str(out)]) == 0
    cfg = tomllib.loads((out / "config.toml").read_text())
    reference = torch.load(out / train.CHECKPOINT, map_location="cpu", weights_only=False)
    wc, wa = _adv_weights()
    naive = naive_loop(cfg, "adv", (2 * wc, 2 * wa))
    gap = max(float((reference["model"][k] - v).abs().max()) for k, v in naive.items())
    assert gap > 1e-3
