"""``--tensorboard DIR``: the epoch log and the final results as TensorBoard scalars."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import train
from _logging import read_log

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="tensorboard is not installed (pip install 'neokd-losses[examples]')",
)


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_epochs_and_results_are_written_as_scalars(tiny_config: Any, tmp_path: Path) -> None:
    board = tmp_path / "tb"
    config = tiny_config(optim__epochs=2, run__tensorboard=str(board))
    outcome = train.run(config, progress=False, quiet=True)
    assert outcome.results is not None
    scalars = _scalars(board)
    log = read_log(config.out_dir / train.LOG)
    assert [step for step, _ in scalars["train/loss"]] == [1, 2]
    for entry in log:
        step = entry["epoch"]
        at = {tag: dict(points).get(step) for tag, points in scalars.items()}
        assert at["train/loss"] == pytest.approx(entry["loss"], rel=1e-6)
        assert at["train/lr"] == pytest.approx(entry["lr"], rel=1e-6)
        for k in range(3):
            assert at[f"train/clean_acc/exit{k + 1}"] == pytest.approx(
                entry["train_clean_acc"][k], abs=1e-6
            )
            assert at[f"train/adv_acc/exit{k + 1}"] == pytest.approx(
                entry["train_adv_acc"][k], abs=1e-6
            )
        for name, value in entry["terms"].items():
            assert at[f"train/terms/{name}"] == pytest.approx(value, rel=1e-5)
    for name, row in outcome.results["anytime"].items():
        for k, value in enumerate(row["per_exit"]):
            assert dict(scalars[f"eval/{name}/exit{k + 1}"]) == {2: pytest.approx(value, abs=1e-6)}
        assert dict(scalars[f"eval/{name}/mean"])[2] == pytest.approx(row["mean"], abs=1e-6)
    transfer = outcome.results["transferability"]["off_diagonal_mean"]
    assert dict(scalars["eval/transferability/off_diagonal_mean"])[2] == pytest.approx(
        transfer, abs=1e-6
    )


def test_the_flag_sets_the_config_key() -> None:
    args = train.build_parser().parse_args(["--tensorboard", "runs/tb"])
    assert train.overrides_from_args(args)["run.tensorboard"] == "runs/tb"


def test_missing_tensorboard_is_a_start_up_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import fails
    out = tmp_path / "run"
    assert train.main(["--tensorboard", str(tmp_path / "tb"), "--out-dir", str(out)]) == 2
    assert "needs the tensorboard package: pip install tensorboard" in capsys.readouterr().err
    assert not out.exists()
