"""Multi-exit APGD (Croce & Hein, ICML 2020) with the CE, DLR and CW margin losses.

Auto-PGD replaces PGD's fixed step by a schedule: the step starts at 2ε and is halved at
checkpoints when the loss has stopped rising; every step mixes the new gradient step
with the previous move (momentum), and a halving restarts from the best point found. The
three multi-exit modes are those of :class:`~neokd_losses.attacks.pgd.MultiExitPGD`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from neokd_losses._cross_entropy import per_exit_cross_entropy, working_dtype
from neokd_losses._exits import stack_exits
from neokd_losses._validation import (
    as_class_indices,
    as_exit_weights,
    check_exit_index,
    check_generator,
    check_int,
    check_real,
    check_targets,
)
from neokd_losses.attacks._adapter import MultiExitAttack
from neokd_losses.attacks._pgd_core import _model_dtype, check_images, check_labels, round_toward
from neokd_losses.attacks.exit_view import as_exit_list
from neokd_losses.attacks.pgd import AttackMode, ThreatModel

__all__ = ["APGDLoss", "MultiExitAPGD", "attack_losses", "multi_exit_apgd"]

APGDLoss = Literal["ce", "dlr", "cw"]
"""The loss APGD ascends: cross-entropy, difference of logits ratio, or C&W margin."""

_LOSSES: tuple[str, ...] = get_args(APGDLoss)
_MODES: tuple[str, ...] = get_args(AttackMode)
_NORMS: tuple[str, ...] = get_args(ThreatModel)
_MOMENTUM = 0.75  # weight of the new step against the previous move (alpha in the paper)
_TINY = 1e-12  # added to norms and DLR denominators, as the reference implementation

Forward = Callable[[Tensor], "list[Tensor] | tuple[Tensor, ...]"]
"""Maps images (N, ...) to the E exit logits (N, K) of a multi-exit model."""


def attack_losses(logits: Tensor, labels: Tensor, loss: APGDLoss) -> Tensor:
    """Per-exit, per-row attack loss: logits (E, N, K), labels (N,) -> (E, N).

    - ``"ce"``: cross-entropy;
    - ``"dlr"``: :math:`-(z_y - \\max_{j \\ne y} z_j) / (z_{\\pi_1} - z_{\\pi_3} + 10^{-12})`
      with π the classes sorted by decreasing logit (needs K ≥ 3);
    - ``"cw"``: the C&W margin :math:`\\max_{j \\ne y} z_j - z_y` (κ = ∞, unscaled).

    Example:
        >>> z = torch.tensor([[[3.0, 1.0, 0.0]]])
        >>> attack_losses(z, torch.tensor([0]), "cw"), attack_losses(z, torch.tensor([0]), "dlr")
        (tensor([[-2.]]), tensor([[-0.6667]]))

    Shape:
        - logits: (E, N, K); labels: (N,); output: (E, N).
    """
    if loss == "ce":
        return per_exit_cross_entropy(logits, labels)
    logits = logits.to(working_dtype(logits))
    if loss == "dlr" and logits.shape[-1] < 3:
        raise ValueError(
            f"the DLR loss needs at least 3 classes (it divides by z_π1 - z_π3), got "
            f"K = {logits.shape[-1]}. Use loss='cw' (the undivided margin) or 'ce'."
        )
    ordered, order = logits.sort(dim=-1)
    index = labels.view(1, -1, 1).expand(logits.shape[0], -1, 1)
    z_y = logits.gather(-1, index).squeeze(-1)
    top_is_y = order[..., -1] == labels.view(1, -1)
    other = torch.where(top_is_y, ordered[..., -2], ordered[..., -1])
    if loss == "cw":
        return other - z_y
    return -(z_y - other) / (ordered[..., -1] - ordered[..., -3] + _TINY)


def _l2(v: Tensor) -> Tensor:
    """Per-row L2 norm, kept broadcastable: (N, ...) -> (N, 1, ..., 1)."""
    return (v**2).sum(dim=tuple(range(1, v.dim())), keepdim=True).sqrt()


def _random_start(x0: Tensor, eps: float, norm: ThreatModel, gen: torch.Generator | None) -> Tensor:
    """APGD's start: a random point on the sphere of the ball (reference arithmetic)."""
    where = x0.device if gen is None else gen.device
    shape = (-1, *([1] * (x0.dim() - 1)))
    if norm == "Linf":
        t = 2 * torch.rand(x0.shape, generator=gen, dtype=x0.dtype, device=where).to(x0.device) - 1
        scale = t.flatten(1).abs().amax(1).view(shape)
        start = x0 + eps * t / scale
    else:
        t = torch.randn(x0.shape, generator=gen, dtype=x0.dtype, device=where).to(x0.device)
        start = x0 + eps * t / (_l2(t) + _TINY)
    return start.clamp(0.0, 1.0)


def _project(x: Tensor, x0: Tensor, eps: float, norm: ThreatModel, pad: float) -> Tensor:
    """Onto the ball around x0 and [0, 1]; ``pad`` is added to the L2 radius clip."""
    if norm == "Linf":
        return torch.clamp(torch.min(torch.max(x, x0 - eps), x0 + eps), 0.0, 1.0)
    d = x - x0
    n = _l2(d)
    return torch.clamp(x0 + d / (n + _TINY) * torch.clamp(n + pad, max=eps), 0.0, 1.0)


def _apgd_run(
    forward: Forward,
    x0: Tensor,
    labels: Tensor,
    row_loss: Callable[[Tensor, Tensor], Tensor],
    start: Tensor,
    *,
    eps: float,
    norm: ThreatModel,
    steps: int,
    rho: float,
) -> tuple[Tensor, Tensor]:
    """One APGD run from ``start``; returns the best point of every row and its loss.

    ``row_loss`` maps the stacked exit logits (E, N, K) and the labels to (N,).
    """
    n = x0.shape[0]
    shape = (-1, *([1] * (x0.dim() - 1)))
    first_window = max(int(0.22 * steps), 1)
    min_window = max(int(0.06 * steps), 1)
    window_decrease = max(int(0.03 * steps), 1)

    def value_and_grad(x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.detach().requires_grad_(True)
        value = row_loss(stack_exits(as_exit_list(forward(x), "model"), name="model"), labels)
        (grad,) = torch.autograd.grad(value.sum(), x)
        return value.detach(), grad.detach()

    x_adv = start.detach()
    loss, grad = value_and_grad(x_adv)
    x_best, grad_best, loss_best = x_adv.clone(), grad.clone(), loss.clone()
    step = torch.full((n,), 2.0 * eps, dtype=x0.dtype, device=x0.device).view(shape)
    x_old = x_adv.clone()
    history = torch.zeros(max(steps, 1), n, dtype=loss.dtype, device=loss.device)
    window, counter = first_window, 0
    best_at_check = loss_best.clone()
    reduced_at_check = torch.ones(n, dtype=torch.bool, device=x0.device)
    for i in range(steps):
        with torch.no_grad():
            move = x_adv - x_old
            x_old = x_adv.clone()
            a = _MOMENTUM if i > 0 else 1.0
            if norm == "Linf":
                z = _project(x_adv + step * grad.sign(), x0, eps, norm, 0.0)
                x_adv = _project(x_adv + (z - x_adv) * a + move * (1 - a), x0, eps, norm, 0.0)
            else:
                z = x_adv + step * grad / (_l2(grad) + _TINY)
                z = _project(z, x0, eps, norm, 0.0)
                x_adv = _project(x_adv + (z - x_adv) * a + move * (1 - a), x0, eps, norm, _TINY)
        loss, grad = value_and_grad(x_adv)
        history[i] = loss
        improved = loss > loss_best
        x_best = torch.where(improved.view(shape), x_adv, x_best)
        grad_best = torch.where(improved.view(shape), grad, grad_best)
        loss_best = torch.where(improved, loss, loss_best)
        counter += 1
        if counter == window:
            # Condition 1: the loss rose in at most rho of the window's steps. As in the
            # reference implementation, the first step of the first window is compared
            # with history[-1] (0 until the last step), not with the start's loss.
            rises = sum((history[i - c] > history[i - c - 1]).long() for c in range(window))
            oscillating = rises <= window * rho
            # Condition 2: the step was not halved at the last checkpoint and the best
            # loss has not improved since.
            stalled = ~reduced_at_check & (best_at_check >= loss_best)
            halve = oscillating | stalled
            reduced_at_check, best_at_check = halve, loss_best.clone()
            step = torch.where(halve.view(shape), step / 2.0, step)
            x_adv = torch.where(halve.view(shape), x_best, x_adv)
            grad = torch.where(halve.view(shape), grad_best, grad)
            counter = 0
            window = max(window - window_decrease, min_window)
    return x_best.detach(), loss_best


def _cast_input(forward: Forward | nn.Module) -> Forward:
    """``forward`` with its input cast to the model's dtype (an ``nn.Module``'s first
    floating parameter's), as :func:`~neokd_losses.attacks.multi_exit_pgd` does."""
    dtype = _model_dtype(forward) if isinstance(forward, nn.Module) else None
    if dtype is None:
        return forward

    def cast(x: Tensor) -> list[Tensor] | tuple[Tensor, ...]:
        return forward(x if x.dtype == dtype else x.to(dtype))

    return cast


def _weights(exit_weights: Tensor | None, num_exits: int, like: Tensor) -> Tensor:
    if exit_weights is None:
        return torch.full((num_exits,), 1.0 / num_exits, dtype=like.dtype, device=like.device)
    w = exit_weights.to(dtype=like.dtype, device=like.device)
    return w / w.sum()


def multi_exit_apgd(
    forward: Forward | nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    eps: float = 8 / 255,
    norm: ThreatModel = "Linf",
    steps: int = 100,
    loss: APGDLoss = "ce",
    mode: AttackMode = "max-average",
    exit_index: int | None = None,
    exit_weights: Tensor | list[float] | tuple[float, ...] | None = None,
    restarts: int = 1,
    rho: float = 0.75,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""APGD against a multi-exit model; returns the best point found for every sample.

    Croce & Hein's Auto-PGD ("Reliable evaluation of adversarial robustness with an
    ensemble of diverse parameter-free attacks", ICML 2020), written after the step
    arithmetic of their reference implementation (which torchattacks' ``APGD`` copies):

    - start: a random point on the sphere of the ball (L∞: uniform noise rescaled to
      ‖δ‖∞ = ε; L2: Gaussian noise rescaled to ‖δ‖₂ = ε), clipped to [0, 1];
    - step k: :math:`z = P(x_k + \eta\,s(\nabla))`, with s = sign (L∞) or ∇/‖∇‖₂ (L2) and
      P the projection on the ball and [0, 1], then
      :math:`x_{k+1} = P(x_k + a(z - x_k) + (1 - a)(x_k - x_{k-1}))` with a = 1 at the
      first step and 0.75 after (momentum);
    - step size η = 2ε per sample, halved at checkpoints after windows of 22 %, then
      3 % shorter (at least 6 %) of ``steps`` when the loss rose in at most ``rho`` of the
      window's steps, or when the step was not halved at the previous checkpoint and the
      best loss did not improve since; a halving restarts from the best point;
    - ``restarts`` runs from fresh random starts; the best loss wins per sample.

    The result is, per sample, the point of highest loss (torchattacks' ``APGD`` returns
    it from ``perturb(..., best_loss=True)``; its default call instead returns the last
    misclassified point, a notion that is per exit here). The loss ascended per row is:

    - ``"single"``: the loss at ``exit_index``;
    - ``"average"``: :math:`\sum_i w_i \ell_i / \sum_i w_i` over the exits;
    - ``"max-average"``: E runs, run i ascending exit i's loss; per sample the run whose
      best point has the largest weighted average loss is kept (ties: earliest exit).

    ``loss="cw"`` is the C&W margin loss with APGD's schedule (as AutoAttack's APGD on a
    margin loss; not the C&W L2 optimization).

    Args:
        forward: the multi-exit model (or any callable images -> list of E logits).
        images: clean images in [0, 1].
        labels: class indices.
        eps: radius ε ≥ 0 of the ball (L∞ or L2, in [0, 1] pixel units).
        norm: ``"Linf"`` or ``"L2"``.
        steps: APGD iterations, ≥ 0 (0 returns the start).
        loss: ``"ce"``, ``"dlr"`` (K ≥ 3) or ``"cw"``.
        mode: ``"single"``, ``"average"`` or ``"max-average"``.
        exit_index: the attacked exit of ``"single"`` (negative counts from the end).
        exit_weights: E non-negative weights of the average (None: uniform).
        restarts: random restarts, ≥ 1.
        rho: the share of rising steps below which the step is halved, in (0, 1].
        generator: generator of the random starts (None: the global one).

    Returns:
        The adversarial images, detached, like ``images``.

    Raises:
        TypeError: if an argument has the wrong kind.
        ValueError: if a value is out of range, the mode / loss / norm is unknown, or
            ``exit_index`` is missing for (or given to) a mode.

    Shape:
        - images: (B, ...); labels: (B,); model output: E tensors (B, K).
        - output: (B, ...).

    Example:
        >>> model = TwoExits(in_features=4, num_classes=3)
        >>> x, y = torch.rand(5, 4), torch.randint(0, 3, (5,))
        >>> adv = multi_exit_apgd(model, x, y, eps=0.1, steps=5, loss="dlr")
        >>> bool((adv - x).abs().max() <= 0.1 + 1e-6), adv.shape
        (True, torch.Size([5, 4]))
    """
    eps_ = check_real(eps, "eps", low=0.0)
    steps_ = check_int(steps, "steps", low=0)
    restarts_ = check_int(restarts, "restarts", low=1)
    rho_ = check_real(rho, "rho", low=0.0, high=1.0, low_open=True)
    for choice, name, allowed in (
        (loss, "loss", _LOSSES),
        (mode, "mode", _MODES),
        (norm, "norm", _NORMS),
    ):
        if choice not in allowed:
            raise ValueError(
                f"`{name}` must be one of {', '.join(map(repr, allowed))}, got {choice!r}."
            )
    if (mode == "single") != (exit_index is not None):
        raise ValueError(
            "`exit_index` is required by mode='single' (e.g. -1 for the last exit) and only "
            f"used by it, got mode={mode!r}, exit_index={exit_index!r}."
        )
    if mode == "single" and exit_weights is not None:
        raise ValueError(
            "`exit_weights` weight the average over exits of mode='average' and "
            "'max-average'; mode='single' has none. Drop `exit_weights`."
        )
    weights = as_exit_weights(exit_weights)
    if weights is not None and not bool((weights > 0).any()):
        raise ValueError(f"`exit_weights` must hold a positive weight, got {weights.tolist()}.")
    check_generator(generator)
    check_images(images)
    batch = images.shape[0]
    check_labels(labels, batch, None)  # the upper bound once K is known
    if batch == 0:
        return images.detach().clone()
    # Half-precision images are attacked in float32 and rounded back toward the clean
    # images at the end, so the result stays in the ball (as multi_exit_pgd does).
    dtype = images.dtype
    x0 = images.detach().to(torch.promote_types(dtype, torch.float32))
    y = as_class_indices(labels.detach())
    forward = _cast_input(forward)
    with torch.no_grad():
        clean = stack_exits(as_exit_list(forward(x0), "model"), name="model output")
    check_targets(y, batch, clean.shape[-1], name="labels")
    num_exits = clean.shape[0]
    w = _weights(as_exit_weights(weights, num_exits), num_exits, clean.to(working_dtype(clean)))
    if loss == "dlr":
        attack_losses(clean[:, :1], y[:1], "dlr")  # raises for K < 3

    def average(logits: Tensor, labels_: Tensor) -> Tensor:
        return w @ attack_losses(logits, labels_, loss)

    with torch.inference_mode(False), torch.enable_grad():
        if mode != "max-average":
            if mode == "single":
                assert exit_index is not None
                index = check_exit_index(exit_index, num_exits)

                def row_loss(logits: Tensor, labels_: Tensor) -> Tensor:
                    return attack_losses(logits[index : index + 1], labels_, loss)[0]
            else:
                row_loss = average
            best, best_loss = x0.clone(), torch.full((batch,), -torch.inf, device=x0.device)
            for _ in range(restarts_):
                start = _random_start(x0, eps_, norm, generator)
                adv, value = _apgd_run(
                    forward, x0, y, row_loss, start, eps=eps_, norm=norm, steps=steps_, rho=rho_
                )
                better = value > best_loss.to(value.dtype)
                best = torch.where(better.view(-1, *([1] * (x0.dim() - 1))), adv, best)
                best_loss = torch.where(better, value, best_loss.to(value.dtype))
            return round_toward(best.detach(), x0, dtype)

        reps = x0.repeat(num_exits, *([1] * (x0.dim() - 1)))
        y_rep = y.repeat(num_exits)
        attacked = torch.arange(num_exits, device=x0.device).repeat_interleave(batch)

        def candidate_loss(logits: Tensor, labels_: Tensor) -> Tensor:
            every = attack_losses(logits, labels_, loss)  # (E, E·B)
            return every.gather(0, attacked.view(1, -1)).squeeze(0)

        best, best_score = x0.clone(), torch.full((batch,), -torch.inf, device=x0.device)
        rows = torch.arange(batch, device=x0.device)
        for _ in range(restarts_):
            start = _random_start(reps, eps_, norm, generator)
            adv, _ = _apgd_run(
                forward,
                reps,
                y_rep,
                candidate_loss,
                start,
                eps=eps_,
                norm=norm,
                steps=steps_,
                rho=rho_,
            )
            with torch.no_grad():
                logits = stack_exits(as_exit_list(forward(adv), "model"), name="model output")
                scores = average(logits, y_rep).view(num_exits, batch)
            pick = scores.argmax(0)
            score = scores[pick, rows]
            chosen = adv.view(num_exits, batch, *x0.shape[1:])[pick, rows]
            better = score > best_score.to(score.dtype)
            best = torch.where(better.view(-1, *([1] * (x0.dim() - 1))), chosen, best)
            best_score = torch.where(better, score, best_score.to(score.dtype))
        return round_toward(best.detach(), x0, dtype)


class MultiExitAPGD(MultiExitAttack):
    """:func:`multi_exit_apgd` as a ``torchattacks.Attack`` (CE, DLR or CW margin loss).

    ``atk.model`` is a final-exit ``ExitView`` of the network (torchattacks' ``save`` and
    ``MultiAttack`` read the final exit); ``set_normalization_used`` and
    ``set_model_training_mode`` work as in torchattacks; every module's train/eval flag is
    restored after the call; the input is never modified.

    Args:
        model: a multi-exit ``nn.Module`` returning a list of E logits (B, K).
        eps: as in :func:`multi_exit_apgd`.
        norm: as in :func:`multi_exit_apgd`.
        steps: as in :func:`multi_exit_apgd`.
        loss: as in :func:`multi_exit_apgd`.
        mode: as in :func:`multi_exit_apgd`.
        exit_index: as in :func:`multi_exit_apgd`.
        exit_weights: as in :func:`multi_exit_apgd`.
        restarts: as in :func:`multi_exit_apgd`.
        rho: as in :func:`multi_exit_apgd`.
        generator: as in :func:`multi_exit_apgd`.

    Shape:
        - images: (B, ...) in [0, 1]; labels: (B,); output: (B, ...).

    Example:
        >>> model = TwoExits(in_features=4, num_classes=3)
        >>> atk = MultiExitAPGD(model, eps=0.1, steps=5, loss="ce", mode="average")
        >>> x, y = torch.rand(5, 4), torch.randint(0, 3, (5,))
        >>> bool((atk(x, y) - x).abs().max() <= 0.1 + 1e-6)
        True
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        norm: ThreatModel = "Linf",
        steps: int = 100,
        loss: APGDLoss = "ce",
        mode: AttackMode = "max-average",
        exit_index: int | None = None,
        exit_weights: Tensor | list[float] | tuple[float, ...] | None = None,
        restarts: int = 1,
        rho: float = 0.75,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__("MultiExitAPGD", model)
        self.eps = check_real(eps, "eps", low=0.0)
        self.norm: ThreatModel = norm
        self.steps = check_int(steps, "steps", low=0)
        self.loss: APGDLoss = loss
        self.mode: AttackMode = mode
        self.exit_index = exit_index
        w = as_exit_weights(exit_weights)
        self.exit_weights = None if w is None else tuple(w.tolist())
        self.restarts = check_int(restarts, "restarts", low=1)
        self.rho = check_real(rho, "rho", low=0.0, high=1.0, low_open=True)
        check_generator(generator)
        self._generator = generator
        # Validate the remaining choices now (mode, loss, norm, exit_index) on no data.
        multi_exit_apgd(
            lambda x: [x],
            torch.zeros(0, 1),
            torch.zeros(0, dtype=torch.long),
            eps=self.eps,
            norm=norm,
            steps=0,
            loss=loss,
            mode=mode,
            exit_index=exit_index,
            exit_weights=exit_weights,
        )

    def _attack(self, images: Tensor, labels: Tensor) -> Tensor:
        return multi_exit_apgd(
            self.get_exit_logits,
            images,
            labels,
            eps=self.eps,
            norm=self.norm,
            steps=self.steps,
            loss=self.loss,
            mode=self.mode,
            exit_index=self.exit_index,
            exit_weights=self.exit_weights,
            restarts=self.restarts,
            rho=self.rho,
            generator=self._generator,
        )
