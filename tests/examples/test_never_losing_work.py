"""Never losing work: crashes and signals in the reference loop's windows (issue 17).

A crash is simulated by raising ``Killed`` (a BaseException, so no ``except Exception``
of the loop handles it, like kill -9) from a monkeypatched write; signals are sent with
``signal.raise_signal`` from hooks. Each test compares against an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path
from typing import Any

import _checkpoint
import _evaluate
import _methods
import pytest
import torch
import train
from _config import Config
from _logging import RunLog, read_log

from .conftest import DIGITS, TINY

RESUME = {"optim__epochs": 2, "data__train_cap": 64, "loss__method": "neokd"}  # 4 batches per epoch


class Killed(BaseException):
    """Stands in for kill -9 at the point where it is raised."""


def _weights(config: Config) -> dict[str, torch.Tensor]:
    return _checkpoint.load(config.out_dir / train.CHECKPOINT)["model"]


def _log(config: Config) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in e.items() if k != "seconds"} for e in read_log(config.out_dir / train.LOG)
    ]


def _same_run(got: Config, ref: Config) -> None:
    a, b = _weights(ref), _weights(got)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _log(got) == _log(ref)


def _run(config: Config, **kwargs: Any) -> train.Outcome:
    kwargs = {"progress": False, "quiet": True, "evaluate": False, **kwargs}
    return train.run(config, **kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Config:
    import _config

    values = {**TINY, **{k.replace("__", "."): v for k, v in RESUME.items()}}
    values["run.out_dir"] = str(tmp_path_factory.mktemp("ref") / "reference")
    config = _config.load(DIGITS, values)
    assert _run(config).status == "finished"
    return config


def _count_calls(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, on_call: Any) -> None:
    """Wrap ``owner.name``: ``on_call(n, original, *args)`` decides what call n does."""
    original = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return on_call(calls["n"], original, *args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


# 1. -------------------------------------------------------- log and checkpoint agree


@pytest.mark.parametrize("window", ["before the checkpoint rename", "after the checkpoint rename"])
def test_crash_around_the_epoch_checkpoint_leaves_log_and_checkpoint_agreeing(
    tiny_config: Any, reference: Config, monkeypatch: pytest.MonkeyPatch, window: str
) -> None:
    config = tiny_config("crashed", **RESUME)

    def kill_second(n: int, original: Any, *args: Any, **kwargs: Any) -> Any:
        if n == 2:  # epoch 2's checkpoint, resp. epoch 2's log line
            raise Killed
        return original(*args, **kwargs)

    if window == "before the checkpoint rename":
        _count_calls(monkeypatch, _checkpoint, "save_atomic", kill_second)
    else:
        _count_calls(monkeypatch, RunLog, "record", kill_second)
    with pytest.raises(Killed):
        _run(config)
    monkeypatch.undo()
    saved = _checkpoint.load(config.out_dir / train.CHECKPOINT)
    on_disk = read_log(config.out_dir / train.LOG)
    assert len(on_disk) <= saved["epoch"]  # the log never runs ahead of the checkpoint
    assert _run(config, resume=True).status == "finished"
    _same_run(config, reference)  # one line per epoch, none twice


# 2. ------------------------------------------------- the NaN stop saves the batch's start


def test_resuming_from_the_non_finite_stop_continues_the_same_run(
    tiny_config: Any, reference: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    def nan_on_sixth(n: int, original: Any, self: Any, *args: Any) -> Any:
        total, terms = original(self, *args)
        return (total * math.nan if n == 6 else total), terms  # epoch 2, batch index 1

    _count_calls(monkeypatch, _methods.Criterion, "__call__", nan_on_sixth)
    config = tiny_config("nan", **RESUME)
    with pytest.raises(train.NonFiniteLossError, match="epoch 2, batch index 1"):
        _run(config)
    monkeypatch.undo()
    saved = _checkpoint.load(config.out_dir / train.CHECKPOINT)
    assert (saved["epoch"], saved["batch"]) == (1, 1)
    # Without the NaN, the resumed run is the uninterrupted one: the attack's random
    # start, the loss's and torch's RNG restart from where that batch began.
    assert _run(config, resume=True).status == "finished"
    _same_run(config, reference)


# 3. ------------------------------------------------------- fewer epochs than trained


def test_resume_with_fewer_epochs_than_trained_is_refused(
    tiny_config: Any, reference: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny_config("stopped", **RESUME)

    def stop(epoch: int, batch: int) -> None:
        if (epoch, batch) == (1, 1):
            signal.raise_signal(signal.SIGTERM)

    assert _run(config, hooks=train.Hooks(after_step=stop)).exit_code == 143
    shorter = tiny_config("stopped", **{**RESUME, "optim__epochs": 1})
    with pytest.raises(
        train.ResumeError,
        match=r"optim.epochs = 1: it has already trained 1 epoch\(s\) and 2 batch\(es\) of "
        r"epoch 2. Pass --epochs 2 or more",
    ):
        _run(shorter, resume=True)
    finished = tiny_config("reference-copy", **{**RESUME, "optim__epochs": 1})
    _run(finished)
    # A finished run resumed with its own epochs is evaluated as it is, and says so.
    outcome = train.run(finished, resume=True, progress=False, evaluate=True)
    assert outcome.status == "finished" and outcome.results is not None
    assert outcome.results["epochs"] == 1
    assert "finished after 1 epoch(s): evaluating it as it is" in capsys.readouterr().err


# 4. ------------------------------------ a signal after the last step still ends the run


def test_signal_in_the_last_checkpoint_window_and_during_evaluation(
    tiny_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config("last")

    def signal_while_saving(n: int, original: Any, payload: Any, path: Any) -> Any:
        if payload.get("finished"):
            signal.raise_signal(signal.SIGTERM)  # arrives while the final checkpoint is written
        return original(payload, path)

    _count_calls(monkeypatch, _checkpoint, "save_atomic", signal_while_saving)
    outcome = _run(config, evaluate=True)
    monkeypatch.undo()
    assert (outcome.status, outcome.exit_code) == ("interrupted", 143)
    assert _checkpoint.load(config.out_dir / train.CHECKPOINT)["finished"]
    assert not (config.out_dir / "results.json").exists()

    # The evaluation is interrupted at once by a signal, and removes what it half wrote.
    def signal_during(n: int, original: Any, *args: Any, **kwargs: Any) -> Any:
        (config.out_dir / "results.md").write_text("half written")
        signal.raise_signal(signal.SIGINT)
        raise AssertionError("the signal did not interrupt the evaluation")

    _count_calls(monkeypatch, _evaluate, "evaluate", signal_during)
    outcome = _run(config, resume=True, evaluate=True)
    monkeypatch.undo()
    assert (outcome.status, outcome.exit_code) == ("interrupted", 130)
    assert not (config.out_dir / "results.md").exists()

    outcome = _run(config, resume=True, evaluate=True)  # evaluates the saved training
    assert outcome.status == "finished" and outcome.exit_code == 0
    assert json.loads((config.out_dir / "results.json").read_text())["epochs"] == 1


# 5. ---------------------------------------------------------------- atomic overwrite


def test_overwrite_deletes_the_old_checkpoint_before_training(
    tiny_config: Any, reference: Config
) -> None:
    config = tiny_config("overwritten", **RESUME)
    _run(config)

    def crash(epoch: int, batch: int) -> None:
        raise Killed

    with pytest.raises(Killed):
        _run(config, overwrite=True, hooks=train.Hooks(after_step=crash))
    # No old finished checkpoint beside the new config: --resume has nothing to "finish".
    assert not (config.out_dir / train.CHECKPOINT).exists()
    assert not (config.out_dir / train.LOG).exists()
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        _run(config, resume=True)
    assert _run(config).status == "finished"  # a plain start is allowed again
    _same_run(config, reference)


# 9. ------------------------------------------------------- stale temporary checkpoints


def test_stale_temporary_checkpoints_are_removed_on_start_and_resume(tiny_config: Any) -> None:
    config = tiny_config("stale")
    config.out_dir.mkdir(parents=True)
    stale = config.out_dir / ".checkpoint.pt.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    mine = config.out_dir / ".notes.tmp"  # not a checkpoint temporary: left alone
    mine.write_text("user file")
    seen: list[bool] = []
    hooks = train.Hooks(before_training=lambda model: seen.append(stale.exists()))
    _run(config, hooks=hooks)
    assert seen == [False] and mine.exists()
    stale.write_bytes(b"again")
    extended = tiny_config("stale", optim__epochs=2)
    _run(extended, resume=True, hooks=hooks)
    assert seen == [False, False]
    assert [p.name for p in config.out_dir.glob(".checkpoint.pt.*")] == []


# 10. ------------------------------------------------------------------ smaller points


def test_resume_and_overwrite_together_are_refused(tiny_config: Any) -> None:
    with pytest.raises(train.ResumeError, match="--resume and --overwrite contradict"):
        _run(tiny_config(), resume=True, overwrite=True)


def test_extending_a_run_updates_config_toml(tiny_config: Any) -> None:
    import _config

    config = tiny_config("extend")
    _run(config)
    assert _config.load(config.out_dir / "config.toml").optim.epochs == 1
    _run(tiny_config("extend", optim__epochs=2), resume=True)
    assert _config.load(config.out_dir / "config.toml").optim.epochs == 2


def test_checkpoint_has_the_same_file_mode_as_the_other_files(tiny_config: Any) -> None:
    config = tiny_config("modes")
    _run(config)
    modes = {
        name: (config.out_dir / name).stat().st_mode & 0o777
        for name in ("checkpoint.pt", "log.jsonl", "config.toml")
    }
    assert len(set(modes.values())) == 1, modes


def test_cli_refuses_resume_with_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert train.main(["--resume", "--overwrite", "--out-dir", str(tmp_path / "x")]) == 2
    assert "--resume and --overwrite contradict" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
