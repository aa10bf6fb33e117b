"""``MultiExitPGD``: the single, average and max-average PGD attacks on multi-exit models.

The three attacks of Triple Wins (Hu et al., ICLR 2020) that NEO-KD (Ham et al.,
NeurIPS 2023) trains and evaluates against, as one ``torchattacks.Attack``. The model
returns a sequence of E logits tensors (B, K); every loss below is computed from logits
(never probabilities), in float32 or better.
"""

from __future__ import annotations

import contextlib
import io
import sys
import warnings
import weakref
from collections.abc import Callable
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torchattacks.attack import Attack

from neokd_losses._exits import (
    ExitWeights,
    as_exit_weights,
    check_exit_index,
    check_targets,
    stack_exits,
)
from neokd_losses._validation import (
    RANGE_TOLERANCE,
    check_generator,
    check_image_kind,
    check_image_range,
    check_int,
    check_real,
    first_device,
    module_device,
    preserved_modes,
    upcast,
)
from neokd_losses.attacks.exit_view import ExitView, as_exit_list

__all__ = ["AttackMode", "MultiExitPGD", "ThreatModel"]

AttackMode = Literal["single", "average", "max-average"]
"""What the attack ascends: one exit's CE, the average CE, or the max-average choice."""

ThreatModel = Literal["Linf", "L2"]
"""The norm of the perturbation ball."""

_MODES: tuple[str, ...] = get_args(AttackMode)
_NORMS: tuple[str, ...] = get_args(ThreatModel)

_L2_DIVISION_EPS = 1e-10  # added to gradient norms before dividing, as torchattacks' PGDL2

RowLoss = Callable[[list[Tensor], Tensor], Tensor]
"""Maps the exit logits of N rows and their labels (N,) to the loss of every row (N,)."""

# One final-exit view per model, shared by every MultiExitPGD built on it, so that
# `torchattacks.MultiAttack`, which requires all its attacks to hold the same `model`
# object, accepts several MultiExitPGD on one network. Values are weak: an entry lives as
# long as some attack holds its view.
_FINAL_VIEWS: weakref.WeakValueDictionary[int, ExitView] = weakref.WeakValueDictionary()


def _final_exit_view(model: nn.Module) -> ExitView:
    view = _FINAL_VIEWS.get(id(model))
    if view is None or view.model is not model or view.exit_index != -1:
        view = ExitView(model, -1)
        _FINAL_VIEWS[id(model)] = view
    return view


def _per_exit_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of every exit and row: logits (E, N, K), labels (N,) -> (E, N)."""
    num_exits = logits.shape[0]
    flat = F.cross_entropy(
        rearrange(logits, "e n k -> (e n) k"), labels.repeat(num_exits), reduction="none"
    )
    return rearrange(flat, "(e n) -> e n", e=num_exits)


def _exit_loss(exit_index: int) -> RowLoss:
    """Every row's CE at one exit (read alone, so autograd skips the other exits)."""

    def loss(exits: list[Tensor], labels: Tensor) -> Tensor:
        return F.cross_entropy(upcast(exits[exit_index]), labels, reduction="none")

    return loss


def _candidate_loss(index: Tensor) -> RowLoss:
    """Row r's CE at exit ``index[0, r, 0]``: logits of the exit its candidate attacks."""

    def loss(exits: list[Tensor], labels: Tensor) -> Tensor:
        logits = stack_exits(exits, name="model output")
        own = logits.gather(0, index.expand(1, -1, logits.shape[2])).squeeze(0)
        return F.cross_entropy(own, labels, reduction="none")

    return loss


def _fixed(row_loss: RowLoss) -> Callable[[list[Tensor]], RowLoss]:
    """A loss builder that ignores the model output (already validated)."""
    return lambda _exits: row_loss


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float16 / bfloat16 images, else their own dtype (float32, float64)."""
    return torch.promote_types(dtype, torch.float32)


def _round_toward(value: Tensor, origin: Tensor, dtype: torch.dtype) -> Tensor:
    """``value`` rounded to ``dtype``, never farther from ``origin`` than it is.

    ``value`` and ``origin`` are in the working precision and ``origin`` is exactly
    representable in ``dtype`` (it came from the images). Entries that rounding to
    nearest moved away from ``origin`` step back one unit in the last place, to the
    representable neighbour between ``origin`` and ``value``: every coordinate of the
    perturbation shrinks or stays, so the rounded point stays inside the L∞ or L2 ball
    and inside [0, 1]. A no-op when ``dtype`` is the working precision.
    """
    if value.dtype == dtype:
        return value
    rounded = value.to(dtype)
    away = (rounded.to(value.dtype) - origin).abs() > (value - origin).abs()
    return torch.where(away, torch.nextafter(rounded, origin.to(dtype)), rounded)


def _look_like_probabilities(logits: Tensor) -> bool:
    """True when every row of (E, N, K) lies in [0, 1] and sums to 1 (softmax outputs)."""
    in_unit = bool(((logits >= 0) & (logits <= 1)).all())
    sums = logits.sum(-1)
    return in_unit and bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-3))


class MultiExitPGD(Attack):  # type: ignore[misc]
    r"""PGD against a multi-exit network: single, average or max-average attack.

    Projected gradient ascent (Madry et al., 2018) with the losses of Triple Wins
    (Hu et al., ICLR 2020) used by NEO-KD (Ham et al., NeurIPS 2023). From an optional
    random start in the ε-ball around the clean images x, each of the ``steps`` steps is

    - L∞: :math:`x' \leftarrow \mathrm{clip}_{[0,1]}(\Pi_\epsilon(x' + \alpha\,\mathrm{sign}
      (\nabla_{x'} L)))`, projection = clamping x' - x to [-ε, ε];
    - L2 (as torchattacks' ``PGDL2``): :math:`x' \leftarrow \mathrm{clip}_{[0,1]}
      (\Pi_\epsilon(x' + \alpha\, g / \lVert g \rVert_2))` with g = ∇ₓ' L per sample and
      projection = rescaling x' - x to L2 norm ≤ ε;

    where L, summed over the batch, depends on ``mode`` (CE = cross-entropy of the exit logits z_i, y = labels):

    - ``"single"``: :math:`L = \mathrm{CE}(z_i(x'), y)` for ``i = exit_index``.
    - ``"average"``: :math:`L = \sum_i w_i\,\mathrm{CE}(z_i(x'), y) / \sum_i w_i`, with
      ``w = exit_weights`` (all ones, the paper's 1/E average, by default).
    - ``"max-average"``: a single attack against every exit i gives E candidates
      :math:`x'_i`; per sample the candidate with the largest average loss
      :math:`\sum_j w_j\,\mathrm{CE}(z_j(x'_i), y) / \sum_j w_j` is kept (ties go to the
      earliest exit). By default the E candidates run as one batch of E·B images per step
      (the batch repeated E times, candidate i attacking exit i), which needs E times
      the activation memory of one attack; ``max_batch`` caps how many candidate copies
      run at once. With ``max_batch=1`` each candidate's backward pass also stops at the
      exit it attacks (in a batch every row goes back through every layer), so it does
      less arithmetic: it is the faster choice where arithmetic dominates, as on a CPU
      at batch sizes above about 16, while batching wins where per-operator overhead
      does (small batches, GPUs; ``benchmarks/bench_attacks.py``). All settings give the
      same candidates for the same random start, up to float round-off, as long as no
      sample's output depends on the others in its batch: with BatchNorm in training
      mode during the attack (``set_model_training_mode(batchnorm_training=True)``) the
      batch statistics mix the candidates run together.

    Both steps ignore the scale of L, so the sum over the batch gives the steps of
    torchattacks' batch mean; it also keeps a float16 model's input gradients from
    underflowing to zero (and the attack from stalling) at large batch sizes.

    Paper settings (NEO-KD, Ham et al., NeurIPS 2023, following Triple Wins): training uses
    max-average with 7 steps, testing 50 steps of max-average and of average; ε = 0.3,
    α = 20/255 on MNIST; ε = 8/255, α = 2/255 on CIFAR; ε = 2/255, α = 2/3·ε on
    Tiny-ImageNet / ImageNet.

    torchattacks compatibility: images live in [0, 1] as for every torchattacks attack;
    ``set_normalization_used(mean, std)`` means the model takes normalised inputs (then
    ``atk`` takes and returns normalised images, and ε is measured in [0, 1] pixel space),
    ``set_model_training_mode`` controls the mode during the attack. ``atk.model`` is a
    final-exit :class:`~neokd_losses.attacks.exit_view.ExitView` of the network (shared by
    every ``MultiExitPGD`` on that network), so what torchattacks reads from one output
    tensor is defined on the **final exit**: the targeted modes'
    random and least-likely target labels, the accuracy printed by ``save()`` and the
    success test of ``torchattacks.MultiAttack`` (combine stock attacks as
    ``torchattacks.PGD(atk.model)``). To use another exit there, pass
    ``ExitView(model, i)`` as ``model``: the network under it is attacked as above. In
    targeted mode every loss is replaced by minus the CE to the target labels (max-average
    then keeps the candidate with the smallest average CE to the target).

    Beyond torchattacks: the model's and each submodule's train/eval flag is restored
    even if the model raises; gradients come from ``torch.autograd.grad`` w.r.t. the input
    only (no parameter ``.grad`` is touched); the input is never modified; the attack runs
    under ``torch.no_grad()`` / ``torch.inference_mode()`` and with the model under
    autocast (its logits are upcast, the loss is computed in float32 or float64). With
    float16 / bfloat16 images the step and projection run in float32 and are rounded
    toward the clean image, so the result stays inside the ball and [0, 1] exactly.
    ``get_exit_logits`` returns all exits' logits for evaluation code.

    Args:
        model: a multi-exit ``nn.Module`` whose forward returns a list or tuple of E
            logits tensors (B, K), or an ``ExitView`` of one (see above).
        eps: radius ε of the perturbation ball (L∞ or L2, in [0, 1] pixel units), ≥ 0.
        alpha: step size α, > 0.
        steps: number of PGD steps, ≥ 0 (0 returns the (random) start).
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
            the model returns a single tensor (use a stock torchattacks attack, or return
            a list of exits) or something else than a list of exit logits.
        ValueError: if eps < 0, alpha ≤ 0, steps < 0, the mode or norm is unknown,
            ``exit_index`` is missing for (or given to) a mode, the weights are negative,
            all zero or of the wrong length, ``max_batch`` < 1; at call time, if the
            images are outside [0, 1], the labels are not (B,) or outside [0, K), or
            ``exit_index`` is outside [-E, E).
        RuntimeError: at call time, if the exit logits do not depend on the input (the
            model detaches it).

    Warns:
        RuntimeWarning: if the exits look like probabilities instead of logits, or every
            input gradient was exactly zero (gradient masking, saturated logits).

    Shape:
        - images: (B, ...) in [0, 1], e.g. (B, C, H, W); any floating dtype.
        - labels: (B,) integer class indices in [0, K).
        - model output: sequence of E tensors (B, K).
        - output: (B, ...), detached, same dtype and device as the images.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class TwoExits(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b = nn.Linear(12, 5), nn.Linear(12, 5)
        ...     def forward(self, x):
        ...         h = x.flatten(1)
        ...         return [self.a(h), self.b(torch.tanh(h))]
        >>> model = TwoExits()
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

    _exit_model: nn.Module

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
        eps_ = check_real(eps, "eps")
        if eps_ < 0:
            raise ValueError(f"`eps` must be >= 0, got {eps!r}.")
        alpha_ = check_real(alpha, "alpha")
        if alpha_ <= 0:
            raise ValueError(f"`alpha` (the step size) must be > 0, got {alpha!r}.")
        steps_ = check_int(steps, "steps")
        if steps_ < 0:
            raise ValueError(f"`steps` must be >= 0, got {steps!r}.")
        if not isinstance(random_start, bool):
            raise TypeError(f"`random_start` must be a bool, got {type(random_start).__name__}.")
        if mode not in _MODES:
            raise ValueError(
                f"`mode` must be one of {', '.join(repr(m) for m in _MODES)}, got {mode!r}."
            )
        if norm not in _NORMS:
            raise ValueError(
                f"`norm` must be one of {', '.join(repr(n) for n in _NORMS)}, got {norm!r}."
            )
        index: int | None = None
        if mode == "single":
            if exit_index is None:
                raise ValueError(
                    "mode='single' attacks one exit: pass `exit_index` (e.g. -1 for the "
                    "final exit), got None."
                )
            index = check_int(exit_index, "exit_index")
        elif exit_index is not None:
            raise ValueError(
                f"`exit_index` is only used by mode='single', got exit_index={exit_index!r} "
                f"with mode={mode!r}. Drop it, or set mode='single'."
            )
        weights: tuple[float, ...] | None = None
        if exit_weights is not None:
            if mode == "single":
                raise ValueError(
                    "`exit_weights` weight the average over exits of mode='average' and "
                    "'max-average'; mode='single' has none. Drop `exit_weights`."
                )
            w = as_exit_weights(exit_weights)
            assert w is not None
            if not bool((w > 0).any()):
                raise ValueError(
                    f"`exit_weights` must hold at least one positive weight, got {w.tolist()}."
                )
            weights = tuple(float(v) for v in w.tolist())
        chunk: int | None = None
        if max_batch is not None:
            chunk = check_int(max_batch, "max_batch")
            if chunk < 1:
                raise ValueError(
                    f"`max_batch` (candidate copies of the batch processed at once) must be "
                    f">= 1 or None, got {max_batch!r}."
                )
        check_generator(generator)

        # torchattacks reads the device from the first parameter and prints "Failed to set
        # device automatically" without one; this attack reads the model's device (a
        # parameter's or a buffer's) at call time, so that message would be wrong.
        quiet = isinstance(model, nn.Module) and next(model.parameters(), None) is None
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            super().__init__("MultiExitPGD", model)
        self.device = first_device(self._exit_model)
        self.eps = eps_
        self.alpha = alpha_
        self.steps = steps_
        self.random_start = random_start
        self.mode: AttackMode = mode
        self.exit_index = index
        self.exit_weights = weights
        self.norm: ThreatModel = norm
        self.max_batch = chunk
        self._generator = generator
        self._outputs_on_model_device = False
        self.supported_mode = ["default", "targeted"]

    # ------------------------------------------------------------------ torchattacks API

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
        the normalisation is applied inside an attack call (inputs in [0, 1]) and not
        outside one (inputs already normalised). Gradients are kept; wrap in
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

    def __call__(self, inputs: Tensor, labels: Tensor | None = None) -> Tensor:
        """Adversarial images for ``inputs`` (in [0, 1], or normalised, see the class)."""
        with preserved_modes(self._exit_model):
            self._change_model_mode(self._exit_model.training)
            if self._normalization_applied is not True:
                adv: Tensor = self.forward(inputs, labels)
                return adv
            check_image_kind(inputs)
            images = self.inverse_normalize(inputs).to(inputs.dtype)
            check_image_range(images, RANGE_TOLERANCE, normalised=True)
            images = images.clamp(0, 1)
            self._set_normalization_applied(False)
            try:
                adv = self.forward(images, labels)
            finally:
                self._set_normalization_applied(True)
            normalised: Tensor = self.normalize(adv).to(inputs.dtype)
            return normalised

    def forward(self, images: Tensor, labels: Tensor | None) -> Tensor:
        """Run the attack on images in [0, 1]; see the class docstring."""
        check_image_kind(images)
        check_image_range(images, 0.0, normalised=False)
        if labels is None:
            raise TypeError(
                "MultiExitPGD needs the labels: call atk(images, labels) with labels (B,) "
                "(the target labels in targeted-by-label mode)."
            )
        batch = images.shape[0]
        check_targets(labels, batch, sys.maxsize, name="labels")
        device = module_device(self._exit_model, images)
        with torch.inference_mode(False), torch.enable_grad():
            x0 = images.detach().to(device).clone()
            y = labels.detach().to(device).clone()
            if batch == 0:
                return images.detach().clone()
            sign = 1.0
            if self.targeted:
                y = self.get_target_label(x0, y).to(device)
                sign = -1.0
            if self.mode == "max-average":
                adv = self._max_average(x0, y, sign)
            else:
                adv = self._one_objective(x0, y, sign)
        out_device = device if self._outputs_on_model_device else images.device
        return adv.detach().to(device=out_device, dtype=images.dtype)

    # ------------------------------------------------------------------ internals

    def _weights(self, num_exits: int, like: Tensor) -> Tensor:
        """Normalised exit weights (E,) summing to 1, in ``like``'s dtype and device."""
        w = as_exit_weights(self.exit_weights, num_exits)
        if w is None:
            return torch.full((num_exits,), 1.0 / num_exits, dtype=like.dtype, device=like.device)
        w = w.to(dtype=like.dtype, device=like.device)
        return w / w.sum()

    def _checked_logits(self, exits: list[Tensor], labels: Tensor, rows: int) -> Tensor:
        """Validate one model output against the labels; return it stacked, (E, N, K)."""
        logits = stack_exits([z.detach() for z in exits], name="model output")
        if logits.shape[1] != rows:
            raise ValueError(
                f"the model returned exits of batch size {logits.shape[1]} for an input "
                f"batch of {rows}; each exit must be (B, K)."
            )
        name = "target labels" if self.targeted else "labels"
        check_targets(labels, rows, logits.shape[2], name=name)
        if rows and logits.shape[2] > 1 and _look_like_probabilities(logits):
            warnings.warn(
                f"the exits of {self.model_name} look like probabilities (in [0, 1], rows "
                "summing to 1); MultiExitPGD applies cross-entropy to logits. Return the "
                "logits (before softmax), or the attack ascends the wrong loss.",
                RuntimeWarning,
                stacklevel=2,
            )
        return logits

    def _random_start(self, x0: Tensor, copies: int) -> Tensor:
        """The batch repeated ``copies`` times, (copies·B, ...), at its random start.

        The noise is drawn in the images' dtype (for a float32 model, the draws of
        torchattacks' PGD / PGDL2 under the same seed); see ``_step`` for the arithmetic.
        """
        x = x0.repeat(copies, *([1] * (x0.dim() - 1)))
        if not self.random_start:
            return x
        gen = self._generator
        where = x.device if gen is None else gen.device
        work = _working_dtype(x.dtype)
        x_work = x.to(work)
        if self.norm == "Linf":
            noise = torch.empty(x.shape, dtype=x.dtype, device=where)
            noise.uniform_(-self.eps, self.eps, generator=gen)
            start = torch.clamp(x_work + noise.to(x.device, work), min=0, max=1)
            return _round_toward(start, x_work, x.dtype)
        delta = torch.empty(x.shape, dtype=x.dtype, device=where).normal_(generator=gen)
        radius = torch.empty(x.shape[0], dtype=x.dtype, device=where).uniform_(generator=gen)
        delta, radius = delta.to(x.device, work), radius.to(x.device, work)
        norms = delta.flatten(1).norm(p=2, dim=1)
        scale = (radius / norms * self.eps).view(-1, *([1] * (x.dim() - 1)))
        start = torch.clamp(x_work + delta * scale, min=0, max=1)
        return _round_toward(start, x_work, x.dtype)

    def _step(self, x: Tensor, grad: Tensor, x0: Tensor) -> Tensor:
        """One ascent step from x followed by the projection onto the ball and [0, 1].

        For float16 / bfloat16 images the step runs in float32 and is rounded back toward
        x0 (see ``_round_toward``): in float16 a small gradient's L2 norm underflows to 0
        and torchattacks' 1e-10 guard rounds to 0, which made the step 0 / 0 = NaN, and
        rounding to nearest could leave the ε-ball by half a unit in the last place.
        """
        dtype, work = x.dtype, _working_dtype(x.dtype)
        x, grad, x0 = x.to(work), grad.to(work), x0.to(work)
        if self.norm == "Linf":
            x = x + self.alpha * grad.sign()
            delta = torch.clamp(x - x0, min=-self.eps, max=self.eps)
            return _round_toward(torch.clamp(x0 + delta, min=0, max=1), x0, dtype)
        shape = (-1, *([1] * (x.dim() - 1)))
        grad_norms = grad.flatten(1).norm(p=2, dim=1) + _L2_DIVISION_EPS
        x = x + self.alpha * (grad / grad_norms.view(shape))
        delta = x - x0
        delta_norms = delta.flatten(1).norm(p=2, dim=1)
        # min(1, ε / ‖δ‖); the clamp keeps ‖δ‖ = 0 (and ε = 0) from producing NaN.
        factor = torch.clamp(self.eps / delta_norms.clamp_min(1e-30), max=1.0)
        return _round_toward(torch.clamp(x0 + delta * factor.view(shape), min=0, max=1), x0, dtype)

    def _pgd(
        self,
        x0: Tensor,
        start: Tensor,
        labels: Tensor,
        build: Callable[[list[Tensor]], RowLoss],
        scale: float,
    ) -> tuple[Tensor, Tensor | None]:
        """``steps`` PGD steps from ``start`` ascending scale · Σ_rows row_loss.

        ``build`` receives the first model output (for validation) and returns the loss.
        Returns the result and a boolean tensor telling whether any gradient entry was
        non-zero (None without steps); it is read once per attack call, not per step.
        """
        x = start
        row_loss: RowLoss | None = None
        moved: Tensor | None = None
        for _ in range(self.steps):
            x = x.detach().requires_grad_(True)
            exits = self.get_exit_logits(x)
            if row_loss is None:
                row_loss = build(exits)
            objective = row_loss(exits, labels).sum() * scale
            grad = None
            if objective.requires_grad:
                (grad,) = torch.autograd.grad(objective, x, allow_unused=True)
            if grad is None:
                raise RuntimeError(
                    f"the exit logits of {self.model_name} do not depend on its input: its "
                    "forward detaches the input (or runs under torch.no_grad()), so no "
                    "gradient attack can move it. Make the model differentiable w.r.t. its "
                    "input."
                )
            nonzero = grad.ne(0).any()
            moved = nonzero if moved is None else moved | nonzero
            x = self._step(x.detach(), grad, x0)
        return x.detach(), moved

    def _warn_if_stuck(self, moved: list[Tensor | None]) -> None:
        flags = [m for m in moved if m is not None]
        if flags and not bool(torch.stack(flags).any()):
            warnings.warn(
                f"every input gradient of {self.model_name} was exactly zero in all "
                f"{self.steps} steps, so the attack did not move from its start. The model "
                "may use non-differentiable operations (gradient masking) or have saturated "
                "logits; its robustness under this attack is not meaningful.",
                RuntimeWarning,
                stacklevel=3,
            )

    def _one_objective(self, x0: Tensor, labels: Tensor, sign: float) -> Tensor:
        """Single or average mode: PGD on one loss over the batch (B, ...)."""
        rows = x0.shape[0]

        def build(exits: list[Tensor]) -> RowLoss:
            logits = self._checked_logits(exits, labels, rows)
            if self.mode == "single":
                assert self.exit_index is not None
                return _exit_loss(check_exit_index(self.exit_index, logits.shape[0]))
            w = self._weights(logits.shape[0], logits)
            return lambda out, y: w @ _per_exit_ce(stack_exits(out, name="model output"), y)

        if self.steps == 0:  # nothing to ascend; still validate labels and exit_index
            with torch.no_grad():
                build(self.get_exit_logits(x0))
        # The sum over the batch, not torchattacks' mean: both steps (sign, or gradient over
        # its per-sample norm) ignore the loss scale, and without the 1/B factor a float16
        # model's input gradients do not underflow to zero for large batches.
        adv, moved = self._pgd(x0, self._random_start(x0, 1), labels, build, sign)
        self._warn_if_stuck([moved])
        return adv

    def _max_average(self, x0: Tensor, labels: Tensor, sign: float) -> Tensor:
        """Max-average mode: E single-exit candidates, the best average loss per sample."""
        batch = x0.shape[0]
        with torch.no_grad():
            clean = self._checked_logits(self.get_exit_logits(x0), labels, batch)
        num_exits = clean.shape[0]
        weights = self._weights(num_exits, clean)
        starts = self._random_start(x0, num_exits)
        per_chunk = num_exits if self.max_batch is None else min(self.max_batch, num_exits)
        rows = torch.arange(batch, device=x0.device)
        # The best candidate so far per sample and its score: (B, ...) and (B,), rather than
        # all E candidates until the end (E·B images more at the peak of the last chunk).
        best_adv: Tensor | None = None
        best_score: Tensor | None = None
        moved: list[Tensor | None] = []
        for first in range(0, num_exits, per_chunk):
            last = min(first + per_chunk, num_exits)
            copies = last - first
            if copies == 1:
                # One candidate: its loss reads one exit, so the backward pass stops there
                # (an early exit's candidate skips the deeper layers).
                row_loss = _exit_loss(first)
            else:
                # Row r of the chunk attacks exit first + r // B; the other exits' logits
                # of that row get zero gradient.
                attacked = torch.arange(first, last, device=x0.device).repeat_interleave(batch)
                row_loss = _candidate_loss(attacked.view(1, -1, 1))
            y_rep = labels.repeat(copies)
            adv, chunk_moved = self._pgd(
                x0.repeat(copies, *([1] * (x0.dim() - 1))),
                starts[first * batch : last * batch],
                y_rep,
                _fixed(row_loss),
                sign,
            )
            moved.append(chunk_moved)
            with torch.no_grad():
                logits = stack_exits(self.get_exit_logits(adv), name="model output")
                scores = (sign * (weights @ _per_exit_ce(logits, y_rep))).view(copies, batch)
            # The chunk's best (argmax: the earliest exit on ties) replaces the best of the
            # earlier chunks only where it is strictly better: ties go to the earliest exit.
            pick = scores.argmax(0)
            chunk_score = scores[pick, rows]
            chunk_adv = adv.reshape(copies, batch, *x0.shape[1:])[pick, rows]
            if best_adv is None or best_score is None:
                best_adv, best_score = chunk_adv, chunk_score
            else:
                better = chunk_score > best_score
                best_score = torch.where(better, chunk_score, best_score)
                best_adv = torch.where(
                    better.view(-1, *([1] * (x0.dim() - 1))), chunk_adv, best_adv
                )
            del adv, logits, scores
        self._warn_if_stuck(moved)
        assert best_adv is not None
        return best_adv
