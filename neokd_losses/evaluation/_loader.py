"""Private helpers shared by the evaluation functions: loaders, devices, progress bars.

A *loader* is anything iterable that yields ``(images, labels, ...)`` batches: a
``torch.utils.data.DataLoader``, a list of tuples, a generator. Batches are moved to the
device the model lives on (or an explicit one), non-blocking on CUDA as PyTorch
recommends with pinned memory. Progress bars come from ``tqdm`` when it is installed; it is
an optional dependency, so without it the loops simply run without a bar.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from neokd_losses._exits import stack_exits
from neokd_losses._validation import (
    as_class_indices,
    check_module,
    check_targets,
    first_device,
    preserved_modes,
)
from neokd_losses.evaluation._finite import check_no_nan

__all__ = [
    "Attack",
    "Loader",
    "attack_name",
    "check_attack",
    "check_labels",
    "check_model",
    "count_correct",
    "eval_mode",
    "exit_logits",
    "forward_exits",
    "iterate_batches",
    "progress",
    "resolve_device",
    "run_attack",
]

Loader = Iterable[Any]
"""An iterable of ``(images, labels, ...)`` batches, e.g. a ``DataLoader``."""

Attack = Callable[[Tensor, Tensor], Tensor]
"""Anything called as ``attack(images, labels) -> adversarial images`` (torchattacks API)."""


def check_model(model: object, name: str = "model") -> nn.Module:
    """Return ``model`` if it is an ``nn.Module``, else raise a TypeError naming the fix."""
    return check_module(model, name, returns="a list of E exit logits (B, K)")


def resolve_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """The device batches go to: ``device`` if given, else the model's first parameter's.

    A model without parameters or buffers runs on the CPU.
    """
    if device is not None:
        return torch.device(device)
    found = first_device(model)
    return torch.device("cpu") if found is None else found


def progress(iterable: Iterable[Any], enabled: bool, desc: str) -> Iterable[Any]:
    """Wrap ``iterable`` in a tqdm bar when ``enabled`` and tqdm is importable."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    try:  # a DataLoader over an IterableDataset has __len__ but raises TypeError in it
        total: int | None = len(iterable)  # type: ignore[arg-type]
    except TypeError:
        total = None
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)  # type: ignore[no-any-return]


def _split_batch(batch: Any, index: int) -> tuple[Tensor, Tensor]:
    if isinstance(batch, Mapping):
        keys = list(batch.keys())
        raise TypeError(
            "each batch of `loader` must be a tuple or list (images, labels, ...), got a "
            f"{type(batch).__name__} with keys {keys} at batch {index}: which keys hold the "
            "images and the labels is ambiguous. Yield tuples instead, e.g. "
            "`((b['image'], b['label']) for b in loader)` or a DataLoader collate_fn."
        )
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError(
            "each batch of `loader` must be a tuple or list (images, labels, ...), got "
            f"{type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            + f" at batch {index}. Wrap a dataset of pairs in a torch.utils.data.DataLoader."
        )
    images, labels = batch[0], batch[1]
    if not isinstance(images, Tensor) or not isinstance(labels, Tensor):
        raise TypeError(
            "each batch of `loader` must start with two Tensors (images, labels), got "
            f"({type(images).__name__}, {type(labels).__name__}) at batch {index}."
        )
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"the labels of batch {index} must have shape (B,) = ({images.shape[0]},) to "
            f"match the images {tuple(images.shape)}, got {tuple(labels.shape)}."
        )
    return images, labels


def iterate_batches(
    loader: Loader, device: torch.device, *, enabled: bool, desc: str
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(images, labels)`` from ``loader`` on ``device``, with an optional progress bar.

    Raises:
        TypeError: if a batch is not a tuple or list starting with two tensors.
        ValueError: if the labels are not (B,) for B images.
    """
    non_blocking = device.type == "cuda"
    for index, batch in enumerate(progress(loader, enabled, desc)):
        images, labels = _split_batch(batch, index)
        yield (
            images.to(device, non_blocking=non_blocking),
            as_class_indices(labels.to(device, non_blocking=non_blocking)),
        )


def forward_exits(model: nn.Module, images: Tensor) -> Tensor:
    """Run ``model`` without gradients and return its exits stacked to (E, B, K)."""
    with torch.no_grad():
        return stack_exits(model(images), name="model(images)")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and restore every submodule's mode on exit, even on error."""
    with preserved_modes(model):
        model.eval()
        yield model


def attack_name(attack: object) -> str:
    """A readable name: torchattacks' ``attack`` attribute, a function's name, or the type's.

    A ``mode`` string attribute (MultiExitPGD's single / average / max-average) is appended.
    """
    name = type(attack).__name__
    for attribute in ("attack", "__name__"):
        value = getattr(attack, attribute, None)
        if isinstance(value, str):
            name = value
            break
    mode = getattr(attack, "mode", None)
    return f"{name} ({mode})" if isinstance(mode, str) else name


def run_attack(attack: Attack, images: Tensor, labels: Tensor) -> Tensor:
    """``attack(images, labels)`` with gradients enabled (also inside ``torch.no_grad()``)."""
    with torch.enable_grad():
        return attack(images, labels).detach()


def check_attack(attack: object) -> None:
    """Raise a TypeError unless ``attack`` is callable as ``attack(images, labels)``."""
    if not callable(attack):
        raise TypeError(
            "`attack` must be callable as attack(images, labels) -> adversarial images "
            "(a MultiExitPGD, or a torchattacks attack on an ExitView), got "
            f"{type(attack).__name__}."
        )


def check_labels(labels: Tensor, num_classes: int) -> None:
    """Raise unless ``labels`` are integer class indices in [0, K) (a device sync on CUDA).

    Raises:
        TypeError: if the labels are not integers (float, bool or one-hot labels).
        ValueError: if a label lies outside [0, K).
    """
    check_targets(labels, labels.shape[0], num_classes, name="labels")


def exit_logits(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    attack: Attack | None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(logits, labels)`` per batch: (E, B, K) logits of the clean or attacked inputs.

    Every exit is scored on the same inputs (one attack output per batch). The labels are
    checked against K; with an attack, K is read from a clean forward pass of one sample
    of the first batch, so that the labels are checked before the attack uses them (on
    CUDA an out-of-range label in its cross-entropy is a device-side assert, not a
    readable error). Empty batches are skipped.

    Raises:
        TypeError: if the labels are not integers.
        ValueError: if a label lies outside [0, K).
    """
    num_classes: int | None = None
    for images, labels in batches:
        if labels.shape[0] == 0:
            continue
        if attack is None:
            logits = forward_exits(model, images)  # (E, B, K)
            check_labels(labels, logits.shape[-1])
        else:
            if num_classes is None:
                num_classes = forward_exits(model, images[:1]).shape[-1]
            check_labels(labels, num_classes)
            logits = forward_exits(model, run_attack(attack, images, labels))
        yield logits, labels


def count_correct(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    attack: Attack | None,
) -> tuple[Tensor, int]:
    """Count correct predictions per exit over ``(images, labels)`` batches.

    Returns:
        ``(correct, n)``: an (E,) long tensor on the batches' device and the sample count.

    Raises:
        TypeError, ValueError: as :func:`exit_logits`; ValueError if no batch holds a
            sample.
    """
    correct: Tensor | None = None
    total = 0
    for logits, labels in exit_logits(model, batches, attack):
        check_no_nan(logits, "model(images)")
        hits = (logits.argmax(-1) == labels).sum(-1)  # (E,)
        correct = hits if correct is None else correct + hits
        total += labels.shape[0]
    if correct is None or total == 0:
        raise ValueError("`loader` yielded no samples; pass a loader with at least one batch.")
    return correct, total
