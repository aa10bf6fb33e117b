"""``MultiExitPGD``: the single, average and max-average PGD attacks as a torchattacks attack.

The algorithm is :func:`neokd_losses.functional.multi_exit_pgd` (in ``_pgd_core``); this
module is its ``torchattacks.Attack`` adapter. The torchattacks conventions it shares with
the other multi-exit attacks (normalization, model-mode control, ``save()`` and
``MultiAttack`` through a final-exit ``ExitView`` as ``atk.model``) live in
``_adapter.MultiExitAttack``; the targeted modes are this attack's own.
The model returns a sequence of E logits tensors (B, K); losses are computed from logits.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from neokd_losses._validation import ExitWeights, check_image_kind, module_device
from neokd_losses.attacks._adapter import MultiExitAttack
from neokd_losses.attacks._pgd_core import (
    AttackMode,
    PGDConfig,
    ThreatModel,
    check_labels,
    check_pgd_args,
    run_pgd,
)

__all__ = ["AttackMode", "MultiExitPGD", "ThreatModel"]


class MultiExitPGD(MultiExitAttack):
    r"""PGD against a multi-exit network: single, average or max-average attack.

    Projected gradient ascent (Madry et al., 2018) with the losses of Triple Wins
    (Hu et al., ICLR 2020) used by NEO-KD (Ham et al., NeurIPS 2023), as a
    ``torchattacks.Attack``: ``atk(images, labels)`` returns adversarial images. From an
    optional random start in the ε-ball around the clean images x, each step is

    - L∞: :math:`x' \leftarrow \mathrm{clip}_{[0,1]}(\Pi_\epsilon(x' + \alpha\,\mathrm{sign}
      (\nabla_{x'} L)))`, projection = clamping x' - x to [-ε, ε];
    - L2 (as torchattacks' ``PGDL2``): :math:`x' \leftarrow \mathrm{clip}_{[0,1]}
      (\Pi_\epsilon(x' + \alpha\, g / \lVert g \rVert_2))` with g = ∇ₓ' L per sample and
      projection = rescaling x' - x to L2 norm ≤ ε;

    where L, summed over the batch, depends on ``mode`` (CE = cross-entropy of the exit
    logits z_i, y = labels):

    - ``"single"``: :math:`L = \mathrm{CE}(z_i(x'), y)` for ``i = exit_index``.
    - ``"average"``: :math:`L = \sum_i w_i\,\mathrm{CE}(z_i(x'), y) / \sum_i w_i`, with
      ``w = exit_weights`` (all ones, the paper's 1/E average, by default).
    - ``"max-average"``: a single attack against every exit i gives E candidates
      :math:`x'_i`; per sample the candidate with the largest average loss
      :math:`\sum_j w_j\,\mathrm{CE}(z_j(x'_i), y) / \sum_j w_j` is kept (ties go to the
      earliest exit). ``max_batch`` sets how many candidates run together; the result is
      the same (see the attacks how-to for speed and memory).

    A staged model (:mod:`neokd_losses.models.staged`) is attacked without computing
    anything past the attacked exit: ``"single"`` on exit k runs stages 0..k, and each
    max-average candidate stops at its exit. All of this gives the same images, up to
    float round-off, as long as no sample's output depends on the others in its batch:
    with BatchNorm in training mode during the attack
    (``set_model_training_mode(batchnorm_training=True)``) the batch statistics change
    with ``max_batch`` and with truncation.

    Paper settings (NEO-KD, following Triple Wins): training uses max-average with 7
    steps, testing 50 steps of max-average and of average; ε = 0.3, α = 20/255 on MNIST;
    ε = 8/255, α = 2/255 on CIFAR; ε = 2/255, α = 2/3·ε on Tiny-ImageNet / ImageNet.

    torchattacks conventions: images live in [0, 1]; ``set_normalization_used(mean, std)``
    means the model takes normalized inputs (``atk`` then takes and returns normalized
    images, and ε is measured in [0, 1] pixel space); ``set_model_training_mode``
    controls the mode during the attack (eval by default). ``atk.model`` is a final-exit
    :class:`~neokd_losses.attacks.exit_view.ExitView` of the network, so what torchattacks
    reads from one output tensor is the **final exit**'s: the targeted modes' random and
    least-likely labels, the accuracy printed by ``save()``, the success test of
    ``torchattacks.MultiAttack``. Pass ``ExitView(model, i)`` as ``model`` to use exit i
    there instead. In targeted mode every loss is minus the CE to the target labels.
    The model's modes are restored even if it raises; no parameter ``.grad`` is touched;
    the input is never modified; it works under ``torch.no_grad()`` and autocast; with
    float16 / bfloat16 images the result stays inside the ball and [0, 1] exactly.

    Args:
        model: a multi-exit ``nn.Module`` whose forward returns a list or tuple of E
            logits tensors (B, K), or an ``ExitView`` of one (see above).
        eps: radius ε of the perturbation ball (L∞ or L2, in [0, 1] pixel units), ≥ 0.
            An L∞ ε > 1 warns: it is almost surely a forgotten ``/ 255`` (ε = 1, the
            whole [0, 1] cube, is the unbounded attack of sanity checks).
        alpha: step size α, > 0.
        steps: number of PGD steps, ≥ 0; ``steps=0`` returns the (random) start, i.e. the
            clean images with ``random_start=False``.
        random_start: start from a random point of the ball (L∞: uniform; L2: a random
            direction scaled by U(0, 1)·ε, as torchattacks' PGDL2) instead of x.
        mode: ``"single"``, ``"average"`` or ``"max-average"``.
        exit_index: the attacked exit for ``mode="single"`` (0-based, negative counts from
            the last exit); must be None for the other modes.
        exit_weights: E non-negative weights (not all zero) of the average in
            ``"average"`` and in the selection of ``"max-average"``; None for uniform.
            Not allowed with ``"single"``.
        norm: threat model, ``"Linf"`` or ``"L2"``.
        max_batch: max-average only: the most candidate copies of the batch processed at
            once (1 = one candidate at a time); None processes all E together.
        generator: a ``torch.Generator`` for the random starts (reproducible with a fixed
            seed); None uses PyTorch's global generator. It may live on the CPU for a CUDA
            model. (torchattacks' random target labels always use the global generator.)

    Raises:
        TypeError: if an argument has the wrong kind; at call time, if the images are not
            a floating tensor, the labels are missing or not integer class indices, or
            the model returns a single tensor or something else than a list of exit logits.
        ValueError: if eps < 0, alpha ≤ 0, steps < 0, the mode or norm is unknown,
            ``exit_index`` is missing for (or given to) a mode, the weights are negative,
            all zero or of the wrong length, ``max_batch`` < 1; at call time, if the
            images contain NaN, lie outside [0, 1] or are (B, H, W) for an image model, the
            labels are not (B,) or outside [0, K), ``exit_index`` is outside [-E, E), or
            the normalization's mean / std does not match the image channels.
        RuntimeError: at call time, if the exit logits do not depend on the input.

    Warns:
        UserWarning: if an L∞ ``eps`` is above 1.
        RuntimeWarning: if the exits look like probabilities instead of logits, or every
            input gradient was exactly zero (gradient masking, saturated logits).

    Shape:
        - images: (B, ...) in [0, 1], e.g. (B, C, H, W); any floating dtype.
        - labels: (B,) integer class indices in [0, K).
        - model output: sequence of E tensors (B, K).
        - output: (B, ...), detached, same dtype and device as the images.

    Example:
        >>> model = TwoExits(in_features=12, num_classes=5)
        >>> images, labels = torch.rand(6, 3, 2, 2), torch.randint(0, 5, (6,))
        >>> atk = MultiExitPGD(model, eps=8 / 255, alpha=2 / 255, steps=5)
        >>> adv = atk(images, labels)
        >>> bool((adv - images).abs().max() <= 8 / 255 + 1e-6), adv.shape
        (True, torch.Size([6, 3, 2, 2]))
        >>> bool(adv.min() >= 0 and adv.max() <= 1)
        True
        >>> [z.shape for z in atk.get_exit_logits(adv)]
        [torch.Size([6, 5]), torch.Size([6, 5])]
        >>> MultiExitPGD(model, mode="single", exit_index=-1, steps=3, norm="L2", eps=0.5)
        MultiExitPGD(model_name=TwoExits, device=cpu, attack_mode=default, targeted=False, normalization_used=False, eps=0.5, alpha=0.00784313725490196, steps=3, random_start=True, mode=single, exit_index=-1, exit_weights=None, norm=L2, max_batch=None)
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        alpha: float = 2 / 255,
        steps: int = 10,
        random_start: bool = True,
        mode: AttackMode = "max-average",
        exit_index: int | None = None,
        exit_weights: ExitWeights = None,
        norm: ThreatModel = "Linf",
        max_batch: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        config = check_pgd_args(
            eps=eps,
            alpha=alpha,
            steps=steps,
            random_start=random_start,
            mode=mode,
            exit_index=exit_index,
            exit_weights=exit_weights,
            norm=norm,
            max_batch=max_batch,
            generator=generator,
        )
        super().__init__("MultiExitPGD", model)
        # The hyper-parameters are public attributes, as in every torchattacks attack
        # (users may change them between calls); each call reads them into a PGDConfig.
        self.eps = config.eps
        self.alpha = config.alpha
        self.steps = config.steps
        self.random_start = config.random_start
        self.mode: AttackMode = config.mode
        self.exit_index = config.exit_index
        self.exit_weights = config.exit_weights
        self.norm: ThreatModel = config.norm
        self.max_batch = config.max_batch
        self._generator = config.generator
        self.supported_mode = ["default", "targeted"]

    # ------------------------------------------------------------------ torchattacks API

    def forward(self, images: Tensor, labels: Tensor | None) -> Tensor:
        """Run the attack on images in [0, 1]; see the class docstring."""
        check_image_kind(images)
        if labels is None:
            raise TypeError(
                "MultiExitPGD needs the labels: call atk(images, labels) with labels (B,) "
                "(the target labels in targeted-by-label mode)."
            )
        model_device = module_device(self._exit_model, images)
        if self.targeted:
            check_labels(labels, images.shape[0], None)
            with torch.inference_mode(False), torch.enable_grad():
                labels = self.get_target_label(
                    images.detach().to(model_device), labels.detach().to(model_device)
                )
        adv = run_pgd(
            self._exit_model,
            images,
            labels,
            self._config(),
            targeted=self.targeted,
            transform=self._normalize_like_input if self._normalization_applied is False else None,
        )
        return adv.to(model_device if self._outputs_on_model_device else images.device)

    def _normalize_like_input(self, inputs: Tensor) -> Tensor:
        normalized: Tensor = self.normalize(inputs).to(inputs.dtype)
        return normalized

    def _config(self) -> PGDConfig:
        """The current hyper-parameters (validated at construction) for the core."""
        return PGDConfig(
            eps=self.eps,
            alpha=self.alpha,
            steps=self.steps,
            random_start=self.random_start,
            mode=self.mode,
            exit_index=self.exit_index,
            exit_weights=self.exit_weights,
            norm=self.norm,
            max_batch=self.max_batch,
            generator=self._generator,
        )
