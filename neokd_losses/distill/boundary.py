"""``BoundarySupportingAttack``: boundary-supporting samples (BSS) of a teacher classifier.

Heo et al. (AAAI 2019, "Knowledge Distillation with Adversarial Samples Supporting
Decision Boundary") distil a teacher's decision boundary through samples that lie just
across it: from a base sample that the teacher classifies correctly, each sample moves
toward a target class until the teacher's prediction leaves the base class. The student
is then taught the teacher's outputs on those samples (see
:func:`~neokd_losses.distill.bss.bss_kd_loss`). The attacked model returns one logits
tensor (B, K); for one exit of a multi-exit network wrap it in
:class:`~neokd_losses.attacks.exit_view.ExitView`. Scores are logits, never probabilities.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple, TypeVar, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchattacks.attack import Attack

from neokd_losses._validation import (
    RANGE_TOLERANCE,
    check_bool,
    check_generator,
    check_image_kind,
    check_image_range,
    check_module,
    check_one_of,
    check_positive_int,
    check_real,
    check_targets,
    module_device,
    preserved_modes,
    upcast,
)

__all__ = ["BoundarySupportingAttack", "BoundarySupportingSamples", "TargetSampling"]

TargetSampling = Literal["sample", "all"]
"""How target classes are chosen: drawn in proportion to p_n^k, or every non-top class."""

_SAMPLINGS: tuple[str, ...] = get_args(TargetSampling)
_NORM_FLOOR = 1e-12  # a zero gradient gives a zero step instead of a division by zero

_R = TypeVar("_R")


class BoundarySupportingSamples(NamedTuple):
    """Boundary-supporting samples and the bookkeeping the BSS loss needs.

    Row m describes one sample, grown from input ``batch_index[m]`` of the batch toward class
    ``target[m]``. M = (number of correctly classified inputs) x (targets per input).

    Attributes:
        samples: the samples (M, ...), same dtype and device as the input images.
        batch_index: (M,) long, the position of each sample's base input in the batch.
        base: (M,) long, the base class b (the label, which the teacher predicted).
        target: (M,) long, the target class k.
        weight: (M,) the weight of each sample in the BSS term of the loss: 1/S for S
            targets drawn in proportion to p_n^k (``sampling="sample"``), or p_n^k itself
            (``sampling="all"``); either way Σ over a base's samples of weight·J is the
            paper's Σ_k p_n^k·J, exactly or in expectation.
        probability: (M,) p_n^k, the teacher's probability of class k renormalized over
            the non-top classes of the base input.
        steps: (M,) long, the number of steps taken.
        crossed: (M,) bool, whether the teacher's prediction left b within the step cap.

    Shape:
        - samples: (M, ...), the shape of one input image after M.
        - batch_index, base, target, weight, probability, steps, crossed: (M,).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> teacher = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        >>> images = torch.rand(4, 1, 4, 4)
        >>> labels = teacher(images).argmax(1)
        >>> bss = BoundarySupportingAttack(teacher, sampling="all").generate(images, labels)
        >>> bss.samples.shape, bss.target.shape
        (torch.Size([8, 1, 4, 4]), torch.Size([8]))
        >>> bool((bss.target != bss.base).all())
        True
        >>> per_base = torch.zeros(4).index_add(0, bss.batch_index, bss.weight)
        >>> torch.allclose(per_base, torch.ones(4))  # sampling="all": Σ_k p_n^k = 1
        True
    """

    samples: Tensor
    batch_index: Tensor
    base: Tensor
    target: Tensor
    weight: Tensor
    probability: Tensor
    steps: Tensor
    crossed: Tensor


class BoundarySupportingAttack(Attack):  # type: ignore[misc]
    r"""Boundary-supporting samples (BSS) of Heo et al. (AAAI 2019), as a torchattacks attack.

    Start from every input that the model (the teacher) classifies correctly, with base
    class b = its label. Target classes k ≠ b are chosen from the teacher's non-top
    probabilities

    .. math:: p_n^k = \frac{\mathrm{softmax}(z(x_n))_k}{1 - \mathrm{softmax}(z(x_n))_b},
        \quad k \ne b,

    either drawn with replacement in proportion to :math:`p_n^k` (``sampling="sample"``,
    ``num_targets`` per input; the reference draws one) or all K - 1 of them
    (``sampling="all"``). Each sample then iterates, with the logits :math:`z` and
    :math:`L_k(x) = z_b(x) - z_k(x)` (zero on the b/k decision boundary),

    .. math:: x \leftarrow x + η\,(L_k(x) + 10^{-4})\,
        \frac{\nabla_x (z_k - z_b)}{\lVert \nabla_x (z_k - z_b) \rVert_2},

    per sample, and stops as soon as the teacher's prediction is no longer b, or after
    ``max_steps`` steps (reference: η = 0.3, 10 steps). The step shrinks as the sample
    nears the boundary, so a sample stops just across it; the 10⁻⁴ offset carries it over.
    With ``clip=True`` every step is clipped to the image range [0, 1].

    Calling conventions: ``atk(images, labels)`` follows torchattacks and returns one
    sample per input, (B, ...), toward a single target drawn in proportion to
    :math:`p_n^k`; inputs the teacher misclassifies come back unchanged.
    :meth:`generate` returns every sample with the bookkeeping of
    :class:`BoundarySupportingSamples` (base index, target, weights), which
    :func:`~neokd_losses.distill.bss.bss_kd_loss` consumes. Both put the model in eval
    mode (see ``set_model_training_mode``) and restore every module's mode in a
    ``finally``; neither leaves parameter gradients nor changes its inputs. With
    ``set_normalization_used(mean, std)`` inputs and outputs are normalized, as in
    torchattacks; otherwise images are in [0, 1].

    Args:
        model: the teacher, returning logits (B, K); ``ExitView(model, i)`` for exit i of
            a multi-exit network.
        eta: the step-size factor η > 0.
        max_steps: the step cap, an int >= 1.
        num_targets: S >= 1, target classes drawn per input with ``sampling="sample"``.
        sampling: ``"sample"`` (draw S targets ∝ p_n^k) or ``"all"`` (every k ≠ b).
        clip: clip samples to [0, 1] after every step.
        generator: a ``torch.Generator`` (on the model's device) for the target draws.

    Raises:
        TypeError: for non-numeric ``eta``, non-integer ``max_steps`` or ``num_targets``,
            or a ``generator`` that is not a ``torch.Generator``; at call time, for
            images that are not a floating tensor, labels that are not integer class
            indices, or a model that returns a list (wrap it in ``ExitView``).
        ValueError: for η <= 0, ``max_steps`` or ``num_targets`` < 1, an unknown
            ``sampling``; at call time, for images outside [0, 1], labels of the wrong
            shape or outside [0, K), or K < 2.

    Shape:
        - images: (B, ...), e.g. (B, C, H, W); labels: (B,).
        - output of ``atk(images, labels)``: (B, ...).
        - :meth:`generate`: samples (M, ...), every other field (M,).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> teacher = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        >>> images = torch.rand(8, 1, 4, 4)
        >>> labels = teacher(images).argmax(1)
        >>> atk = BoundarySupportingAttack(teacher, eta=0.3, max_steps=10, num_targets=2)
        >>> bss = atk.generate(images, labels)
        >>> bss.samples.shape, bss.batch_index.shape
        (torch.Size([16, 1, 4, 4]), torch.Size([16]))
        >>> crossed = teacher(bss.samples).argmax(1) != bss.base
        >>> bool((crossed == bss.crossed).all())
        True
        >>> atk(images, labels).shape
        torch.Size([8, 1, 4, 4])
    """

    def __init__(
        self,
        model: nn.Module,
        eta: float = 0.3,
        max_steps: int = 10,
        num_targets: int = 1,
        sampling: TargetSampling = "sample",
        clip: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        check_module(model, returns="logits (B, K)")
        eta_ = check_real(eta, "eta", low=0.0, low_open=True)
        steps = check_positive_int(max_steps, "max_steps")
        targets = check_positive_int(num_targets, "num_targets")
        check_one_of(sampling, "sampling", _SAMPLINGS)
        check_bool(clip, "clip")
        check_generator(generator)
        super().__init__("BoundarySupportingAttack", model)
        self.eta = eta_
        self.max_steps = steps
        self.num_targets = targets
        self.sampling: TargetSampling = sampling
        self.clip = clip
        self._generator = generator

    # ------------------------------------------------------------------ public API

    def __call__(self, inputs: Tensor, labels: Tensor | None = None) -> Tensor:
        """One boundary-supporting sample per input, (B, ...); see the class docstring."""

        def normalize(out: Tensor) -> Tensor:
            normalized: Tensor = self.normalize(out)
            return normalized.to(out.dtype)

        return self._in_attack_context(inputs, labels, self.forward, normalize)

    def forward(self, images: Tensor, labels: Tensor | None) -> Tensor:
        """One sample per input in [0, 1] toward a target drawn ∝ p_n^k; misclassified
        inputs are returned unchanged."""
        bss = self._generate(images, labels, num_targets=1, sampling="sample")
        out = images.detach().clone()
        out[bss.batch_index.to(out.device)] = bss.samples
        return out

    def generate(self, images: Tensor, labels: Tensor) -> BoundarySupportingSamples:
        """Every boundary-supporting sample of a batch, with its bookkeeping.

        Uses ``num_targets`` and ``sampling`` of the attack. Model modes and input
        normalization are handled as in ``atk(images, labels)``.

        Args:
            images: a batch (B, ...) in [0, 1] (normalized if ``set_normalization_used``).
            labels: class indices (B,).

        Returns:
            A :class:`BoundarySupportingSamples`; its ``samples`` are normalized like the
            inputs.
        """

        def normalize(bss: BoundarySupportingSamples) -> BoundarySupportingSamples:
            return bss._replace(samples=self.normalize(bss.samples).to(bss.samples.dtype))

        return self._in_attack_context(
            images,
            labels,
            lambda x, y: self._generate(x, y, num_targets=self.num_targets, sampling=self.sampling),
            normalize,
        )

    def get_logits(
        self, inputs: Tensor, labels: Tensor | None = None, *args: Any, **kwargs: Any
    ) -> Tensor:
        """The model's logits (B, K), normalized as torchattacks does; raises on a list."""
        if self._normalization_applied is False:
            inputs = self.normalize(inputs).to(inputs.dtype)
        out = self.model(inputs)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"BoundarySupportingAttack needs a model that returns one logits tensor (B, K), "
                f"but {type(self.model).__name__} returned {type(out).__name__}. For a "
                "multi-exit model attack one exit: BoundarySupportingAttack(ExitView(model, i))."
            )
        if out.dim() != 2:
            raise ValueError(
                f"the model must return logits of shape (B, K), got {tuple(out.shape)}."
            )
        return out

    # ------------------------------------------------------------------ internals

    def _in_attack_context(
        self,
        inputs: Tensor,
        labels: Tensor | None,
        run: Callable[[Tensor, Tensor | None], _R],
        renormalize: Callable[[_R], _R],
    ) -> _R:
        """Run ``run`` with the attack's model mode and torchattacks' normalization rules."""
        check_image_kind(inputs)
        with preserved_modes(self.model):
            self._change_model_mode(self.model.training)
            if self._normalization_applied is not True:
                return run(inputs, labels)
            images = self.inverse_normalize(inputs).to(inputs.dtype)
            check_image_range(images, RANGE_TOLERANCE, normalized=True)
            self._set_normalization_applied(False)
            try:
                result = run(images.clamp(0, 1), labels)
            finally:
                self._set_normalization_applied(True)
            return renormalize(result)

    def _targets(
        self, logits: Tensor, base: Tensor, num_targets: int, sampling: str
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Targets (n, S), their p_n^k (n, S) and weights (n, S) for n base rows."""
        num_classes = logits.shape[1]
        masked = logits.masked_fill(F.one_hot(base, num_classes).bool(), float("-inf"))
        # softmax with the top class removed = p_k / (1 - p_b), without the 0/0 of a
        # saturated teacher (p_b == 1 in floating point).
        non_top = F.softmax(masked, dim=1)
        if sampling == "sample":
            if logits.shape[0] == 0:
                target = base.new_zeros(0, num_targets)
            else:
                target = torch.multinomial(
                    non_top, num_targets, replacement=True, generator=self._generator
                )
            prob = non_top.gather(1, target)
            weight = torch.full_like(prob, 1.0 / num_targets)
        else:
            others = torch.arange(num_classes - 1, device=base.device)[None, :]
            target = others + (others >= base[:, None]).long()
            prob = non_top.gather(1, target)
            weight = prob
        return target, prob, weight

    def _generate(
        self, images: Tensor, labels: Tensor | None, *, num_targets: int, sampling: str
    ) -> BoundarySupportingSamples:
        """Boundary-supporting samples for images in [0, 1] (no normalization handling)."""
        check_image_kind(images)
        check_image_range(images, 0.0, normalized=False)
        if labels is None:
            raise TypeError(
                "BoundarySupportingAttack needs the labels: call atk(images, labels) with "
                "class indices (B,)."
            )
        batch = images.shape[0]
        device = module_device(self.model, images)
        with torch.inference_mode(False), torch.enable_grad():
            x0 = images.detach().to(device).clone()
            with torch.no_grad():
                logits0 = upcast(self.get_logits(x0))
            num_classes = logits0.shape[1]
            if num_classes < 2:
                raise ValueError(
                    f"boundary-supporting samples need at least 2 classes, the model returned "
                    f"K = {num_classes}."
                )
            check_targets(labels, batch, num_classes, name="labels")
            y = labels.detach().to(device).long()
            correct = (logits0.argmax(1) == y).nonzero().squeeze(1)
            target, prob, weight = self._targets(
                logits0[correct], y[correct], num_targets, sampling
            )
            per_base = target.shape[1]
            index = correct.repeat_interleave(per_base)
            base = y[index]
            target = target.reshape(-1)
            samples, steps, crossed = self._walk(x0[index], base, target)
        return BoundarySupportingSamples(
            samples=samples.to(device=images.device, dtype=images.dtype),
            batch_index=index.to(images.device),
            base=base.to(images.device),
            target=target.to(images.device),
            weight=weight.reshape(-1).to(images.device),
            probability=prob.reshape(-1).to(images.device),
            steps=steps.to(images.device),
            crossed=crossed.to(images.device),
        )

    def _walk(self, x: Tensor, base: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Iterate the BSS step rule on every row until it leaves ``base`` or hits the cap."""
        rows = x.shape[0]
        steps = torch.zeros(rows, dtype=torch.long, device=x.device)
        active = torch.arange(rows, device=x.device)
        x = x.clone()
        for step in range(self.max_steps + 1):
            if active.numel() == 0:
                break
            xa = x[active].requires_grad_(True)
            logits = upcast(self.get_logits(xa))
            still = logits.argmax(1) == base[active]
            if step == self.max_steps or not bool(still.any()):
                active = active[still]
                break
            b = base[active, None]
            k = target[active, None]
            margin = logits.gather(1, b) - logits.gather(1, k)  # L_k = z_b - z_k, (n, 1)
            (grad,) = torch.autograd.grad(-margin.sum(), xa)  # ∇ₓ (z_k - z_b)
            flat = grad.flatten(1)
            norm = flat.norm(dim=1, keepdim=True).clamp_min(_NORM_FLOOR)
            scale = self.eta * (margin.detach() + 1e-4) / norm
            step_ = (scale * flat).view_as(grad).to(x.dtype)
            new = xa.detach() + step_
            if self.clip:
                new = new.clamp(0, 1)
            active = active[still]
            x[active] = new[still]
            steps[active] += 1
        crossed = torch.ones(rows, dtype=torch.bool, device=x.device)
        crossed[active] = False
        return x.detach(), steps, crossed
