"""Each plot writes a non-empty PNG and returns its figure."""

from __future__ import annotations

import itertools
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


def test_plot_transferability_takes_a_transfer_result() -> None:
    from neokd_losses.evaluation.transfer import TransferResult

    result = TransferResult(
        "clean-correct",
        clean_correct=torch.tensor([4, 5]),
        fooled=torch.tensor([[4, 1], [2, 5]]),
        wrong=torch.tensor([[10, 6], [8, 10]]),
        num_samples=10,
    )
    fig = plot_transferability(result)
    # fooled / clean_correct per column: [[4/4, 1/5], [2/4, 5/5]]
    assert [t.get_text() for t in fig.axes[0].texts] == ["100.0", "20.0", "50.0", "100.0"]


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


# --------------------------------------------------------------------------- layout

LONG_TITLE = (
    "CIFAR-100, MSDNet with 7 exits, NEO-KD (alpha = 3, beta = 1): budgeted prediction "
    "under the PGD max-average attack with eps = 8/255, 50 steps, over the whole test set"
)
LONG_LABEL = "NEO-KD trained for 100 epochs with a very long method name, PGD max-average"


def _render(fig: Figure):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def _assert_texts_inside(fig: Figure) -> None:
    from matplotlib.text import Text

    renderer = _render(fig)
    box = fig.bbox
    hidden = set()  # tick labels outside the view interval are not drawn
    for ax in fig.axes:
        for axis, limits in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            low, high = sorted(limits)
            for tick in axis.get_major_ticks():
                if not low - 1e-9 <= tick.get_loc() <= high + 1e-9:
                    hidden.update({id(tick.label1), id(tick.label2)})
    texts = [
        t
        for t in fig.findobj(Text)
        if t.get_visible() and t.get_text().strip() and id(t) not in hidden
    ]
    assert texts
    for text in texts:
        tight = text.get_tightbbox(renderer)
        inside = (
            tight.x0 >= box.x0 - 1
            and tight.y0 >= box.y0 - 1
            and tight.x1 <= box.x1 + 1
            and tight.y1 <= box.y1 + 1
        )
        assert inside, f"{text.get_text()!r} leaves the figure: {tight} not in {box}"


def _assert_clear_of_the_data(fig: Figure) -> None:
    """Neither the legend nor the title overlaps an axes (data, bars, color bar)."""
    renderer = _render(fig)
    blocks = [legend.get_window_extent(renderer) for legend in fig.legends]
    if fig._suptitle is not None:
        blocks.append(fig._suptitle.get_window_extent(renderer))
    for ax in fig.axes:
        assert ax.get_legend() is None, "the legend sits inside the axes"
        area = ax.get_window_extent(renderer)
        artists = [*ax.patches, *ax.lines, *ax.texts, *ax.images]
        for block in blocks:
            assert not block.overlaps(area), f"{block} overlaps the axes {area}"
            for artist in artists:
                assert not block.overlaps(artist.get_window_extent(renderer))


def test_budget_curves_layout_with_long_title_and_labels() -> None:
    fig = plot_budget_curves(
        {LONG_LABEL: _curve(0), "clean": _curve(1), "SKD, PGD average": _curve(2)},
        title=LONG_TITLE,
        cost_label="expected multiply-adds per sample, measured by exit_costs on the test set",
    )
    _assert_texts_inside(fig)
    _assert_clear_of_the_data(fig)
    assert len(fig.legends) == 1
    assert [t.get_text().replace("\n", " ") for t in fig.legends[0].get_texts()] == [
        LONG_LABEL,
        "clean",
        "SKD, PGD average",
    ]


def test_budget_curves_draw_large_costs_in_readable_units() -> None:
    # Raw multiply-adds in a narrow range (the ticks used to read 459750 ... 461750).
    g = torch.Generator().manual_seed(0)
    val, y = torch.randn(3, 40, 5, generator=g), torch.randint(5, (40,), generator=g)
    curve = budget_curve(val, y, val, y, [459_750.0, 460_750.0, 461_750.0], num_points=9)
    fig = plot_budget_curves({"NEO-KD": curve}, cost_label="multiply-adds per sample")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "multiply-adds per sample (thousands)"
    xs, _ = ax.get_lines()[0].get_data()
    assert list(xs) == pytest.approx([c / 1e3 for c in sorted(curve.mean_costs)])
    renderer = _render(fig)
    labels = [t for t in ax.get_xticklabels() if t.get_text()]
    assert all(len(t.get_text()) <= 6 for t in labels), [t.get_text() for t in labels]
    assert not ax.xaxis.get_offset_text().get_text()  # no "+4.6e5" offset
    boxes = [t.get_window_extent(renderer) for t in labels]
    assert all(not a.overlaps(b) for a, b in itertools.pairwise(boxes))
    millions = budget_curve(val, y, val, y, [6.2e6, 12.5e6, 25.1e6], num_points=9)
    fig = plot_budget_curves({"a": millions})
    assert fig.axes[0].get_xlabel() == "expected cost per sample (millions)"


def test_transferability_layout_with_long_title() -> None:
    for size in (1, 2, 7):
        matrix = torch.rand(size, size, generator=torch.Generator().manual_seed(size))
        fig = plot_transferability(matrix, title=LONG_TITLE)
        _assert_texts_inside(fig)
        _assert_clear_of_the_data(fig)  # the title clears the heatmap and the color bar
        assert len(fig.axes) == 2  # heatmap and color bar


def test_exit_accuracies_layout_with_long_title_and_labels() -> None:
    fig = plot_exit_accuracies(
        {LONG_LABEL: [0.9, 0.95, 1.0], "PGD max-average": [0.4, 0.45, 0.52], "x": [1, 1, 1]},
        title=LONG_TITLE,
    )
    _assert_texts_inside(fig)
    _assert_clear_of_the_data(fig)
    # Bar labels at 100 % stay inside the axes.
    renderer = _render(fig)
    area = fig.axes[0].get_window_extent(renderer)
    for text in fig.axes[0].texts:
        box = text.get_window_extent(renderer)
        assert area.y0 <= box.y0 and box.y1 <= area.y1


@pytest.mark.parametrize(
    "call",
    [
        lambda: plot_exit_accuracies({"clean": [90.0, 95.0]}),
        lambda: plot_exit_accuracies({"clean": AnytimeResult((1, 2), 2), "pgd": [0.5, 55.0]}),
        lambda: plot_transferability([[95.0, 20.0], [30.0, 90.0]]),
        lambda: plot_budget_curves({"a": {"mean_costs": [1.0, 2.0], "accuracies": [50.0, 70.0]}}),
    ],
    ids=["exits", "exits-second", "transfer", "budget"],
)
def test_percentages_are_refused_with_the_fix(call) -> None:
    with pytest.raises(
        ValueError,
        match=r"fractions in \[0, 1\], got values up to .* "
        r"look like percentages\. Pass fractions \(divide by 100\)",
    ):
        call()


def test_negative_and_nan_values_are_refused() -> None:
    with pytest.raises(ValueError, match=r"fractions in \[0, 1\], got -0.1"):
        plot_exit_accuracies({"a": [-0.1, 0.5]})
    with pytest.raises(ValueError, match="got NaN"):
        plot_exit_accuracies({"a": [float("nan"), 0.5]})
    fig = plot_transferability([[float("nan"), 0.5], [0.25, 1.0]])  # a blank cell
    assert [t.get_text() for t in fig.axes[0].texts] == ["50.0", "25.0", "100.0"]


def test_a_missing_folder_is_created(tmp_path: Path) -> None:
    target = tmp_path / "new" / "plots" / "exits.png"
    plot_exit_accuracies({"clean": [0.5]}, target)
    assert_png(target)
    plot_transferability([[0.5]], str(tmp_path / "other" / "t.png"))
    assert_png(tmp_path / "other" / "t.png")


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: plot_exit_accuracies({"a": [0.5]}, dpi=0), ValueError, "`dpi` must be >= 1"),
        (lambda: plot_exit_accuracies({"a": [0.5]}, dpi=72.0), TypeError, "`dpi` must be an int"),
        (lambda: plot_transferability([[0.5]], digits=-1), ValueError, "`digits` must be >= 0"),
        (lambda: plot_transferability([[0.5]], digits="1"), TypeError, "`digits` must be an int"),
    ],
)
def test_integer_arguments_are_checked(call, error, match: str) -> None:
    with pytest.raises(error, match=match):
        call()
