"""Real early exit against the full forward: measured speed-up and FLOP-predicted speed-up.

``msdnet_cifar100()`` (7 exits, K = 100), eval mode, float32, CIFAR-sized inputs
(3×32×32), under ``torch.inference_mode``, in one run:

- full forward: ``model(x)``, every exit on every sample (what simulated budgeted
  prediction pays);
- early exit: ``EarlyExitClassifier(model, thresholds)(x)``, samples leave the batch at
  the first exit whose confidence reaches its threshold.

Thresholds: the network is untrained, so there is no accuracy to speak of, only the
exit distribution matters. They are fitted with ``fit_thresholds`` (the confidence
quantiles of budgeted prediction: exit k takes the ⌊N·q_k⌋ most confident validation
samples still present) on the logits of ``--val`` random validation images, for the
proportions q = (0.20, 0.15, 0.15, 0.10, 0.10, 0.10, 0.20): half of the samples are
meant to leave at exits 1-3. Test images are other random images; the exit fractions
actually reached on them are printed.

Speed-ups: wall clock = time(full) / time(early); FLOP-predicted = cost of the last exit
/ mean cost of the exits taken, costs from ``stage_costs`` (multiply-adds per exit).
Target: wall clock ≥ 0.7 × predicted, at B = 256 and at B = 1 (B = 1 runs ``--singles``
images one at a time; both paths are timed over the same images). Times are the fastest
of ``--repeats`` runs after a warm-up, the two paths alternating.

    python benchmarks/bench_early_exit.py [--batch 256] [--singles 64] [--repeats 5]
        [--threads N] [--device cpu]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from neokd_losses.evaluation.budgeted import fit_thresholds
from neokd_losses.inference import EarlyExitClassifier, stage_costs
from neokd_losses.models import msdnet_cifar100

PROPORTIONS = (0.20, 0.15, 0.15, 0.10, 0.10, 0.10, 0.20)


def timed_pair(
    first: Callable[[], object], second: Callable[[], object], repeats: int, device: torch.device
) -> tuple[float, float]:
    """The fastest of ``repeats`` calls of each, alternating, after one warm-up call each.

    Alternating the two makes both see the same load when the machine is shared.
    """
    first()
    second()
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for slot, fn in enumerate((first, second)):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best[slot] = min(best[slot], time.perf_counter() - start)
    return best[0], best[1]


def report(
    name: str, t_full: float, t_early: float, exits: torch.Tensor, costs: list[float]
) -> None:
    cost = torch.tensor(costs, dtype=torch.float64)
    predicted = float(cost[-1] / cost[exits].mean())
    measured = t_full / t_early
    fractions = torch.bincount(exits, minlength=len(costs)).double() / len(exits)
    print(f"{name}: exit fractions {', '.join(f'{f:.2f}' for f in fractions.tolist())}")
    print(
        f"{name}: full {t_full * 1e3:.1f} ms, early exit {t_early * 1e3:.1f} ms; speed-up "
        f"wall clock {measured:.2f}x, FLOP-predicted {predicted:.2f}x, ratio "
        f"{measured / predicted:.2f} (target >= 0.70)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--singles", type=int, default=64)
    parser.add_argument("--val", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    model = msdnet_cifar100().to(device).eval()
    costs = stage_costs(model, torch.zeros(1, 3, 32, 32))
    with torch.inference_mode():
        val = torch.rand(args.val, 3, 32, 32, device=device)
        val_logits = torch.cat([torch.stack(model(chunk)) for chunk in val.split(128)], dim=1)
    thresholds = fit_thresholds(val_logits, list(PROPORTIONS))
    classifier = EarlyExitClassifier(model, thresholds).to(device)
    print(
        f"MSDNet-7 (msdnet_cifar100), {device}, {torch.get_num_threads()} threads; "
        f"costs (M multiply-adds): {', '.join(f'{c / 1e6:.1f}' for c in costs)}"
    )

    with torch.inference_mode():
        x = torch.rand(args.batch, 3, 32, 32, device=device)
        exits = classifier(x).exit_index.cpu()
        t_full, t_early = timed_pair(lambda: model(x), lambda: classifier(x), args.repeats, device)
        report(f"B = {args.batch}", t_full, t_early, exits, costs)

        singles = [torch.rand(1, 3, 32, 32, device=device) for _ in range(args.singles)]
        exits = torch.cat([classifier(s).exit_index.cpu() for s in singles])
        t_full, t_early = timed_pair(
            lambda: [model(s) for s in singles],
            lambda: [classifier(s) for s in singles],
            args.repeats,
            device,
        )
        report(f"B = 1 ({args.singles} images)", t_full, t_early, exits, costs)


if __name__ == "__main__":
    main()
