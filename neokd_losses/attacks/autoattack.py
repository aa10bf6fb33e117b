"""AutoAttack on one exit of a multi-exit model, in its standard or a cheap version.

AutoAttack (Croce & Hein, ICML 2020) is the usual robustness check beyond PGD; the paper's
appendix reports it "tailored to multi-exit networks". torchattacks' implementation
targets a single-output model, so ``exit_autoattack`` builds it on ``ExitView(model, i)``.
Its standard version runs APGD-CE, APGD-T, FAB-T and Square (5000 queries) one after the
other on the samples still classified correctly, which costs minutes even for small
batches on a CPU; the cheap version keeps the two gradient attacks, built from
torchattacks' own public classes and combined with ``torchattacks.MultiAttack``.
"""

from __future__ import annotations

from typing import Any, Literal

import torchattacks
from torch import nn

from neokd_losses._validation import check_int, check_real
from neokd_losses.attacks.exit_view import ExitView

__all__ = ["exit_autoattack"]

AutoAttackVersion = Literal["standard", "cheap"]

# The cheap version: APGD steps and the number of target classes of APGD-T.
CHEAP_STEPS = 10
CHEAP_TARGET_CLASSES = 3


def exit_autoattack(
    model: nn.Module,
    exit_index: int,
    *,
    eps: float = 8 / 255,
    norm: Literal["Linf", "L2"] = "Linf",
    version: AutoAttackVersion = "standard",
    n_classes: int = 10,
    seed: int = 0,
) -> Any:
    """AutoAttack against exit ``exit_index`` of a multi-exit model (a torchattacks attack).

    - ``version="standard"``: ``torchattacks.AutoAttack(ExitView(model, exit_index), ...,
      version="standard")``: APGD-CE, APGD-T (all K - 1 target classes), FAB-T and Square
      with 5000 queries, each run on the samples the previous ones left correctly
      classified. Thorough and slow: minutes for 16 MNIST-sized images on a CPU.
    - ``version="cheap"``: ``torchattacks.MultiAttack`` of ``APGD`` (cross-entropy loss)
      and ``APGDT`` (targeted DLR loss, the 3 most likely wrong classes as targets), each
      with 10 steps and one restart: AutoAttack's two gradient-based attacks, which find
      nearly all of its adversarial examples on models without gradient masking. FAB-T and
      Square are left out; if the cheap and PGD accuracies disagree with the standard
      version on a sample of your data, or the sanity checks flag gradient masking, use
      the standard version.

    Both read the logits of exit ``exit_index`` only; score the adversarial images at that
    exit (``anytime_accuracy(...).accuracies[exit_index]``) for its AutoAttack accuracy.
    Call it as any torchattacks attack: ``atk(images, labels)`` with images in [0, 1].

    Args:
        model: a multi-exit model whose forward returns a list or tuple of E logits
            tensors (B, K).
        exit_index: the exit to attack, 0-based; negative values count from the last exit.
            Checked against E at the first call.
        eps: the radius of the threat model, > 0 (L∞ or L2 ball around the images).
        norm: ``"Linf"`` or ``"L2"``.
        version: ``"standard"`` or ``"cheap"`` (see above).
        n_classes: K, the number of classes (>= 4: the targeted DLR loss of APGD-T reads
            the four largest logits). torchattacks' default is 10; with K > 10 and the
            default, APGD-T and FAB-T would target only some of the classes.
        seed: the seed of the attacks' random starts.

    Returns:
        A ``torchattacks.Attack`` (``torchattacks.AutoAttack`` or ``torchattacks.MultiAttack``)
        whose ``model`` is ``ExitView(model, exit_index)``.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module`` or a number has the wrong kind.
        ValueError: if ``eps`` <= 0, ``n_classes`` < 4, or ``norm`` / ``version`` is
            unknown.

    Shape:
        - images: (B, C, H, W) in [0, 1]; labels: (B,).
        - output: adversarial images (B, C, H, W).

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> model = TwoExits(in_features=4, num_classes=5).eval()
        >>> atk = exit_autoattack(model, 0, eps=0.1, version="cheap", n_classes=5)
        >>> type(atk).__name__, type(atk.model).__name__
        ('MultiAttack', 'ExitView')
        >>> images, labels = torch.rand(6, 1, 2, 2), torch.randint(0, 5, (6,))
        >>> adv = atk(images, labels)
        >>> bool((adv - images).abs().max() <= 0.1 + 1e-6)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"`model` must be an nn.Module returning a list of exit logits, "
            f"got {type(model).__name__}."
        )
    eps = check_real(eps, "eps", low=0.0, low_open=True)
    k = check_int(n_classes, "n_classes")
    if k < 4:
        raise ValueError(
            f"`n_classes` must be >= 4 for AutoAttack (APGD-T's targeted DLR loss reads the "
            f"four largest logits), got {k}; for fewer classes use MultiExitPGD or "
            f"torchattacks.APGD on ExitView(model, exit_index)."
        )
    seed = check_int(seed, "seed")
    if norm not in ("Linf", "L2"):
        raise ValueError(f'`norm` must be "Linf" or "L2", got {norm!r}.')
    view = ExitView(model, exit_index)
    if version == "standard":
        return torchattacks.AutoAttack(
            view, norm=norm, eps=eps, version="standard", n_classes=k, seed=seed
        )
    if version == "cheap":
        apgd = torchattacks.APGD(
            view, norm=norm, eps=eps, steps=CHEAP_STEPS, n_restarts=1, seed=seed, loss="ce"
        )
        # torchattacks' APGDT uses n_classes only to set its number of target classes
        # (n_classes - 1, the runner-up classes in order of the clean logits), so
        # CHEAP_TARGET_CLASSES + 1 asks for that many targets through the public argument.
        targets = min(CHEAP_TARGET_CLASSES, k - 1)
        apgdt = torchattacks.APGDT(
            view, norm=norm, eps=eps, steps=CHEAP_STEPS, n_restarts=1, seed=seed,
            n_classes=targets + 1,
        )  # fmt: skip
        return torchattacks.MultiAttack([apgd, apgdt])
    raise ValueError(f'`version` must be "standard" or "cheap", got {version!r}.')
