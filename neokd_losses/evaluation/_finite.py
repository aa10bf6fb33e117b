"""The NaN check shared by the evaluation entry points (images, logits)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor


def check_no_nan(values: Tensor, name: str) -> None:
    """Raise a ValueError naming ``name`` if ``values`` holds a NaN (a device sync on CUDA).

    A NaN image or logit would otherwise be scored as an ordinary (wrong or right)
    prediction and turn into a plausible-looking, meaningless accuracy.
    """
    if values.is_floating_point() and bool(torch.isnan(values).any()):
        count = int(torch.isnan(values).sum())
        raise ValueError(
            f"`{name}` contain NaN ({count} of {values.numel()} values); an accuracy "
            "computed from them would be meaningless. Check the data pipeline (images) or "
            "the model (logits) for NaN before evaluating."
        )


def checked_batches(batches: Iterator[tuple[Tensor, Tensor]]) -> Iterator[tuple[Tensor, Tensor]]:
    """Pass ``(images, labels)`` batches through, refusing images that contain NaN."""
    for images, labels in batches:
        check_no_nan(images, "images")
        yield images, labels
