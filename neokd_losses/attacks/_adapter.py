"""The torchattacks plumbing shared by the attacks of issue 15 (APGD, exit policy, slow-down).

Each attack is a function on a *forward* callable (images -> list of E exit logits); the
class wraps it as a ``torchattacks.Attack``: ``atk.model`` is a final-exit
:class:`~neokd_losses.attacks.exit_view.ExitView` (what torchattacks reads from one output
tensor is defined on the final exit), ``set_normalization_used`` and
``set_model_training_mode`` work as for every torchattacks attack, and the model's and
every submodule's train/eval flag is restored even if the model raises.
"""

from __future__ import annotations

import contextlib
import io

import torch
from torch import Tensor, nn
from torchattacks.attack import Attack

from neokd_losses._validation import (
    RANGE_TOLERANCE,
    check_image_kind,
    check_image_range,
    first_device,
    module_device,
    preserved_modes,
)
from neokd_losses.attacks._pgd_core import check_labels
from neokd_losses.attacks.exit_view import ExitView, as_exit_list

__all__ = ["MultiExitAttack"]


class MultiExitAttack(Attack):  # type: ignore[misc]
    """Base class: a multi-exit attack with the torchattacks API (not public)."""

    _exit_model: nn.Module

    def __init__(self, name: str, model: nn.Module) -> None:
        quiet = isinstance(model, nn.Module) and next(model.parameters(), None) is None
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            super().__init__(name, model)
        self.device = first_device(self._exit_model)
        self.supported_mode = ["default"]

    def set_model(self, model: nn.Module) -> None:
        """Attack ``model``; ``self.model`` becomes its final-exit ``ExitView``."""
        if isinstance(model, ExitView):
            view, network = model, model.model
        elif isinstance(model, nn.Module):
            view, network = ExitView(model, -1), model
        else:
            raise TypeError(
                "`model` must be an nn.Module returning a list of exit logits, "
                f"got {type(model).__name__}."
            )
        self._exit_model = network
        self.model = view
        self.model_name = type(network).__name__

    def get_exit_logits(self, inputs: Tensor) -> list[Tensor]:
        """Logits of every exit (a list of E tensors (B, K)), normalizing as torchattacks."""
        if self._normalization_applied is False:
            inputs = self.normalize(inputs).to(inputs.dtype)
        return as_exit_list(self._exit_model(inputs), self.model_name)

    def __call__(self, inputs: Tensor, labels: Tensor | None = None) -> Tensor:
        """Adversarial images for ``inputs`` (in [0, 1], or normalized after
        ``set_normalization_used``)."""
        with preserved_modes(self._exit_model):
            self._change_model_mode(self._exit_model.training)
            if self._normalization_applied is not True:
                adv: Tensor = self.forward(inputs, labels)
                return adv
            check_image_kind(inputs)
            images = self.inverse_normalize(inputs).to(inputs.dtype)
            check_image_range(images, RANGE_TOLERANCE, normalized=True)
            self._set_normalization_applied(False)
            try:
                adv = self.forward(images.clamp(0, 1), labels)
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
            y = labels.detach().to(device).clone()
            adv = self._attack(x0, y)
        return adv.detach().to(device=images.device, dtype=images.dtype)

    def _attack(self, images: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError
