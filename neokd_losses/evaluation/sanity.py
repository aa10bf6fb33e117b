"""Sanity checks that tell a real robustness gain from gradient masking.

A defence can look robust because its gradients are useless to the attacker (masked,
obfuscated, shattered) rather than because it is. Carlini et al., "On Evaluating
Adversarial Robustness" (arXiv:1902.06705, 2019) and Athalye et al., "Obfuscated
Gradients Give a False Sense of Security" (ICML 2018) list symptoms that a sound
evaluation must not show; :func:`sanity_checks` tests four of them with
:class:`~neokd_losses.attacks.pgd.MultiExitPGD`:

1. ``accuracy_decreases_with_eps``: robust accuracy never rises as ε grows
   (clean accuracy at ε = 0, then ε·(¼, ½, 1, 2) by default);
2. ``more_steps_not_weaker``: 50 PGD steps are not weaker than 7;
3. ``large_eps_breaks_model``: an attack allowed to reach the whole input domain (L∞
   ε = 1) drives accuracy to about zero;
4. ``gradients_nonzero``: the input gradient of the loss is finite and not all zero for
   any sample.

Accuracies are the mean over exits of the per-exit accuracy (the paper's anytime
summary), fractions in [0, 1]. A failed check raises a :class:`GradientMaskingWarning`;
it does not prove masking but means the reported robustness should not be trusted yet.

:func:`exit_sanity_checks` runs the step, large-ε and transfer checks on every exit and on
the deployed early-exit classifier (given its thresholds), each accuracy being that of one
exit or of the deployed answer.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from neokd_losses._exits import stack_exits
from neokd_losses._validation import check_int, check_real
from neokd_losses.attacks.pgd import AttackMode, MultiExitPGD, ThreatModel
from neokd_losses.attacks.policy import ExitPolicyAttack, check_thresholds, deployed_decision
from neokd_losses.evaluation._loader import (
    Loader,
    check_model,
    count_correct,
    eval_mode,
    iterate_batches,
    resolve_device,
    run_attack,
)
from neokd_losses.evaluation._loader import progress as progress_bar

__all__ = [
    "GradientMaskingWarning",
    "SanityCheck",
    "SanityReport",
    "exit_sanity_checks",
    "sanity_checks",
]

_ZERO_GRADIENT = 1e-10  # a sample whose largest |input gradient| is below this has none


class GradientMaskingWarning(UserWarning):
    """A robustness sanity check failed: the evaluation may suffer from gradient masking."""


@dataclass(frozen=True)
class SanityCheck:
    """One check: its name, whether it passed, a readable message and the measured values.

    Example:
        >>> check = SanityCheck("gradients_nonzero", False, "2 of 8 samples", {"zero": 0.25})
        >>> check.passed, check.to_dict()["values"]
        (False, {'zero': 0.25})
        >>> SanityReport((check,)).failures == (check,)
        True
    """

    name: str
    passed: bool
    message: str
    values: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict of the fields."""
        return {
            "name": self.name,
            "passed": self.passed,
            "message": self.message,
            "values": dict(self.values),
        }


@dataclass(frozen=True)
class SanityReport:
    """The outcome of :func:`sanity_checks`.

    Attributes:
        checks: the individual checks, in the order they ran.

    Example:
        >>> report = SanityReport((SanityCheck("gradients_nonzero", True, "ok"),))
        >>> report.passed, report.failures
        (True, ())
        >>> print(report.to_markdown())
        | check | result | details |
        |---|---|---|
        | gradients_nonzero | pass | ok |
    """

    checks: tuple[SanityCheck, ...]

    @property
    def passed(self) -> bool:
        """True when every check passed."""
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> tuple[SanityCheck, ...]:
        """The checks that failed."""
        return tuple(c for c in self.checks if not c.passed)

    def __getitem__(self, name: str) -> SanityCheck:
        """The check called ``name``."""
        for check in self.checks:
            if check.name == name:
                return check
        names = [c.name for c in self.checks]
        raise KeyError(f"no check named {name!r}; the checks are {names}.")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict: ``passed`` and the list of checks."""
        return {"passed": self.passed, "checks": [c.to_dict() for c in self.checks]}

    def to_markdown(self) -> str:
        """A markdown table, one row per check."""
        lines = ["| check | result | details |", "|---|---|---|"]
        for c in self.checks:
            lines.append(f"| {c.name} | {'pass' if c.passed else 'FAIL'} | {c.message} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def _positive(value: float, name: str) -> float:
    return check_real(value, name, low=0.0, low_open=True)


def _check_settings(
    steps: Sequence[int],
    tolerance: float,
    max_accuracy_at_large_eps: float,
    seed: int,
    max_batches: int | None,
    *,
    equal_steps: bool,
) -> tuple[float, float, int]:
    """The settings both sanity-check entry points share; returns the checked numbers."""
    counts = [check_int(s, f"steps[{i}]", low=1) for i, s in enumerate(steps)]
    ordered = len(counts) == 2 and (
        counts[0] <= counts[1] if equal_steps else counts[0] < counts[1]
    )
    if not ordered:
        relation = "<=" if equal_steps else "<"
        raise ValueError(f"`steps` must be two ints 0 < few {relation} many, got {steps!r}.")
    if max_batches is not None:
        check_int(max_batches, "max_batches", low=1)
    return (
        check_real(tolerance, "tolerance", low=0.0, high=1.0, high_open=True),
        check_real(max_accuracy_at_large_eps, "max_accuracy_at_large_eps", low=0.0, high=1.0),
        check_int(seed, "seed"),
    )


def _zero_gradient_fraction(
    model: nn.Module, batches: list[tuple[Tensor, Tensor]]
) -> tuple[float, float]:
    """Fractions of samples whose input gradient is all zero, and non-finite.

    The loss is the average attack's: the mean over exits of the cross-entropy.
    """
    zero, nonfinite, total = 0, 0, 0
    for images, labels in batches:
        with torch.inference_mode(False), torch.enable_grad():
            x = images.detach().clone().requires_grad_(True)
            logits = stack_exits(model(x), name="model(images)")  # (E, B, K)
            num_exits = logits.shape[0]
            loss = F.cross_entropy(
                rearrange(logits.float(), "e b k -> (e b) k"),
                labels.clone().repeat(num_exits),
                reduction="sum",
            )
            (grad,) = torch.autograd.grad(loss / num_exits, x)
        flat = grad.detach().flatten(1)
        finite = torch.isfinite(flat).all(1)
        nonfinite += int((~finite).sum())
        zero += int((finite & (flat.abs().amax(1) < _ZERO_GRADIENT)).sum())
        total += x.shape[0]
    return zero / total, nonfinite / total


def sanity_checks(
    model: nn.Module,
    loader: Loader,
    *,
    eps: float,
    norm: ThreatModel = "Linf",
    mode: AttackMode = "average",
    eps_factors: Sequence[float] = (0.25, 0.5, 1.0, 2.0),
    steps: tuple[int, int] = (7, 50),
    large_eps: float | None = None,
    step_factor: float = 2.5,
    tolerance: float = 0.02,
    max_accuracy_at_large_eps: float = 0.05,
    max_batches: int | None = 4,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
    warn: bool = True,
) -> SanityReport:
    """Run the standard robustness sanity checks and warn about any that fails.

    Every attack is :class:`~neokd_losses.attacks.pgd.MultiExitPGD` with ``mode`` and
    ``norm``, a random start drawn from a generator seeded with ``seed`` (the same start
    for every run, so runs differ only in ε and steps) and the step size
    α = ``step_factor`` · ε / steps (Madry et al.'s 2.5 ε / steps), so that every run can
    cross its whole ball. The checks (module docstring) use:

    - accuracies at ε = 0 (clean) and ε·``eps_factors`` with ``steps[0]`` steps, which
      must never rise by more than ``tolerance`` from one ε to the next;
    - accuracy at ε with ``steps[1]`` steps, which must not exceed the ``steps[0]`` one
      by more than ``tolerance``;
    - accuracy at ``large_eps`` (default: 1 for L∞, √D for L2 with D the input size, the
      diameter of [0, 1]^D) with ``steps[1]`` steps, which must be at most
      ``max_accuracy_at_large_eps``;
    - the input gradient of the mean-over-exits cross-entropy, which must be finite and
      not all zero (largest |∂L/∂x| below 1e-10) for every sample.

    Args:
        model: multi-exit model returning a sequence of E logits tensors (B, K).
        loader: iterable of ``(images, labels, ...)`` batches, images in [0, 1].
        eps: the ε of the evaluation being checked (e.g. 8/255).
        norm: ``"Linf"`` or ``"L2"``.
        mode: ``"average"`` (default; one forward-backward per step) or
            ``"max-average"`` (E times the cost); every exit is attacked and scored.
        eps_factors: increasing multiples of ``eps`` for the first check.
        steps: the (few, many) numbers of PGD steps compared by the second check.
        large_eps: ε of the third check; None for the default above.
        step_factor: α = step_factor · ε / steps.
        tolerance: accuracy slack (fraction) allowed by the first two checks.
        max_accuracy_at_large_eps: the "about zero" of the third check.
        max_batches: use only the first batches of the loader (None: all of them).
        seed: seed of the random starts.
        device: where batches are moved; defaults to the model's device.
        progress: show a tqdm progress bar over the runs (when tqdm is installed).
        warn: issue a :class:`GradientMaskingWarning` listing the failed checks.

    Returns:
        A :class:`SanityReport`; ``report.passed`` is True when all checks pass.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module`` or a batch is not
            ``(images, labels, ...)``, or a number has the wrong kind.
        ValueError: if ``eps`` or another number is out of range, ``eps_factors`` is not
            increasing and positive, ``steps`` is not two increasing positive ints,
            ``mode`` is "single", or the loader is empty.

    Shape:
        - batches: images (B, ...) in [0, 1] and labels (B,).
        - model output: sequence of E tensors (B, K).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class TwoExits(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)
        ...     def forward(self, x):
        ...         return [self.a(x), self.b(x)]
        >>> batches = [(torch.rand(16, 4), torch.randint(3, (16,)))]
        >>> report = sanity_checks(TwoExits(), batches, eps=0.1, steps=(2, 5),
        ...                        progress=False, warn=False)
        >>> [c.name for c in report.checks]  # doctest: +NORMALIZE_WHITESPACE
        ['accuracy_decreases_with_eps', 'more_steps_not_weaker', 'large_eps_breaks_model',
         'gradients_nonzero']
    """
    check_model(model)
    eps = _positive(eps, "eps")
    step_factor = _positive(step_factor, "step_factor")
    if mode == "single":
        raise ValueError(
            "`mode` must be 'average' or 'max-average' for the sanity checks, got 'single': "
            "the checks attack and score every exit."
        )
    factors = [_positive(f, "eps_factors") for f in eps_factors]
    if not factors or any(b <= a for a, b in itertools.pairwise(factors)):
        raise ValueError(
            f"`eps_factors` must be increasing and non-empty, got {list(eps_factors)}."
        )
    tolerance, max_accuracy_at_large_eps, seed = _check_settings(
        steps, tolerance, max_accuracy_at_large_eps, seed, max_batches, equal_steps=False
    )
    few, many = steps
    target = resolve_device(model, device)
    batches = list(
        itertools.islice(iterate_batches(loader, target, enabled=False, desc=""), max_batches)
    )
    batches = [b for b in batches if b[1].shape[0] > 0]
    if not batches:
        raise ValueError("`loader` yielded no samples; pass a loader with at least one batch.")
    if large_eps is None:
        size = batches[0][0][0].numel()
        large_eps = 1.0 if norm == "Linf" else math.sqrt(size)
    large_eps = _positive(large_eps, "large_eps")
    # (eps, steps) of every attack run, without repeats; (eps, few) may be a grid point.
    runs = list(dict.fromkeys([(eps * f, few) for f in factors] + [(eps, few), (eps, many)]))
    runs += [] if (large_eps, many) in runs else [(large_eps, many)]

    def mean_accuracy(attack: MultiExitPGD | None) -> float:
        correct, total = count_correct(model, batches, attack)
        return float(correct.double().mean()) / total

    accuracy: dict[tuple[float, int], float] = {}
    with eval_mode(model):
        clean = mean_accuracy(None)
        for run_eps, run_steps in progress_bar(runs, progress, "sanity checks"):
            attack = MultiExitPGD(
                model,
                eps=run_eps,
                alpha=step_factor * run_eps / run_steps,
                steps=run_steps,
                random_start=True,
                mode=mode,
                norm=norm,
                generator=torch.Generator().manual_seed(seed),
            )
            accuracy[(run_eps, run_steps)] = mean_accuracy(attack)
        zero, nonfinite = _zero_gradient_fraction(model, batches)

    checks = []
    curve_eps = [0.0] + [eps * f for f in factors]
    curve = [clean] + [accuracy[(e, few)] for e in curve_eps[1:]]
    rises = [(e, b - a) for e, (a, b) in zip(curve_eps[1:], itertools.pairwise(curve))]
    worst = max(rises, key=lambda r: r[1])
    ok = worst[1] <= tolerance
    checks.append(
        SanityCheck(
            "accuracy_decreases_with_eps",
            ok,
            "robust accuracy does not rise with eps"
            if ok
            else f"robust accuracy rises by {100 * worst[1]:.2f} points at eps = {worst[0]:.4g} "
            f"(tolerance {100 * tolerance:.2f}); the attack is not exploring the ball well",
            {"eps": curve_eps, "accuracy": curve, "steps": few},
        )
    )
    few_acc, many_acc = accuracy[(eps, few)], accuracy[(eps, many)]
    ok = many_acc <= few_acc + tolerance
    checks.append(
        SanityCheck(
            "more_steps_not_weaker",
            ok,
            f"{many} steps: {100 * many_acc:.2f} %, {few} steps: {100 * few_acc:.2f} %"
            + ("" if ok else f"; {many} steps are weaker than {few}, a sign of masked gradients"),
            {"eps": eps, "steps": [few, many], "accuracy": [few_acc, many_acc]},
        )
    )
    large_acc = accuracy[(large_eps, many)]
    ok = large_acc <= max_accuracy_at_large_eps
    checks.append(
        SanityCheck(
            "large_eps_breaks_model",
            ok,
            f"accuracy {100 * large_acc:.2f} % at eps = {large_eps:.4g}"
            + (
                ""
                if ok
                else f" (expected at most {100 * max_accuracy_at_large_eps:.2f} %): an "
                "unbounded attack should fool every exit; the gradients may be masked"
            ),
            {"eps": large_eps, "steps": many, "accuracy": large_acc},
        )
    )
    ok = zero == 0 and nonfinite == 0
    checks.append(
        SanityCheck(
            "gradients_nonzero",
            ok,
            "input gradients are finite and non-zero"
            if ok
            else f"{100 * zero:.2f} % of the samples have an all-zero input gradient and "
            f"{100 * nonfinite:.2f} % a non-finite one: gradient-based attacks cannot work "
            "(rounding, quantisation or saturated outputs mask the gradient)",
            {"zero_fraction": zero, "nonfinite_fraction": nonfinite},
        )
    )
    report = SanityReport(tuple(checks))
    if warn and not report.passed:
        failed = "; ".join(f"{c.name}: {c.message}" for c in report.failures)
        warnings.warn(
            f"robustness sanity checks failed ({failed}). The robust accuracy may be "
            "overestimated by gradient masking; see Carlini et al. 2019 "
            "(arXiv:1902.06705) and help(neokd_losses.evaluation.sanity_checks).",
            GradientMaskingWarning,
            stacklevel=2,
        )
    return report


def _target_correct(logits: Tensor, labels: Tensor, target: int | None, thresholds: Any) -> Tensor:
    """Correct predictions (B,) of exit ``target``, or of the deployed classifier (None)."""
    if target is None:
        _, answer = deployed_decision(logits, thresholds)
        return answer == labels
    return logits[target].argmax(-1) == labels


def exit_sanity_checks(
    model: nn.Module,
    loader: Loader,
    *,
    eps: float,
    thresholds: Sequence[float] | Tensor | None = None,
    norm: ThreatModel = "Linf",
    steps: tuple[int, int] = (10, 50),
    restarts: int = 2,
    surrogate: nn.Module | None = None,
    large_eps: float | None = None,
    step_factor: float = 2.5,
    tolerance: float = 0.02,
    max_accuracy_at_large_eps: float = 0.05,
    max_batches: int | None = 4,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
    warn: bool = True,
) -> SanityReport:
    """The gradient-masking checks on every exit and on the deployed classifier.

    For each target (exit 1..E, and the deployed early-exit classifier when
    ``thresholds`` are given) three checks run, named ``"<target>: <check>"``:

    - ``more_steps_not_weaker``: ``steps[1]`` steps with ``restarts`` random restarts
      (a sample counts as correct only if it survives every restart) leave at most
      ``tolerance`` more accuracy than ``steps[0]`` steps with one start;
    - ``large_eps_breaks_model``: at ``large_eps`` (default: 1 for L∞, √D for L2) the
      accuracy is at most ``max_accuracy_at_large_eps``;
    - ``transfer_weaker_than_white_box``: examples crafted on another model (black box)
      leave at least the white-box accuracy minus ``tolerance``. The source is
      ``surrogate`` (attacked at the same exit; max-average for the deployed target)
      when given; otherwise the same model's next exit (exit i+1, the last exit uses
      exit 1) for an exit, and its first exit alone for the deployed classifier. Skipped
      for a one-exit model without surrogate.

    The white-box attack of exit i is single-exit :class:`MultiExitPGD` on exit i; for
    the deployed classifier a sample must survive both
    :class:`~neokd_losses.attacks.ExitPolicyAttack` and max-average PGD; all with
    α = ``step_factor`` · ε / steps and seeded random starts.

    Args:
        model: multi-exit model returning E logits (B, K).
        loader: ``(images, labels, ...)`` batches in [0, 1].
        eps: the ε of the evaluation being checked.
        thresholds: the deployed classifier's thresholds (E,), or None.
        norm: ``"Linf"`` or ``"L2"``.
        steps: (few, many) steps.
        restarts: random restarts of the many-step attack, ≥ 1.
        surrogate: a model of the same output format to craft transfer examples on.
        large_eps: as in :func:`sanity_checks`.
        step_factor: as in :func:`sanity_checks`.
        tolerance: as in :func:`sanity_checks`.
        max_accuracy_at_large_eps: as in :func:`sanity_checks`.
        max_batches: as in :func:`sanity_checks`.
        seed: as in :func:`sanity_checks`.
        device: as in :func:`sanity_checks`.
        progress: as in :func:`sanity_checks`.
        warn: as in :func:`sanity_checks`.

    Returns:
        A :class:`SanityReport`.

    Raises:
        TypeError, ValueError: for wrong arguments, thresholds that do not match the
            model's exits, or an empty loader.

    Shape:
        - batches: images (B, ...) in [0, 1] and labels (B,); thresholds: (E,).

    Example:
        >>> model = TwoExits(in_features=4, num_classes=3)
        >>> data = [(torch.rand(16, 4), torch.randint(3, (16,)))]
        >>> report = exit_sanity_checks(model, data, eps=0.1, thresholds=[0.5, 0.0],
        ...                             steps=(2, 4), progress=False, warn=False)
        >>> [c.name for c in report.checks][:3]  # doctest: +NORMALIZE_WHITESPACE
        ['exit 1: more_steps_not_weaker', 'exit 1: large_eps_breaks_model',
         'exit 1: transfer_weaker_than_white_box']
    """
    check_model(model)
    eps = _positive(eps, "eps")
    step_factor = _positive(step_factor, "step_factor")
    restarts = check_int(restarts, "restarts", low=1)
    tolerance, max_accuracy_at_large_eps, seed = _check_settings(
        steps, tolerance, max_accuracy_at_large_eps, seed, max_batches, equal_steps=True
    )
    target_device = resolve_device(model, device)
    batches = list(
        itertools.islice(
            iterate_batches(loader, target_device, enabled=False, desc=""), max_batches
        )
    )
    batches = [b for b in batches if b[1].shape[0] > 0]
    if not batches:
        raise ValueError("`loader` yielded no samples; pass a loader with at least one batch.")
    with eval_mode(model), torch.no_grad():  # batch statistics untouched
        num_exits = stack_exits(model(batches[0][0][:1]), name="model(images)").shape[0]
    t = None if thresholds is None else check_thresholds(thresholds, num_exits).tolist()
    if surrogate is not None:
        check_model(surrogate, "surrogate")
        with eval_mode(surrogate), torch.no_grad():
            logits = surrogate(batches[0][0][:1])
        source_exits = stack_exits(logits, name="surrogate(images)").shape[0]
        if source_exits != num_exits:
            raise ValueError(
                f"`surrogate` must have the model's {num_exits} exits (each exit is "
                f"attacked through the surrogate's exit of the same index), got "
                f"{source_exits}."
            )
    if large_eps is None:
        large_eps = 1.0 if norm == "Linf" else math.sqrt(batches[0][0][0].numel())
    large_eps = _positive(large_eps, "large_eps")
    few, many = steps

    def attack_on(
        network: nn.Module, target: int | None, run_eps: float, run_steps: int, mode: str
    ) -> Callable[[Tensor, Tensor], Tensor]:
        gen = torch.Generator(device=target_device)
        alpha = step_factor * run_eps / run_steps
        if target is None and mode == "policy":
            assert t is not None
            atk: Callable[[Tensor, Tensor], Tensor] = ExitPolicyAttack(
                network, t, eps=run_eps, alpha=alpha, steps=run_steps, norm=norm, generator=gen
            )
        elif target is None:
            atk = MultiExitPGD(
                network, eps=run_eps, alpha=alpha, steps=run_steps, norm=norm, generator=gen
            )
        else:
            atk = MultiExitPGD(
                network,
                eps=run_eps,
                alpha=alpha,
                steps=run_steps,
                mode="single",
                exit_index=target,
                norm=norm,
                generator=gen,
            )
        atk.seed_generator = gen  # type: ignore[attr-defined]
        return atk

    def accuracy(
        target: int | None,
        source: tuple[nn.Module, int | None, tuple[str, ...]],
        run_eps: float,
        run_steps: int,
        runs: int,
    ) -> float:
        """Accuracy of ``target`` surviving every attack ``attack_on(network, attacked, m)``
        for m in the modes of ``source``, ``runs`` random starts each."""
        network, attacked, modes = source
        correct, total = 0, 0
        for b, (images, labels) in enumerate(batches):
            alive = torch.ones_like(labels, dtype=torch.bool)
            for r, mode in itertools.product(range(runs), modes):
                atk = attack_on(network, attacked, run_eps, run_steps, mode)
                atk.seed_generator.manual_seed(seed * 7919 + b * 131 + r)  # type: ignore[attr-defined]
                adv = run_attack(atk, images, labels)
                logits = stack_exits(model(adv), name="model(images)")
                alive &= _target_correct(logits.detach(), labels, target, t)
            correct += int(alive.sum())
            total += labels.shape[0]
        return correct / total

    targets: list[int | None] = list(range(num_exits)) + ([None] if t is not None else [])
    checks: list[SanityCheck] = []
    with eval_mode(model):
        for target in progress_bar(targets, progress, "exit sanity checks"):
            label = "deployed" if target is None else f"exit {target + 1}"
            mode = ("policy", "pgd") if target is None else ("single",)
            acc_few = accuracy(target, (model, target, mode), eps, few, 1)
            acc_many = accuracy(target, (model, target, mode), eps, many, restarts)
            ok = acc_many <= acc_few + tolerance
            checks.append(
                SanityCheck(
                    f"{label}: more_steps_not_weaker",
                    ok,
                    f"{many} steps × {restarts} restarts: {100 * acc_many:.2f} %, {few} steps: "
                    f"{100 * acc_few:.2f} %"
                    + ("" if ok else "; the stronger attack is weaker: masked gradients?"),
                    {"steps": [few, many], "restarts": restarts, "accuracy": [acc_few, acc_many]},
                )
            )
            acc_large = accuracy(target, (model, target, mode), large_eps, many, 1)
            ok = acc_large <= max_accuracy_at_large_eps
            checks.append(
                SanityCheck(
                    f"{label}: large_eps_breaks_model",
                    ok,
                    f"accuracy {100 * acc_large:.2f} % at eps = {large_eps:.4g}"
                    + ("" if ok else "; an unbounded attack should reach about 0 %"),
                    {"eps": large_eps, "accuracy": acc_large},
                )
            )
            if surrogate is not None:
                source_model, source, source_mode = surrogate, target, ("pgd",)
            elif num_exits == 1:
                continue  # no other exit to transfer from (the deployed target included)
            elif target is None:
                source_model, source, source_mode = model, 0, ("single",)
            else:
                source_model, source, source_mode = model, (target + 1) % num_exits, ("single",)
            acc_transfer = accuracy(target, (source_model, source, source_mode), eps, many, 1)
            white = min(acc_few, acc_many)
            ok = acc_transfer >= white - tolerance
            where = "surrogate" if surrogate is not None else f"exit {(source or 0) + 1}"
            checks.append(
                SanityCheck(
                    f"{label}: transfer_weaker_than_white_box",
                    ok,
                    f"transfer from {where}: {100 * acc_transfer:.2f} %, white box: "
                    f"{100 * white:.2f} %"
                    + (
                        ""
                        if ok
                        else "; a black-box attack beats the white-box one: the "
                        "gradients of the model are not useful to its own attack"
                    ),
                    {"transfer": acc_transfer, "white_box": white},
                )
            )
    report = SanityReport(tuple(checks))
    if warn and not report.passed:
        failed = "; ".join(f"{c.name}: {c.message}" for c in report.failures)
        warnings.warn(
            f"exit-wise robustness sanity checks failed ({failed}). The robust accuracy "
            "may be overestimated by gradient masking.",
            GradientMaskingWarning,
            stacklevel=2,
        )
    return report
