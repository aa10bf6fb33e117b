"""``ExitView``: one exit of a multi-exit model as a single-output ``nn.Module``.

A multi-exit model returns a sequence of E logits tensors (B, K). Every stock
torchattacks attack (PGD, APGD, CW, AutoAttack, ...) expects a model that returns one
logits tensor; ``ExitView(model, i)`` is that model for exit i, so any of them attacks
one exit of a multi-exit network. Outputs are logits, never probabilities.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from neokd_losses._exits import exit_sequence
from neokd_losses._validation import check_exit_index, check_int, check_module

__all__ = ["ExitView"]


def as_exit_list(output: Any, model_name: str, single_hint: str | None = None) -> list[Tensor]:
    """Return a multi-exit model's output as a list of E tensors, or raise.

    Only the kind of the output is checked here (a list or tuple of tensors); shapes and
    dtypes are checked by :func:`neokd_losses._exits.stack_exits`. The messages name what
    the model returned and the fix: ``list(out.unbind(0))`` for a stacked (E, B, K)
    tensor, an ``ExitList`` wrapper for a dict, ``return exits`` for
    ``(exits, features)``.

    Args:
        output: what the model returned.
        model_name: the model's name in messages.
        single_hint: the fix for a single (B, K) tensor; by default, use a stock
            torchattacks attack.

    Raises:
        TypeError: if the output is not a list or tuple of tensors.
        ValueError: if the output holds no exit.
    """
    if single_hint is None:
        single_hint = (
            "For a single-output model use a stock torchattacks attack (e.g. "
            "torchattacks.PGD(model)); otherwise make forward return the list of exit logits."
        )
    exits = exit_sequence(
        output,
        "expected a multi-exit model whose forward returns a list or tuple of E exit "
        f"logits tensors (B, K), but {model_name} returned",
        "out",
        single_hint,
        lambda i: f"exit {i} of {model_name}'s output",
    )
    if len(exits) == 0:
        raise ValueError(f"{model_name} returned an empty {type(output).__name__}: no exits.")
    return list(exits)


class ExitView(nn.Module):
    """A view of one exit of a multi-exit model: ``forward`` returns that exit's logits.

    Wrapping turns a multi-exit network into the single-output model that every
    torchattacks attack expects, so ``torchattacks.PGD(ExitView(model, i))`` is the single
    attack on exit i of Triple Wins (Hu et al., ICLR 2020) and NEO-KD, and APGD, CW or
    AutoAttack can target any exit the same way. The view owns no parameters of its own:
    ``parameters()``, ``.to()`` and ``state_dict()`` reach the wrapped model (keys are
    prefixed with ``model.``), and its ``training`` flag *is* the wrapped model's, so
    ``model.train()`` and ``view.eval()`` are seen on both sides.

    Args:
        model: a multi-exit model whose forward returns a list or tuple of E logits
            tensors (B, K).
        exit_index: the exit to expose, 0-based; negative values count from the last
            exit (-1 is the final exit). The range is checked when E is known, at the
            first forward.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module`` or ``exit_index`` is not an int;
            at call time, if the model returns a single tensor or not a list of tensors.
        ValueError: at call time, if ``exit_index`` is outside [-E, E).

    Shape:
        - input: whatever the wrapped model takes, e.g. images (B, C, H, W).
        - output: (B, K), the logits of exit ``exit_index``.

    Example:
        >>> model = TwoExits(in_features=4, num_classes=3)
        >>> x = torch.randn(5, 4)
        >>> last = ExitView(model, -1)
        >>> torch.equal(last(x), model(x)[1])
        True
        >>> last
        ExitView(
          exit_index=-1
          (model): TwoExits(
            (a): Linear(in_features=4, out_features=3, bias=True)
            (b): Linear(in_features=4, out_features=3, bias=True)
          )
        )
        >>> _ = model.eval()
        >>> last.training
        False
    """

    model: nn.Module
    exit_index: int

    def __init__(self, model: nn.Module, exit_index: int) -> None:
        super().__init__()
        self.model = check_module(model, returns="a list of exit logits")
        self.exit_index = check_int(exit_index, "exit_index")

    # The view has no state of its own: its training flag is the wrapped model's, so
    # torchattacks (which reads `attack.model.training` to restore the mode) sees the
    # model's real mode even when the user switched the model itself after wrapping.
    @property
    def training(self) -> bool:
        model = self.__dict__.get("_modules", {}).get("model")
        if model is None:
            return bool(self.__dict__.get("_view_training", True))
        return bool(model.training)

    @training.setter
    def training(self, mode: bool) -> None:
        self.__dict__["_view_training"] = bool(mode)

    def forward(self, x: Tensor) -> Tensor:
        """Run the wrapped model and return the logits (B, K) of exit ``exit_index``."""
        exits = as_exit_list(self.model(x), type(self.model).__name__)
        return exits[check_exit_index(self.exit_index, len(exits))]

    def extra_repr(self) -> str:
        return f"exit_index={self.exit_index}"
