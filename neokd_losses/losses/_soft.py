"""Soft-target cross-entropy, the ℓ(p, q) of the paper with q a probability vector."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["soft_cross_entropy"]


def soft_cross_entropy(
    student_logits: Tensor, teacher_probs: Tensor, temperature: float = 1.0
) -> Tensor:
    """Cross-entropy of ``softmax(student_logits / T)`` against a soft target, over the last dim.

    .. math:: ℓ(p, q) = -Σ_k q_k \\log p_k, \\quad p = \\mathrm{softmax}(z / T)

    No T² factor is applied here; knowledge-distillation callers multiply by T² themselves.
    Zero target probabilities contribute exactly zero, so a teacher that puts no mass on a
    class never produces ``0 · log 0`` NaNs.

    Args:
        student_logits: logits, (..., K).
        teacher_probs: a probability vector per row, (..., K), same shape.
        temperature: T > 0 dividing the student logits.

    Returns:
        The loss per row, (...).
    """
    log_p = F.log_softmax(student_logits / temperature, dim=-1)
    return -(teacher_probs * log_p).sum(-1)
