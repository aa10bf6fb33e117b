"""Worst-case robustness over a suite of attacks, and the deployed classifier's two surfaces.

- :func:`robust_accuracy`: per sample and per exit, a prediction counts as correct only
  if it survives every attack of the suite (AutoAttack's protocol, per exit); samples
  broken at every exit are not attacked again, so the suite costs little more than its
  strongest attack.
- :func:`deployed_evaluation`: budgeted (deployed) accuracy under the exit-policy attack
  next to the paper's protocol (max-average examples fed to the budgeted classifier), and
  the slow-down factor of the slow-down attack, at several budgets.
- :func:`strong_evaluation`: both, as one JSON-ready dict.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from neokd_losses._validation import check_int, check_real
from neokd_losses.attacks.apgd import MultiExitAPGD
from neokd_losses.attacks.pgd import AttackMode, MultiExitPGD, ThreatModel
from neokd_losses.attacks.policy import ExitPolicyAttack, deployed_decision
from neokd_losses.attacks.slowdown import SlowdownAttack
from neokd_losses.evaluation._finite import check_no_nan
from neokd_losses.evaluation._loader import (
    Loader,
    attack_name,
    check_labels,
    check_model,
    eval_mode,
    forward_exits,
    iterate_batches,
    resolve_device,
    run_attack,
)
from neokd_losses.evaluation.budgeted import collect_logits, exit_proportions, fit_thresholds

__all__ = [
    "ATTACK_NAMES",
    "SUITES",
    "DeployedResult",
    "RobustResult",
    "deployed_evaluation",
    "make_suite",
    "robust_accuracy",
    "strong_evaluation",
]

AttackFn = Callable[[Tensor, Tensor], Tensor]

ATTACK_NAMES: tuple[str, ...] = (
    "pgd-average",
    "pgd-max-average",
    "pgd-exit",
    "apgd-ce",
    "apgd-dlr",
    "apgd-cw",
)
"""Attack names a suite may hold; ``"pgd-exit"`` expands to one single-exit PGD per exit."""

SUITES: dict[str, tuple[str, ...]] = {
    "standard": ("pgd-average", "apgd-ce", "pgd-max-average", "apgd-dlr", "pgd-exit"),
    "strong": ("pgd-average", "apgd-ce", "pgd-max-average", "apgd-dlr", "apgd-cw", "pgd-exit"),
}
"""Named suites. The cheapest attack that breaks many samples (average PGD, one
forward-backward pass per step) runs first, so that the costlier max-average attacks (E
passes per step) see fewer samples. ``"strong"`` adds APGD with the C&W margin loss and
doubles every attack's steps (see :func:`make_suite`)."""

_BOUND_SLACK = 1e-5  # relative slack of the ball check (float32 round-off)


def _unknown(name: object, known: Iterable[str], what: str) -> ValueError:
    close = difflib.get_close_matches(str(name), list(known), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return ValueError(f"unknown {what} {name!r}; the known ones are {sorted(known)}.{hint}")


def make_suite(
    model: nn.Module,
    suite: str | Sequence[str | AttackFn],
    *,
    eps: float,
    norm: ThreatModel = "Linf",
    steps: int = 50,
    num_exits: int,
    generator: torch.Generator | None = None,
) -> list[tuple[str, AttackFn]]:
    """Build the attacks of a suite: a suite name, or a list of attack names and callables.

    Settings: PGD with α = 2.5 ε / steps and a random start (Madry et al.), APGD with
    ``steps`` iterations (both max-average, the CE / DLR / CW losses); ``"strong"``
    doubles ``steps`` and gives APGD two restarts. Callables are kept as they are, named
    by :func:`~neokd_losses.evaluation._loader.attack_name`.

    Raises:
        ValueError: for an unknown suite or attack name (the close names are suggested).
        TypeError: for an entry that is neither a name nor a callable.

    Example:
        >>> model = TwoExits(in_features=4, num_classes=3)
        >>> [n for n, _ in make_suite(model, ["pgd-exit", "apgd-ce"], eps=0.1, num_exits=2)]
        ['pgd-exit-0', 'pgd-exit-1', 'apgd-ce']

    Shape:
        - every attack maps images (B, ...) and labels (B,) to images (B, ...).
    """
    steps = check_int(steps, "steps", low=1)
    restarts = 1
    if isinstance(suite, str):
        if suite not in SUITES:
            raise _unknown(suite, SUITES, "suite")
        if suite == "strong":
            steps, restarts = 2 * steps, 2
        entries: Sequence[str | AttackFn] = SUITES[suite]
    else:
        entries = suite
    eps = check_real(eps, "eps", low=0.0)
    alpha = 2.5 * eps / steps if eps > 0 else 1.0
    out: list[tuple[str, AttackFn]] = []
    for entry in entries:
        if not isinstance(entry, str):
            if not callable(entry):
                raise TypeError(
                    "a suite entry must be an attack name or a callable attack(images, "
                    f"labels), got {type(entry).__name__}."
                )
            label = attack_name(entry)
            index = getattr(entry, "exit_index", None)
            if isinstance(index, int) and label.endswith(")"):
                label = f"{label[:-1]}, exit {index})"
            out.append((label, entry))
            continue
        if entry not in ATTACK_NAMES:
            raise _unknown(entry, ATTACK_NAMES, "attack name")
        if entry.startswith("pgd-exit"):
            for i in range(num_exits):
                out.append(
                    (
                        f"pgd-exit-{i}",
                        MultiExitPGD(
                            model,
                            eps=eps,
                            alpha=alpha,
                            steps=steps,
                            mode="single",
                            exit_index=i,
                            norm=norm,
                            generator=generator,
                        ),
                    )
                )
        elif entry.startswith("pgd-"):
            mode: AttackMode = "average" if entry == "pgd-average" else "max-average"
            pgd = MultiExitPGD(
                model,
                eps=eps,
                alpha=alpha,
                steps=steps,
                mode=mode,
                norm=norm,
                generator=generator,
            )
            out.append((entry, pgd))
        else:
            loss = entry.removeprefix("apgd-")
            apgd = MultiExitAPGD(
                model,
                eps=eps,
                norm=norm,
                steps=steps,
                loss=loss,  # type: ignore[arg-type]
                mode="max-average",
                restarts=restarts,
                generator=generator,
            )
            out.append((entry, apgd))
    if not out:
        raise ValueError("the attack suite is empty; pass at least one attack.")
    # Equal names (two attacks of one kind) get a counter: the report is keyed by name.
    counts: dict[str, int] = {}
    unique = []
    for label, attack in out:
        counts[label] = counts.get(label, 0) + 1
        unique.append((label if counts[label] == 1 else f"{label} #{counts[label]}", attack))
    return unique


def _finite_exits(model: nn.Module, images: Tensor, name: str) -> Tensor:
    """``forward_exits(model, images)`` (E, B, K), refusing NaN logits (named ``name``)."""
    logits = forward_exits(model, images)
    check_no_nan(logits, name)
    return logits


def check_in_ball(name: str, adv: Tensor, images: Tensor, eps: float, norm: ThreatModel) -> None:
    """Raise a ValueError naming the attack if ``adv`` leaves the ε-ball or [0, 1].

    Example:
        >>> x = torch.zeros(2, 3)
        >>> check_in_ball("mine", x + 0.5, x, 0.1, "Linf")
        Traceback (most recent call last):
        ...
        ValueError: attack 'mine' returned images outside the Linf ball of radius 0.1: the largest distance to the clean images is 0.5. Fix the attack's projection (or its eps).

    Shape:
        - adv, images: (B, ...).
    """
    if adv.shape != images.shape:
        raise ValueError(
            f"attack {name!r} returned images of shape {tuple(adv.shape)} for inputs of shape "
            f"{tuple(images.shape)}."
        )
    if adv.numel() == 0:
        return
    delta = (adv.double() - images.double()).flatten(1)
    dist = delta.abs().amax(1) if norm == "Linf" else delta.norm(p=2, dim=1)
    worst = float(dist.max())
    if not math.isfinite(worst) or worst > eps * (1 + _BOUND_SLACK) + 1e-6:
        raise ValueError(
            f"attack {name!r} returned images outside the {norm} ball of radius {eps:.4g}: "
            f"the largest distance to the clean images is {worst:.4g}. Fix the attack's "
            "projection (or its eps)."
        )
    low, high = float(adv.min()), float(adv.max())
    if low < -1e-6 or high > 1 + 1e-6:
        raise ValueError(
            f"attack {name!r} returned images outside [0, 1] (values in [{low:.4g}, "
            f"{high:.4g}]); clip its output to the image range."
        )


@dataclass(frozen=True)
class RobustResult:
    """Worst-case accuracy over a suite, per exit.

    Attributes:
        attacks: the attack names, in the order they ran.
        num_samples: N.
        clean_correct: correct clean predictions per exit (E,).
        robust_correct: predictions that survived every attack, per exit (E,).
        broken: per attack, how many (sample, exit) predictions it broke that the attacks
            before it had not (the suite's order decides the credit, as in AutoAttack).
        broken_samples: per attack, how many samples it broke at one exit or more.
        seen: per attack, how many samples it was run on (the rest were already broken
            at every exit).

    Example:
        >>> r = RobustResult(("a",), 4, (4, 3), (1, 2), {"a": 4}, {"a": 3}, {"a": 4})
        >>> r.robust_accuracy, r.mean_robust_accuracy
        ((0.25, 0.5), 0.375)
        >>> print(r.to_markdown().splitlines()[3])
        | worst case | 25.00 | 50.00 | 37.50 |
    """

    attacks: tuple[str, ...]
    num_samples: int
    clean_correct: tuple[int, ...]
    robust_correct: tuple[int, ...]
    broken: dict[str, int] = field(default_factory=dict)
    broken_samples: dict[str, int] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)

    @property
    def clean_accuracy(self) -> tuple[float, ...]:
        """Clean accuracy per exit, fractions."""
        return tuple(c / self.num_samples for c in self.clean_correct)

    @property
    def robust_accuracy(self) -> tuple[float, ...]:
        """Worst-case accuracy per exit, fractions."""
        return tuple(c / self.num_samples for c in self.robust_correct)

    @property
    def mean_robust_accuracy(self) -> float:
        """Mean over exits of the worst-case accuracy (the anytime summary)."""
        return sum(self.robust_accuracy) / len(self.robust_accuracy)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields and the accuracies."""
        out = asdict(self)
        out.update(
            clean_accuracy=list(self.clean_accuracy),
            robust_accuracy=list(self.robust_accuracy),
            mean_robust_accuracy=self.mean_robust_accuracy,
        )
        return out

    def to_markdown(self) -> str:
        """Accuracy table (percent, one column per exit) and the per-attack breakdown."""
        num_exits = len(self.clean_correct)
        head = "| | " + " | ".join(f"exit {i + 1}" for i in range(num_exits)) + " | mean |"
        lines = [head, "|---" * (num_exits + 2) + "|"]
        for label, acc in (("clean", self.clean_accuracy), ("worst case", self.robust_accuracy)):
            cells = [f"{100 * a:.2f}" for a in acc] + [f"{100 * sum(acc) / num_exits:.2f}"]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += ["", "| attack | samples seen | predictions broken | samples broken |"]
        lines.append("|---|---|---|---|")
        for name in self.attacks:
            lines.append(
                f"| {name} | {self.seen.get(name, 0)} | {self.broken.get(name, 0)} | "
                f"{self.broken_samples.get(name, 0)} |"
            )
        return "\n".join(lines)


def _load_state(path: str | None, key: str) -> dict[str, Any] | None:
    if path is None or not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        state: dict[str, Any] = json.load(handle)
    if state.get("key") != key:
        raise ValueError(
            f"the checkpoint {path!r} belongs to another evaluation (other attacks, eps, "
            "seed or model size); delete it or pass another `checkpoint` path."
        )
    return state


def robust_accuracy(
    model: nn.Module,
    loader: Loader,
    attacks: str | Sequence[str | AttackFn] = "standard",
    *,
    eps: float,
    norm: ThreatModel = "Linf",
    steps: int = 50,
    seed: int = 0,
    skip_broken: bool = True,
    max_batches: int | None = None,
    checkpoint: str | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> RobustResult:
    """Per-exit accuracy that survives every attack of a suite (the worst case).

    For every batch, the clean predictions are scored, then the attacks run in order;
    a (sample, exit) prediction stays correct only while every attack so far left it
    correct. Every attack's output is scored at every exit (a single-exit attack on exit
    i may also break exit j), so the worst case does not depend on the order of the
    suite; the order decides only which attack gets the credit in the breakdown. With
    ``skip_broken`` (default), an attack runs only on the samples still correct at one
    exit or more: those broken at every exit cannot get worse, so skipping them saves
    time without changing what is measured. Every output is checked to lie in the
    ε-ball and in [0, 1], and every logit to be free of NaN. Named attacks draw their
    random starts from one generator re-seeded from ``seed`` and the batch index before
    each attack, so the result is deterministic and a resumed run equals an
    uninterrupted one.

    Args:
        model: multi-exit model returning E logits (B, K), images in [0, 1].
        loader: ``(images, labels, ...)`` batches.
        attacks: a suite name (:data:`SUITES`: ``"standard"``, ``"strong"``) or a list of
            attack names (:data:`ATTACK_NAMES`) and callables ``attack(images, labels)``.
        eps: radius of the threat model (every attack output is checked against it).
        norm: ``"Linf"`` or ``"L2"``.
        steps: iterations of the named attacks (see :func:`make_suite`).
        seed: seed of the random starts.
        skip_broken: do not attack samples already broken at every exit (a speed-up;
            the attacks' random starts are drawn for the rows they run on).
        max_batches: evaluate only the first batches (None: all).
        checkpoint: a JSON file updated after every batch; an interrupted run restarts
            from it (it must come from the same suite, eps, norm, steps and seed).
        device: where batches go; defaults to the model's device.
        progress: show a tqdm progress bar (when tqdm is installed).

    Returns:
        A :class:`RobustResult`.

    Raises:
        TypeError: if the model or a batch has the wrong kind.
        ValueError: for an unknown suite or attack name, an attack that leaves the ball
            or [0, 1], an empty loader, or a checkpoint of another evaluation.

    Shape:
        - batches: images (B, ...) in [0, 1], labels (B,); model output: E tensors (B, K).

    Example:
        >>> model = TwoExits(in_features=4, num_classes=3)
        >>> data = [(torch.rand(8, 4), torch.randint(0, 3, (8,)))]
        >>> result = robust_accuracy(model, data, ["pgd-average"], eps=0.1, steps=3,
        ...                          progress=False)
        >>> all(r <= c for r, c in zip(result.robust_correct, result.clean_correct))
        True
    """
    check_model(model)
    eps = check_real(eps, "eps", low=0.0)
    seed = check_int(seed, "seed")
    if max_batches is not None:
        check_int(max_batches, "max_batches", low=1)
    target = resolve_device(model, device)
    generator = torch.Generator(device=target).manual_seed(seed)
    suite: list[tuple[str, AttackFn]] | None = None
    names: list[str] = []
    clean: Tensor | None = None
    robust: Tensor | None = None
    broken: dict[str, int] = {}
    broken_samples: dict[str, int] = {}
    seen: dict[str, int] = {}
    total, start_batch = 0, 0
    state: dict[str, Any] | None = None
    with eval_mode(model):
        batches = iterate_batches(loader, target, enabled=progress, desc="worst case")
        for index, (images, labels) in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            if images.shape[0] == 0:
                continue
            check_no_nan(images, "images")
            logits = forward_exits(model, images)  # (E, B, K)
            check_no_nan(logits, "model(images)")
            check_labels(labels, logits.shape[-1])
            if suite is None:
                suite = make_suite(
                    model,
                    attacks,
                    eps=eps,
                    norm=norm,
                    steps=steps,
                    num_exits=logits.shape[0],
                    generator=generator,
                )
                names = [n for n, _ in suite]
                key = json.dumps([names, eps, norm, steps, seed, logits.shape[0]])
                state = _load_state(checkpoint, key)
                if state is not None:
                    start_batch, total = state["batches"], state["num_samples"]
                    clean = torch.tensor(state["clean"], device=target)
                    robust = torch.tensor(state["robust"], device=target)
                    broken, broken_samples, seen = (
                        state["broken"],
                        state["broken_samples"],
                        state["seen"],
                    )
            if index < start_batch:
                continue
            alive = logits.argmax(-1) == labels  # (E, B)
            clean_hits = alive.sum(1)
            for j, (name, attack) in enumerate(suite):
                rows = (
                    alive.any(0).nonzero().squeeze(1)
                    if skip_broken
                    else torch.arange(labels.shape[0], device=labels.device)
                )
                seen[name] = seen.get(name, 0) + int(rows.numel())
                if rows.numel() == 0:
                    continue
                generator.manual_seed(seed * 1_000_003 + index * 1009 + j)
                x, y = images[rows], labels[rows]
                adv = run_attack(attack, x, y)
                check_in_ball(name, adv, x, eps, norm)
                adv_logits = forward_exits(model, adv)
                check_no_nan(adv_logits, f"model(images attacked by {name!r})")
                hits = adv_logits.argmax(-1) == y  # (E, n)
                newly = alive[:, rows] & ~hits
                broken[name] = broken.get(name, 0) + int(newly.sum())
                broken_samples[name] = broken_samples.get(name, 0) + int(newly.any(0).sum())
                alive[:, rows] &= hits
            clean = clean_hits if clean is None else clean + clean_hits
            robust = alive.sum(1) if robust is None else robust + alive.sum(1)
            total += labels.shape[0]
            if checkpoint is not None:
                snapshot = {
                    "key": key,
                    "batches": index + 1,
                    "num_samples": total,
                    "clean": clean.tolist(),
                    "robust": robust.tolist(),
                    "broken": broken,
                    "broken_samples": broken_samples,
                    "seen": seen,
                }
                with open(checkpoint + ".tmp", "w", encoding="utf-8") as handle:
                    json.dump(snapshot, handle)
                os.replace(checkpoint + ".tmp", checkpoint)
    if clean is None or robust is None or total == 0:
        raise ValueError("`loader` yielded no samples; pass a loader with at least one batch.")
    return RobustResult(
        attacks=tuple(names),
        num_samples=total,
        clean_correct=tuple(int(v) for v in clean.tolist()),
        robust_correct=tuple(int(v) for v in robust.tolist()),
        broken={n: broken.get(n, 0) for n in names},
        broken_samples={n: broken_samples.get(n, 0) for n in names},
        seen={n: seen.get(n, 0) for n in names},
    )


@dataclass(frozen=True)
class DeployedResult:
    """The deployed (budgeted) classifier under attack, one entry per budget.

    Attributes:
        budgets: the budget indices p (MSDNet's schedule, :func:`exit_proportions`).
        thresholds: the thresholds fitted on the clean validation logits, per budget.
        num_samples: N test samples.
        clean_accuracy: deployed accuracy on clean inputs.
        max_average_accuracy: deployed accuracy on max-average PGD examples (the paper's
            protocol).
        exit_policy_accuracy: deployed accuracy under :class:`ExitPolicyAttack`.
        worst_accuracy: deployed accuracy when a sample counts as correct only if it
            survives both attacks.
        clean_cost, slowdown_cost: mean cost per sample, clean and under
            :class:`SlowdownAttack`.
        clean_last_share, slowdown_last_share: share of samples that reach the last exit.

    Example:
        >>> r = DeployedResult((20,), ((0.9, -1.0),), 10, (0.9,), (0.5,), (0.4,), (0.3,),
        ...                    (1.5,), (1.8,), (0.5,), (0.8,))
        >>> round(r.slowdown_factor[0], 3)
        1.2
    """

    budgets: tuple[float, ...]
    thresholds: tuple[tuple[float, ...], ...]
    num_samples: int
    clean_accuracy: tuple[float, ...]
    max_average_accuracy: tuple[float, ...]
    exit_policy_accuracy: tuple[float, ...]
    worst_accuracy: tuple[float, ...]
    clean_cost: tuple[float, ...]
    slowdown_cost: tuple[float, ...]
    clean_last_share: tuple[float, ...]
    slowdown_last_share: tuple[float, ...]

    @property
    def slowdown_factor(self) -> tuple[float, ...]:
        """Mean cost under the slow-down attack over the clean mean cost, per budget."""
        return tuple(
            a / c if c > 0 else math.nan for a, c in zip(self.slowdown_cost, self.clean_cost)
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields and the slow-down factors."""
        out = asdict(self)
        out["slowdown_factor"] = list(self.slowdown_factor)
        return out

    def to_markdown(self) -> str:
        """One row per budget: accuracies in percent, costs, slow-down factor."""
        lines = [
            "| budget | clean | max-average | exit policy | worst | clean cost | "
            "slow-down cost | factor | last exit (clean → attacked) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for i, p in enumerate(self.budgets):
            lines.append(
                f"| {p:g} | {100 * self.clean_accuracy[i]:.2f} | "
                f"{100 * self.max_average_accuracy[i]:.2f} | "
                f"{100 * self.exit_policy_accuracy[i]:.2f} | {100 * self.worst_accuracy[i]:.2f} | "
                f"{self.clean_cost[i]:.4g} | {self.slowdown_cost[i]:.4g} | "
                f"{self.slowdown_factor[i]:.3f} | {100 * self.clean_last_share[i]:.1f} % → "
                f"{100 * self.slowdown_last_share[i]:.1f} % |"
            )
        return "\n".join(lines)


def deployed_evaluation(
    model: nn.Module,
    val_loader: Loader,
    test_loader: Loader,
    costs: Sequence[float],
    *,
    eps: float,
    norm: ThreatModel = "Linf",
    steps: int = 50,
    budgets: Sequence[float] = (10, 20, 30),
    center: float = 20.0,
    slowdown: str = "hinge",
    seed: int = 0,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> DeployedResult:
    """Attack the deployed early-exit classifier: its answer and its compute.

    Thresholds are fitted on the clean validation logits for each budget index p
    (:func:`fit_thresholds` with :func:`exit_proportions`, center ``center``): the
    deployed network is fitted once, then attacked. On the test set the deployed answer
    (:func:`~neokd_losses.attacks.policy.deployed_decision`, the exact rule of
    :func:`exit_assignment`) is scored on clean inputs, on max-average PGD examples (the
    paper's protocol) and under :class:`~neokd_losses.attacks.ExitPolicyAttack`
    (``steps`` steps, α = 2.5 ε / steps); the mean cost per sample is measured clean and
    under :class:`~neokd_losses.attacks.SlowdownAttack` (``slowdown`` objective).

    Args:
        model: multi-exit model returning E logits (B, K).
        val_loader: validation batches (thresholds).
        test_loader: test batches (attacked).
        costs: cumulative cost of each exit (E,), e.g. from :func:`exit_costs`.
        eps: radius of the threat model. norm: ``"Linf"`` or ``"L2"``.
        steps: steps of every attack.
        budgets: budget indices p > 0 (low p: early exits take most samples).
        center: budget index at which every exit gets the same share.
        slowdown: ``"hinge"`` or ``"uniform"`` (see :class:`SlowdownAttack`).
        seed: seed of the random starts.
        max_batches: test batches used (None: all).
        device: where batches go. progress: show progress bars.

    Returns:
        A :class:`DeployedResult`.

    Raises:
        TypeError, ValueError: for wrong arguments, ``costs`` that do not hold one value
            per exit, or an empty loader.

    Shape:
        - batches: images (B, ...) in [0, 1], labels (B,); costs: (E,).

    Example:
        >>> model = TwoExits(in_features=4, num_classes=3)
        >>> data = [(torch.rand(8, 4), torch.randint(0, 3, (8,)))]
        >>> r = deployed_evaluation(model, data, data, [1.0, 2.0], eps=0.1, steps=2,
        ...                         budgets=[20], progress=False)
        >>> r.slowdown_factor[0] >= 1.0
        True
    """
    center = check_real(center, "center", low=0.0, low_open=True)
    seed = check_int(seed, "seed")
    check_model(model)
    eps = check_real(eps, "eps", low=0.0)
    steps = check_int(steps, "steps", low=1)
    if max_batches is not None:
        check_int(max_batches, "max_batches", low=1)
    points = [check_real(p, "budgets", low=0.0, low_open=True) for p in budgets]
    if not points:
        raise ValueError("`budgets` must hold at least one budget index, got none.")
    target = resolve_device(model, device)
    val_logits, _ = collect_logits(model, val_loader, None, device=target, progress=progress)
    num_exits = val_logits.shape[0]
    if len(costs) != num_exits:
        raise ValueError(
            f"`costs` must hold one cumulative cost per exit: the model has {num_exits} "
            f"exits, got {len(costs)} ({list(costs)})."
        )
    cost = torch.tensor([check_real(c, "costs", low=0.0) for c in costs], dtype=torch.float64)
    thresholds = [
        fit_thresholds(val_logits, exit_proportions(p, num_exits, center=center)).double().cpu()
        for p in points
    ]
    alpha = 2.5 * eps / steps if eps > 0 else 1.0
    gen = torch.Generator(device=target)
    max_average = MultiExitPGD(model, eps=eps, alpha=alpha, steps=steps, norm=norm, generator=gen)
    policy = [
        ExitPolicyAttack(model, t, eps=eps, alpha=alpha, steps=steps, norm=norm, generator=gen)
        for t in thresholds
    ]
    slow = [
        SlowdownAttack(
            model,
            t,
            objective=slowdown,  # type: ignore[arg-type]
            eps=eps,
            alpha=alpha,
            steps=steps,
            norm=norm,
            generator=gen,
        )
        for t in thresholds
    ]
    n_points = len(points)
    sums = {
        k: [0.0] * n_points
        for k in ("clean", "maxavg", "policy", "worst", "c_cost", "s_cost", "c_last", "s_last")
    }
    total = 0
    with eval_mode(model):
        batches = iterate_batches(test_loader, target, enabled=progress, desc="deployed")
        for index, (images, labels) in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            if images.shape[0] == 0:
                continue
            check_no_nan(images, "images")
            clean = _finite_exits(model, images, "model(images)")
            check_labels(labels, clean.shape[-1])
            gen.manual_seed(seed * 1_000_003 + index * 1009)
            adv_max = _finite_exits(
                model, run_attack(max_average, images, labels), "model(max-average images)"
            )
            for i, t in enumerate(thresholds):
                gen.manual_seed(seed * 1_000_003 + index * 1009 + 1 + i)
                adv_policy = _finite_exits(
                    model, run_attack(policy[i], images, labels), "model(exit-policy images)"
                )
                gen.manual_seed(seed * 1_000_003 + index * 1009 + 101 + i)
                adv_slow = _finite_exits(
                    model, run_attack(slow[i], images, labels), "model(slow-down images)"
                )
                exit_c, answer_c = deployed_decision(clean, t)
                _, answer_m = deployed_decision(adv_max, t)
                _, answer_p = deployed_decision(adv_policy, t)
                exit_s, _ = deployed_decision(adv_slow, t)
                ok_m, ok_p = answer_m == labels, answer_p == labels
                sums["clean"][i] += float((answer_c == labels).sum())
                sums["maxavg"][i] += float(ok_m.sum())
                sums["policy"][i] += float(ok_p.sum())
                sums["worst"][i] += float((ok_m & ok_p).sum())
                sums["c_cost"][i] += float(cost[exit_c.cpu()].sum())
                sums["s_cost"][i] += float(cost[exit_s.cpu()].sum())
                sums["c_last"][i] += float((exit_c == num_exits - 1).sum())
                sums["s_last"][i] += float((exit_s == num_exits - 1).sum())
            total += labels.shape[0]
    if total == 0:
        raise ValueError("`test_loader` yielded no samples; pass a loader with at least one batch.")

    def mean(key: str) -> tuple[float, ...]:
        return tuple(v / total for v in sums[key])

    return DeployedResult(
        budgets=tuple(points),
        thresholds=tuple(tuple(float(v) for v in t.tolist()) for t in thresholds),
        num_samples=total,
        clean_accuracy=mean("clean"),
        max_average_accuracy=mean("maxavg"),
        exit_policy_accuracy=mean("policy"),
        worst_accuracy=mean("worst"),
        clean_cost=mean("c_cost"),
        slowdown_cost=mean("s_cost"),
        clean_last_share=mean("c_last"),
        slowdown_last_share=mean("s_last"),
    )


def strong_evaluation(
    model: nn.Module,
    val_loader: Loader,
    test_loader: Loader,
    costs: Sequence[float],
    *,
    eps: float,
    norm: ThreatModel = "Linf",
    steps: int = 50,
    suite: str | Sequence[str | AttackFn] = "strong",
    budgets: Sequence[float] = (10, 20, 30),
    seed: int = 0,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The whole honest evaluation in one call, as a JSON-ready dict.

    Runs :func:`robust_accuracy` (worst case over ``suite`` on the test set) and
    :func:`deployed_evaluation` (exit-policy and slow-down attacks on the deployed
    classifier at ``budgets``).

    Returns:
        ``{"worst_case": {...}, "deployed": {...}, "summary": {...}, "markdown": str}``;
        the summary holds ``worst_case_accuracy`` (per exit), ``worst_case_mean``,
        ``budgets``, ``budgeted_max_average``, ``budgeted_exit_policy``,
        ``slowdown_factor`` and ``last_exit_share`` (clean, attacked) per budget.

    Raises:
        TypeError, ValueError: as the two functions.

    Shape:
        - batches: images (B, ...) in [0, 1], labels (B,); costs: (E,).

    Example:
        >>> model = TwoExits(in_features=4, num_classes=3)
        >>> data = [(torch.rand(8, 4), torch.randint(0, 3, (8,)))]
        >>> out = strong_evaluation(model, data, data, [1.0, 2.0], eps=0.1, steps=2,
        ...                         suite=["pgd-average"], budgets=[20], progress=False)
        >>> len(out["summary"]["worst_case_accuracy"]), out["summary"]["slowdown_factor"][0] >= 1
        (2, True)
    """
    worst = robust_accuracy(
        model,
        test_loader,
        suite,
        eps=eps,
        norm=norm,
        steps=steps,
        seed=seed,
        max_batches=max_batches,
        device=device,
        progress=progress,
    )
    deployed = deployed_evaluation(
        model,
        val_loader,
        test_loader,
        costs,
        eps=eps,
        norm=norm,
        steps=steps,
        budgets=budgets,
        seed=seed,
        max_batches=max_batches,
        device=device,
        progress=progress,
    )
    summary = {
        "worst_case_accuracy": list(worst.robust_accuracy),
        "worst_case_mean": worst.mean_robust_accuracy,
        "budgets": list(deployed.budgets),
        "budgeted_max_average": list(deployed.max_average_accuracy),
        "budgeted_exit_policy": list(deployed.exit_policy_accuracy),
        "budgeted_worst": list(deployed.worst_accuracy),
        "slowdown_factor": list(deployed.slowdown_factor),
        "last_exit_share": [
            [c, s] for c, s in zip(deployed.clean_last_share, deployed.slowdown_last_share)
        ],
    }
    return {
        "worst_case": worst.to_dict(),
        "deployed": deployed.to_dict(),
        "summary": summary,
        "markdown": worst.to_markdown() + "\n\n" + deployed.to_markdown(),
    }
