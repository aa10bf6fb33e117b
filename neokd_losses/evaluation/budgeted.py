"""Budgeted prediction: confidence thresholds per exit and the accuracy-vs-cost curve.

This is MSDNet's "dynamic evaluation" (Huang et al., ICLR 2018), used by the NEO-KD paper
(Ham et al., NeurIPS 2023). Each exit k gets a threshold T_k on its confidence, the maximum
softmax probability of its *logits*; a test sample leaves at the first exit whose
confidence reaches the threshold, and the last exit takes every remaining sample
(T_E = −∞). Thresholds are fitted on a validation split so that a chosen proportion
q_k of the validation samples leaves at exit k:

    for k = 1 .. E-1:  n_k = ⌊N_val · q_k⌋
        T_k = confidence of the n_k-th most confident validation sample at exit k among
              those that have not left yet (+∞ if n_k = 0 or too few remain)
        every validation sample with confidence ≥ T_k at exit k has now left

A budget index p = 1..P sets q_k ∝ (p / c)^k for k = 1..E (c = 20 for the paper's
P = 39 points), from mostly-early (small p) to mostly-late exits (large p). The expected
cost of a threshold vector is Σ_k (fraction of test samples leaving at k) · cost_k, with
cost_k the *cumulative* cost of computing exit k (see :func:`exit_costs`).

With ``ensemble=True`` (the NEO-KD paper's "ensemble strategy" for budgeted prediction,
whose exact rule the paper does not print), exit k does not predict from its own logits
but from the mean of the softmax outputs of exits 1..k,

    p̄_k = (1/k) Σ_{m ≤ k} softmax(z_m),    prediction_k = argmax p̄_k,
    confidence_k = max p̄_k,

used for the thresholds, the exit assignment and the prediction alike. The cost of exit
k is unchanged: exits 1..k have all been computed by the time exit k is reached.

Everything works on stacked (E, N, K) logits and is vectorized over samples; the loops
left are over the E - 1 exits (each threshold depends on the previous ones) and over the
P budget points. Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor, nn

from neokd_losses._exits import stack_exits
from neokd_losses._validation import (
    check_bool,
    check_costs,
    check_exit_vector,
    check_int,
    check_positive_int,
    check_real,
    check_targets,
)
from neokd_losses.evaluation._finite import check_no_nan, checked_batches
from neokd_losses.evaluation._loader import (
    Attack,
    Loader,
    attack_name,
    check_attack,
    check_model,
    eval_mode,
    exit_logits,
    iterate_batches,
    resolve_device,
)

__all__ = [
    "BudgetCurve",
    "budget_curve",
    "budgeted_accuracy",
    "budgeted_evaluation",
    "collect_logits",
    "exit_assignment",
    "exit_proportions",
    "fit_thresholds",
]

StackedLogits = Union[Tensor, Sequence[Tensor]]
"""Logits of E exits: one (E, N, K) tensor or a sequence of E tensors (N, K)."""

Numbers = Union[Sequence[float], Tensor]


def _as_stacked(logits: StackedLogits, name: str) -> Tensor:
    """Return (E, N, K) floating-point logits without NaN (half precision upcast to float32)."""
    stacked = _stack(logits, name)
    check_no_nan(stacked, name)
    return stacked


def _stack(logits: StackedLogits, name: str) -> Tensor:
    if isinstance(logits, Tensor):
        if not logits.is_floating_point():
            raise TypeError(
                f"`{name}` must hold floating-point logits, got dtype {logits.dtype}. "
                "Pass the model's raw float outputs, not predicted labels."
            )
        if logits.dim() != 3:
            raise ValueError(
                f"`{name}` must be a stacked (E, N, K) tensor or a sequence of E tensors "
                f"(N, K), got a tensor of shape {tuple(logits.shape)}. For one exit pass "
                f"`{name}.unsqueeze(0)`."
            )
        if logits.dtype in (torch.float16, torch.bfloat16):
            return logits.float()
        return logits
    return stack_exits(logits, name=name)


def _as_proportions(proportions: Numbers, length: int) -> Tensor:
    """Validate E non-negative proportions that sum to 1 (within 1e-6)."""
    q = check_exit_vector(
        proportions, length, "proportions", device="cpu", finite_non_negative=True
    )
    total = float(q.sum())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(
            f"`proportions` must sum to 1 (the share of samples leaving at each exit), got "
            f"{q.tolist()} summing to {total:.6g}. Normalize them (q / sum(q)) or use "
            "exit_proportions(p, E)."
        )
    return q


def _floor_count(value: float) -> int:
    """⌊value⌋ for value = N · q_k, robust to the rounding of q_k.

    N · q_k is often an integer in exact arithmetic (N = 18 and q = (5/6, 1/6), budget
    point p = 4 with E = 2, give 15) but a hair below it in floating point
    (14.999999999999998); a plain floor would then send one sample fewer to the exit than
    ⌊N · q_k⌋ asks. A value within a relative 1e-9 of an integer counts as that integer:
    float64 rounding errors are about 1e-16, far below that.
    """
    nearest = round(value)
    if abs(value - nearest) <= 1e-9 * max(1.0, abs(value)):
        return int(nearest)
    return math.floor(value)


def _probabilities(logits: Tensor, ensemble: bool) -> Tensor:
    """Softmax of every exit (E, N, K), or with ``ensemble`` the running mean over exits 1..k."""
    probs = logits.softmax(dim=-1)
    if not ensemble:
        return probs
    # Summed one exit after the other in the probabilities' dtype, as the early-exit
    # classifier does at run time: ``cumsum`` may accumulate in higher precision and
    # round once, which moves a confidence by one unit in the last place, and a sample
    # on its threshold (every fitted threshold is some sample's confidence) to another exit.
    means, total = [], probs[0]
    for k in range(probs.shape[0]):
        if k:
            total = total + probs[k]
        means.append(total / (k + 1))
    return torch.stack(means)


def _confidence(logits: Tensor, ensemble: bool = False) -> tuple[Tensor, Tensor]:
    """Max probability and predicted class of every exit and sample, (E, N) each."""
    return _probabilities(logits, ensemble).max(dim=-1)


def exit_proportions(budget_index: float, num_exits: int, *, center: float = 20.0) -> Tensor:
    """Proportion of samples meant to leave at each exit for one budget point.

    MSDNet's schedule: q_k ∝ (p / c)^k for k = 1..E, normalized to sum 1. Below the
    center (p < c) early exits get most samples; above it, late exits do.

    Args:
        budget_index: p > 0, the budget point (1..39 in the paper).
        num_exits: E >= 1.
        center: c > 0, the budget index at which every exit gets the same share.

    Returns:
        q, a float64 tensor (E,) summing to 1.

    Raises:
        ValueError: if ``budget_index`` or ``center`` is not a finite number > 0, or
            ``num_exits`` < 1.

    Shape:
        - output: (E,), E = ``num_exits``.

    Example:
        >>> exit_proportions(20, 4)
        tensor([0.2500, 0.2500, 0.2500, 0.2500], dtype=torch.float64)
        >>> exit_proportions(10, 3)
        tensor([0.5714, 0.2857, 0.1429], dtype=torch.float64)
    """
    check_positive_int(num_exits, "num_exits")
    ratio = check_real(budget_index, "budget_index", low=0.0, low_open=True) / check_real(
        center, "center", low=0.0, low_open=True
    )
    powers = torch.tensor([ratio ** (k + 1) for k in range(num_exits)], dtype=torch.float64)
    return powers / powers.sum()


def fit_thresholds(
    val_logits: StackedLogits, proportions: Numbers, *, ensemble: bool = False
) -> Tensor:
    """Fit one confidence threshold per exit on validation logits (MSDNet, Huang et al., ICLR 2018).

    Exit k (k < E) receives n_k = ⌊N · q_k⌋ of the validation samples that have not
    left at an earlier exit, the most confident ones: T_k is the confidence (max softmax)
    of the n_k-th of them, and every sample whose confidence at exit k is ≥ T_k leaves
    there (with ties, possibly more than n_k). T_k = +∞ when n_k = 0 or fewer than n_k
    samples remain. T_E = −∞: the last exit takes all the rest.

    Args:
        val_logits: validation logits, (E, N, K) or a sequence of E tensors (N, K).
        proportions: q, E non-negative numbers summing to 1, e.g. from
            :func:`exit_proportions`. The last one is implied by the others.
        ensemble: confidences of the running mean of the softmax outputs of exits 1..k
            (see the module docstring) instead of exit k's own.

    Returns:
        Thresholds (E,) in the logits' floating dtype and on their device.

    Raises:
        TypeError: if the logits are not floating point or ``proportions`` is not numeric.
        ValueError: if shapes disagree, the logits contain NaN, or the proportions are
            negative, non-finite or do not sum to 1.

    Shape:
        - val_logits: (E, N, K) or sequence of E tensors (N, K).
        - proportions: (E,).
        - output: (E,).

    Example:
        >>> import torch
        >>> logits = torch.tensor([[[3.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.0, 0.5]],
        ...                        [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]])
        >>> thresholds = fit_thresholds(logits, [0.5, 0.5])
        >>> thresholds[0] == logits[0, 2].softmax(-1).max(), thresholds[1]
        (tensor(True), tensor(-inf))
    """
    logits = _as_stacked(val_logits, "val_logits")
    num_exits, num_samples, _ = logits.shape
    q = _as_proportions(proportions, num_exits)
    counts = [_floor_count(num_samples * p) for p in (q / q.sum()).tolist()]
    confidence, _ = _confidence(logits, check_bool(ensemble, "ensemble"))  # (E, N)
    inf = torch.tensor(math.inf, dtype=confidence.dtype, device=confidence.device)
    thresholds = torch.full((num_exits,), math.inf, dtype=confidence.dtype, device=logits.device)
    left = torch.zeros(num_samples, dtype=torch.bool, device=logits.device)
    for k in range(num_exits - 1):
        n_k = min(counts[k], num_samples)
        if n_k > 0:
            # n_k-th largest confidence among the samples still present; those that left
            # sort last as -inf, so the value is -inf when fewer than n_k remain.
            remaining = confidence[k].masked_fill(left, -math.inf)
            value = -torch.kthvalue(-remaining, n_k).values
            thresholds[k] = torch.where(torch.isneginf(value), inf, value)
        left |= confidence[k] >= thresholds[k]
    thresholds[-1] = -math.inf
    return thresholds


def exit_assignment(
    logits: StackedLogits, thresholds: Numbers | Tensor, *, ensemble: bool = False
) -> Tensor:
    """The exit at which each sample leaves: the first k with confidence_k ≥ T_k.

    The last exit takes every sample that has not left before, whatever T_E is.

    Args:
        logits: (E, N, K) or a sequence of E tensors (N, K).
        thresholds: T, (E,), e.g. from :func:`fit_thresholds`; ±inf allowed.
        ensemble: confidences of the running mean of the softmax outputs of exits 1..k.

    Returns:
        Exit indices (N,), long, in [0, E).

    Raises:
        TypeError: if the logits are not floating point.
        ValueError: if ``thresholds`` is not (E,) or holds NaN, or the logits contain NaN.

    Shape:
        - logits: (E, N, K) or a sequence of E tensors (N, K); thresholds: (E,).
        - output: (N,).

    Example:
        >>> import torch
        >>> logits = torch.tensor([[[4.0, 0.0], [0.0, 0.1]], [[0.0, 0.0], [0.0, 0.0]]])
        >>> exit_assignment(logits, torch.tensor([0.9, float("-inf")]))
        tensor([0, 1])
    """
    stacked = _as_stacked(logits, "logits")
    confidence, _ = _confidence(stacked, check_bool(ensemble, "ensemble"))
    return _assign(confidence, _as_thresholds(thresholds, confidence))


def _as_thresholds(thresholds: Numbers | Tensor, confidence: Tensor) -> Tensor:
    return check_exit_vector(
        thresholds,
        confidence.shape[0],
        "thresholds",
        dtype=confidence.dtype,
        device=confidence.device,
    )


def _assign(confidence: Tensor, thresholds: Tensor) -> Tensor:
    leaves = confidence >= thresholds[:, None]  # (E, N)
    leaves[-1] = True
    # argmax returns the first maximal index: the first exit whose test passes.
    return leaves.to(torch.uint8).argmax(dim=0)


def budgeted_accuracy(
    test_logits: StackedLogits,
    test_targets: Tensor,
    thresholds: Numbers | Tensor,
    costs: Numbers,
    *,
    ensemble: bool = False,
) -> tuple[float, float]:
    """Accuracy and expected cost when samples leave at the first confident exit.

    Each sample is predicted by the exit :func:`exit_assignment` gives it; the expected
    cost is Σ_k (fraction of samples leaving at k) · cost_k. With ``ensemble=True`` exit k
    predicts, and measures its confidence, from the mean of the softmax outputs of exits
    1..k: p̄_k = (1/k) Σ_{m ≤ k} softmax(z_m), prediction argmax p̄_k, confidence max p̄_k.

    Args:
        test_logits: (E, N, K) or a sequence of E tensors (N, K).
        test_targets: class indices (N,).
        thresholds: T (E,), e.g. from :func:`fit_thresholds`.
        costs: cumulative cost of each exit (E,), non-decreasing, e.g. from
            :func:`exit_costs`.
        ensemble: exit k uses the mean of the softmax outputs of exits 1..k.

    Returns:
        ``(accuracy, mean_cost)``: the accuracy in [0, 1] and the expected cost per sample,
        in the unit of ``costs``.

    Raises:
        TypeError: if the logits are not floating point or the targets not integers.
        ValueError: if shapes disagree, a target is out of range, the logits contain NaN,
            ``costs`` is negative, non-finite or decreasing, or N = 0.

    Shape:
        - test_logits: (E, N, K); test_targets: (N,); thresholds, costs: (E,).

    Example:
        >>> import torch
        >>> logits = torch.tensor([[[4.0, 0.0], [0.5, 0.0]], [[0.0, 1.0], [0.0, 0.2]]])
        >>> targets = torch.tensor([0, 0])
        >>> budgeted_accuracy(logits, targets, [0.9, float("-inf")], [1.0, 3.0])
        (0.5, 2.0)
        >>> budgeted_accuracy(logits, targets, [0.9, float("-inf")], [1.0, 3.0], ensemble=True)
        (1.0, 2.0)
    """
    logits = _as_stacked(test_logits, "test_logits")
    num_exits, num_samples, num_classes = logits.shape
    if num_samples == 0:
        raise ValueError("`test_logits` must hold at least one sample, got N = 0.")
    check_targets(test_targets, num_samples, num_classes, name="test_targets")
    cost = check_costs(costs, num_exits, device=logits.device)
    confidence, prediction = _confidence(logits, check_bool(ensemble, "ensemble"))
    exits = _assign(confidence, _as_thresholds(thresholds, confidence))  # (N,)
    chosen = prediction.gather(0, exits[None]).squeeze(0)
    accuracy = (chosen == test_targets.to(logits.device)).double().mean()
    return float(accuracy), float(cost[exits].mean())


@dataclass(frozen=True)
class BudgetCurve:
    """Accuracy against expected cost over a sweep of exit proportions.

    Attributes:
        budget_indices: the budget points p, P integers.
        mean_costs: expected test cost per sample at each point, in the unit of ``costs``.
        accuracies: test accuracy in [0, 1] at each point.
        val_accuracies: validation accuracy in [0, 1] with the same thresholds.
        exit_fractions: P tuples of E fractions, the share of test samples leaving at
            each exit.
        thresholds: P tuples of E thresholds (+inf: nobody leaves; the last is −inf).
        costs: the cumulative cost of each exit, E numbers.
        ensemble: whether exit k predicted from the mean of the softmax outputs of
            exits 1..k (``ensemble=True`` of :func:`budget_curve`).

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> logits = torch.randn(2, 40, 3, generator=g)
        >>> targets = torch.randint(3, (40,), generator=g)
        >>> curve = budget_curve(logits, targets, logits, targets, costs=[1.0, 4.0], num_points=3)
        >>> curve.budget_indices, len(curve.exit_fractions[0])
        ((1, 2, 3), 2)
        >>> curve.mean_costs[0] <= curve.mean_costs[-1]  # early exits first, then late ones
        True
        >>> curve.to_dict()["costs"]
        [1.0, 4.0]
    """

    budget_indices: tuple[int, ...]
    mean_costs: tuple[float, ...]
    accuracies: tuple[float, ...]
    val_accuracies: tuple[float, ...]
    exit_fractions: tuple[tuple[float, ...], ...]
    thresholds: tuple[tuple[float, ...], ...]
    costs: tuple[float, ...]
    ensemble: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A strictly JSON-serializable dict (no ``inf``).

        ``thresholds`` keeps the first E - 1 exits only (the last is always −∞), with
        +∞ (no sample leaves there) written as None.
        """
        return {
            "budget_indices": list(self.budget_indices),
            "mean_costs": list(self.mean_costs),
            "accuracies": list(self.accuracies),
            "val_accuracies": list(self.val_accuracies),
            "exit_fractions": [list(f) for f in self.exit_fractions],
            "thresholds": [
                [None if math.isinf(t) else t for t in ts[:-1]] for ts in self.thresholds
            ],
            "costs": list(self.costs),
            "ensemble": self.ensemble,
        }


def budget_curve(
    val_logits: StackedLogits,
    val_targets: Tensor,
    test_logits: StackedLogits,
    test_targets: Tensor,
    costs: Numbers,
    num_points: int = 39,
    *,
    ensemble: bool = False,
) -> BudgetCurve:
    """The budgeted-prediction curve: thresholds from validation, accuracy vs cost on test.

    For p = 1..P the proportions q_k ∝ (p / c)^k with c = (P + 1) / 2 (c = 20 for the
    paper's P = 39) give thresholds fitted on the validation logits
    (:func:`fit_thresholds`), applied to the test logits (:func:`budgeted_accuracy`).
    With ``ensemble=True`` exit k's confidence and prediction come from the mean of the
    softmax outputs of exits 1..k, for the thresholds and the test alike.

    Args:
        val_logits: validation logits, (E, N_val, K) or a sequence of E tensors.
        val_targets: validation class indices (N_val,); used for ``val_accuracies``.
        test_logits: test logits, (E, N, K) or a sequence of E tensors.
        test_targets: test class indices (N,).
        costs: cumulative cost of each exit (E,), non-decreasing, e.g. from
            :func:`exit_costs`.
        num_points: P >= 1, the number of budget points.
        ensemble: exit k uses the mean of the softmax outputs of exits 1..k.

    Returns:
        A :class:`BudgetCurve`.

    Raises:
        TypeError: if logits or targets have the wrong kind.
        ValueError: if shapes or the number of exits disagree, a target is out of range,
            the logits contain NaN, ``costs`` is negative or decreasing, or
            ``num_points`` < 1.

    Shape:
        - val_logits: (E, N_val, K); val_targets: (N_val,).
        - test_logits: (E, N, K); test_targets: (N,); costs: (E,).

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> val, test = torch.randn(3, 50, 4, generator=g), torch.randn(3, 60, 4, generator=g)
        >>> y_val, y_test = torch.randint(4, (50,), generator=g), torch.randint(4, (60,), generator=g)
        >>> curve = budget_curve(val, y_val, test, y_test, costs=[1.0, 2.0, 3.0], num_points=5)
        >>> len(curve.accuracies), all(1.0 <= c <= 3.0 for c in curve.mean_costs)
        (5, True)
    """
    val = _as_stacked(val_logits, "val_logits")
    test = _as_stacked(test_logits, "test_logits")
    if val.shape[0] != test.shape[0] or val.shape[2] != test.shape[2]:
        raise ValueError(
            "`val_logits` and `test_logits` must have the same number of exits E and classes "
            f"K, got (E, K) = {(val.shape[0], val.shape[2])} and {(test.shape[0], test.shape[2])}."
        )
    check_int(num_points, "num_points", low=1)
    num_exits = val.shape[0]
    if val.shape[1] == 0:
        raise ValueError("`val_logits` must hold at least one sample, got N_val = 0.")
    check_targets(val_targets, val.shape[1], val.shape[2], name="val_targets")
    cost = check_costs(costs, num_exits, device="cpu")
    use_ensemble = check_bool(ensemble, "ensemble")
    test_confidence, _ = _confidence(test, use_ensemble)
    center = (num_points + 1) / 2
    points = tuple(range(1, num_points + 1))
    mean_costs, accuracies, val_accuracies, fractions, thresholds = [], [], [], [], []
    for p in points:
        t = fit_thresholds(
            val, exit_proportions(p, num_exits, center=center), ensemble=use_ensemble
        )
        accuracy, mean_cost = budgeted_accuracy(test, test_targets, t, cost, ensemble=use_ensemble)
        val_accuracy, _ = budgeted_accuracy(val, val_targets, t, cost, ensemble=use_ensemble)
        counts = torch.bincount(_assign(test_confidence, t.to(test.device)), minlength=num_exits)
        accuracies.append(accuracy)
        mean_costs.append(mean_cost)
        val_accuracies.append(val_accuracy)
        fractions.append(tuple((counts.double() / test.shape[1]).tolist()))
        thresholds.append(tuple(float(v) for v in t.tolist()))
    return BudgetCurve(
        budget_indices=points,
        mean_costs=tuple(mean_costs),
        accuracies=tuple(accuracies),
        val_accuracies=tuple(val_accuracies),
        exit_fractions=tuple(fractions),
        thresholds=tuple(thresholds),
        costs=tuple(float(c) for c in cost.tolist()),
        ensemble=use_ensemble,
    )


def collect_logits(
    model: nn.Module,
    loader: Loader,
    attack: Attack | None = None,
    *,
    ensemble: bool = False,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """Run a model over a loader and keep every exit's logits, on clean or attacked inputs.

    The model runs in eval mode (restored afterwards); with an attack each batch is
    replaced by ``attack(images, labels)`` first. Results are gathered on the CPU so that
    large test sets do not hold accelerator memory.

    With ``ensemble=True`` entry k of the result is log p̄_k, the log of the mean of the
    softmax outputs of exits 1..k: its softmax is the ensemble's probabilities, so the
    result can be passed to :func:`budget_curve` and the other functions *with*
    ``ensemble=False`` (passing it with ``ensemble=True`` would average twice).

    Args:
        model: multi-exit model returning a sequence of E logits tensors (B, K).
        loader: iterable of ``(images, labels, ...)`` batches.
        attack: ``attack(images, labels) -> adversarial images``, or None.
        ensemble: return the log of the running mean of the exits' softmax outputs.
        device: where batches are moved; defaults to the model's device.
        progress: show a tqdm progress bar (when tqdm is installed).

    Returns:
        ``(logits, targets)``: (E, N, K) logits (log-probabilities with ``ensemble``) and
        (N,) labels, on the CPU.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``, ``attack`` is not callable, a
            batch is not ``(images, labels, ...)`` or the labels are not integers.
        ValueError: if the loader yields no sample, a label lies outside [0, K), or the
            images or the model's logits contain NaN.

    Shape:
        - batches: images (B, ...) and labels (B,).
        - output: logits (E, N, K) and targets (N,), N the total number of samples.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class TwoExits(nn.Module):
        ...     def forward(self, x):
        ...         return [x, 2 * x]
        >>> batches = [(torch.ones(2, 3), torch.tensor([0, 1])), (torch.zeros(1, 3), torch.tensor([2]))]
        >>> logits, targets = collect_logits(TwoExits(), batches, progress=False)
        >>> tuple(logits.shape), targets.tolist()
        ((2, 3, 3), [0, 1, 2])
    """
    check_model(model)
    if attack is not None:
        check_attack(attack)
    use_ensemble = check_bool(ensemble, "ensemble")
    target = resolve_device(model, device)
    desc = "logits (clean)" if attack is None else f"logits ({attack_name(attack)})"
    chunks: list[Tensor] = []
    labels_list: list[Tensor] = []
    with eval_mode(model):
        batches = checked_batches(iterate_batches(loader, target, enabled=progress, desc=desc))
        for logits, labels in exit_logits(model, batches, attack):
            check_no_nan(logits, "model(images)")
            if use_ensemble:
                logits = _probabilities(logits, ensemble=True).log()
            chunks.append(logits.cpu())
            labels_list.append(labels.cpu())
    if not chunks:
        raise ValueError("`loader` yielded no samples; pass a loader with at least one batch.")
    return torch.cat(chunks, dim=1), torch.cat(labels_list)


def budgeted_evaluation(
    model: nn.Module,
    val_loader: Loader,
    test_loader: Loader,
    costs: Numbers,
    *,
    attack: Attack | None = None,
    attack_validation: bool = True,
    num_points: int = 39,
    ensemble: bool = False,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> BudgetCurve:
    """Budgeted prediction in one call: logits of both splits, then :func:`budget_curve`.

    The adversarial budgeted setting of the NEO-KD paper: thresholds from a validation
    split, accuracy on adversarial test inputs. With ``attack_validation=True`` (default)
    the validation inputs are attacked too, so the thresholds are fitted on the kind of
    inputs they will face; set it to False to fit them on clean validation inputs.

    Args:
        model: multi-exit model returning a sequence of E logits tensors (B, K).
        val_loader: validation batches ``(images, labels, ...)``.
        test_loader: test batches.
        costs: cumulative cost of each exit (E,), e.g. from :func:`exit_costs`.
        attack: ``attack(images, labels) -> adversarial images``, or None (clean).
        attack_validation: also attack the validation inputs (only with an attack).
        num_points: number of budget points P.
        ensemble: exit k uses the mean of the softmax outputs of exits 1..k (see
            :func:`budget_curve`).
        device: where batches are moved; defaults to the model's device.
        progress: show tqdm progress bars (when tqdm is installed).

    Returns:
        A :class:`BudgetCurve`.

    Raises:
        TypeError, ValueError: as :func:`collect_logits` and :func:`budget_curve`.

    Shape:
        - batches: images (B, ...) and labels (B,); model output: E tensors (B, K).
        - costs: (E,).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class TwoExits(nn.Module):
        ...     def forward(self, x):
        ...         return [x, 2 * x]
        >>> g = torch.Generator().manual_seed(0)
        >>> val = [(torch.randn(8, 3, generator=g), torch.randint(3, (8,), generator=g))]
        >>> test = [(torch.randn(8, 3, generator=g), torch.randint(3, (8,), generator=g))]
        >>> curve = budgeted_evaluation(TwoExits(), val, test, [1.0, 2.0], num_points=3,
        ...                             progress=False)
        >>> curve.budget_indices
        (1, 2, 3)
    """
    val_attack = attack if attack_validation else None
    val_logits, val_targets = collect_logits(
        model, val_loader, val_attack, device=device, progress=progress
    )
    test_logits, test_targets = collect_logits(
        model, test_loader, attack, device=device, progress=progress
    )
    return budget_curve(
        val_logits, val_targets, test_logits, test_targets, costs, num_points, ensemble=ensemble
    )
