"""Each plot writes a non-empty PNG and returns its figure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402

from neokd_losses.evaluation.anytime import AnytimeResult  # noqa: E402
from neokd_losses.evaluation.budgeted import budget_curve  # noqa: E402
from neokd_losses.evaluation.plots import (  # noqa: E402
    plot_budget_curves,
    plot_exit_accuracies,
    plot_transferability,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 1000  # a real image, not just a header


def _curve(seed: int):
    g = torch.Generator().manual_seed(seed)
    val, test = torch.randn(3, 40, 5, generator=g), torch.randn(3, 40, 5, generator=g)
    y = torch.randint(5, (40,), generator=g)
    return budget_curve(val, y, test, y, [14.76, 21.77, 27.67], num_points=9)


def test_plot_budget_curves_writes_png(tmp_path: Path) -> None:
    path = tmp_path / "budget.png"
    neokd = _curve(0)
    # A curve read back from results.json is accepted as well.
    adv = json.loads(json.dumps(_curve(1).to_dict()))
    fig = plot_budget_curves({"NEO-KD": neokd, "Adv. w/o distill": adv}, path, title="CIFAR-10")
    assert isinstance(fig, Figure)
    assert_png(path)
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["NEO-KD", "Adv. w/o distill"]
    xs, ys = ax.get_lines()[0].get_data()
    assert list(xs) == sorted(neokd.mean_costs)
    assert max(ys) == pytest.approx(100 * max(neokd.accuracies))


def test_plot_transferability_writes_png_with_numbers(tmp_path: Path) -> None:
    path = tmp_path / "transfer.png"
    matrix = torch.tensor([[0.95, 0.2312, 0.1], [0.3, 0.9, 0.25], [0.05, 0.4, 0.88]])
    fig = plot_transferability(matrix, path, title="transferability")
    assert isinstance(fig, Figure)
    assert_png(path)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["95.0", "23.1", "10.0", "30.0", "90.0", "25.0", "5.0", "40.0", "88.0"]


def test_plot_exit_accuracies_writes_png(tmp_path: Path) -> None:
    path = tmp_path / "exits.png"
    clean = AnytimeResult((90, 95, 97), 100)
    adv = AnytimeResult((40, 45, 52), 100, attack="PGD")
    fig = plot_exit_accuracies(
        {"clean": clean, "max-average": adv, "average": [0.5, 0.55, 0.6]}, path
    )
    assert isinstance(fig, Figure)
    assert_png(path)
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == pytest.approx([90, 95, 97, 40, 45, 52, 50, 55, 60])


def test_plots_do_not_touch_pyplot_state() -> None:
    plt = pytest.importorskip("matplotlib.pyplot")
    before = plt.get_fignums()
    plot_transferability([[1.0]])
    plot_exit_accuracies({"clean": [0.5]})
    assert plt.get_fignums() == before


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: plot_budget_curves({}), ValueError, "at least one method"),
        (lambda: plot_budget_curves({"a": [1, 2]}), TypeError, "BudgetCurve"),
        (
            lambda: plot_budget_curves({"a": {"mean_costs": [1], "accuracies": []}}),
            ValueError,
            "as many costs",
        ),
        (lambda: plot_transferability(torch.zeros(2, 3)), ValueError, r"square \(E, E\)"),
        (lambda: plot_exit_accuracies({}), ValueError, "at least one setting"),
        (lambda: plot_exit_accuracies({"a": [0.1, 0.2], "b": [0.3]}), ValueError, "same number"),
    ],
)
def test_plot_errors(call, error, match: str) -> None:
    with pytest.raises(error, match=match):
        call()
