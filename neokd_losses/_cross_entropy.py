"""The two cross-entropies of the package: per exit against labels, and against soft targets.

The paper writes ℓ(p, q) for the cross-entropy of a prediction p against a target q,
where q is a hard label or a probability vector. Every loss and every attack computes
ℓ through these two helpers, so one dtype rule holds everywhere:

- logits are unnormalized scores, stacked to (E, B, K) by ``_exits.stack_exits``;
- a loss is computed in the *working dtype* of its inputs (:func:`working_dtype`):
  half-precision inputs (float16 / bfloat16, as produced under autocast) are computed in
  float32, and when two tensors meet (adversarial and clean logits, student logits and
  teacher probabilities) both are promoted to their common dtype (float32 with float64
  gives float64), never cast down. The losses bring both sides of a pair to that dtype
  once, on entry (``losses._base.stack_pair``), so every term of one loss, and its
  result, has the same dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["per_exit_cross_entropy", "soft_cross_entropy", "tempered", "working_dtype"]


def working_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype a loss is computed in: the promotion of the inputs and float32."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def tempered(logits: Tensor, temperature: float) -> Tensor:
    """``logits / T``, without the division (an elementwise pass) at T = 1."""
    return logits if temperature == 1.0 else logits / temperature


def per_exit_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of every exit and row: logits (E, N, K), labels (N,) -> (E, N).

    Computed in the working dtype (float32 for half-precision logits). The same values
    and gradients, bit for bit, as ``F.cross_entropy(..., reduction="none")`` per exit
    (a gather of the log-softmax, which is what ``cross_entropy`` computes), without
    repeating the labels E times.
    """
    num_exits, rows, _ = logits.shape
    log_probs = F.log_softmax(logits.to(working_dtype(logits)), dim=-1)
    index = labels.long()[None, :, None].expand(num_exits, rows, 1)
    return -log_probs.gather(-1, index).squeeze(-1)


def soft_cross_entropy(
    student_logits: Tensor, teacher_probs: Tensor, temperature: float = 1.0
) -> Tensor:
    """Cross-entropy of ``softmax(student_logits / T)`` against a soft target, over the last dim.

    .. math:: ℓ(p, q) = -Σ_k q_k \\log p_k, \\quad p = \\mathrm{softmax}(z / T)

    No T² factor is applied here; knowledge-distillation callers multiply by T² themselves.
    Zero target probabilities contribute exactly zero, so a teacher that puts no mass on a
    class never produces ``0 · log 0`` NaNs. The teacher broadcasts against the student:
    several teachers stacked in front, (n, ..., K), share one log-softmax of the student
    and give n losses per row, (n, ...).

    Args:
        student_logits: logits, (..., K).
        teacher_probs: a probability vector per row, (..., K), or broadcastable to it.
        temperature: T > 0 dividing the student logits.

    Returns:
        The loss per row, the broadcast shape without K, in the working dtype of both
        inputs.
    """
    dtype = working_dtype(student_logits, teacher_probs)
    log_p = F.log_softmax(tempered(student_logits.to(dtype), temperature), dim=-1)
    return -(teacher_probs.to(dtype) * log_p).sum(-1)
