"""Draw the two pictures of the Concepts page from the library itself.

- ``neighbor_teacher.png``: the NKD teacher weights (which clean exits enter which
  adversarial exit's teacher), from :func:`neokd_losses.losses.neighbor_weights`, and a
  worked example of one teacher as the average of three clean predictions.
- ``orthogonal_masks.png``: EOKD's exit-wise orthogonal label masks, drawn by
  :func:`neokd_losses.orthogonal_label_mask` with a seeded generator, and one clean
  prediction beside its orthogonal label.

Usage (from the repository root; needs matplotlib, e.g. ``pip install -e ".[examples]"``)::

    python docs/scripts/make_figures.py               # writes docs/figures/*.png
    python docs/scripts/make_figures.py --out /tmp/f  # somewhere else
"""

from __future__ import annotations

import argparse
from fractions import Fraction
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from neokd_losses.losses import neighbor_weights, orthogonal_label_mask

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "figures"
EXIT_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"]
TRUTH_COLOR = "#222222"
DROPPED_COLOR = "#eeeeee"
# PNG metadata without the matplotlib version, so that re-running gives the same bytes.
PNG_METADATA = {"Software": None}


def neighbor_teacher_figure(num_exits: int = 5) -> Figure:
    """Teacher weights for ``num_exits`` exits, and one teacher built from three exits."""
    weights = neighbor_weights(num_exits)
    fig, (ax_matrix, ax_example) = plt.subplots(
        1, 2, figsize=(10.5, 4.2), gridspec_kw={"width_ratios": [1, 1.35]}
    )

    ax_matrix.imshow(weights.numpy(), cmap="Blues", vmin=0, vmax=0.75)
    for i in range(num_exits):
        for k in range(num_exits):
            w = float(weights[i, k])
            if w > 0:
                text = str(Fraction(w).limit_denominator(10))
                ax_matrix.text(k, i, text, ha="center", va="center", fontsize=11)
    ticks = range(num_exits)
    labels = [str(i + 1) for i in ticks]
    ax_matrix.set_xticks(ticks, labels)
    ax_matrix.set_yticks(ticks, labels)
    ax_matrix.set_xlabel("clean prediction of exit k (teacher side)")
    ax_matrix.set_ylabel("adversarial prediction of exit i (student)")
    ax_matrix.set_title(f"NKD teacher weights, E = {num_exits}")

    # Worked example: exit 2's teacher is the mean of the clean predictions of exits 1-3.
    generator = torch.Generator().manual_seed(3)
    num_classes = 6
    logits = 1.6 * torch.randn(3, num_classes, generator=generator)
    logits[:, 2] += torch.tensor([1.0, 2.0, 3.0])  # the true class, clearer at later exits
    probs = logits.softmax(-1)
    teacher = neighbor_weights(3)[1] @ probs
    width = 0.2
    classes = torch.arange(num_classes).float()
    for e in range(3):
        ax_example.bar(
            classes + (e - 1.5) * width,
            probs[e].numpy(),
            width,
            color=EXIT_COLORS[e],
            alpha=0.55,
            label=f"clean exit {e + 1}",
        )
    ax_example.bar(
        classes + 1.5 * width, teacher.numpy(), width, color="black", label="teacher of exit 2"
    )
    ax_example.set_xticks(range(num_classes), [f"class {k}" for k in range(num_classes)])
    ax_example.set_ylabel("probability")
    ax_example.set_title("teacher of exit 2 = mean of clean exits 1, 2, 3")
    ax_example.legend(frameon=False, fontsize=9)
    fig.tight_layout()
    return fig


def orthogonal_mask_figure(num_exits: int = 3, num_classes: int = 10) -> Figure:
    """Masks for two samples and a second draw of the first, plus one orthogonal label."""
    generator = torch.Generator().manual_seed(0)
    targets = torch.tensor([3, 7])
    first = orthogonal_label_mask(targets, num_exits, num_classes, generator=generator)
    second = orthogonal_label_mask(targets, num_exits, num_classes, generator=generator)
    panels = [
        (first[:, 0], int(targets[0]), f"sample 1 (label {int(targets[0])})"),
        (first[:, 1], int(targets[1]), f"sample 2 (label {int(targets[1])})"),
        (second[:, 0], int(targets[0]), "sample 1, next call (fresh draw)"),
    ]

    fig = plt.figure(figsize=(12, 6.2))
    grid = fig.add_gridspec(2, 3, height_ratios=[1, 1.15])
    colors = ListedColormap([DROPPED_COLOR, TRUTH_COLOR, *EXIT_COLORS[:num_exits]])
    for column, (mask, target, title) in enumerate(panels):
        ax = fig.add_subplot(grid[0, column])
        # 0 dropped, 1 ground truth, 2 + e kept for exit e
        codes = torch.zeros(num_exits, num_classes)
        for e in range(num_exits):
            codes[e][mask[e]] = 2 + e
        codes[:, target] = 1
        ax.imshow(codes.numpy(), cmap=colors, vmin=0, vmax=1 + num_exits)
        ax.set_xticks(range(num_classes), [str(k) for k in range(num_classes)])
        ax.set_yticks(range(num_exits), [f"exit {e + 1}" for e in range(num_exits)])
        ax.set_xlabel("class")
        ax.set_title(title, fontsize=11)
        ax.set_xticks([k - 0.5 for k in range(1, num_classes)], minor=True)
        ax.set_yticks([e - 0.5 for e in range(1, num_exits)], minor=True)
        ax.grid(which="minor", color="white", linewidth=2)
        ax.tick_params(which="minor", length=0)
    per_exit = (num_classes - 1) // num_exits
    handles = [Patch(color=TRUTH_COLOR, label="ground truth (kept by every exit)")]
    handles += [
        Patch(color=EXIT_COLORS[e], label=f"kept by exit {e + 1} only") for e in range(num_exits)
    ]
    handles.append(Patch(color=DROPPED_COLOR, label="set to zero"))
    fig.legend(handles=handles, loc="upper center", ncol=num_exits + 2, frameon=False)

    # One orthogonal label: exit 1's clean prediction restricted to its kept classes.
    ax = fig.add_subplot(grid[1, :])
    logits = torch.randn(num_classes, generator=torch.Generator().manual_seed(1))
    logits[panels[0][1]] += 1.0
    probs = logits.softmax(-1)
    kept = first[0, 0]
    label = torch.where(kept, probs, torch.zeros_like(probs))
    label = label / label.sum()
    classes = torch.arange(num_classes).float()
    ax.bar(classes - 0.2, probs.numpy(), 0.4, color="#999999", label="clean prediction f₁(x)")
    ax.bar(
        classes + 0.2, label.numpy(), 0.4, color=EXIT_COLORS[0], label="orthogonal label O(f₁(x))"
    )
    ax.set_xticks(range(num_classes), [str(k) for k in range(num_classes)])
    ax.set_xlabel("class")
    ax.set_ylabel("probability")
    ax.set_title(
        f"exit 1, sample 1: keep the label and exit 1's {per_exit} classes, zero the rest, "
        "renormalize",
        fontsize=11,
    )
    ax.legend(frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, make in (
        ("neighbor_teacher.png", neighbor_teacher_figure),
        ("orthogonal_masks.png", orthogonal_mask_figure),
    ):
        fig = make()
        path = args.out / name
        fig.savefig(path, dpi=110, metadata=PNG_METADATA)
        plt.close(fig)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
