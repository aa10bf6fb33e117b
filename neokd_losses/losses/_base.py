"""What every multi-exit loss shares: input preparation and the module base class.

Every loss of the package is a pure function plus a thin ``nn.Module`` (the
``torch.nn.functional.cross_entropy`` / ``torch.nn.CrossEntropyLoss`` split). The
functions prepare their logits with :func:`stack_pair` (or :func:`stack_adversarial`),
so that one set of rules holds for all of them:

- logits are stacked to (E, B, K) and validated (``_exits.stack_exits``);
- both sides are computed in their common working dtype (``_cross_entropy``);
- an empty batch (B = 0) raises a ``ValueError``: the mean over no samples is NaN, and
  an empty batch in a training loop is a bug upstream (a sampler or a filter), not a
  loss of zero;
- logits that look like probabilities (every row non-negative and summing to 1) give
  one ``RuntimeWarning`` per call.

The modules derive from :class:`_MultiExitLoss`, which holds ``reduction``, the
``exit_weights`` buffer and the ``extra_repr``, so that each module is its docstring, an
``__init__`` that validates and stores its own hyper-parameters, and a one-line
``forward``.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._cross_entropy import working_dtype
from .._exits import ExitLogits, check_same_exits, reduce_exits, stack_exits
from .._validation import (
    ExitWeights,
    Reduction,
    as_exit_weights,
    check_reduction,
    check_targets,
    is_compiling,
)

__all__ = [
    "PROBABILITY_TOLERANCE",
    "apply_exit_weights",
    "stack_adversarial",
    "stack_pair",
    "warn_if_probabilities",
    "weigh_and_reduce",
]

PROBABILITY_TOLERANCE = 1e-2
"""How far from 1 a row sum may be for the row to count as a probability vector:
bfloat16 rounds each probability by up to 0.2 %, so a bfloat16 softmax can sum to 1 ± 0.002;
real logits that are all non-negative and sum to within 1 % of 1 on every row are not
a practical concern."""

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH_NN_DIR = os.path.dirname(os.path.abspath(nn.__file__))


def _check_batch(logits: Tensor, name: str) -> None:
    if logits.shape[1] == 0:
        raise ValueError(
            f"`{name}` hold an empty batch (B = 0, exits of shape {tuple(logits.shape[1:])}): "
            "a loss over no samples is undefined (its mean is NaN). Skip empty batches "
            "before the loss, e.g. `if targets.numel() == 0: continue`, or drop the last "
            "incomplete batch with `DataLoader(..., drop_last=True)`."
        )


def _probability_flags(rows: Tensor) -> Tensor:
    """Bools (n,): for each of n stacked (n, ..., K) tensors, every row is non-negative
    and sums to 1 within the tolerance."""
    with torch.no_grad():
        flat = rows.detach().flatten(1, -2)
        sums_to_one = (flat.sum(-1) - 1).abs().amax(-1) <= PROBABILITY_TOLERANCE
        return (flat.amin(dim=(1, 2)) >= 0) & sums_to_one


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside this package and ``torch.nn``."""
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(
        (_PACKAGE_DIR, _TORCH_NN_DIR)
    ):
        frame = frame.f_back
        level += 1
    return level


def warn_if_probabilities(**stacked: Tensor) -> None:
    """One ``RuntimeWarning`` if any of the stacked (E, B, K) tensors looks like probabilities.

    A tensor looks like probabilities when every row is non-negative and sums to 1 (as
    AutoAttack checks its models' outputs). Logits of a real model practically never do;
    log-probabilities (``log_softmax``) do not trigger it and are harmless, since the
    softmax of log-probabilities is the probabilities again. One device synchronization
    for all tensors; skipped while ``torch.compile`` traces the caller and for K = 1.
    """
    if is_compiling():
        return
    names = [name for name, t in stacked.items() if t.shape[-1] > 1 and t.numel()]
    if not names:
        return
    # The first exit of every tensor screens (E times cheaper, one device sync); only a
    # suspect is then checked in full.
    flags = _probability_flags(torch.stack([stacked[name][0] for name in names])).tolist()
    suspects = [name for name, flag in zip(names, flags, strict=True) if flag]
    suspects = [name for name in suspects if bool(_probability_flags(stacked[name][None]))]
    if suspects:
        which = " and ".join(f"`{name}`" for name in suspects)
        warnings.warn(
            f"{which} look like probabilities (every row is non-negative and sums to 1), "
            "but the losses expect logits, the unnormalized scores before the softmax: "
            "a softmax of probabilities is nearly uniform, so the loss trains almost "
            "nothing. Pass the model's raw outputs (remove the final softmax); see "
            '"Logits, not probabilities" on the losses page of the API docs.',
            RuntimeWarning,
            stacklevel=_user_stacklevel(),
        )


def stack_pair(
    adv_logits: ExitLogits, clean_logits: ExitLogits, targets: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Validate both sides, stack each to (E, B, K) and bring them to their working dtype.

    Checks, in order: each side (``stack_exits``), that they agree in E, B and K, a
    non-empty batch, the targets when given (an integer (B,) tensor in [0, K)), and the
    probability warning.
    """
    adv = stack_exits(adv_logits, "adv_logits")
    clean = stack_exits(clean_logits, "clean_logits")
    check_same_exits(adv, clean, ("adv_logits", "clean_logits"))
    _check_batch(adv, "adv_logits")
    if targets is not None:
        check_targets(targets, adv.shape[1], adv.shape[2])
    warn_if_probabilities(adv_logits=adv, clean_logits=clean)
    dtype = working_dtype(adv, clean)
    return adv.to(dtype), clean.to(dtype)


def stack_adversarial(adv_logits: ExitLogits, targets: Tensor) -> Tensor:
    """:func:`stack_pair` for a loss of the adversarial logits alone."""
    adv = stack_exits(adv_logits, "adv_logits")
    _check_batch(adv, "adv_logits")
    check_targets(targets, adv.shape[1], adv.shape[2])
    warn_if_probabilities(adv_logits=adv)
    return adv.to(working_dtype(adv))


def apply_exit_weights(loss: Tensor, exit_weights: ExitWeights) -> Tensor:
    """Multiply the rows of a per-exit, per-sample loss (E, B) by the exit weights γ (E,)."""
    weights = as_exit_weights(exit_weights, loss.shape[0])
    return loss if weights is None else loss * weights.to(loss)[:, None]


def weigh_and_reduce(loss: Tensor, exit_weights: ExitWeights, reduction: Reduction) -> Tensor:
    """:func:`apply_exit_weights`, then ``reduce_exits``."""
    return reduce_exits(apply_exit_weights(loss, exit_weights), reduction)


class _MultiExitLoss(nn.Module):
    """Base of the loss modules: ``reduction``, the ``exit_weights`` buffer, the repr.

    A subclass validates and stores its hyper-parameters in ``__init__`` and lists their
    attribute names in ``_hyper_parameters`` (shown by ``repr`` and passed to the
    function by :meth:`_options`) and ``_passed`` (passed, not shown: generators and
    flags). ``forward`` is then one line: ``return the_function(..., **self._options())``.

    ``exit_weights`` is a registered buffer (None when not given), so ``.to(device)`` and
    ``.double()`` move it and ``state_dict()`` saves it under the key ``exit_weights``.
    """

    _hyper_parameters: ClassVar[tuple[str, ...]] = ()
    _passed: ClassVar[tuple[str, ...]] = ()
    exit_weights: Tensor | None

    def __init__(self, exit_weights: ExitWeights = None, reduction: Reduction = "mean") -> None:
        super().__init__()
        self.reduction: Reduction = check_reduction(reduction)
        self.register_buffer("exit_weights", as_exit_weights(exit_weights))

    def _options(self) -> dict[str, Any]:
        """The keyword arguments of the module's function."""
        options = {name: getattr(self, name) for name in self._hyper_parameters + self._passed}
        options["exit_weights"] = self.exit_weights
        options["reduction"] = self.reduction
        return options

    def extra_repr(self) -> str:
        parts = [f"{name}={getattr(self, name)!r}" for name in self._hyper_parameters]
        if self.exit_weights is not None:
            parts.append(f"exit_weights={self.exit_weights.tolist()}")
        parts.append(f"reduction={self.reduction!r}")
        return ", ".join(parts)
