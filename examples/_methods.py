"""Training methods: which loss each ``loss.method`` uses, built from its config table.

| method   | loss                         | config table   | fixed                          |
|----------|------------------------------|----------------|--------------------------------|
| adv      | TripleWinsLoss (no distill)  | [loss.adv]     |                                |
| adv-half | TripleWinsLoss (no distill)  | [loss.adv]     | clean_weight = adv_weight = 0.5|
| lw       | LWLoss (LW baseline)         | [loss.lw]      | the model's exit classifiers   |
| neokd    | NEOKDLoss                    | [loss.neokd]   |                                |
| nkd      | NEOKDLoss (NKD only)         | [loss.neokd]   | beta = 0                       |
| eokd     | NEOKDLoss (EOKD only)        | [loss.neokd]   | alpha = 0                      |
| skd      | SKDLoss                      | [loss.skd]     |                                |
| ard      | ARDLoss                      | [loss.ard]     |                                |

Every loss is called as ``loss(adv_logits, clean_logits, targets)``; the table's keys are
passed to its constructor (``reduction`` and ``generator`` are set by the loop); the
ablations nkd and eokd read NEO-KD's table and override beta, resp. alpha, with 0.

``adv`` is the *controlled* baseline, the NEO-KD paper's "Adv. w/o distill" as the paper
describes it: the sum of the clean and adversarial cross-entropies of all exits, weights 1
and 1, which is exactly NEO-KD's objective without its distillation terms
(``NEOKDLoss(alpha=0, beta=0)``). ``adv-half`` is the Triple Wins code's weighting, 0.5 x
clean + 0.5 x adversarial: with the same learning rate and weight decay it takes half the
step, so comparing it with NEO-KD mixes the loss scale into the distillation's gain.
``lw`` is the LW baseline (Chen et al., Neural Networks 2022): adversarial cross-entropy of
all exits (on the training attack's examples, max-average by default) plus ``lambda_`` x
the squared norm of every exit classifier's final linear weights (found in the model by
``exit_classifiers``); ``[loss.lw] lambda_`` sets the weight (default: the library's
``DEFAULT_LW_LAMBDA``). It needs the model, so the training loop passes it to
:func:`build_criterion`; the clean logits are not used.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from _config import ConfigError, LossConfig
from torch import Tensor, nn

_TABLE: dict[str, tuple[str, str, dict[str, Any]]] = {
    "adv": ("adv", "TripleWinsLoss", {}),
    "adv-half": ("adv", "TripleWinsLoss", {"clean_weight": 0.5, "adv_weight": 0.5}),
    "lw": ("lw", "LWLoss", {}),
    "neokd": ("neokd", "NEOKDLoss", {}),
    "nkd": ("neokd", "NEOKDLoss", {"beta": 0.0}),
    "eokd": ("neokd", "NEOKDLoss", {"alpha": 0.0}),
    "skd": ("skd", "SKDLoss", {}),
    "ard": ("ard", "ARDLoss", {}),
}
_RESERVED = ("reduction", "generator")


def loss_section(method: str) -> str:
    """The ``loss.<table>`` of the config that configures ``method`` (nkd reads neokd's)."""
    return _TABLE[method][0]


PAPER_NAMES = {
    "adv": "Adv. w/o distill",
    "adv-half": "Adv. w/o distill (0.5/0.5)",
    "lw": "LW",
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
    from neokd_losses import losses
    from neokd_losses.losses import baselines

    cls: type[nn.Module] = getattr(baselines, name, None) or getattr(losses, name)
    return cls


@dataclass
class Criterion:
    """A built loss and whether it can report its terms (``return_terms=True``).

    ``classifiers`` holds the model's exit classifiers for losses that penalise their
    weights (``lw``); such a loss is called as ``module(adv_logits, targets, classifiers)``.
    """

    method: str
    module: nn.Module
    has_terms: bool
    classifiers: list[nn.Module] | None = None

    def __call__(
        self, adv_logits: Sequence[Tensor], clean_logits: Sequence[Tensor], targets: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The total loss and its named terms (``{}`` for losses without terms)."""
        if self.method == "lw":
            if self.classifiers is None:
                raise RuntimeError(
                    "the lw loss needs the model's exit classifiers: build it with "
                    "build_criterion(cfg, generator, model=model)."
                )
            return self.module(adv_logits, targets, self.classifiers), {}
        if self.has_terms:
            terms = self.module(adv_logits, clean_logits, targets, return_terms=True)
            parts = terms._asdict()
            total = parts.pop("total")
            return total, parts
        return self.module(adv_logits, clean_logits, targets), {}


def build_criterion(
    cfg: LossConfig, generator: torch.Generator | None = None, *, model: nn.Module | None = None
) -> Criterion:
    """Instantiate the loss of ``cfg.method`` with the keywords of its config table.

    ``model`` is needed by ``lw`` (its exit classifiers' weights are regularized); without
    it the loss is built only to check the config table.

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
    classifiers: list[nn.Module] | None = None
    if cfg.method == "lw" and model is not None:
        classifiers = model_exit_classifiers(model)
    return Criterion(cfg.method, module, has_terms, classifiers)


def model_exit_classifiers(model: nn.Module) -> list[nn.Module]:
    """The final linear layer of each exit of an examples model, earliest first.

    The package's models (SmallCNN, MSDNet, attach_exits) follow ``exit_classifiers``'s
    documented rule; the digits CNN's are the last layers of ``head1``, ``head2`` and
    ``block3``. A ``Normalized`` wrapper is looked through.
    """
    from _models import DigitsCNN, Normalized

    inner = model.model if isinstance(model, Normalized) else model
    if isinstance(inner, DigitsCNN):
        return [inner.head1[-1], inner.head2[-1], inner.block3[-1]]
    from neokd_losses.losses import exit_classifiers

    try:
        return list(exit_classifiers(inner))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"loss.method = 'lw': {err}") from err
