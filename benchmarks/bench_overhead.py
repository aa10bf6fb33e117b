"""Overhead of the NEO-KD loss against the model step it is added to.

``msdnet_cifar100()`` (7 exits, K = 100), B = 64 CIFAR-100-sized inputs (3×32×32), train
mode, float32, in one run:

- model step: forward + backward of the MSDNet on one batch (the loss on top is a plain
  sum of the logits, so this is the network's own cost);
- loss step: forward + backward of ``NEOKDLoss()`` (α = 3, β = 1, a fresh orthogonal
  mask per call) on the model's outputs, adversarial and clean logits each a list of
  7 tensors (64, 100).

Prints both times and their ratio; target: the loss costs at most 2 % of the model step.
A NEO-KD training step runs the model twice (clean and adversarial batches), so the
loss's share of a real step is about half the printed ratio. Times are the fastest of
``--repeats`` runs after a warm-up (the minimum is the least noisy).

    python benchmarks/bench_overhead.py [--device cuda] [--repeats 10] [--batch 64]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import Tensor

from neokd_losses.losses.neokd import NEOKDLoss
from neokd_losses.models import msdnet_cifar100


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """The fastest of ``repeats`` calls after one warm-up call, in seconds."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    model = msdnet_cifar100().to(device).train()
    images = torch.rand(args.batch, 3, 32, 32, device=device)
    targets = torch.randint(0, model.num_classes, (args.batch,), device=device)
    with torch.no_grad():
        outputs = model(images)
    adv: list[Tensor] = [z.detach().clone().requires_grad_() for z in outputs]
    clean: list[Tensor] = [(z + 0.1 * torch.randn_like(z)).requires_grad_() for z in outputs]
    criterion = NEOKDLoss().to(device)

    def model_step() -> None:
        model.zero_grad(set_to_none=True)
        torch.stack(model(images)).sum().backward()

    def loss_step() -> None:
        for z in (*adv, *clean):
            z.grad = None
        criterion(adv, clean, targets).backward()

    t_model = timed(model_step, args.repeats, device)
    t_loss = timed(loss_step, args.repeats, device)
    print(
        f"msdnet_cifar100, E={len(outputs)}, B={args.batch}, K={model.num_classes}, "
        f"3x32x32, device={device}, threads={torch.get_num_threads()}"
    )
    print(f"  model forward+backward      {t_model * 1e3:9.2f} ms")
    print(f"  NEOKDLoss forward+backward  {t_loss * 1e3:9.2f} ms")
    print(f"loss / model step: {t_loss / t_model:.2%} (target <= 2%)")


if __name__ == "__main__":
    main()
