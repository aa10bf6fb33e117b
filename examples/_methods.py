"""Training methods: which loss each ``loss.method`` uses, built from its config table.

| method | loss                         | config table   | fixed                     |
|--------|------------------------------|----------------|---------------------------|
| adv    | TripleWinsLoss (no distill)  | [loss.adv]     |                           |
| neokd  | NEOKDLoss                    | [loss.neokd]   |                           |
| nkd    | NEOKDLoss (NKD only)         | [loss.neokd]   | beta = 0                  |
| eokd   | NEOKDLoss (EOKD only)        | [loss.neokd]   | alpha = 0                 |
| skd    | SKDLoss                      | [loss.skd]     |                           |
| ard    | ARDLoss                      | [loss.ard]     |                           |

Every loss is called as ``loss(adv_logits, clean_logits, targets)``; the table's keys are
passed to its constructor (``reduction`` and ``generator`` are set by the loop); the
ablations nkd and eokd read NEO-KD's table and override beta, resp. alpha, with 0.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from _config import ConfigError, LossConfig
from torch import Tensor, nn

_TABLE = {
    "adv": ("adv", "TripleWinsLoss", {}),
    "neokd": ("neokd", "NEOKDLoss", {}),
    "nkd": ("neokd", "NEOKDLoss", {"beta": 0.0}),
    "eokd": ("neokd", "NEOKDLoss", {"alpha": 0.0}),
    "skd": ("skd", "SKDLoss", {}),
    "ard": ("ard", "ARDLoss", {}),
}
_RESERVED = ("reduction", "generator")

PAPER_NAMES = {
    "adv": "Adv. w/o distill",
    "neokd": "NEO-KD",
    "nkd": "NKD only",
    "eokd": "EOKD only",
    "skd": "SKD",
    "ard": "ARD",
}


def _loss_class(name: str) -> type[nn.Module]:
    if name == "NEOKDLoss":
        from neokd_losses.losses.neokd import NEOKDLoss

        return NEOKDLoss
    from neokd_losses.losses import baselines

    cls: type[nn.Module] = getattr(baselines, name)
    return cls


@dataclass
class Criterion:
    """A built loss and whether it can report its terms (``return_terms=True``)."""

    method: str
    module: nn.Module
    has_terms: bool

    def __call__(
        self, adv_logits: Sequence[Tensor], clean_logits: Sequence[Tensor], targets: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The total loss and its named terms (``{}`` for losses without terms)."""
        if self.has_terms:
            terms = self.module(adv_logits, clean_logits, targets, return_terms=True)
            parts = terms._asdict()
            total = parts.pop("total")
            return total, parts
        return self.module(adv_logits, clean_logits, targets), {}


def build_criterion(cfg: LossConfig, generator: torch.Generator | None = None) -> Criterion:
    """Instantiate the loss of ``cfg.method`` with the keywords of its config table.

    Raises:
        ConfigError: for a keyword the loss does not take, or a value it rejects.
    """
    section, class_name, fixed = _TABLE[cfg.method]
    cls = _loss_class(class_name)
    params = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = dict(getattr(cfg, section))
    allowed = [p for p in params if p not in ("self", *_RESERVED)]
    for key in kwargs:
        if key not in allowed:
            raise ConfigError(
                f"unknown key `loss.{section}.{key}`: {class_name} takes {', '.join(allowed)}"
                + (
                    " (reduction and generator are set by the training loop)."
                    if key in _RESERVED
                    else "."
                )
            )
    kwargs.update(fixed)
    if "generator" in params:
        kwargs["generator"] = generator
    try:
        module = cls(reduction="mean", **kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"[loss.{section}] rejected by {class_name}: {err}") from err
    has_terms = "return_terms" in inspect.signature(module.forward).parameters
    return Criterion(cfg.method, module, has_terms)
