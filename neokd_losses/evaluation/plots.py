"""Figures for the evaluation results: budget curves, transferability heatmap, exit accuracies.

matplotlib is an optional dependency (the ``examples`` extra); it is imported only when a
plot function is called. The figures are built on ``matplotlib.figure.Figure`` directly,
not through ``pyplot``, so they need no display, leave no global state behind and are
freed when dropped; in a notebook the returned figure still displays. Every function
saves the figure when ``path`` is given (the format follows the suffix, e.g. ``.png``)
and returns it. Accuracies and rates, stored as fractions in [0, 1], are drawn in percent.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import Tensor

from neokd_losses.evaluation.anytime import AnytimeResult
from neokd_losses.evaluation.budgeted import BudgetCurve

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_budget_curves", "plot_exit_accuracies", "plot_transferability"]

PathLike = Union[str, "os.PathLike[str]"]


def _figure(figsize: tuple[float, float]) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - exercised only without matplotlib
        raise ImportError(
            "plotting needs matplotlib, which is not installed. Install it with "
            "`pip install matplotlib` or `pip install 'neokd-losses[examples]'`."
        ) from err
    return Figure(figsize=figsize, layout="constrained")


def _save(fig: Figure, path: PathLike | None, dpi: int) -> None:
    if path is not None:
        fig.savefig(os.fspath(path), dpi=dpi)


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
        title: figure title.
        cost_label: x-axis label, e.g. ``"MFLOPs"`` when the costs are mega-FLOPs.
        dpi: resolution of the saved image.

    Returns:
        The matplotlib ``Figure``.

    Raises:
        ImportError: if matplotlib is not installed.
        TypeError: if a curve is neither a BudgetCurve nor a dict with its fields.
        ValueError: if ``curves`` is empty or a curve has no points.

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
    fig = _figure((5.0, 3.8))
    ax = fig.add_subplot()
    for name, curve in curves.items():
        costs, accs = _curve_points(name, curve)
        ax.plot(costs, accs, marker="o", markersize=3, linewidth=1.5, label=name)
    ax.set_xlabel(cost_label)
    ax.set_ylabel("accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    _save(fig, path, dpi)
    return fig


def _as_matrix(matrix: Tensor | Sequence[Sequence[float]]) -> list[list[float]]:
    m = (
        matrix.detach().cpu().double()
        if isinstance(matrix, Tensor)
        else torch.tensor([[float(v) for v in row] for row in matrix], dtype=torch.float64)
    )
    if m.dim() != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(
            f"`matrix` must be a square (E, E) matrix of success rates, got shape {tuple(m.shape)}."
        )
    return [[float(v) for v in row] for row in m.tolist()]


def plot_transferability(
    matrix: Tensor | Sequence[Sequence[float]],
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
        matrix: (E, E) success rates in [0, 1], e.g. from
            :func:`~neokd_losses.evaluation.transfer.transferability_matrix`.
        path: where to save the figure; not saved when None.
        title: figure title.
        cmap: matplotlib colormap name.
        digits: decimals printed in the cells.
        dpi: resolution of the saved image.

    Returns:
        The matplotlib ``Figure``.

    Raises:
        ImportError: if matplotlib is not installed.
        ValueError: if ``matrix`` is not square.

    Shape:
        - matrix: (E, E).

    Example:
        >>> fig = plot_transferability([[0.9, 0.3], [0.2, 0.8]])
        >>> [t.get_text() for t in fig.axes[0].texts]
        ['90.0', '30.0', '20.0', '80.0']
    """
    values = _as_matrix(matrix)
    size = len(values)
    fig = _figure((1.0 + 0.75 * size, 0.6 + 0.75 * size))
    ax = fig.add_subplot()
    percent = [[100 * v for v in row] for row in values]
    image = ax.imshow(percent, cmap=cmap, vmin=0.0, vmax=100.0)
    for i in range(size):
        for j in range(size):
            colour = "white" if percent[i][j] > 60 else "black"
            ax.text(
                j,
                i,
                f"{percent[i][j]:.{digits}f}",
                ha="center",
                va="center",
                color=colour,
                fontsize=8 if size > 5 else 10,
            )
    labels = [str(k + 1) for k in range(size)]
    ax.set_xticks(range(size), labels)
    ax.set_yticks(range(size), labels)
    ax.set_xlabel("evaluated exit")
    ax.set_ylabel("attacked exit")
    fig.colorbar(image, ax=ax, label="attack success rate (%)")
    if title:
        ax.set_title(title)
    _save(fig, path, dpi)
    return fig


def plot_exit_accuracies(
    results: Mapping[str, AnytimeResult | Sequence[float]],
    path: PathLike | None = None,
    *,
    title: str | None = None,
    dpi: int = 150,
) -> Figure:
    """Grouped bars of per-exit accuracy, one colour per setting (e.g. clean and attacked).

    Args:
        results: label -> :class:`~neokd_losses.evaluation.anytime.AnytimeResult` or a
            sequence of E accuracies in [0, 1]; all with the same E.
        path: where to save the figure; not saved when None.
        title: figure title.
        dpi: resolution of the saved image.

    Returns:
        The matplotlib ``Figure``.

    Raises:
        ImportError: if matplotlib is not installed.
        ValueError: if ``results`` is empty or the settings differ in their number of exits.

    Example:
        >>> fig = plot_exit_accuracies({"clean": [0.9, 0.95], "PGD": [0.4, 0.5]})
        >>> len(fig.axes[0].patches)
        4
    """
    if not results:
        raise ValueError("`results` must hold at least one setting, got an empty mapping.")
    rows = {
        label: list(r.accuracies) if isinstance(r, AnytimeResult) else [float(a) for a in r]
        for label, r in results.items()
    }
    lengths = {label: len(r) for label, r in rows.items()}
    if len(set(lengths.values())) != 1 or 0 in lengths.values():
        raise ValueError(f"every setting must have the same number E >= 1 of exits, got {lengths}.")
    num_exits = next(iter(lengths.values()))
    width = 0.8 / len(rows)
    fig = _figure((1.6 + 0.9 * num_exits * max(1, len(rows) / 2), 3.5))
    ax = fig.add_subplot()
    for s, (label, accs) in enumerate(rows.items()):
        xs = [k + (s - (len(rows) - 1) / 2) * width for k in range(num_exits)]
        bars = ax.bar(xs, [100 * a for a in accs], width=width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks(range(num_exits), [f"exit {k + 1}" for k in range(num_exits)])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend()
    if title:
        ax.set_title(title)
    _save(fig, path, dpi)
    return fig
