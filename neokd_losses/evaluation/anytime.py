"""Anytime prediction: the accuracy of every exit, on clean or adversarial inputs.

In the anytime setting of the NEO-KD paper (Ham et al., NeurIPS 2023) a prediction may be
requested at any exit, so every exit is scored on the whole test set. The headline number
is the *average adversarial test accuracy*, the mean over the E exits of the per-exit
accuracy on adversarial inputs, the metric of the paper's anytime-prediction tables:

    acc_i = 1/N Σ_j 1[argmax_k z_i(x_j')_k = y_j],      mean = 1/E Σ_i acc_i

where x_j' is x_j (clean) or the attack's output. The model returns *logits*; the
prediction of an exit is their argmax. Accuracies are fractions in [0, 1]; the markdown
tables print them in percent, as the paper does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from neokd_losses._validation import check_int
from neokd_losses.evaluation._finite import checked_batches
from neokd_losses.evaluation._loader import (
    Attack,
    Loader,
    attack_name,
    check_attack,
    check_model,
    count_correct,
    eval_mode,
    iterate_batches,
    resolve_device,
)

__all__ = ["AnytimeResult", "anytime_accuracy", "anytime_table"]


@dataclass(frozen=True)
class AnytimeResult:
    """Per-exit accuracy of a multi-exit model on one test set, clean or attacked.

    Attributes:
        correct: number of correctly classified samples at each exit, E integers.
        num_samples: N, the number of test samples.
        attack: name of the attack that produced the inputs, or None for clean inputs.

    Example:
        >>> result = AnytimeResult(correct=(6, 7, 9), num_samples=10, attack="PGD")
        >>> result.accuracies, round(result.mean, 4)
        ((0.6, 0.7, 0.9), 0.7333)
        >>> print(result.to_markdown())
        | inputs | exit 1 | exit 2 | exit 3 | mean |
        |---|---|---|---|---|
        | PGD | 60.00 | 70.00 | 90.00 | 73.33 |
    """

    correct: tuple[int, ...]
    num_samples: int
    attack: str | None = None

    def __post_init__(self) -> None:
        if self.num_samples <= 0:
            raise ValueError(f"`num_samples` must be > 0, got {self.num_samples}.")
        if len(self.correct) == 0:
            raise ValueError("`correct` must hold one count per exit, got an empty tuple.")
        if any(not 0 <= c <= self.num_samples for c in self.correct):
            raise ValueError(
                f"every entry of `correct` must lie in [0, num_samples = {self.num_samples}], "
                f"got {list(self.correct)}."
            )

    @property
    def num_exits(self) -> int:
        """E, the number of exits."""
        return len(self.correct)

    @property
    def accuracies(self) -> tuple[float, ...]:
        """Accuracy of each exit, E fractions in [0, 1]."""
        return tuple(c / self.num_samples for c in self.correct)

    @property
    def mean(self) -> float:
        """Mean accuracy over exits (the paper's average adversarial test accuracy)."""
        return sum(self.accuracies) / self.num_exits

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict: attack, num_samples, correct, per_exit, mean."""
        return {
            "attack": self.attack,
            "num_samples": self.num_samples,
            "correct": list(self.correct),
            "per_exit": list(self.accuracies),
            "mean": self.mean,
        }

    def to_markdown(self, label: str | None = None) -> str:
        """A one-row markdown table in percent; ``label`` defaults to the attack or "clean"."""
        return anytime_table({label or self.attack or "clean": self})


def anytime_table(results: Mapping[str, AnytimeResult], *, digits: int = 2) -> str:
    """A markdown table of several anytime results, one row each, accuracies in percent.

    Args:
        results: row label -> result, e.g. ``{"clean": r0, "PGD max-average": r1}``;
            every result must have the same number of exits.
        digits: decimals printed.

    Returns:
        The table, columns ``exit 1 .. exit E`` and ``mean``.

    Raises:
        ValueError: if ``results`` is empty or the results differ in their number of exits.

    Example:
        >>> clean = AnytimeResult((9, 10), 10)
        >>> adv = AnytimeResult((4, 5), 10, attack="PGD")
        >>> print(anytime_table({"clean": clean, "adversarial": adv}, digits=1))
        | inputs | exit 1 | exit 2 | mean |
        |---|---|---|---|
        | clean | 90.0 | 100.0 | 95.0 |
        | adversarial | 40.0 | 50.0 | 45.0 |
    """
    digits = check_int(digits, "digits", low=0)
    if not results:
        raise ValueError("`results` must hold at least one AnytimeResult, got an empty mapping.")
    exits = {label: r.num_exits for label, r in results.items()}
    if len(set(exits.values())) != 1:
        raise ValueError(f"all results must have the same number of exits, got {exits}.")
    num_exits = next(iter(exits.values()))
    header = ["inputs", *(f"exit {i + 1}" for i in range(num_exits)), "mean"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, r in results.items():
        cells = [f"{100 * a:.{digits}f}" for a in (*r.accuracies, r.mean)]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)


def anytime_accuracy(
    model: nn.Module,
    loader: Loader,
    attack: Attack | None = None,
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> AnytimeResult:
    """Accuracy of every exit on clean inputs, or on the inputs an attack produces.

    The model is evaluated in eval mode (its own and its submodules' modes are restored
    afterwards, also on error). With an attack, each batch is replaced by
    ``attack(images, labels)`` before the forward pass; the attack may be a
    :class:`~neokd_losses.attacks.pgd.MultiExitPGD` (single, average or max-average) or any
    torchattacks attack built on an :class:`~neokd_losses.attacks.exit_view.ExitView`.
    Every exit is then scored on the same adversarial inputs.

    Args:
        model: multi-exit model; ``model(x)`` returns a sequence of E logits tensors (B, K).
        loader: iterable of ``(images, labels, ...)`` batches, e.g. a ``DataLoader``.
        attack: callable ``attack(images, labels) -> adversarial images``, or None for
            clean accuracy.
        device: where batches are moved; defaults to the device of the model's parameters.
        progress: show a tqdm progress bar (when tqdm is installed).

    Returns:
        An :class:`AnytimeResult` with the per-exit correct counts, the accuracies and
        their mean.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``, ``attack`` is not callable, a
            batch is not ``(images, labels, ...)`` or the labels are not integers.
        ValueError: if the loader yields no sample, the images contain NaN, or the labels
            are not (B,) for B images or lie outside [0, K) (checked before the attack
            runs).

    Shape:
        - batches: images (B, ...) and labels (B,) class indices in [0, K).
        - model output: sequence of E tensors (B, K).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class TwoExits(nn.Module):
        ...     def forward(self, x):
        ...         return [x, -x]
        >>> images = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 4.0]])
        >>> labels = torch.tensor([0, 1, 1])
        >>> result = anytime_accuracy(TwoExits(), [(images, labels)], progress=False)
        >>> result.correct, round(result.mean, 4)
        ((2, 1), 0.5)
    """
    check_model(model)
    if attack is not None:
        check_attack(attack)
    target = resolve_device(model, device)
    desc = "anytime (clean)" if attack is None else f"anytime ({attack_name(attack)})"
    with eval_mode(model):
        batches = checked_batches(iterate_batches(loader, target, enabled=progress, desc=desc))
        correct, total = count_correct(model, batches, attack)
    return AnytimeResult(
        correct=tuple(int(c) for c in correct.tolist()),
        num_samples=total,
        attack=None if attack is None else attack_name(attack),
    )
