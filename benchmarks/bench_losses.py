"""Speed of NEOKDLoss against a straightforward per-exit, per-sample loop.

Forward + backward of the full NEO-KD objective for E = 7 exits, B = 128, K = 100 (the
CIFAR-100 setting), on identical inputs and the same orthogonal mask, in one run. Prints
time ratios; targets: the vectorized loss at least 5x faster than the loop, and drawing
the orthogonal mask at most 20 % of the loss time.

    python benchmarks/bench_losses.py [--device cuda] [--repeats 20]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from neokd_losses import NEOKDLoss, orthogonal_label_mask


def loop_neokd(
    adv: list[Tensor], clean: list[Tensor], targets: Tensor, mask: Tensor, alpha: float, beta: float
) -> Tensor:
    """The paper's objective written the obvious way: a loop over exits and samples."""
    num_exits, batch = len(adv), adv[0].shape[0]
    total = adv[0].new_zeros(())
    for j in range(batch):
        y = targets[j : j + 1]
        for i in range(num_exits):
            total = (
                total
                + F.cross_entropy(clean[i][j : j + 1], y)
                + F.cross_entropy(adv[i][j : j + 1], y)
            )
            if num_exits == 1:
                members = [0]
            elif i == 0:
                members = [0, 1]
            elif i == num_exits - 1:
                members = [num_exits - 2, num_exits - 1]
            else:
                members = [i - 1, i, i + 1]
            teacher = sum(clean[n][j].detach().softmax(-1) for n in members) / len(members)
            log_p = adv[i][j].log_softmax(-1)
            nkd = -(teacher * log_p).sum()
            p = clean[i][j].detach().softmax(-1) * mask[i, j]
            eokd = -((p / p.sum()) * log_p).sum()
            total = total + alpha * nkd + beta * eokd
    return total / batch


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """The fastest of ``repeats`` calls, in seconds (the minimum is the least noisy)."""
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--exits", type=int, default=7)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--classes", type=int, default=100)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    e, b, k = args.exits, args.batch, args.classes
    adv = [torch.randn(b, k, device=device, requires_grad=True) for _ in range(e)]
    clean = [torch.randn(b, k, device=device, requires_grad=True) for _ in range(e)]
    targets = torch.randint(0, k, (b,), device=device)
    mask = orthogonal_label_mask(targets, e, k)
    criterion = NEOKDLoss().to(device)

    def vectorized() -> None:
        criterion(adv, clean, targets, mask=mask).backward()

    def fresh_mask() -> None:
        criterion(adv, clean, targets).backward()

    def loop() -> None:
        loop_neokd(adv, clean, targets, mask, 3.0, 1.0).backward()

    def draw_mask() -> None:
        orthogonal_label_mask(targets, e, k)

    torch.testing.assert_close(
        criterion(adv, clean, targets, mask=mask), loop_neokd(adv, clean, targets, mask, 3.0, 1.0)
    )
    t_vec = timed(vectorized, args.repeats, device)
    t_fresh = timed(fresh_mask, args.repeats, device)
    t_loop = timed(loop, max(2, args.repeats // 10), device)
    t_mask = timed(draw_mask, args.repeats, device)
    print(f"NEOKDLoss forward+backward, E={e}, B={b}, K={k}, device={device}")
    print(f"  vectorized (given mask)   {t_vec * 1e3:9.2f} ms")
    print(f"  vectorized (fresh mask)   {t_fresh * 1e3:9.2f} ms")
    print(f"  per-exit/per-sample loop  {t_loop * 1e3:9.2f} ms")
    print(f"  mask draw alone           {t_mask * 1e3:9.2f} ms")
    print(f"speed-up over the loop: {t_loop / t_vec:.1f}x (target >= 5x)")
    print(f"mask draw / loss time:  {t_mask / t_fresh:.1%} (target <= 20%)")


if __name__ == "__main__":
    main()
