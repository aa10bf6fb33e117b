"""Figures for the evaluation results: budget curves, transferability heatmap, exit accuracies.

matplotlib is an optional dependency (the ``examples`` extra); it is imported only when a
plot function is called. The figures are built on ``matplotlib.figure.Figure`` directly,
not through ``pyplot``, so they need no display, leave no global state behind and are
freed when dropped; in a notebook the returned figure still displays. Every function
saves the figure when ``path`` is given (the format follows the suffix, e.g. ``.png``)
and returns it, creating the folder of ``path`` if needed. Accuracies and rates are taken
as fractions in [0, 1] (as the evaluation functions return them) and drawn in percent;
values above 1 are refused, since they are almost surely percentages already. Long titles
and legend labels are wrapped to the figure's width, and legends sit outside the plotted
data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import Tensor

from neokd_losses._validation import check_int, check_positive_int
from neokd_losses.evaluation.anytime import AnytimeResult
from neokd_losses.evaluation.budgeted import BudgetCurve
from neokd_losses.evaluation.transfer import TransferResult

if TYPE_CHECKING:
    from matplotlib.artist import Artist
    from matplotlib.figure import Figure

__all__ = ["plot_budget_curves", "plot_exit_accuracies", "plot_transferability"]

PathLike = Union[str, "os.PathLike[str]"]


_TITLE_SIZE = 11.0
_LEGEND_SIZE = 8.0
_SCALES = ((1e9, "billions"), (1e6, "millions"), (1e3, "thousands"))


def _figure(figsize: tuple[float, float]) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - exercised only without matplotlib
        raise ImportError(
            "plotting needs matplotlib, which is not installed. Install it with "
            "`pip install matplotlib` or `pip install 'neokd-losses[examples]'`."
        ) from err
    return Figure(figsize=figsize, layout="constrained")


def _text_width(text: str, fontsize: float) -> float:
    """The width of one line of ``text`` in points, in matplotlib's default font."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import text_to_path

    width, _, _ = text_to_path.get_text_width_height_descent(
        text, FontProperties(size=fontsize), ismath=False
    )
    return float(width)


def _wrap(text: str, width_inches: float, fontsize: float) -> str:
    """``text`` broken at spaces (or inside over-long words) into lines that fit."""
    limit = width_inches * 72
    lines: list[str] = []
    for paragraph in str(text).splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if _text_width(candidate, fontsize) <= limit:
                line = candidate
                continue
            if line:
                lines.append(line)
            while len(word) > 1 and _text_width(word, fontsize) > limit:
                cut = len(word) - 1
                while cut > 1 and _text_width(word[:cut], fontsize) > limit:
                    cut -= 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return "\n".join(lines)


def _title(fig: Figure, title: str | None) -> None:
    """A figure title centred on the whole figure and wrapped to its width (in the layout)."""
    if title:
        width = fig.get_figwidth() - 0.3
        fig.suptitle(_wrap(title, width, _TITLE_SIZE), fontsize=_TITLE_SIZE)


def _legend_below(fig: Figure, handles: Sequence[Artist], labels: Sequence[str]) -> None:
    """A legend under the axes, outside the data, with labels wrapped to the figure width."""
    columns = 1 if max(len(label) for label in labels) > 24 else min(len(labels), 3)
    width = fig.get_figwidth() * 0.92 / columns - 0.6  # the handle and padding take 0.6 in
    wrapped = [_wrap(label, width, _LEGEND_SIZE) for label in labels]
    fig.legend(
        handles,
        wrapped,
        loc="outside lower center",
        ncols=columns,
        fontsize=_LEGEND_SIZE,
        frameon=False,
    )


def _save(fig: Figure, path: PathLike | None, dpi: int) -> None:
    if path is not None:
        target = os.fspath(path)
        folder = os.path.dirname(target)
        if folder:
            os.makedirs(folder, exist_ok=True)
        fig.savefig(target, dpi=dpi)


def _check_fractions(values: Sequence[float], what: str, allow_nan: bool = False) -> None:
    """ValueError unless every value is a fraction in [0, 1] (percentages are named)."""
    finite = [v for v in values if not math.isnan(v)]
    if len(finite) != len(values) and not allow_nan:
        raise ValueError(f"{what} must be fractions in [0, 1], got NaN.")
    if finite and max(finite) > 1:
        raise ValueError(
            f"{what} must be fractions in [0, 1], got values up to {max(finite):g}: they look "
            "like percentages. Pass fractions (divide by 100); the evaluation results "
            "(AnytimeResult.accuracies, BudgetCurve.accuracies, transferability_matrix) "
            "already are, only anytime_table prints percentages."
        )
    if finite and min(finite) < 0:
        raise ValueError(f"{what} must be fractions in [0, 1], got {min(finite):g}.")


def _cost_scale(costs: Sequence[float]) -> tuple[float, str]:
    """A power of 1000 that keeps the largest cost's tick labels short, and its name."""
    largest = max((abs(c) for c in costs if math.isfinite(c)), default=0.0)
    for factor, name in _SCALES:
        if largest >= factor:
            return factor, name
    return 1.0, ""


def _curve_points(
    name: str, curve: BudgetCurve | Mapping[str, Any]
) -> tuple[list[float], list[float]]:
    if isinstance(curve, BudgetCurve):
        costs, accs = list(curve.mean_costs), list(curve.accuracies)
    elif isinstance(curve, Mapping) and "mean_costs" in curve and "accuracies" in curve:
        costs = [float(c) for c in curve["mean_costs"]]
        accs = [float(a) for a in curve["accuracies"]]
    else:
        raise TypeError(
            f"curve {name!r} must be a BudgetCurve or its to_dict() (with 'mean_costs' and "
            f"'accuracies'), got {type(curve).__name__}."
        )
    if len(costs) != len(accs) or not costs:
        raise ValueError(
            f"curve {name!r} must have as many costs as accuracies and at least one point, got "
            f"{len(costs)} costs and {len(accs)} accuracies."
        )
    _check_fractions(accs, f"the accuracies of curve {name!r}")
    order = sorted(range(len(costs)), key=costs.__getitem__)
    return [costs[i] for i in order], [100 * accs[i] for i in order]


def plot_budget_curves(
    curves: Mapping[str, BudgetCurve | Mapping[str, Any]],
    path: PathLike | None = None,
    *,
    title: str | None = None,
    cost_label: str = "expected cost per sample",
    dpi: int = 150,
) -> Figure:
    """Accuracy against expected cost for several methods on one figure.

    Args:
        curves: method name -> :class:`~neokd_losses.evaluation.budgeted.BudgetCurve` (or
            its ``to_dict()``, e.g. read back from a results.json).
        path: where to save the figure (e.g. ``"budget.png"``); not saved when None.
        title: figure title (wrapped to the figure's width).
        cost_label: x-axis label, e.g. ``"multiply-adds per sample"`` for the costs of
            :func:`~neokd_losses.evaluation.flops.exit_costs`. Costs of 1000 and more
            are drawn in thousands, millions or billions, and the label says which, e.g.
            "multiply-adds per sample (millions)".
        dpi: resolution of the saved image.

    Returns:
        The matplotlib ``Figure``; the legend is below the axes.

    Raises:
        ImportError: if matplotlib is not installed.
        TypeError: if a curve is neither a BudgetCurve nor a dict with its fields, or
            ``dpi`` is not an int.
        ValueError: if ``curves`` is empty, a curve has no points, or its accuracies are
            not fractions in [0, 1] (e.g. percentages).

    Example:
        >>> from neokd_losses.evaluation.budgeted import BudgetCurve
        >>> curve = BudgetCurve((1, 2), (1.0, 2.0), (0.5, 0.6), (0.5, 0.6),
        ...                     ((1.0, 0.0), (0.0, 1.0)), ((0.0, float("-inf")),) * 2, (1.0, 2.0))
        >>> fig = plot_budget_curves({"NEO-KD": curve})
        >>> fig.axes[0].get_ylabel()
        'accuracy (%)'
    """
    if not curves:
        raise ValueError("`curves` must hold at least one method, got an empty mapping.")
    dpi = check_positive_int(dpi, "dpi")
    points = {name: _curve_points(name, curve) for name, curve in curves.items()}
    factor, scale = _cost_scale([c for costs, _ in points.values() for c in costs])
    fig = _figure((5.5, 4.2))
    ax = fig.add_subplot()
    for name, (costs, accs) in points.items():
        ax.plot(
            [c / factor for c in costs], accs, marker="o", markersize=3, linewidth=1.5, label=name
        )
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    ax.xaxis.set_major_locator(MaxNLocator(nbins=6))
    ax.xaxis.set_major_formatter(ScalarFormatter(useOffset=False))
    label = f"{cost_label} ({scale})" if scale else cost_label
    ax.set_xlabel(_wrap(label, 4.5, 10.0))
    ax.set_ylabel("accuracy (%)")
    ax.grid(True, alpha=0.3)
    _legend_below(fig, ax.get_lines(), [str(name) for name in points])
    _title(fig, title)
    _save(fig, path, dpi)
    return fig


def _as_matrix(matrix: TransferResult | Tensor | Sequence[Sequence[float]]) -> list[list[float]]:
    if isinstance(matrix, TransferResult):
        matrix = matrix.matrix
    m = (
        matrix.detach().cpu().double()
        if isinstance(matrix, Tensor)
        else torch.tensor([[float(v) for v in row] for row in matrix], dtype=torch.float64)
    )
    if m.dim() != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(
            f"`matrix` must be a square (E, E) matrix of success rates, got shape {tuple(m.shape)}."
        )
    values = [[float(v) for v in row] for row in m.tolist()]
    _check_fractions([v for row in values for v in row], "`matrix` (success rates)", True)
    return values


def plot_transferability(
    matrix: TransferResult | Tensor | Sequence[Sequence[float]],
    path: PathLike | None = None,
    *,
    title: str | None = None,
    cmap: str = "Blues",
    digits: int = 1,
    dpi: int = 150,
) -> Figure:
    """Heatmap of the adversarial transferability matrix with the numbers in the cells.

    Row i is the exit the single attack was generated on, column j the exit it is
    evaluated at; a cell is the attack success rate in percent (the paper's figure).

    Args:
        matrix: (E, E) success rates in [0, 1], or the
            :class:`~neokd_losses.evaluation.transfer.TransferResult` of
            :func:`~neokd_losses.evaluation.transfer.transferability_matrix` (its
            ``matrix`` is drawn); NaN cells are left blank.
        path: where to save the figure; not saved when None.
        title: figure title, centred on the figure and wrapped to its width.
        cmap: matplotlib colormap name.
        digits: decimals printed in the cells.
        dpi: resolution of the saved image.

    Returns:
        The matplotlib ``Figure``.

    Raises:
        ImportError: if matplotlib is not installed.
        TypeError: if ``digits`` or ``dpi`` is not an int.
        ValueError: if ``matrix`` is not square or its rates are not fractions in
            [0, 1] (e.g. percentages).

    Shape:
        - matrix: (E, E).

    Example:
        >>> fig = plot_transferability([[0.9, 0.3], [0.2, 0.8]])
        >>> [t.get_text() for t in fig.axes[0].texts]
        ['90.0', '30.0', '20.0', '80.0']
    """
    values = _as_matrix(matrix)
    digits = check_int(digits, "digits", low=0)
    dpi = check_positive_int(dpi, "dpi")
    size = len(values)
    fig = _figure((max(4.0, 1.6 + 0.75 * size), max(3.4, 1.0 + 0.75 * size)))
    ax = fig.add_subplot()
    percent = [[100 * v for v in row] for row in values]
    image = ax.imshow(percent, cmap=cmap, vmin=0.0, vmax=100.0)
    for i in range(size):
        for j in range(size):
            if math.isnan(percent[i][j]):
                continue
            color = "white" if percent[i][j] > 60 else "black"
            ax.text(
                j,
                i,
                f"{percent[i][j]:.{digits}f}",
                ha="center",
                va="center",
                color=color,
                fontsize=8 if size > 5 else 10,
            )
    labels = [str(k + 1) for k in range(size)]
    ax.set_xticks(range(size), labels)
    ax.set_yticks(range(size), labels)
    ax.set_xlabel("evaluated exit")
    ax.set_ylabel("attacked exit")
    fig.colorbar(image, ax=ax, label="attack success rate (%)")
    _title(fig, title)
    _save(fig, path, dpi)
    return fig


def plot_exit_accuracies(
    results: Mapping[str, AnytimeResult | Sequence[float]],
    path: PathLike | None = None,
    *,
    title: str | None = None,
    dpi: int = 150,
) -> Figure:
    """Grouped bars of per-exit accuracy, one color per setting (e.g. clean and attacked).

    Args:
        results: label -> :class:`~neokd_losses.evaluation.anytime.AnytimeResult` or a
            sequence of E accuracies in [0, 1]; all with the same E.
        path: where to save the figure; not saved when None.
        title: figure title (wrapped to the figure's width).
        dpi: resolution of the saved image.

    Returns:
        The matplotlib ``Figure``; the legend is below the axes, clear of the bars.

    Raises:
        ImportError: if matplotlib is not installed.
        TypeError: if ``dpi`` is not an int.
        ValueError: if ``results`` is empty, the settings differ in their number of
            exits, or an accuracy is not a fraction in [0, 1] (e.g. a percentage).

    Example:
        >>> fig = plot_exit_accuracies({"clean": [0.9, 0.95], "PGD": [0.4, 0.5]})
        >>> len(fig.axes[0].patches)
        4
    """
    if not results:
        raise ValueError("`results` must hold at least one setting, got an empty mapping.")
    dpi = check_positive_int(dpi, "dpi")
    rows = {
        label: list(r.accuracies) if isinstance(r, AnytimeResult) else [float(a) for a in r]
        for label, r in results.items()
    }
    lengths = {label: len(r) for label, r in rows.items()}
    if len(set(lengths.values())) != 1 or 0 in lengths.values():
        raise ValueError(f"every setting must have the same number E >= 1 of exits, got {lengths}.")
    for label, accs in rows.items():
        _check_fractions(accs, f"the accuracies of {label!r}")
    num_exits = next(iter(lengths.values()))
    width = 0.8 / len(rows)
    fig = _figure((max(4.5, 1.6 + 0.9 * num_exits * max(1, len(rows) / 2)), 4.0))
    ax = fig.add_subplot()
    handles = []
    for s, (label, accs) in enumerate(rows.items()):
        xs = [k + (s - (len(rows) - 1) / 2) * width for k in range(num_exits)]
        bars = ax.bar(xs, [100 * a for a in accs], width=width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
        handles.append(bars.patches[0])
    ax.set_xticks(range(num_exits), [f"exit {k + 1}" for k in range(num_exits)])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 110)  # room for the labels of bars at 100 %
    _legend_below(fig, handles, [str(label) for label in rows])
    _title(fig, title)
    _save(fig, path, dpi)
    return fig
