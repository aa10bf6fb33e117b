"""Adversarial transferability between the exits of a multi-exit network.

NEO-KD's exit-wise orthogonal distillation aims to make an attack crafted against one
exit transfer less to the others. The NEO-KD paper (Ham et al., NeurIPS 2023) measures it
with an E × E matrix: entry (i, j) is the attack success rate at exit j of the single
PGD attack generated on exit i,

    M_ij = 1/N Σ_n 1[argmax_k z_j(x_n^(i))_k ≠ y_n],    x^(i) = PGD-single on exit i,

here the misclassification rate over all N test samples (samples already misclassified on
clean inputs count as successes, so with ε = 0 every row is the clean error rate). The
diagonal is each exit's own single-attack success rate; the mean of the off-diagonal
entries summarises transferability (CIFAR-100, 7 exits: 23.68 % without distillation,
33.36 % for SKD, 20.12 % for NEO-KD). The model returns *logits*; rates are fractions in
[0, 1].
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from neokd_losses.attacks.pgd import MultiExitPGD, ThreatModel
from neokd_losses.evaluation._loader import (
    Loader,
    check_labels,
    check_model,
    eval_mode,
    forward_exits,
    iterate_batches,
    resolve_device,
)

__all__ = ["off_diagonal_mean", "transferability_matrix"]


def transferability_matrix(
    model: nn.Module,
    loader: Loader,
    *,
    eps: float,
    alpha: float,
    steps: int,
    norm: ThreatModel = "Linf",
    random_start: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> Tensor:
    """E × E matrix of attack success rates: single attack on exit i, evaluated at exit j.

    For every batch and every exit i, :class:`~neokd_losses.attacks.pgd.MultiExitPGD` in
    ``mode="single"`` attacks exit i; all E exits are then evaluated on its output. The
    model is evaluated in eval mode and its modes are restored afterwards.

    Args:
        model: multi-exit model returning a sequence of E logits tensors (B, K).
        loader: iterable of ``(images, labels, ...)`` batches, images in [0, 1].
        eps: radius ε of the threat model (e.g. 8/255 for CIFAR L∞).
        alpha: PGD step size.
        steps: number of PGD steps.
        norm: ``"Linf"`` or ``"L2"``.
        random_start: start each attack from a random point of the ε-ball.
        generator: ``torch.Generator`` for the random starts, for reproducible results.
        device: where batches are moved; defaults to the model's device.
        progress: show a tqdm progress bar (when tqdm is installed).

    Returns:
        M, a float64 CPU tensor (E, E) with rates in [0, 1]; row i = attacked exit,
        column j = evaluated exit. :func:`off_diagonal_mean` gives the paper's summary.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``, a batch is not
            ``(images, labels, ...)`` or the labels are not integers.
        ValueError: if the loader yields no sample, a label lies outside [0, K), or an
            attack argument is invalid (as :class:`~neokd_losses.attacks.pgd.MultiExitPGD`).

    Shape:
        - batches: images (B, ...) in [0, 1], labels (B,).
        - output: (E, E).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class TwoExits(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)
        ...     def forward(self, x):
        ...         return [self.a(x), self.b(x)]
        >>> batches = [(torch.rand(8, 4), torch.randint(3, (8,)))]
        >>> m = transferability_matrix(TwoExits(), batches, eps=0.1, alpha=0.02, steps=3,
        ...                            progress=False)
        >>> m.shape, bool(((m >= 0) & (m <= 1)).all())
        (torch.Size([2, 2]), True)
    """
    check_model(model)
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
    attacks: list[MultiExitPGD] = []
    total = 0
    with eval_mode(model):
        for images, labels in iterate_batches(
            loader, target, enabled=progress, desc="transferability"
        ):
            if labels.shape[0] == 0:
                continue
            if not attacks:
                num_exits, _, num_classes = forward_exits(model, images[:1]).shape
                attacks = [single_exit_attack(exit_index=i) for i in range(num_exits)]
            check_labels(labels, num_classes)  # before the attacks use them
            rows = []
            for attack in attacks:
                logits = forward_exits(model, attack(images, labels))  # (E, B, K)
                rows.append((logits.argmax(-1) != labels).sum(-1))
            batch_wrong = torch.stack(rows)
            wrong = batch_wrong if wrong is None else wrong + batch_wrong
            total += labels.shape[0]
    if wrong is None or total == 0:
        raise ValueError("`loader` yielded no samples; pass a loader with at least one batch.")
    return wrong.cpu().double() / total


def off_diagonal_mean(matrix: Tensor) -> float:
    """Mean of the off-diagonal entries of an E × E transferability matrix (E ≥ 2).

    This is the paper's summary of adversarial transferability: how often an attack on
    one exit also fools another exit, averaged over the E(E - 1) ordered pairs.

    Args:
        matrix: (E, E) success rates, e.g. from :func:`transferability_matrix`.

    Returns:
        The mean of M_ij over i ≠ j.

    Raises:
        TypeError: if ``matrix`` is not a tensor.
        ValueError: if it is not square or E < 2.

    Shape:
        - matrix: (E, E); output: a Python float.

    Example:
        >>> import torch
        >>> off_diagonal_mean(torch.tensor([[0.9, 0.2], [0.4, 0.8]], dtype=torch.float64))
        0.30000000000000004
    """
    if not isinstance(matrix, Tensor):
        raise TypeError(f"`matrix` must be a Tensor (E, E), got {type(matrix).__name__}.")
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 2:
        raise ValueError(
            "`matrix` must be a square (E, E) matrix with E >= 2 exits (an off-diagonal "
            f"needs two exits), got shape {tuple(matrix.shape)}."
        )
    size = matrix.shape[0]
    mask = ~torch.eye(size, dtype=torch.bool, device=matrix.device)
    return float(matrix[mask].double().mean())
