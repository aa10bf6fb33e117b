"""Cost of the worst-case suite with and without skipping the samples already broken.

The 3-exit SmallCNN (MNIST-sized, 1×28×28), lightly trained (``--train-steps`` Adam steps
on sklearn's 8×8 digits upsampled to 28×28, so that the attacks break samples at
different stages; an untrained model is broken by the first attack), B = 256 test
samples, ε = ``--eps`` (L∞, default 0.12, where the worst case is 5-26 % per exit: this
model is not adversarially trained, and at the paper's MNIST ε = 0.3 the first attack
breaks every sample, which says nothing about the later stages), the ``"standard"``
suite of
:func:`neokd_losses.evaluation.robust_accuracy` with ``--steps`` steps per attack:

- ``skip_broken=True``: each attack only runs on the samples still correct at one exit
  or more (AutoAttack's protocol);
- ``skip_broken=False``: every attack runs on every sample.

Printed: the time ratio (target <= 0.6), the share of the samples each stage saw, and
both worst cases (they differ only through the random starts, drawn for the rows an
attack sees). Times are the fastest of
``--repeats`` runs after a warm-up.

    python benchmarks/bench_eval_suite.py [--device cuda] [--steps 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neokd_losses.evaluation import RobustResult, robust_accuracy
from neokd_losses.models import SmallCNN


def digits_28(device: torch.device) -> tuple[Tensor, Tensor]:
    """sklearn's digits as (N, 1, 28, 28) images in [0, 1] and labels (N,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    return x[perm].to(device), y[perm].to(device)


def train(model: nn.Module, x: Tensor, y: Tensor, steps: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=g).to(x.device)
        loss = sum(F.cross_entropy(z, y[idx]) for z in model(x[idx]))
        opt.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        opt.step()
    model.eval()


def timed(fn: object, repeats: int) -> tuple[float, RobustResult]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - start)
    assert result is not None
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--suite", default="standard")
    parser.add_argument("--eps", type=float, default=0.12)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    x, y = digits_28(device)
    model = SmallCNN().to(device)
    train(model, x[args.batch :], y[args.batch :], args.train_steps)
    loader = [(x[: args.batch], y[: args.batch])]

    def run(skip: bool) -> RobustResult:
        return robust_accuracy(
            model,
            loader,
            args.suite,
            eps=args.eps,
            steps=args.steps,
            skip_broken=skip,
            progress=False,
        )

    run(True)  # warm-up
    t_skip, skipped = timed(lambda: run(True), args.repeats)
    t_all, full = timed(lambda: run(False), args.repeats)
    n = skipped.num_samples
    print(
        f"SmallCNN, B = {n}, eps = {args.eps}, {args.steps} steps, suite {args.suite!r}, {device}"
    )
    print(f"clean accuracy per exit: {[round(a, 3) for a in skipped.clean_accuracy]}")
    print(f"worst case per exit:     {[round(a, 3) for a in skipped.robust_accuracy]}")
    print(f"  without skipping:      {[round(a, 3) for a in full.robust_accuracy]}")
    print("| stage | share of samples seen | predictions broken |")
    print("|---|---|---|")
    for name in skipped.attacks:
        print(f"| {name} | {skipped.seen[name] / n:.3f} | {skipped.broken[name]} |")
    ratio = t_skip / t_all
    print(f"skipping broken samples: {t_skip:.2f} s; every attack on every sample: {t_all:.2f} s")
    print(f"time ratio: {ratio:.3f} (target <= 0.6)")
    print(
        json.dumps(
            {
                "benchmark": "eval_suite",
                "device": str(device),
                "batch": n,
                "steps": args.steps,
                "eps": args.eps,
                "time_skip_s": t_skip,
                "time_all_s": t_all,
                "ratio": ratio,
                "seen_share": {k: v / n for k, v in skipped.seen.items()},
                "worst_case": list(skipped.robust_accuracy),
                "worst_case_without_skipping": list(full.robust_accuracy),
            }
        )
    )


if __name__ == "__main__":
    main()
