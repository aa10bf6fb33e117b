"""Draw the figure of the how-to "Deploy with real early exit": accuracy vs measured time.

A SmallCNN (3 exits) is trained for four epochs (``--epochs``) on scikit-learn's handwritten digits
(8×8 images upsampled to 28×28, split 1000 train / 400 validation / 397 test, seeded).
For budget points p = 1..P, thresholds are fitted on the validation split
(``fit_thresholds`` with ``exit_proportions(p, 3)``), and the test split runs through
``EarlyExitClassifier`` in one batch; the figure plots the test accuracy against the
measured wall-clock time per image, next to the time the FLOP counts predict
(full-forward time × mean cost / last exit's cost) and to the full forward itself.
Times are the fastest of ``--repeats`` runs on one thread; the full forward is timed
between the budget points and its fastest run is kept, so both see the same load.

Usage (from the repository root; needs matplotlib and scikit-learn, e.g.
``pip install -e ".[examples]"``)::

    python docs/scripts/deploy_figure.py                # writes docs/figures/deploy_speedup.png
    python docs/scripts/deploy_figure.py --out /tmp/f   # somewhere else
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from neokd_losses.evaluation import exit_proportions, fit_thresholds
from neokd_losses.inference import EarlyExitClassifier, stage_costs
from neokd_losses.models import SmallCNN


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False)
    return images.clamp(0, 1), torch.tensor(data.target)


def fastest(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "figures")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--points", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)

    images, labels = digits()
    perm = torch.randperm(len(images))
    train, val, test = perm[:1000], perm[1000:1400], perm[1400:]
    model = SmallCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(args.epochs):
        model.train()
        for batch in train[torch.randperm(len(train))].split(50):
            loss = sum(F.cross_entropy(z, labels[batch]) for z in model(images[batch]))
            optimizer.zero_grad()
            loss.backward()  # type: ignore[union-attr]
            optimizer.step()
    model.eval()

    costs = stage_costs(model, images[:1])
    x_val, x_test, y_test = images[val], images[test], labels[test]
    with torch.inference_mode():
        val_logits = torch.stack(model(x_val))
        full_accuracy = float((model(x_test)[-1].argmax(-1) == y_test).float().mean())
        t_full = float("inf")
        measured, predicted, accuracy = [], [], []
        for p in torch.linspace(1, 39, args.points).tolist():
            thresholds = fit_thresholds(val_logits, exit_proportions(p, 3))
            classifier = EarlyExitClassifier(model, thresholds, costs)
            out = classifier(x_test)
            assert out.cost is not None
            accuracy.append(float((out.prediction == y_test).float().mean()))
            measured.append(fastest(lambda c=classifier: c(x_test), args.repeats) / len(test))
            predicted.append(float(out.cost.mean()) / costs[-1])
            # The full forward is timed between the points, so that both see the same load.
            t_full = min(t_full, fastest(lambda: model(x_test), args.repeats) / len(test))
    predicted = [t_full * share for share in predicted]

    fig, ax = plt.subplots(figsize=(6.4, 4.6), layout="constrained")
    ms, pct = 1e3, 100.0
    ax.plot(
        [t * ms for t in measured], [a * pct for a in accuracy], "o", label="early exit, measured"
    )
    ax.plot(
        [t * ms for t in predicted],
        [a * pct for a in accuracy],
        "s",
        mfc="none",
        label="early exit, FLOP-predicted",
    )
    for t, q, a in zip(measured, predicted, accuracy, strict=True):
        ax.plot([q * ms, t * ms], [a * pct, a * pct], color="0.7", lw=0.8, zorder=0)
    ax.plot([t_full * ms], [full_accuracy * pct], "k*", ms=12, label="full forward (last exit)")
    ax.set_xlabel("wall-clock time per image (ms; batch of 397, 1 CPU thread)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("SmallCNN on digits: accuracy against measured time")
    ax.set_xlim(left=0, right=max([t_full, *measured]) * ms * 1.15)
    low = min([full_accuracy, *accuracy]) * pct
    ax.set_ylim(max(0.0, low - 5.0), 100.0)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=3, fontsize="small")
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "deploy_speedup.png", dpi=120)
    print(f"costs {costs}; full {t_full * ms:.3f} ms/image, accuracy {full_accuracy:.3f}")
    for t, q, a in zip(measured, predicted, accuracy, strict=True):
        print(f"measured {t * ms:.3f} ms, predicted {q * ms:.3f} ms, accuracy {a:.3f}")


if __name__ == "__main__":
    main()
