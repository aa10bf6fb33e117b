"""Final evaluation of a trained model: the numbers and figures of the NEO-KD paper.

- Anytime prediction: accuracy of every exit on clean test inputs and under
  ``attack.eval_steps``-step PGD, max-average and average attacks (the paper's tables
  report the mean over exits of the adversarial accuracy).
- Budgeted prediction: confidence thresholds fitted on the validation split held out of
  the training set, test accuracy against expected cost (FLOPs of each exit from
  ``exit_costs``), on clean inputs and under the max-average and average attacks
  (validation attacked too, so the thresholds see the inputs they will face); each
  curve twice: every exit predicting from its own softmax (``plain``) and from the mean
  of the softmax outputs of exits 1..k (``ensemble``, the paper's ensemble strategy).
- Adversarial transferability: the E x E matrix of the attack success rate at exit j of
  a single-exit attack generated on exit i (among the samples exit j classifies
  correctly on clean inputs), the mean of its off-diagonal entries, and the counts
  behind both this and the all-samples definition.

Under ``torchrun`` every rank evaluates its own share of the test set (no sample counted
twice); counts are summed across ranks and logits gathered on rank 0, which alone writes
``results.json``, ``results.md`` and ``plots/*.png`` into the run directory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import _distributed
import torch
from _config import Config
from _data import ShardedSampler, Splits
from _logging import RunLog
from _methods import PAPER_NAMES
from torch import Tensor, nn
from torch.utils.data import DataLoader

EVAL_ATTACKS = ("max-average", "average")
ENSEMBLE_SUFFIX = ", ensemble"
"""Budget curves whose key ends with this use ``ensemble=True`` (mean softmax of exits 1..k)."""


def _loader(dataset: Any, config: Config, env: _distributed.DistEnv) -> DataLoader[Any]:
    sampler = ShardedSampler(
        dataset, rank=env.rank, world_size=env.world_size, shuffle=False, pad=False
    )
    return DataLoader(
        dataset,
        batch_size=config.eval.batch_size,
        sampler=sampler,
        num_workers=config.data.num_workers,
        pin_memory=env.device.type == "cuda",
    )


def _gather_cat(tensor: Tensor, dim: int) -> Tensor:
    """Concatenate every rank's CPU tensor along ``dim`` (rank order) on every rank."""
    parts = _distributed.gather_objects(tensor.cpu())
    return torch.cat(parts, dim=dim)


def _eval_attack(
    model: nn.Module, config: Config, mode: str, seed: int, exit_index: int | None = None
) -> Any:
    from neokd_losses.attacks.pgd import MultiExitPGD

    a = config.attack
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    return MultiExitPGD(
        model,
        eps=a.eps,
        alpha=a.step_size,
        steps=a.eval_steps,
        random_start=a.random_start,
        mode=mode,
        exit_index=exit_index,
        generator=generator,
    )


def _collect(
    model: nn.Module, loader: DataLoader[Any], attack: Any, progress: bool
) -> tuple[Tensor, Tensor]:
    """Logits (E, N, K) and labels (N,) of the whole split, gathered over ranks."""
    from neokd_losses.evaluation.budgeted import collect_logits

    logits, labels = collect_logits(model, loader, attack, progress=progress)
    return _gather_cat(logits, 1), _gather_cat(labels, 0)


def _anytime(logits: Tensor, labels: Tensor, attack: str | None) -> Any:
    from neokd_losses.evaluation.anytime import AnytimeResult

    correct = (logits.argmax(-1) == labels).sum(-1)
    return AnytimeResult(tuple(int(c) for c in correct.tolist()), int(labels.shape[0]), attack)


def transfer_rates(
    model: nn.Module, loader: DataLoader[Any], config: Config, seed: int, progress: bool
) -> Any:
    """The transferability counts over the whole split (a ``TransferResult``).

    Each rank runs ``transferability_matrix`` on its share; the counts (numerators and
    denominators of both success-rate definitions) are summed over ranks.
    """
    from neokd_losses.evaluation.transfer import TransferResult, transferability_matrix

    a = config.attack
    device = next(model.parameters()).device
    local = transferability_matrix(
        model,
        loader,
        eps=a.eps,
        alpha=a.step_size,
        steps=a.eval_steps,
        random_start=a.random_start,
        generator=torch.Generator(device=device).manual_seed(seed),
        progress=progress,
    )

    def total(t: Tensor) -> Tensor:
        return _distributed.all_reduce_sum(t.to(device)).cpu()

    n = total(torch.tensor(local.num_samples, dtype=torch.long))
    return TransferResult(
        count=local.count,
        clean_correct=total(local.clean_correct),
        fooled=total(local.fooled),
        wrong=total(local.wrong),
        num_samples=int(n),
    )


TRANSFER_DEFINITION = {
    "clean-correct": "attack success rate: among the test samples that exit j (column) "
    "classifies correctly on clean inputs, the fraction misclassified at exit j under a "
    "single-exit PGD attack generated on exit i (row)",
    "all": "fraction of all test samples misclassified at exit j (column) by a single-exit "
    "PGD attack generated on exit i (row)",
}


TIMING_BUDGETS = (10, 20, 30)
"""Budget indices (MSDNet's schedule) at which early-exit inference is timed."""


def early_exit_timing(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    val_logits: Tensor,
    costs: list[float],
    batch_size: int,
    repeats: int = 3,
) -> list[dict[str, Any]] | str:
    """Wall-clock time of real early exit against the full forward, at three budgets.

    Thresholds are fitted on the clean validation logits (MSDNet's schedule at each of
    ``TIMING_BUDGETS``); the test images run through ``EarlyExitClassifier`` batch by
    batch and through the plain forward, alternately, ``repeats`` times (the fastest
    run of each is kept). Returns the rows, or a sentence saying why it was skipped.
    """
    from neokd_losses.evaluation.budgeted import exit_proportions, fit_thresholds
    from neokd_losses.inference import EarlyExitClassifier
    from neokd_losses.models import is_staged

    if not is_staged(model):
        return (
            f"{type(model).__name__} has no stages (forward_stage), so it cannot stop early; "
            "see 'Staged models' in the docs' concepts page."
        )
    device = next(model.parameters()).device
    batches = [b.to(device) for b in images.split(batch_size)]

    def timed(fn: Any) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for b in batches:
            fn(b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    rows = []
    with torch.inference_mode():
        for budget in TIMING_BUDGETS:
            q = exit_proportions(budget, val_logits.shape[0])
            classifier = EarlyExitClassifier(model, fit_thresholds(val_logits, q), costs).eval()
            out = [classifier(b) for b in batches]
            full, early = [], []
            for _ in range(repeats):
                full.append(timed(model))
                early.append(timed(classifier))
            prediction = torch.cat([o.prediction for o in out]).cpu()
            cost = torch.cat([o.cost for o in out]).cpu()
            rows.append(
                {
                    "budget_index": budget,
                    "accuracy": float((prediction == labels).double().mean()),
                    "mean_cost": float(cost.mean()),
                    "full_cost": costs[-1],
                    "early_exit_seconds": min(early),
                    "full_forward_seconds": min(full),
                    "measured_speedup": min(full) / min(early),
                    "predicted_speedup": costs[-1] / float(cost.mean()),
                }
            )
    return rows


def _full_loader(dataset: Any, config: Config) -> DataLoader[Any]:
    return DataLoader(dataset, batch_size=config.eval.batch_size, shuffle=False)


def strong_suite(
    model: nn.Module, splits: Splits, config: Config, costs: list[float], progress: bool
) -> dict[str, Any]:
    """``neokd_losses.evaluation.strong_evaluation`` on the validation and test splits."""
    from neokd_losses.evaluation import strong_evaluation

    return strong_evaluation(
        model,
        _full_loader(splits.val, config),
        _full_loader(splits.test, config),
        costs,
        eps=config.attack.eps,
        steps=config.attack.eval_steps,
        suite="strong",
        budgets=TIMING_BUDGETS,
        seed=config.run.seed * 1000 + 900,
        progress=progress,
    )


def evaluate(
    model: nn.Module,
    splits: Splits,
    config: Config,
    env: _distributed.DistEnv,
    *,
    progress: bool = True,
    log: RunLog | None = None,
) -> dict[str, Any] | None:
    """Run the whole evaluation; return the results dict on rank 0 (None elsewhere).

    Also writes ``results.json``, ``results.md`` and, with ``eval.plots``, the figures.
    """
    from neokd_losses.evaluation.budgeted import budget_curve
    from neokd_losses.evaluation.flops import exit_costs

    started = time.perf_counter()
    log = log or RunLog(config.out_dir / "log.jsonl", enabled=False)
    model.eval()
    seed = config.run.seed * 1000 + 100 + 17 * env.rank
    test_loader = _loader(splits.test, config, env)
    val_loader = _loader(splits.val, config, env)

    logits: dict[str, tuple[Tensor, Tensor]] = {
        "clean": _collect(model, test_loader, None, progress)
    }
    val_logits: dict[str, tuple[Tensor, Tensor]] = {
        "clean": _collect(model, val_loader, None, progress)
    }
    for k, mode in enumerate(EVAL_ATTACKS):
        log.info(f"evaluating under {config.attack.eval_steps}-step PGD {mode} ...")
        attack = _eval_attack(model, config, mode, seed + k)
        logits[mode] = _collect(model, test_loader, attack, progress)
    log.info("budgeted evaluation: attacking the validation split ...")
    for k, mode in enumerate(EVAL_ATTACKS):
        val_logits[mode] = _collect(
            model, val_loader, _eval_attack(model, config, mode, seed + 5 + k), progress
        )
    log.info("transferability: one single-exit attack per exit ...")
    transfer_limited = config.eval.transfer_cap and config.eval.transfer_cap < len(splits.test)  # type: ignore[arg-type]
    transfer_data = (
        torch.utils.data.Subset(splits.test, range(config.eval.transfer_cap))
        if transfer_limited
        else splits.test
    )
    transfer = transfer_rates(
        model, _loader(transfer_data, config, env), config, seed + 50, progress
    )

    if not env.is_main:
        return None
    probe = splits.test[0][0].unsqueeze(0).to(next(model.parameters()).device)
    costs = [float(c) for c in exit_costs(model, probe)]
    anytime = {
        name: _anytime(z, y, None if name == "clean" else f"PGD-{config.attack.eval_steps} {name}")
        for name, (z, y) in logits.items()
    }
    curves = {
        f"{name}{suffix}": budget_curve(
            *val_logits[name],
            *logits[name],
            costs,
            num_points=config.eval.budget_points,
            ensemble=ensemble,
        )
        for name in ("clean", *EVAL_ATTACKS)
        for suffix, ensemble in (("", False), (ENSEMBLE_SUFFIX, True))
    }
    num_exits = transfer.num_exits
    log.info("early exit: wall-clock time of real early exit vs the full forward ...")
    # Images and labels in dataset order (the gathered logits are in rank order under
    # torchrun: rank 0's samples, then rank 1's).
    test_images = torch.stack([splits.test[i][0] for i in range(len(splits.test))])
    test_labels = torch.as_tensor([int(splits.test[i][1]) for i in range(len(splits.test))])
    timing = early_exit_timing(
        model,
        test_images,
        test_labels,
        val_logits["clean"][0],
        costs,
        config.eval.batch_size,
    )
    strong = None
    if config.eval.suite == "strong":
        log.info("strong evaluation suite (worst case, exit policy, slow-down) ...")
        strong = strong_suite(model, splits, config, costs, progress)
    results: dict[str, Any] = {
        "setting": config.name,
        "method": config.loss.method,
        "method_name": PAPER_NAMES[config.loss.method],
        "train_attack": config.attack.train_mode,
        "epochs": config.optim.epochs,
        "num_exits": num_exits,
        "samples": {
            "train": len(splits.train),
            "val": len(splits.val),
            "test": int(logits["clean"][1].shape[0]),
        },  # type: ignore[arg-type]
        "attack": {
            "eps": config.attack.eps,
            "step_size": config.attack.step_size,
            "eval_steps": config.attack.eval_steps,
            "random_start": config.attack.random_start,
        },
        "anytime": {name: r.to_dict() for name, r in anytime.items()},
        "budget": {name: c.to_dict() for name, c in curves.items()},
        "exit_costs": costs,
        "transferability": {
            **transfer.to_dict(),
            "off_diagonal_mean_all": transfer.off_diagonal_mean("all") if num_exits > 1 else 0.0,
            "definition": TRANSFER_DEFINITION[transfer.count],
        },
        "early_exit": timing,
        "eval_suite": config.eval.suite,
        **({"strong": {k: strong[k] for k in ("summary", "markdown")}} if strong else {}),
        "eval_seconds": round(time.perf_counter() - started, 2),
        "config": config.to_dict(),
        "world_size": env.world_size,
        "device": str(env.device),
    }
    write_results(results, config.out_dir, plots=config.eval.plots)
    log.info(f"results written to {config.out_dir / 'results.json'}")
    return results


def summary_markdown(results: dict[str, Any]) -> str:
    """The per-run markdown report: anytime table, transferability, budget summary."""
    from neokd_losses.evaluation.anytime import AnytimeResult, anytime_table

    rows = {
        name: AnytimeResult(tuple(r["correct"]), r["num_samples"], r["attack"])
        for name, r in results["anytime"].items()
    }
    e = results["num_exits"]
    t = results["transferability"]
    lines = [
        f"## {results['setting']}: {results['method_name']} (trained with PGD {results['train_attack']})",
        "",
        f"Anytime accuracy (%), {results['samples']['test']} test samples, "
        f"eps = {results['attack']['eps']:.4g}, {results['attack']['eval_steps']}-step PGD:",
        "",
        anytime_table({"clean" if k == "clean" else f"PGD {k}": v for k, v in rows.items()}),
        "",
        transfer_caption(t) + ":",
        "",
        "| attack on \\ at | " + " | ".join(f"exit {j + 1}" for j in range(e)) + " |",
        "|" + "---|" * (e + 1),
    ]
    for i, row in enumerate(t["matrix"]):
        lines.append(f"| exit {i + 1} | " + " | ".join(f"{100 * v:.1f}" for v in row) + " |")
    lines += [
        "",
        "Budgeted prediction (test accuracy % at the budget points' expected cost; "
        "'ensemble': exit k predicts from the mean of the softmax outputs of exits 1..k):",
        "",
    ]
    lines += ["| inputs | lowest cost | median cost | highest cost |", "|---|---|---|---|"]
    for name, curve in results["budget"].items():
        pts = sorted(zip(curve["mean_costs"], curve["accuracies"], strict=True))
        picks = [pts[0], pts[len(pts) // 2], pts[-1]]
        lines.append(
            f"| {name} | " + " | ".join(f"{100 * a:.2f} @ {c:.4g}" for c, a in picks) + " |"
        )
    timing = results.get("early_exit")
    if isinstance(timing, list):
        lines += [
            "",
            "Real early exit (EarlyExitClassifier, clean test set, thresholds from the clean "
            "validation split): wall-clock time against the full forward:",
            "",
            "| budget index | accuracy % | mean cost / full | measured speed-up | "
            "FLOP-predicted speed-up |",
            "|---|---|---|---|---|",
        ]
        for r in timing:
            lines.append(
                f"| {r['budget_index']} | {100 * r['accuracy']:.2f} | "
                f"{r['mean_cost'] / r['full_cost']:.3f} | {r['measured_speedup']:.2f}x | "
                f"{r['predicted_speedup']:.2f}x |"
            )
    elif timing:
        lines += ["", f"Real early exit: skipped ({timing})"]
    if "strong" in results:
        lines += ["", "Strong evaluation suite:", "", results["strong"]["markdown"].strip()]
    return "\n".join(lines) + "\n"


def transfer_caption(t: dict[str, Any]) -> str:
    """One sentence naming the transferability definition of ``t`` and its off-diagonal mean."""
    n = t["num_samples"]
    if t.get("count", "all") == "clean-correct":
        text = (
            "Adversarial transferability (attack success rate, %: among the samples exit j "
            "classifies correctly on clean inputs, those misclassified at exit j by a single "
            f"attack on exit i; {n} samples), off-diagonal mean "
            f"{100 * t['off_diagonal_mean']:.2f}%"
        )
        if "off_diagonal_mean_all" in t:
            text += f" ({100 * t['off_diagonal_mean_all']:.2f}% counting all samples)"
        return text
    return (
        f"Adversarial transferability (% of all samples misclassified at exit j by a single "
        f"attack on exit i; {n} samples), off-diagonal mean {100 * t['off_diagonal_mean']:.2f}%"
    )


def write_results(results: dict[str, Any], out_dir: Path, *, plots: bool = True) -> None:
    """``results.json``, ``results.md`` and (optionally) ``plots/*.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    tmp.replace(out_dir / "results.json")
    (out_dir / "results.md").write_text(summary_markdown(results))
    if plots:
        write_plots(results, out_dir / "plots")


RESULT_FILES = (
    "results.json",
    "results.md",
    "plots/budget.png",
    "plots/transferability.png",
    "plots/exits.png",
)
"""What :func:`write_results` writes, relative to the run directory."""


def write_plots(results: dict[str, Any], folder: Path) -> None:
    from neokd_losses.evaluation import plots as P

    folder.mkdir(parents=True, exist_ok=True)
    name = results["method_name"]
    P.plot_budget_curves(
        {f"{name}, {k}": v for k, v in results["budget"].items()},
        folder / "budget.png",
        title=f"{results['setting']}: budgeted prediction",
        cost_label="expected multiply-adds per sample",
    )
    P.plot_transferability(
        results["transferability"]["matrix"],
        folder / "transferability.png",
        title=f"{results['setting']}, {name}: "
        + (
            "attack success rate (%, clean-correct samples)"
            if results["transferability"].get("count", "all") == "clean-correct"
            else "misclassified (%, all samples)"
        ),
    )
    P.plot_exit_accuracies(
        {k: v["per_exit"] for k, v in results["anytime"].items()},
        folder / "exits.png",
        title=f"{results['setting']}, {name}: anytime accuracy",
    )
