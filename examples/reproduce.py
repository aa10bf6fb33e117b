"""Reproduce one NEO-KD paper setting: train every method, then print the side-by-side table.

    python examples/reproduce.py                      # digits: adv and neokd, CPU, minutes
    python examples/reproduce.py cifar10_msdnet3      # Adv. w/o distill, SKD, ARD, NEO-KD
    python examples/reproduce.py cifar100_msdnet7 --nproc-per-node 2 --data-dir /data
    python examples/reproduce.py --paired             # one model per training attack

Each method trains with ``examples/train.py``'s loop into ``<out-root>/<setting>/<method>``
(a finished run with the same settings is reused, an interrupted one resumed); models
trained against the average attack (``--train-attack average``) go to
``<out-root>/<setting>/train-average/<method>``, so they never collide with the paper's
max-average runs. The table
follows the paper's anytime-prediction table: per-exit adversarial test accuracy under the
max-average and the average attack with their mean over exits, plus the mean clean
accuracy and the mean off-diagonal adversarial transferability. It is printed and written
to ``summary.md`` in the same folder (with ``summary.json`` and a budget-curve figure
comparing the methods). The table's caption says which pairing of training and test
attacks it shows: by default both test attacks on the models trained with one attack
(``--train-attack``, max-average unless set); with ``--paired`` every method is trained
twice, once per training attack, and each test attack is reported on the model trained
with the same attack (written to ``summary-paired.md``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from _config import ConfigError, load
from _data import DatasetError
from _methods import PAPER_NAMES

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
SETTINGS = sorted(p.stem for p in CONFIGS.glob("*.toml"))

DEFAULT_METHODS = {"digits": ["adv", "neokd"]}
PAPER_METHODS = ["adv", "lw", "skd", "ard", "neokd"]
TRAIN_ATTACKS = ("max-average", "average")

# The NEO-KD paper's anytime-prediction tables (docs/paper.md): average adversarial test
# accuracy over exits (%), max-average and average attack; the paper has no LW row for
# ImageNet.
PAPER_RESULTS: dict[str, dict[str, tuple[float, float]]] = {
    "mnist_smallcnn": {
        "adv": (94.15, 92.75),
        "lw": (92.12, 91.95),
        "skd": (94.36, 92.82),
        "ard": (93.97, 92.82),
        "neokd": (94.49, 93.50),
    },
    "cifar10_msdnet3": {
        "adv": (45.91, 40.04),
        "lw": (35.87, 30.62),
        "skd": (44.69, 39.71),
        "ard": (47.39, 41.63),
        "neokd": (48.30, 44.20),
    },
    "cifar100_msdnet7": {
        "adv": (27.12, 18.13),
        "lw": (19.91, 14.42),
        "skd": (24.26, 18.06),
        "ard": (27.95, 18.73),
        "neokd": (28.96, 22.88),
    },
    "imagenet_msdnet5": {
        "adv": (30.45, 25.58),
        "skd": (28.43, 23.57),
        "ard": (30.89, 24.71),
        "neokd": (32.37, 29.98),
    },
}
# Mean off-diagonal transferability (%), CIFAR-100, 7 exits.
PAPER_TRANSFER = {"cifar100_msdnet7": {"adv": 23.68, "skd": 33.36, "neokd": 20.12}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "setting", nargs="?", default="digits", choices=SETTINGS, help="paper setting (config name)"
    )
    p.add_argument(
        "--methods",
        nargs="+",
        choices=tuple(PAPER_NAMES),
        help="methods to run (default: the paper's)",
    )
    p.add_argument("--train-attack", choices=TRAIN_ATTACKS, help="attack used for training")
    p.add_argument(
        "--paired",
        action="store_true",
        help="train every method once per training attack and report each test attack on "
        "the model trained with the same attack",
    )
    p.add_argument(
        "--out-root",
        default="runs",
        help="runs go to <out-root>/<setting>/<method> (<out-root>/<setting>/train-average/"
        "<method> when training against the average attack)",
    )
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--data-dir")
    p.add_argument("--train-cap", type=int)
    p.add_argument("--eval-cap", type=int)
    p.add_argument("--device")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"))
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--workers", type=int)
    p.add_argument(
        "--eval-suite",
        choices=("paper", "strong"),
        help="'strong' adds worst-case accuracy over an attack suite, budgeted accuracy "
        "under the exit-policy attack and the slow-down factor to every run and the summary",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--nproc-per-node", type=int, default=1, help=">1 launches each run with torchrun"
    )
    p.add_argument("--rerun", action="store_true", help="retrain even when finished results exist")
    p.add_argument("--no-progress", action="store_true")
    return p


def _train_args(args: argparse.Namespace, method: str, out_dir: Path) -> list[str]:
    argv = [
        "--config",
        str(CONFIGS / f"{args.setting}.toml"),
        "--method",
        method,
        "--out-dir",
        str(out_dir),
    ]
    for flag in (
        "train_attack",
        "epochs",
        "batch_size",
        "data_dir",
        "train_cap",
        "eval_cap",
        "device",
        "amp",
        "workers",
        "eval_suite",
    ):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    if args.compile is not None:
        argv.append("--compile" if args.compile else "--no-compile")
    for item in args.set:
        argv += ["--set", item]
    if args.no_progress:
        argv.append("--no-progress")
    return argv


def _finished(out_dir: Path, config: Any) -> bool:
    """True when ``out_dir`` holds a finished run evaluated with exactly this configuration."""
    results, ckpt = out_dir / "results.json", out_dir / "checkpoint.pt"
    if not (results.is_file() and ckpt.is_file()):
        return False
    import _checkpoint

    saved = json.loads(results.read_text()).get("config")
    return bool(_checkpoint.load(ckpt).get("finished")) and saved == config.to_dict()


def setting_root(args: argparse.Namespace) -> Path:
    """``<out-root>/<setting>``, or its ``train-average`` subfolder for models trained
    against the average attack (from ``--train-attack`` or ``--set attack.train_mode``)."""
    import train

    parsed = train.build_parser().parse_args(_train_args(args, "neokd", Path(args.out_root)))
    config = load(parsed.config, train.overrides_from_args(parsed))
    root = Path(args.out_root) / args.setting
    if config.attack.train_mode != "max-average":
        root = root / f"train-{config.attack.train_mode}"
    return root


def run_method(args: argparse.Namespace, method: str, root: Path) -> dict[str, Any] | None:
    """Train and evaluate one method (or reuse its results); None if it was interrupted."""
    import train

    out_dir = root / method
    argv = _train_args(args, method, out_dir)
    parsed = train.build_parser().parse_args(argv)
    config = load(parsed.config, train.overrides_from_args(parsed))
    if not args.rerun and _finished(out_dir, config):
        print(f"[{method}] reusing finished run in {out_dir}", file=sys.stderr)
        return json.loads((out_dir / "results.json").read_text())
    resume = not args.rerun and (out_dir / "checkpoint.pt").is_file()
    if args.nproc_per_node > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # a free local port: several runs may share a machine
            f"--nproc_per_node={args.nproc_per_node}",
            str(HERE / "train.py"),
            *argv,
            *(["--resume"] if resume else ["--overwrite"]),
        ]
        code = subprocess.call(cmd)
        if code != 0:
            raise SystemExit(code)
        return json.loads((out_dir / "results.json").read_text())
    outcome = train.run(config, resume=resume, overwrite=not resume, progress=not args.no_progress)
    if outcome.status != "finished":
        print(f"[{method}] interrupted; run the same command again to resume.", file=sys.stderr)
        raise SystemExit(outcome.exit_code)
    return outcome.results


def paired_results(
    by_attack: dict[str, dict[str, dict[str, Any]]],
) -> dict[str, dict[str, Any]]:
    """One result per method whose test attack k comes from the model trained with attack k.

    ``by_attack`` maps each training attack to its ``{method: results}``. The clean
    accuracy, the transferability and everything else come from the max-average-trained
    model; ``pairing`` records where each row's numbers come from.
    """
    maxavg, average = by_attack["max-average"], by_attack["average"]
    paired: dict[str, dict[str, Any]] = {}
    for method, r in maxavg.items():
        if method not in average:
            continue
        anytime = {**r["anytime"], "average": average[method]["anytime"]["average"]}
        paired[method] = {**r, "anytime": anytime, "pairing": "paired"}
    return paired


def pairing_caption(results: dict[str, Any]) -> str:
    """Which training attack each column of the table comes from."""
    if results.get("pairing") == "paired":
        return (
            "Pairing: each test attack on the model trained with the same attack (max-average "
            "columns: models trained with the max-average attack; average columns: models "
            "trained with the average attack; clean accuracy and transferability: the "
            "max-average-trained models)"
        )
    return (
        "Pairing: both test attacks on the models trained with the "
        f"{results['train_attack']} attack"
    )


def _transfer_header(results: dict[str, dict[str, Any]]) -> str:
    counts = {r["transferability"].get("count", "all") for r in results.values()}
    if counts == {"clean-correct"}:
        return "transfer (off-diag, success rate)"
    if counts == {"all"}:
        return "transfer (off-diag, all samples)"
    return "transfer (off-diag)"


def comparison_table(setting: str, results: dict[str, dict[str, Any]]) -> str:
    """The paper-format table: per-exit adversarial accuracy under both attacks, means,
    clean accuracy and transferability, one row per method (percent), with a caption
    naming the pairing of training and test attacks and the transferability definition."""
    any_result = next(iter(results.values()))
    e = any_result["num_exits"]
    exits = [f"exit {i + 1}" for i in range(e)]
    header = [
        "Method",
        *(f"max-avg {x}" for x in exits),
        "**max-avg mean**",
        *(f"avg {x}" for x in exits),
        "**avg mean**",
        "clean mean",
        _transfer_header(results),
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, r in results.items():
        ma, av = r["anytime"]["max-average"], r["anytime"]["average"]
        cells = [
            r["method_name"],
            *(f"{100 * a:.2f}" for a in ma["per_exit"]),
            f"**{100 * ma['mean']:.2f}**",
            *(f"{100 * a:.2f}" for a in av["per_exit"]),
            f"**{100 * av['mean']:.2f}**",
            f"{100 * r['anytime']['clean']['mean']:.2f}",
            f"{100 * r['transferability']['off_diagonal_mean']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    a = any_result
    trained = (
        "models trained with each attack"
        if a.get("pairing") == "paired"
        else f"models trained with the {a['train_attack']} attack"
    )
    transfer = (
        "transfer: mean off-diagonal attack success rate of a single-exit attack, among the "
        "samples the evaluated exit classifies correctly on clean inputs"
        if a["transferability"].get("count", "all") == "clean-correct"
        else "transfer: mean off-diagonal fraction of all samples misclassified by a "
        "single-exit attack on another exit"
    )
    note = (
        f"\n{setting}: {a['samples']['test']} test samples, eps = {a['attack']['eps']:.4g}, "
        f"{a['attack']['eval_steps']}-step PGD, {trained} "
        f"for {a['epochs']} epochs; device {a['device']}.\n{pairing_caption(a)}; {transfer}."
    )
    paper = PAPER_RESULTS.get(setting)
    if paper:
        note += (
            "\n\nPaper (NEO-KD, NeurIPS 2023, anytime-prediction table), mean adversarial "
            "accuracy over exits (%) under the max-average and average test attacks (the "
            "paper lists both training attacks beside both test attacks without saying "
            "which model each column uses):\n\n"
        )
        note += (
            "| Method | max-average | average |"
            + (" transfer |" if setting in PAPER_TRANSFER else "")
            + "\n"
        )
        note += "|---|---|---|" + ("---|" if setting in PAPER_TRANSFER else "") + "\n"
        for method, (m1, m2) in paper.items():
            row = f"| {PAPER_NAMES[method]} | {m1:.2f} | {m2:.2f} |"
            if setting in PAPER_TRANSFER:
                t = PAPER_TRANSFER[setting].get(method)
                row += f" {t:.2f} |" if t is not None else " - |"
            note += row + "\n"
    return "\n".join(lines) + "\n" + note


def strong_table(results: dict[str, dict[str, Any]]) -> str:
    """The strong-suite table (runs evaluated with ``--eval-suite strong``), or ""."""
    rows = {m: r["strong"]["summary"] for m, r in results.items() if "strong" in r}
    if not rows:
        return ""
    first = next(iter(rows.values()))
    budgets = first["budgets"]
    e = len(first["worst_case_accuracy"])
    header = [
        "Method",
        *(f"worst exit {i + 1}" for i in range(e)),
        "**worst-case mean**",
        *(f"budget {b:g}: max-avg / exit-policy" for b in budgets),
        *(f"slow-down @{b:g}" for b in budgets),
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, s in rows.items():
        cells = [
            results[method]["method_name"],
            *(f"{100 * a:.2f}" for a in s["worst_case_accuracy"]),
            f"**{100 * s['worst_case_mean']:.2f}**",
            *(
                f"{100 * m:.2f} / {100 * p:.2f}"
                for m, p in zip(s["budgeted_max_average"], s["budgeted_exit_policy"])
            ),
            *(f"{f:.2f}x" for f in s["slowdown_factor"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    caption = (
        "\nStrong suite: worst case per sample over max-average, average, single-exit PGD "
        "and multi-exit APGD-CE / APGD-DLR / APGD-CW (accuracy %, a sample counts only if it "
        "survives every attack); budgeted (deployed) accuracy % under the paper's "
        "max-average examples and under the exit-policy attack, thresholds fitted on the "
        "clean validation split at MSDNet budget indices; slow-down: mean cost per sample "
        "under the slow-down attack over the clean mean cost.\n"
    )
    return "\n".join(lines) + "\n" + caption


def _sets_train_mode(items: list[str]) -> bool:
    return any(item.split("=", 1)[0].strip() == "attack.train_mode" for item in items)


def _run_all(args: argparse.Namespace, methods: list[str], root: Path) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for method in methods:
        print(f"[{method}] {args.setting}: training and evaluating ...", file=sys.stderr)
        result = run_method(args, method, root)
        if result is not None:
            results[method] = result
    return results


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.nproc_per_node < 1:
        parser.error(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
    if args.paired and (args.train_attack is not None or _sets_train_mode(args.set)):
        parser.error(
            "--paired trains with both attacks itself; drop --train-attack and "
            "--set attack.train_mode"
        )
    methods = args.methods or DEFAULT_METHODS.get(args.setting, PAPER_METHODS)
    results: dict[str, dict[str, Any]] = {}
    summary_name = "summary"
    import train  # its errors map to train.py's exit codes

    try:
        if args.paired:
            by_attack: dict[str, dict[str, dict[str, Any]]] = {}
            for attack in TRAIN_ATTACKS:
                attack_args = argparse.Namespace(**{**vars(args), "train_attack": attack})
                attack_root = setting_root(attack_args)
                by_attack[attack] = _run_all(attack_args, methods, attack_root)
            results = paired_results(by_attack)
            root = setting_root(argparse.Namespace(**{**vars(args), "train_attack": None}))
            summary_name = "summary-paired"
        else:
            root = setting_root(args)
            results = _run_all(args, methods, root)
    except train.NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except (ConfigError, DatasetError, *train._EXIT_2_ERRORS, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        if "different configuration" in str(err):
            print(
                "(reproduce.py: pass --rerun to retrain it from scratch, or another --out-root)",
                file=sys.stderr,
            )
        return 2
    table = comparison_table(args.setting, results)
    if strong := strong_table(results):
        table += "\n" + strong
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{summary_name}.md").write_text(table)
    (root / f"{summary_name}.json").write_text(json.dumps(results, indent=2) + "\n")
    try:
        from neokd_losses.evaluation.plots import plot_budget_curves

        plot_budget_curves(
            {
                f"{r['method_name']}, {k}": c
                for r in results.values()
                for k, c in r["budget"].items()
                if not k.endswith(", ensemble") or k == "max-average, ensemble"
            },
            root / ("budget.png" if summary_name == "summary" else "budget-paired.png"),
            title=f"{args.setting}: budgeted prediction",
            cost_label="expected multiply-adds per sample",
        )
    except ImportError as err:  # matplotlib missing: the table is still there
        print(f"note: no figure ({err})", file=sys.stderr)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
