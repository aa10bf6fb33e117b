"""Naive references for the NEO-KD losses, written from docs/paper.md#the-neo-kd-objective.

One exit and one sample at a time with plain Python arithmetic; nothing here is shared
with the vectorized implementation under test.
"""

from __future__ import annotations

import math

from torch import Tensor


def softmax(z: list[float], temperature: float = 1.0) -> list[float]:
    top = max(v / temperature for v in z)
    exps = [math.exp(v / temperature - top) for v in z]
    total = sum(exps)
    return [e / total for e in exps]


def soft_ce(student: list[float], target: list[float], temperature: float = 1.0) -> float:
    top = max(v / temperature for v in student)
    log_norm = top + math.log(sum(math.exp(v / temperature - top) for v in student))
    return -sum(q * (s / temperature - log_norm) for q, s in zip(target, student) if q > 0)


def hard_ce(student: list[float], label: int) -> float:
    onehot = [1.0 if k == label else 0.0 for k in range(len(student))]
    return soft_ce(student, onehot)


def neighbors(i: int, num_exits: int) -> list[int]:
    """The paper's N_i, 0-based: first exit {0, 1}, last {E-2, E-1}, inner {i-1, i, i+1}."""
    if num_exits == 1:
        return [0]
    if i == 0:
        return [0, 1]
    if i == num_exits - 1:
        return [num_exits - 2, num_exits - 1]
    return [i - 1, i, i + 1]


def nkd(adv: list[Tensor], clean: list[Tensor], temperature: float = 1.0) -> list[list[float]]:
    """NKD_ij as an E x B nested list."""
    num_exits, batch = len(adv), adv[0].shape[0]
    out = []
    for i in range(num_exits):
        row = []
        for j in range(batch):
            probs = [softmax(clean[n][j].tolist(), temperature) for n in neighbors(i, num_exits)]
            teacher = [sum(p[k] for p in probs) / len(probs) for k in range(len(probs[0]))]
            row.append(temperature**2 * soft_ce(adv[i][j].tolist(), teacher, temperature))
        out.append(row)
    return out


def eokd(
    adv: list[Tensor], clean: list[Tensor], mask: Tensor, temperature: float = 1.0
) -> list[list[float]]:
    """EOKD_ij as an E x B nested list, for a given (E, B, K) bool mask."""
    out = []
    for i in range(len(adv)):
        row = []
        for j in range(adv[0].shape[0]):
            p = softmax(clean[i][j].tolist(), temperature)
            kept = [pk if bool(mask[i, j, k]) else 0.0 for k, pk in enumerate(p)]
            norm = sum(kept)
            teacher = [v / norm for v in kept]
            row.append(temperature**2 * soft_ce(adv[i][j].tolist(), teacher, temperature))
        out.append(row)
    return out


def neokd(
    adv: list[Tensor],
    clean: list[Tensor],
    targets: Tensor,
    mask: Tensor,
    *,
    alpha: float,
    beta: float,
    gamma: list[float],
    temperature: float,
) -> float:
    """The paper's L = 1/N Σ_j Σ_i [CE(clean) + CE(adv) + γ_i(α NKD_ij + β EOKD_ij)]."""
    n = nkd(adv, clean, temperature)
    o = eokd(adv, clean, mask, temperature)
    batch = len(targets)
    total = 0.0
    for j in range(batch):
        y = int(targets[j])
        for i in range(len(adv)):
            total += hard_ce(clean[i][j].tolist(), y) + hard_ce(adv[i][j].tolist(), y)
            total += gamma[i] * (alpha * n[i][j] + beta * o[i][j])
    return total / batch
