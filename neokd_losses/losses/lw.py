"""The LW baseline: multi-exit adversarial training plus a penalty on the exit classifiers.

LW (Chen et al., "Towards improving fast adversarial training in multi-exit network",
Neural Networks 2022) is the fifth row of the NEO-KD paper's anytime table. The NEO-KD
paper describes it as adversarial training with max-average adversarial examples plus "a
regularization term to reduce the weights of the classifier at each exit during
training". The LW paper's exact formula and coefficient are not reproduced here; this
library reads it as a squared-norm penalty on the weight matrix of each exit's final
linear layer (biases are not penalized), added to the multi-exit adversarial
cross-entropy.

The classifier weights are passed in on every call, as tensors or ``nn.Linear`` modules;
:func:`exit_classifiers` finds them for this package's models.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor, nn

from .._cross_entropy import per_exit_cross_entropy, working_dtype
from .._exits import ExitLogits
from .._validation import ExitWeights, Reduction, check_coefficient, check_reduction
from ._base import _MultiExitLoss, stack_adversarial, weigh_and_reduce

__all__ = ["DEFAULT_LW_LAMBDA", "LWLoss", "exit_classifiers", "lw_loss"]

Classifiers = Sequence[Union[Tensor, nn.Linear]]
"""The final linear layer of each exit, earliest first: ``nn.Linear`` modules or their
weight tensors (K, D)."""

DEFAULT_LW_LAMBDA = 1e-3
"""This library's default λ for LW (the LW paper's coefficient is not public here).

The penalty's gradient is 2λW, so λ = 1e-3 acts like an extra weight decay of 2e-3 on
the exit classifiers only, a few times the usual 5e-4 that the optimizer already
applies to every weight: strong enough to shrink the classifiers, small enough not to
dominate the cross-entropy. Tune it per data set."""


def _classifier_weights(classifiers: Classifiers, num_exits: int) -> list[Tensor]:
    if isinstance(classifiers, (Tensor, nn.Module)) or not isinstance(classifiers, Sequence):
        raise TypeError(
            "`classifiers` must be a list of the E exit classifiers (nn.Linear modules or "
            f"their weight tensors), got {type(classifiers).__name__}. Use "
            "`exit_classifiers(model)` for this package's models."
        )
    if len(classifiers) != num_exits:
        raise ValueError(
            f"`classifiers` must hold one classifier per exit: expected {num_exits}, got "
            f"{len(classifiers)}."
        )
    weights = []
    for i, layer in enumerate(classifiers):
        weight = layer.weight if isinstance(layer, nn.Linear) else layer
        if not isinstance(weight, Tensor) or not weight.is_floating_point():
            kind = f"dtype {weight.dtype}" if isinstance(weight, Tensor) else type(layer).__name__
            raise TypeError(
                f"`classifiers[{i}]` must be an nn.Linear or a floating-point weight tensor, "
                f"got {kind}."
            )
        weights.append(weight)
    return weights


def lw_loss(
    adv_logits: ExitLogits,
    targets: Tensor,
    classifiers: Classifiers,
    *,
    lambda_: float = DEFAULT_LW_LAMBDA,
    exit_weights: ExitWeights = None,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""The LW baseline: adversarial cross-entropy of every exit plus λ Σ_i ‖W_i‖².

    .. math::
        L = \frac{1}{B}\sum_j \sum_{i=1}^{E} γ_i \Big[ \mathrm{CE}(z_i(x_j^{adv}), y_j)
            + λ\, \lVert W_i \rVert_F^2 \Big]
          = \frac{1}{B}\sum_j \sum_i γ_i\, \mathrm{CE}(z_i(x_j^{adv}), y_j)
            + λ \sum_i γ_i \lVert W_i \rVert_F^2

    with :math:`W_i` the weight matrix of exit i's final linear layer (no bias) and the
    adversarial inputs crafted with the max-average attack, as the NEO-KD paper
    describes LW. The penalty is part of every sample's loss, so ``reduction="mean"``
    adds it once (as written above), ``"sum"`` adds it B times and ``"none"`` adds
    :math:`λ\lVert W_i\rVert^2` to every entry of row i of the (E, B) result. As in
    :func:`~neokd_losses.losses.baselines.triple_wins_loss` (which has no distillation
    term either), the exit weights γ weigh each exit's whole loss. The default λ is
    :data:`DEFAULT_LW_LAMBDA`, this library's choice (see there).

    Args:
        adv_logits: logits of every exit on the adversarial inputs.
        targets: class indices (B,).
        classifiers: the final linear layer of each exit, earliest first: ``nn.Linear``
            modules or weight tensors (any shape; the sum of squares is taken).
            :func:`exit_classifiers` finds them for this package's models.
        lambda_: λ >= 0, the weight of the penalty.
        exit_weights: per-exit weights γ (E,); default all ones.
        reduction: ``"mean"`` (sum over exits, mean over the batch), ``"sum"`` or ``"none"``.

    Returns:
        The loss: a scalar, or (E, B) for ``reduction="none"``, in the working dtype of
        the logits and weights.

    Raises:
        TypeError: for logits that are not a sequence of float tensors, non-integer
            targets, ``classifiers`` that is not a sequence of ``nn.Linear`` or float
            tensors, or a non-numeric λ.
        ValueError: for mismatched shapes, an empty batch, targets out of range, a number
            of classifiers other than E, a negative λ, bad ``exit_weights`` or
            ``reduction``.

    Shape:
        - adv_logits: sequence of E tensors (B, K); targets: (B,).
        - classifiers: E weights, typically (K, D_i).
        - output: () or (E, B).

    Example:
        >>> model = TwoExits(in_features=4, num_classes=3)
        >>> x_adv, y = torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1])
        >>> loss = lw_loss(model(x_adv), y, [model.a, model.b], lambda_=1e-3)
        >>> loss.backward()
        >>> lw_loss(model(x_adv), y, [model.a.weight, model.b.weight], reduction="none").shape
        torch.Size([2, 5])
    """
    lam = check_coefficient("lambda_", lambda_)
    check_reduction(reduction)
    adv = stack_adversarial(adv_logits, targets)
    weights = _classifier_weights(classifiers, adv.shape[0])
    dtype = working_dtype(adv, *weights)
    loss = per_exit_cross_entropy(adv.to(dtype), targets)
    if lam:
        norms = torch.stack([w.to(dtype).square().sum().to(adv.device) for w in weights])
        loss = loss + lam * norms[:, None]
    return weigh_and_reduce(loss, exit_weights, reduction)


class LWLoss(_MultiExitLoss):
    """The LW baseline: :func:`lw_loss` as a module.

    The constructor takes the keyword arguments of :func:`lw_loss` (same names, defaults
    and checks, described there) and stores them; ``exit_weights`` becomes a registered
    buffer. ``forward(adv_logits, targets, classifiers)`` takes the classifiers on every
    call, so the module holds no reference to the model (nor its weights in its
    ``state_dict``).

    Shape:
        - adv_logits: sequence of E tensors (B, K); targets: (B,).
        - classifiers: E weights, typically (K, D_i).
        - output: () or (E, B) for ``reduction="none"``.

    Example:
        >>> from neokd_losses.models import SmallCNN
        >>> model = SmallCNN()
        >>> criterion = LWLoss(lambda_=1e-3)
        >>> criterion
        LWLoss(lambda_=0.001, reduction='mean')
        >>> images, labels = torch.rand(2, 1, 28, 28), torch.tensor([3, 7])
        >>> criterion(model(images), labels, exit_classifiers(model)).backward()
    """

    _hyper_parameters = ("lambda_",)

    def __init__(
        self,
        lambda_: float = DEFAULT_LW_LAMBDA,
        exit_weights: ExitWeights = None,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__(exit_weights, reduction)
        self.lambda_ = check_coefficient("lambda_", lambda_)

    def forward(self, adv_logits: ExitLogits, targets: Tensor, classifiers: Classifiers) -> Tensor:
        return lw_loss(adv_logits, targets, classifiers, **self._options())


def _last_linear(module: nn.Module, where: str, num_classes: int) -> nn.Linear:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"{where} has no nn.Linear, so its classifier cannot be found; pass the "
            "classifier weights to the loss yourself."
        )
    last = linears[-1]
    if last.out_features != num_classes:
        raise ValueError(
            f"the last nn.Linear of {where} maps to {last.out_features} features, not the "
            f"model's {num_classes} classes, so it is not the exit's classifier; pass the "
            "classifier weights to the loss yourself."
        )
    return last


def exit_classifiers(model: nn.Module) -> list[nn.Linear]:
    """The final linear layer of every exit of one of this package's models, earliest first.

    The rule: the last ``nn.Linear`` registered in each exit's head module, which must map
    to the model's ``num_classes`` outputs. The heads are

    - :class:`~neokd_losses.models.SmallCNN`: ``exit1``, ``exit2`` and ``block3`` (the
      trunk's end is exit 3), i.e. the three fc 200→K layers;
    - :class:`~neokd_losses.models.MSDNet`: every ``heads[i]`` (its ``linear``);
    - :class:`~neokd_losses.models.AttachedExits` (from
      :func:`~neokd_losses.models.attach_exits`): every ``heads[i]``, then, with
      ``include_output=True``, the backbone (its last registered ``nn.Linear``, such
      as a torchvision ResNet's ``fc``).

    A model wrapped in ``nn.DataParallel`` or ``DistributedDataParallel`` is unwrapped.
    For any other model, pass the classifiers yourself, e.g.
    ``[model.head1[-1], model.head2[-1], model.fc]``.

    Args:
        model: a SmallCNN, MSDNet or AttachedExits (possibly wrapped as above).

    Returns:
        E ``nn.Linear`` modules, the model's own (not copies).

    Raises:
        TypeError: for a model of another class.
        ValueError: if a head has no ``nn.Linear``, or its last one does not output K
            classes.

    Shape:
        - output: E modules whose weights are (K, D_i).

    Example:
        >>> from neokd_losses.models import SmallCNN
        >>> [layer.weight.shape for layer in exit_classifiers(SmallCNN(num_classes=10))]
        [torch.Size([10, 200]), torch.Size([10, 200]), torch.Size([10, 200])]
    """
    from ..models.attach import AttachedExits
    from ..models.msdnet import MSDNet
    from ..models.small_cnn import SmallCNN

    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    heads: list[tuple[str, nn.Module]]
    if isinstance(model, SmallCNN):
        heads = [("exit1", model.exit1), ("exit2", model.exit2), ("block3", model.block3)]
    elif isinstance(model, (MSDNet, AttachedExits)):
        heads = [(f"heads[{i}]", head) for i, head in enumerate(model.heads)]
        if isinstance(model, AttachedExits) and model.include_output:
            heads.append(("backbone", model.backbone))
    else:
        raise TypeError(
            "exit_classifiers knows SmallCNN, MSDNet and AttachedExits (attach_exits), got "
            f"{type(model).__name__}. Pass the final nn.Linear of each exit yourself, e.g. "
            "`[model.head1[-1], model.head2[-1], model.fc]`."
        )
    num_classes = int(model.num_classes)
    name = type(model).__name__
    return [_last_linear(head, f"{name}.{where}", num_classes) for where, head in heads]
