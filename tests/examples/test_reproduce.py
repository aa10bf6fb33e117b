"""reproduce.py: every method of a setting, reuse of finished runs, the paper-format table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import reproduce

from .conftest import TINY


def _fake_result(
    method: str,
    maxavg: list[float],
    avg: list[float],
    clean: list[float],
    matrix: list[list[float]],
) -> dict:
    def anytime(per_exit: list[float]) -> dict:
        return {"per_exit": per_exit, "mean": sum(per_exit) / len(per_exit)}

    off = [matrix[i][j] for i in range(len(matrix)) for j in range(len(matrix)) if i != j]
    return {
        "method_name": reproduce.PAPER_NAMES[method],
        "num_exits": len(maxavg),
        "anytime": {
            "clean": anytime(clean),
            "max-average": anytime(maxavg),
            "average": anytime(avg),
        },
        "transferability": {"off_diagonal_mean": sum(off) / len(off), "count": "clean-correct"},
        "samples": {"test": 10},
        "attack": {"eps": 0.3, "eval_steps": 50},
        "train_attack": "max-average",
        "epochs": 150,
        "device": "cpu",
    }


def test_comparison_table_in_paper_format() -> None:
    results = {
        "adv": _fake_result("adv", [0.5, 0.6], [0.4, 0.5], [0.9, 1.0], [[1.0, 0.25], [0.75, 1.0]]),
        "neokd": _fake_result(
            "neokd", [0.7, 0.8], [0.6, 0.7], [0.8, 0.9], [[1.0, 0.1], [0.2, 1.0]]
        ),
    }
    table = reproduce.comparison_table("mnist_smallcnn", results).splitlines()
    assert table[0] == (
        "| Method | max-avg exit 1 | max-avg exit 2 | **max-avg mean** | avg exit 1 | avg exit 2 | **avg mean** "
        "| clean mean | transfer (off-diag, success rate) |"
    )
    assert (
        table[2]
        == "| Adv. w/o distill | 50.00 | 60.00 | **55.00** | 40.00 | 50.00 | **45.00** | 95.00 | 50.00 |"
    )
    assert (
        table[3]
        == "| NEO-KD | 70.00 | 80.00 | **75.00** | 60.00 | 70.00 | **65.00** | 85.00 | 15.00 |"
    )
    text = "\n".join(table)
    assert "| NEO-KD | 94.49 | 93.50 |" in text  # the paper's MNIST row is printed below
    assert "| LW | 92.12 | 91.95 |" in text  # ... with the LW baseline's
    assert "Pairing: both test attacks on the models trained with the max-average attack" in text
    assert "among the samples the evaluated exit classifies correctly on clean inputs" in text


def test_paired_table_takes_each_test_attack_from_its_training_attack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    trained: list[tuple[str, Path]] = []

    def fake_run(args, method: str, root: Path) -> dict:
        trained.append((method, root))
        if root.name == "train-average":  # the model trained with the average attack
            r = _fake_result(method, [0.1, 0.2], [0.8, 0.9], [0.5, 0.5], [[1, 0], [0, 1]])
            return {**r, "train_attack": "average", "budget": {}}
        r = _fake_result(method, [0.6, 0.7], [0.3, 0.4], [0.9, 0.9], [[1, 0.2], [0.4, 1]])
        return {**r, "budget": {}}

    monkeypatch.setattr(reproduce, "run_method", fake_run)
    from neokd_losses.evaluation import plots

    monkeypatch.setattr(plots, "plot_budget_curves", lambda *args, **kwargs: None)
    argv = ["mnist_smallcnn", "--methods", "adv", "neokd", "--out-root", str(tmp_path)]
    assert reproduce.main([*argv, "--paired"]) == 0
    root = tmp_path / "mnist_smallcnn"
    assert trained == [
        ("adv", root),
        ("neokd", root),
        ("adv", root / "train-average"),
        ("neokd", root / "train-average"),
    ]
    summary = (root / "summary-paired.md").read_text()
    assert capsys.readouterr().out.strip() == summary.strip()
    # max-average columns from the max-average model, average columns from the average one;
    # clean accuracy and transfer from the max-average model.
    assert "| NEO-KD | 60.00 | 70.00 | **65.00** | 80.00 | 90.00 | **85.00** | 90.00 | 30.00 |" in (
        summary
    )
    assert "Pairing: each test attack on the model trained with the same attack" in summary
    assert "models trained with each attack" in summary
    assert not (root / "summary.md").exists()
    with pytest.raises(SystemExit):
        reproduce.main([*argv, "--paired", "--train-attack", "average"])
    assert "--paired trains with both attacks itself" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        reproduce.main([*argv, "--paired", "--set", "attack.train_mode=average"])


def test_reproduce_runs_each_method_then_reuses_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["digits", "--out-root", str(tmp_path), "--no-progress"]
    for key, value in TINY.items():
        argv += ["--set", f"{key}={json.dumps(value)}"]
    assert reproduce.main(argv) == 0
    captured = capsys.readouterr()
    summary = (tmp_path / "digits" / "summary.md").read_text()
    assert captured.out.strip() == summary.strip()
    rows = [
        line
        for line in summary.splitlines()
        if line.startswith("| Adv.") or line.startswith("| NEO-KD")
    ]
    assert len(rows) == 2
    assert (tmp_path / "digits" / "budget.png").stat().st_size > 0
    for method in ("adv", "neokd"):
        assert (tmp_path / "digits" / method / "results.json").is_file()
    saved = json.loads((tmp_path / "digits" / "summary.json").read_text())
    assert set(saved) == {"adv", "neokd"}
    # Second call: nothing is retrained, the same table comes back.
    assert reproduce.main(argv) == 0
    again = capsys.readouterr()
    assert again.err.count("reusing finished run") == 2 and again.out == captured.out
    # A changed evaluation setting re-evaluates the finished runs without retraining them.
    assert reproduce.main([*argv, "--set", "eval.budget_points=2", "--methods", "adv"]) == 0
    capsys.readouterr()
    adv = json.loads((tmp_path / "digits" / "adv" / "results.json").read_text())
    assert len(adv["budget"]["clean"]["accuracies"]) == 2
    assert len((tmp_path / "digits" / "adv" / "log.jsonl").read_text().splitlines()) == 1
    # A changed training setting is not silently reused: the old run is refused on resume.
    assert reproduce.main([*argv, "--set", "optim.lr=0.5", "--methods", "adv"]) == 2
    assert "different configuration" in capsys.readouterr().err
    # Average-attack training (a documented command) runs beside the max-average runs.
    before = (tmp_path / "digits" / "adv" / "results.json").read_text()
    assert reproduce.main([*argv, "--train-attack", "average", "--methods", "adv"]) == 0
    assert "models trained with the average attack" in capsys.readouterr().out
    average = tmp_path / "digits" / "train-average"
    assert json.loads((average / "adv" / "results.json").read_text())["train_attack"] == "average"
    assert (average / "summary.md").is_file()
    assert (tmp_path / "digits" / "adv" / "results.json").read_text() == before
    assert "Adv. w/o distill" in (tmp_path / "digits" / "summary.md").read_text()


def test_torchrun_launch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--nproc-per-node: torchrun on a free local port, --overwrite first, --resume after."""
    calls: list[list[str]] = []

    def fake_call(cmd: list[str]) -> int:
        calls.append(cmd)
        out_dir = Path(cmd[cmd.index("--out-dir") + 1])
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "checkpoint.pt").write_bytes(b"")
        result = _fake_result("adv", [0.5, 0.6], [0.4, 0.5], [0.9, 1.0], [[1.0, 0.2], [0.3, 1.0]])
        (out_dir / "results.json").write_text(json.dumps({**result, "budget": {}}))
        return 0

    monkeypatch.setattr(reproduce.subprocess, "call", fake_call)
    monkeypatch.setattr(reproduce, "_finished", lambda out_dir, config: False)
    from neokd_losses.evaluation import plots

    monkeypatch.setattr(plots, "plot_budget_curves", lambda *args, **kwargs: None)
    argv = ["digits", "--methods", "adv", "--out-root", str(tmp_path), "--nproc-per-node", "2"]
    assert reproduce.main(argv) == 0
    assert reproduce.main([*argv, "--train-attack", "average"]) == 0
    assert reproduce.main(argv) == 0
    first, average, again = calls
    assert first[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert first[-1] == "--overwrite" and again[-1] == "--resume"
    assert first[first.index("--out-dir") + 1] == str(tmp_path / "digits" / "adv")
    assert average[average.index("--out-dir") + 1] == str(
        tmp_path / "digits" / "train-average" / "adv"
    )
    assert average[-1] == "--overwrite"


def test_bad_nproc_per_node_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(["digits", "--nproc-per-node", "0", "--out-root", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--nproc-per-node must be >= 1, got 0" in capsys.readouterr().err


def test_training_failures_keep_train_py_exit_codes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import train

    def diverge(*args: Any, **kwargs: Any) -> Any:
        raise train.NonFiniteLossError("non-finite loss (nan) at epoch 1, batch index 0")

    monkeypatch.setattr(train, "run", diverge)
    argv = ["digits", "--methods", "adv", "--out-root", str(tmp_path)]
    assert reproduce.main(argv) == 3
    assert "error: non-finite loss (nan)" in capsys.readouterr().err

    def unwritable(*args: Any, **kwargs: Any) -> Any:
        raise train.OutputError(f"cannot write {tmp_path}: Permission denied")

    monkeypatch.setattr(train, "run", unwritable)
    assert reproduce.main(argv) == 2
    assert "error: cannot write" in capsys.readouterr().err
