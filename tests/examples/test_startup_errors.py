"""What stops a run with exit code 2 and one line: invalid values, bad run directories,
corrupt checkpoints, failed writes (issue 17, items 6-8), all before any data is loaded
when they can be known then, and without touching the disk for invalid settings."""

from __future__ import annotations

import errno
import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import _checkpoint
import pytest
import torch
import train

from .conftest import EXAMPLES, TINY


def _argv(out_dir: Path, *extra: str) -> list[str]:
    argv = ["--out-dir", str(out_dir), "--no-progress", "--no-eval"]
    for key, value in TINY.items():
        argv += ["--set", f"{key}={json.dumps(value)}"]
    return [*argv, *extra]


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.fixture
def no_data_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the run gets as far as loading data."""

    def refuse(*args: Any) -> Any:
        raise AssertionError("the data was loaded before the error was found")

    monkeypatch.setattr(train, "build_splits", refuse)


# 8. ---------------------------------------------------------- values that cannot work


@pytest.mark.parametrize(
    ("flags", "key", "value"),
    [
        (["--lr", "nan"], "optim.lr", "nan"),
        (["--lr", "inf"], "optim.lr", "inf"),
        (["--set", "optim.momentum=inf"], "optim.momentum", "inf"),
        (["--set", "optim.momentum=1.5"], "optim.momentum", "1.5"),
        (["--set", "attack.eps=nan"], "attack.eps", "nan"),
        (["--set", "attack.step_size=nan"], "attack.step_size", "nan"),
        (["--set", "optim.weight_decay=-inf"], "optim.weight_decay", "-inf"),
        (["--set", "loss.neokd.exit_weights=[1.0, 1.0]"], "loss.neokd.exit_weights", "[1.0, 1.0]"),
        (["--set", "loss.neokd.alpha=nan"], "loss.neokd", "nan"),
    ],
)
def test_settings_that_cannot_work_are_refused_at_start_up(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_data_loading: None,
    flags: list[str],
    key: str,
    value: str,
) -> None:
    out = tmp_path / "run"
    assert train.main(_argv(out, *flags)) == 2
    err = _one_error_line(capsys)
    assert key in err and value in err, err
    if key == "attack.step_size":
        assert "alpha" not in err  # the config's name, not the library's
    if key == "loss.neokd.exit_weights":
        assert "3 exits" in err and "[1.0, 1.0, 1.0]" in err
    assert not out.exists()  # nothing was written


def test_missing_mnist_without_network_is_refused_without_creating_folders(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    no_data_loading: None,
) -> None:
    monkeypatch.setattr(train, "_mnist_mirrors_reachable", lambda timeout=3.0: False)
    data, out = tmp_path / "mnist", tmp_path / "run"
    argv = [
        "--config",
        str(EXAMPLES / "configs" / "mnist_smallcnn.toml"),
        "--data-dir",
        str(data),
        "--out-dir",
        str(out),
    ]
    assert train.main(argv) == 2
    err = _one_error_line(capsys)
    assert "`data.data_dir`" in err and str(data) in err and "no MNIST mirror" in err
    assert not data.exists() and not out.exists()
    assert train.main([*argv, "--set", "data.download=false"]) == 2
    assert "`data.download` is false" in _one_error_line(capsys)


# 7. -------------------------------------------------------------- the run directory


def test_out_dir_that_is_a_file_or_below_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_data_loading: None
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert train.main(_argv(blocker)) == 2
    assert f"{blocker}' is a file, not a folder" in _one_error_line(capsys)
    assert train.main(_argv(blocker / "run")) == 2
    assert f"is below {blocker}, which is a file" in _one_error_line(capsys)


def test_unwritable_out_dir(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    no_data_loading: None,
) -> None:
    # (chmod does not stop root, who runs CI: the write itself is made to fail.)
    def denied(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(train.tempfile, "mkstemp", denied)
    out = tmp_path / "run"
    assert train.main(_argv(out)) == 2
    assert f"{out}' is not writable: Permission denied" in _one_error_line(capsys)


def test_full_disk_during_a_checkpoint_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(obj: Any, handle: Any) -> None:
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "run"
    assert train.main(_argv(out)) == 2
    err = _one_error_line(capsys)
    assert f"cannot write {out / 'checkpoint.pt'}: No space left on device" in err
    assert sorted(p.name for p in out.iterdir()) == ["config.toml"]  # nothing half-written


# 6. ------------------------------------------------------------- corrupt checkpoints


class _NotATensor:
    pass


def _corrupt(path: Path, kind: str) -> str:
    """Write a broken checkpoint at ``path``; return what the message must say."""
    good = _checkpoint.load(path)
    if kind == "garbage":
        path.write_bytes(b"\x00 this is not a checkpoint \xff" * 10)
        return "is not a readable checkpoint"
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
        return "is not a readable checkpoint"
    if kind == "pickled object":
        path.write_bytes(pickle.dumps({"format": 1, "model": _NotATensor()}, protocol=2))
        return "is not a readable checkpoint"
    if kind == "missing key":
        del good["model"]
        torch.save(good, path)
        return "lacks the key(s) 'model'"
    if kind == "other format":
        torch.save({**good, "format": 99}, path)
        return "format 1 expected, found 99"
    if kind == "wrong weights":
        good["model"] = {k: v[..., :1] for k, v in good["model"].items()}
        torch.save(good, path)
        return "does not fit this run (RuntimeError: Error(s) in loading state_dict"
    raise AssertionError(kind)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train.main(_argv(out)) == 0
    return out


@pytest.mark.parametrize(
    "kind",
    ["garbage", "truncated", "pickled object", "missing key", "other format", "wrong weights"],
)
def test_corrupt_checkpoint_gives_one_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], finished_run: Path, kind: str
) -> None:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    capsys.readouterr()
    expected = _corrupt(out / "checkpoint.pt", kind)
    assert train.main(_argv(out, "--resume")) == 2
    err = _one_error_line(capsys)
    assert str(out / "checkpoint.pt") in err and expected in err, err
    assert "weights_only" not in err  # never the advice to unpickle an untrusted file
    assert "--overwrite" in err
