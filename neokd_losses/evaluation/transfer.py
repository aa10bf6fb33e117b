"""Adversarial transferability between the exits of a multi-exit network.

NEO-KD's exit-wise orthogonal distillation aims to make an attack crafted against one
exit transfer less to the others. The NEO-KD paper (Ham et al., NeurIPS 2023) measures it
with an E × E matrix of "attack success rates of the adversarial single attack": entry
(i, j) is the success rate at exit j of the single-exit PGD attack generated on exit i.

Two ways of counting a success are offered (``count=``):

- ``"clean-correct"`` (default; the usual attack-success-rate definition, and the one the
  paper's numbers are consistent with): among the samples that exit j classifies
  correctly on the *clean* input, the fraction that the attack on exit i makes exit j
  misclassify,

      M_ij = Σ_n 1[ŷ_j(x_n) = y_n] · 1[ŷ_j(x_n^(i)) ≠ y_n] / Σ_n 1[ŷ_j(x_n) = y_n];

- ``"all"``: the misclassification rate over all N samples,
  M_ij = 1/N Σ_n 1[ŷ_j(x_n^(i)) ≠ y_n], so samples that exit j already gets wrong on
  clean inputs count as successes: the diagonal is at least exit j's clean error, and
  off-diagonal entries usually are too (an attack on exit i can also correct some of
  exit j's clean mistakes; with ε = 0 every row is the clean error rate). It was the
  only definition in earlier releases of this library.

Here x^(i) = PGD-single on exit i and ŷ_j the prediction of exit j. The diagonal is
each exit's own single-attack success rate; the mean of the off-diagonal entries
summarizes transferability (CIFAR-100, 7 exits: 23.68 % without distillation, 33.36 %
for SKD, 20.12 % for NEO-KD in the paper). A :class:`TransferResult` keeps the per-entry
numerators and denominators of both definitions, so either rate can be recomputed. The
model returns *logits*; rates are fractions in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, Union

import torch
from torch import Tensor, nn

from neokd_losses.attacks.pgd import MultiExitPGD, ThreatModel
from neokd_losses.evaluation._finite import check_no_nan
from neokd_losses.evaluation._loader import (
    Loader,
    check_labels,
    check_model,
    eval_mode,
    forward_exits,
    iterate_batches,
    resolve_device,
)

__all__ = ["TransferCount", "TransferResult", "off_diagonal_mean", "transferability_matrix"]

TransferCount = Literal["clean-correct", "all"]
"""How a success of the attack on exit i at exit j is counted (see the module docstring)."""

_COUNTS = ("clean-correct", "all")


def _check_count(count: object) -> TransferCount:
    if count == "clean-correct":
        return "clean-correct"
    if count == "all":
        return "all"
    raise ValueError(
        f"`count` must be one of {', '.join(map(repr, _COUNTS))}, got {count!r}. "
        "'clean-correct' counts successes among the samples exit j gets right on clean "
        "inputs (the attack success rate); 'all' counts misclassifications over all samples."
    )


@dataclass(frozen=True)
class TransferResult:
    """A transferability matrix with the counts behind every entry.

    Row i is the attacked exit, column j the evaluated exit. The counts are integer
    tensors on the CPU; :attr:`matrix` is the rate of the chosen ``count`` definition.

    Attributes:
        count: the definition of :attr:`matrix`, ``"clean-correct"`` or ``"all"``.
        clean_correct: (E,), the number of samples exit j classifies correctly on clean
            inputs: the denominators of the ``"clean-correct"`` rate (equal down a column).
        fooled: (E, E), among those, how many the attack on exit i makes exit j
            misclassify: the numerators of the ``"clean-correct"`` rate.
        wrong: (E, E), the number of all samples that exit j misclassifies under the
            attack on exit i: the numerators of the ``"all"`` rate.
        num_samples: N, the denominator of the ``"all"`` rate.

    Shape:
        - clean_correct: (E,); fooled, wrong, matrix, numerators, denominators: (E, E).

    Example:
        >>> import torch
        >>> r = TransferResult("clean-correct", clean_correct=torch.tensor([4, 5]),
        ...                    fooled=torch.tensor([[4, 1], [2, 5]]),
        ...                    wrong=torch.tensor([[10, 6], [8, 10]]), num_samples=10)
        >>> r.matrix
        tensor([[1.0000, 0.2000],
                [0.5000, 1.0000]], dtype=torch.float64)
        >>> r.rates("all")[0, 1].item(), r.off_diagonal_mean()
        (0.6, 0.35)
    """

    count: TransferCount
    clean_correct: Tensor
    fooled: Tensor
    wrong: Tensor
    num_samples: int

    @property
    def num_exits(self) -> int:
        """E, the number of exits."""
        return int(self.fooled.shape[0])

    def numerators(self, count: TransferCount | None = None) -> Tensor:
        """Successes per entry (E, E) under ``count`` (default: :attr:`count`)."""
        which = self.count if count is None else _check_count(count)
        return self.fooled if which == "clean-correct" else self.wrong

    def denominators(self, count: TransferCount | None = None) -> Tensor:
        """Attempts per entry (E, E) under ``count`` (default: :attr:`count`)."""
        which = self.count if count is None else _check_count(count)
        e = self.num_exits
        if which == "clean-correct":
            return self.clean_correct.reshape(1, e).expand(e, e).clone()
        return torch.full((e, e), self.num_samples, dtype=torch.long)

    def rates(self, count: TransferCount | None = None) -> Tensor:
        """Success rates (E, E), float64 in [0, 1], under ``count`` (default: :attr:`count`).

        An entry whose denominator is 0 (exit j classifies no clean sample correctly, so
        there is nothing to fool) is 0.
        """
        num = self.numerators(count).double()
        den = self.denominators(count).double()
        return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))

    @property
    def matrix(self) -> Tensor:
        """Success rates (E, E) under :attr:`count`, float64 in [0, 1]."""
        return self.rates()

    def off_diagonal_mean(self, count: TransferCount | None = None) -> float:
        """Mean of the off-diagonal rates under ``count`` (default: :attr:`count`)."""
        return off_diagonal_mean(self.rates(count))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict: the rates of both definitions and every count."""
        return {
            "count": self.count,
            "matrix": self.matrix.tolist(),
            "off_diagonal_mean": self.off_diagonal_mean() if self.num_exits > 1 else 0.0,
            "matrix_all": self.rates("all").tolist(),
            "matrix_clean_correct": self.rates("clean-correct").tolist(),
            "clean_correct": self.clean_correct.tolist(),
            "fooled": self.fooled.tolist(),
            "wrong": self.wrong.tolist(),
            "num_samples": self.num_samples,
        }


def transferability_matrix(
    model: nn.Module,
    loader: Loader,
    *,
    eps: float,
    alpha: float,
    steps: int,
    norm: ThreatModel = "Linf",
    random_start: bool = True,
    count: TransferCount = "clean-correct",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> TransferResult:
    """E × E attack success rates: single attack on exit i, evaluated at exit j.

    For every batch and every exit i, :class:`~neokd_losses.attacks.pgd.MultiExitPGD` in
    ``mode="single"`` attacks exit i; all E exits are then evaluated on its output and on
    the clean batch. The model is evaluated in eval mode and its modes are restored
    afterwards.

    Args:
        model: multi-exit model returning a sequence of E logits tensors (B, K).
        loader: iterable of ``(images, labels, ...)`` batches, images in [0, 1].
        eps: radius ε of the threat model (e.g. 8/255 for CIFAR L∞).
        alpha: PGD step size.
        steps: number of PGD steps.
        norm: ``"Linf"`` or ``"L2"``.
        random_start: start each attack from a random point of the ε-ball.
        count: ``"clean-correct"`` (default): success rate among the samples exit j gets
            right on clean inputs; ``"all"``: misclassification rate over all samples
            (see the module docstring). Both are always counted; this picks
            :attr:`TransferResult.matrix`.
        generator: ``torch.Generator`` for the random starts, for reproducible results.
        device: where batches are moved; defaults to the model's device.
        progress: show a tqdm progress bar (when tqdm is installed).

    Returns:
        A :class:`TransferResult`: ``.matrix`` is the float64 CPU (E, E) tensor of rates
        (row i = attacked exit, column j = evaluated exit), ``.off_diagonal_mean()`` the
        paper's summary, and the counts give either definition's rates.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``, a batch is not
            ``(images, labels, ...)`` or the labels are not integers.
        ValueError: if ``count`` is unknown, the loader yields no sample, the images or
            the model's logits contain NaN, a label lies outside [0, K), or an attack
            argument is invalid (as :class:`~neokd_losses.attacks.pgd.MultiExitPGD`).

    Shape:
        - batches: images (B, ...) in [0, 1], labels (B,).
        - output: ``.matrix`` (E, E).

    Example:
        >>> import torch
        >>> batches = [(torch.rand(8, 4), torch.randint(3, (8,)))]
        >>> r = transferability_matrix(TwoExits(in_features=4, num_classes=3), batches,
        ...                            eps=0.1, alpha=0.02, steps=3, progress=False)
        >>> r.count, r.matrix.shape, bool(((r.matrix >= 0) & (r.matrix <= 1)).all())
        ('clean-correct', torch.Size([2, 2]), True)
        >>> r.rates("all").shape, r.num_samples
        (torch.Size([2, 2]), 8)
    """
    check_model(model)
    chosen = _check_count(count)
    single_exit_attack = partial(
        MultiExitPGD,
        model,
        eps=eps,
        alpha=alpha,
        steps=steps,
        random_start=random_start,
        mode="single",
        norm=norm,
        generator=generator,
    )
    # Validate the attack arguments before touching the data (exit 0 always exists).
    single_exit_attack(exit_index=0)
    target = resolve_device(model, device)
    wrong: Tensor | None = None  # (E, E): attacked exit i, evaluated exit j
    fooled: Tensor | None = None  # (E, E): same, among the clean-correct samples of exit j
    clean_correct: Tensor | None = None  # (E,)
    attacks: list[MultiExitPGD] = []
    total = 0
    with eval_mode(model):
        for images, labels in iterate_batches(
            loader, target, enabled=progress, desc="transferability"
        ):
            if labels.shape[0] == 0:
                continue
            check_no_nan(images, "images")
            clean = forward_exits(model, images)  # (E, B, K)
            check_no_nan(clean, "model(images)")
            if not attacks:
                attacks = [single_exit_attack(exit_index=i) for i in range(clean.shape[0])]
            check_labels(labels, clean.shape[-1])  # before the attacks use them
            right = clean.argmax(-1) == labels  # (E, B): exit j right on the clean input
            rows_wrong, rows_fooled = [], []
            for attack in attacks:
                miss = forward_exits(model, attack(images, labels)).argmax(-1) != labels
                rows_wrong.append(miss.sum(-1))
                rows_fooled.append((miss & right).sum(-1))
            batch = (torch.stack(rows_wrong), torch.stack(rows_fooled), right.sum(-1))
            if wrong is None or fooled is None or clean_correct is None:
                wrong, fooled, clean_correct = batch
            else:
                wrong, fooled, clean_correct = (
                    wrong + batch[0],
                    fooled + batch[1],
                    clean_correct + batch[2],
                )
            total += labels.shape[0]
    if wrong is None or fooled is None or clean_correct is None or total == 0:
        raise ValueError("`loader` yielded no samples; pass a loader with at least one batch.")
    return TransferResult(
        count=chosen,
        clean_correct=clean_correct.cpu().long(),
        fooled=fooled.cpu().long(),
        wrong=wrong.cpu().long(),
        num_samples=total,
    )


def off_diagonal_mean(matrix: Union[Tensor, TransferResult]) -> float:
    """Mean of the off-diagonal entries of an E × E transferability matrix (E ≥ 2).

    This is the paper's summary of adversarial transferability: how often an attack on
    one exit also fools another exit, averaged over the E(E - 1) ordered pairs.

    Args:
        matrix: (E, E) success rates, or a :class:`TransferResult` (its ``.matrix``),
            e.g. from :func:`transferability_matrix`.

    Returns:
        The mean of M_ij over i ≠ j.

    Raises:
        TypeError: if ``matrix`` is not a tensor or a :class:`TransferResult`.
        ValueError: if it is not square or E < 2.

    Shape:
        - matrix: (E, E); output: a Python float.

    Example:
        >>> import torch
        >>> off_diagonal_mean(torch.tensor([[0.9, 0.2], [0.4, 0.8]], dtype=torch.float64))
        0.30000000000000004
    """
    if isinstance(matrix, TransferResult):
        matrix = matrix.matrix
    if not isinstance(matrix, Tensor):
        raise TypeError(
            "`matrix` must be a Tensor (E, E) or a TransferResult, got " f"{type(matrix).__name__}."
        )
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 2:
        raise ValueError(
            "`matrix` must be a square (E, E) matrix with E >= 2 exits (an off-diagonal "
            f"needs two exits), got shape {tuple(matrix.shape)}."
        )
    size = matrix.shape[0]
    mask = ~torch.eye(size, dtype=torch.bool, device=matrix.device)
    return float(matrix[mask].double().mean())
