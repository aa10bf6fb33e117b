"""The torchattacks plumbing shared by every multi-exit attack (PGD, APGD, exit policy, slow-down).

Each attack is a function on tensors; its class wraps it as a ``torchattacks.Attack``:
``atk.model`` is a final-exit :class:`~neokd_losses.attacks.exit_view.ExitView` (what
torchattacks reads from one output tensor is defined on the final exit; one view per
network, so ``torchattacks.MultiAttack`` accepts several of these attacks on it),
``set_normalization_used`` (validated) and ``set_model_training_mode`` work as for every
torchattacks attack, ``save()`` works with a model on a GPU and a CPU data loader, and
the model's and every submodule's train/eval flag is restored even if the model raises.
"""

from __future__ import annotations

import contextlib
import io
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchattacks.attack import Attack

from neokd_losses._validation import (
    RANGE_TOLERANCE,
    as_class_indices,
    check_image_kind,
    check_image_range,
    first_device,
    module_device,
    preserved_modes,
)
from neokd_losses.attacks._pgd_core import _model_dtype, check_labels
from neokd_losses.attacks.exit_view import ExitView, as_exit_list

__all__ = ["MultiExitAttack"]

# One final-exit view per model, shared by every multi-exit attack built on it, so that
# `torchattacks.MultiAttack`, which requires all its attacks to hold the same `model`
# object, accepts several of them on one network. Values are weak: an entry lives as
# long as some attack holds its view.
_FINAL_VIEWS: weakref.WeakValueDictionary[int, ExitView] = weakref.WeakValueDictionary()


def _final_exit_view(model: nn.Module) -> ExitView:
    view = _FINAL_VIEWS.get(id(model))
    if view is None or view.model is not model or view.exit_index != -1:
        view = ExitView(model, -1)
        _FINAL_VIEWS[id(model)] = view
    return view


class MultiExitAttack(Attack):  # type: ignore[misc]
    """Base class: a multi-exit attack with the torchattacks API (not public).

    Subclasses implement :meth:`_attack` (images in [0, 1] and labels on the model's
    device, gradients enabled) or override :meth:`forward`.
    """

    _exit_model: nn.Module

    def __init__(self, name: str, model: nn.Module) -> None:
        # torchattacks reads the device from the first parameter and prints "Failed to set
        # device automatically" without one; these attacks read the model's device (a
        # parameter's or a buffer's) at call time, so that message would be wrong.
        quiet = isinstance(model, nn.Module) and next(model.parameters(), None) is None
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            super().__init__(name, model)
        self.device = first_device(self._exit_model)
        self.supported_mode = ["default"]
        self._outputs_on_model_device = False

    def set_model(self, model: nn.Module) -> None:
        """Attack ``model``; ``self.model`` becomes its final-exit ``ExitView``.

        Overrides torchattacks' version: the multi-exit network is kept apart and
        ``self.model`` is a single-output view, so that the base class's methods that read
        one logits tensor (``get_logits``, ``save``, the targeted modes, ``MultiAttack``)
        work on the final exit (or on the exit of an ``ExitView`` passed as ``model``).
        """
        if isinstance(model, ExitView):
            view, network = model, model.model
        elif isinstance(model, nn.Module):
            view, network = _final_exit_view(model), model
        else:
            raise TypeError(
                f"`model` must be an nn.Module returning a list of exit logits, "
                f"got {type(model).__name__}."
            )
        self._exit_model = network
        self.model = view
        self.model_name = type(network).__name__

    def get_exit_logits(self, inputs: Tensor) -> list[Tensor]:
        """Logits of every exit of the attacked model, as the attack sees them.

        Mirrors torchattacks' ``get_logits``: when ``set_normalization_used`` is active
        the normalization is applied inside an attack call (inputs in [0, 1]) and not
        outside one (inputs already normalized); the inputs are then cast to the model's
        dtype (its first floating parameter's). Gradients are kept; wrap in
        ``torch.no_grad()`` for evaluation. The model's mode is not changed.

        Args:
            inputs: a batch for the model, (B, ...).

        Returns:
            A list of E tensors (B, K), in the model's output dtype.

        Raises:
            TypeError: if the model returns a single tensor or not a list of tensors.
        """
        if self._normalization_applied is False:
            inputs = self.normalize(inputs).to(inputs.dtype)
        dtype = _model_dtype(self._exit_model)
        if dtype is not None and inputs.dtype != dtype:
            inputs = inputs.to(dtype)  # e.g. float64 images, a float32 model
        return as_exit_list(self._exit_model(inputs), self.model_name)

    @torch.no_grad()
    def get_output_with_eval_nograd(self, inputs: Tensor) -> Tensor:
        """Final-exit logits in eval mode without gradients; every module's mode restored."""
        with preserved_modes(self._exit_model):
            self.model.eval()
            logits: Tensor = self.get_logits(inputs)
        return logits

    def save(self, *args: Any, **kwargs: Any) -> Any:
        """torchattacks' ``save`` (accuracy read at the final exit), modes restored.

        While it runs, the adversarial batches stay on the model's device, as
        torchattacks' own attacks return them, so that a model on a GPU works with a data
        loader that yields CPU tensors (torchattacks evaluates them on ``self.device``).
        """
        self.device = first_device(self._exit_model)
        self._outputs_on_model_device = True
        try:
            with preserved_modes(self._exit_model):
                return super().save(*args, **kwargs)
        finally:
            self._outputs_on_model_device = False

    def set_normalization_used(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """The model takes inputs normalized per channel as ``(x - mean) / std``.

        Raises:
            TypeError: if ``mean`` or ``std`` is not a sequence of numbers.
            ValueError: if they are empty, differ in length, or ``std`` holds a zero.
        """
        values = []
        for name, given in (("mean", mean), ("std", std)):
            try:
                values.append(torch.as_tensor(given, dtype=torch.float64).flatten())
            except (TypeError, ValueError, RuntimeError) as err:
                raise TypeError(
                    f"`{name}` must be a sequence of numbers (one per channel), "
                    f"got {type(given).__name__}."
                ) from err
        if values[0].numel() == 0 or values[0].numel() != values[1].numel():
            raise ValueError(
                f"`mean` and `std` must hold one value per image channel, the same number: "
                f"got {values[0].numel()} means and {values[1].numel()} stds."
            )
        if bool((values[1] == 0).any()):
            raise ValueError(f"`std` must be non-zero, got {values[1].tolist()}.")
        super().set_normalization_used(list(mean), list(std))

    def _check_channels(self, inputs: Tensor) -> None:
        """ValueError unless the normalization's mean / std match the images' channels."""
        count = int(self.normalization_used["mean"].numel())
        if inputs.dim() != 4 or count not in (1, inputs.shape[1]):
            channels = "C" if count == 1 else str(count)
            raise ValueError(
                f"set_normalization_used was given {count} means / stds (one per channel), "
                f"so the images must be (B, {channels}, H, W), got shape "
                f"{tuple(inputs.shape)}. Pass one mean and std per channel of the images."
            )

    def __call__(self, inputs: Tensor, labels: Tensor | None = None) -> Tensor:
        """Adversarial images for ``inputs`` (in [0, 1], or normalized, see the class)."""
        with preserved_modes(self._exit_model):
            self._change_model_mode(self._exit_model.training)
            if self._normalization_applied is not True:
                adv: Tensor = self.forward(inputs, labels)
                return adv
            check_image_kind(inputs)
            self._check_channels(inputs)
            images = self.inverse_normalize(inputs).to(inputs.dtype)
            check_image_range(images, RANGE_TOLERANCE, normalized=True)
            images = images.clamp(0, 1)
            self._set_normalization_applied(False)
            try:
                adv = self.forward(images, labels)
            finally:
                self._set_normalization_applied(True)
            normalized: Tensor = self.normalize(adv).to(inputs.dtype)
            return normalized

    def forward(self, images: Tensor, labels: Tensor | None) -> Tensor:
        """Validate, move to the model's device, run :meth:`_attack`, move back."""
        check_image_kind(images)
        check_image_range(images, 0.0, normalized=False)
        if labels is None:
            raise TypeError(
                f"{self.attack} needs the labels: call atk(images, labels) with labels (B,)."
            )
        check_labels(labels, images.shape[0], None)  # the upper bound once K is known
        if images.shape[0] == 0:
            return images.detach().clone()
        device = module_device(self._exit_model, images)
        with torch.inference_mode(False), torch.enable_grad():
            x0 = images.detach().to(device).clone()
            y = as_class_indices(labels.detach().to(device).clone())
            adv = self._attack(x0, y)
        out_device = device if self._outputs_on_model_device else images.device
        return adv.detach().to(device=out_device, dtype=images.dtype)

    def _attack(self, images: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError
