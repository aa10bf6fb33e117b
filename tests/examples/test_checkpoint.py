"""Checkpoints: atomic writes, weights_only loading, RNG and scheduler round trips."""

from __future__ import annotations

import random
from pathlib import Path

import _checkpoint
import numpy as np
import pytest
import torch


def test_rng_round_trip_through_a_weights_only_file(tmp_path: Path) -> None:
    state = _checkpoint.capture_rng()
    expected = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    _checkpoint.save_atomic({"format": _checkpoint.FORMAT_VERSION, "rng": state}, tmp_path / "c.pt")
    torch.rand(5), np.random.rand(7), random.random()  # noqa: NPY002  (advance every stream)
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)
    _checkpoint.restore_rng(loaded["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    assert torch.equal(expected[0], again[0])
    np.testing.assert_array_equal(expected[1], again[1])
    assert expected[2] == again[2]


def test_multistep_scheduler_state_survives_weights_only_load(tmp_path: Path) -> None:
    def make() -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.MultiStepLR]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4], gamma=0.5)

    opt, sched = make()
    opt.step()
    sched.step()
    _checkpoint.save_atomic(
        {"format": _checkpoint.FORMAT_VERSION, "s": _checkpoint.scheduler_state(sched)},
        tmp_path / "s.pt",
    )
    opt2, sched2 = make()
    _checkpoint.load_scheduler_state(sched2, _checkpoint.load(tmp_path / "s.pt")["s"])
    lrs = []
    for _ in range(5):
        opt2.step()
        sched2.step()
        lrs.append(opt2.param_groups[0]["lr"])
    # epochs 2..6: halved at 2 and at 4 (closed form lr = 0.5 ** #milestones passed)
    assert lrs == [0.5, 0.5, 0.25, 0.25, 0.25]


def test_save_is_atomic_and_leaves_no_temporary_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ckpt.pt"
    _checkpoint.save_atomic({"format": _checkpoint.FORMAT_VERSION, "x": torch.arange(3)}, path)

    def broken_save(obj: object, handle: object) -> None:
        handle.write(b"partial")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        _checkpoint.save_atomic({"format": _checkpoint.FORMAT_VERSION, "x": torch.arange(5)}, path)
    monkeypatch.undo()
    assert torch.equal(_checkpoint.load(path)["x"], torch.arange(3))  # the old checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        _checkpoint.load(tmp_path / "none.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(
        ValueError, match=r"not a checkpoint of examples/train.py \(format 1 expected, found None\)"
    ):
        _checkpoint.load(tmp_path / "other.pt")


def test_checkpoint_file_mode_is_that_of_any_new_file(tmp_path: Path) -> None:
    _checkpoint.save_atomic({"format": _checkpoint.FORMAT_VERSION}, tmp_path / "c.pt")
    (tmp_path / "plain.txt").write_text("x")  # what open() gives under this umask
    mode = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == mode


def test_stale_temporaries_of_this_file_only_are_removed(tmp_path: Path) -> None:
    names = [".c.pt.abc123.tmp", ".c.pt.x.tmp", ".other.pt.abc.tmp", "c.pt", ".c.pt.keep"]
    for name in names:
        (tmp_path / name).write_text("x")
    removed = _checkpoint.remove_stale_temporaries(tmp_path / "c.pt")
    assert sorted(p.name for p in removed) == [".c.pt.abc123.tmp", ".c.pt.x.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".c.pt.keep", ".other.pt.abc.tmp", "c.pt"]
    assert _checkpoint.remove_stale_temporaries(tmp_path / "missing" / "c.pt") == []


def test_unreadable_files_are_one_checkpoint_error(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(
        _checkpoint.CheckpointError, match=r"junk.pt is not a readable checkpoint"
    ) as info:
        _checkpoint.load(tmp_path / "junk.pt")
    assert "weights_only" not in str(info.value) and info.value.__cause__ is None
    torch.save({"format": _checkpoint.FORMAT_VERSION}, tmp_path / "part.pt")
    with pytest.raises(_checkpoint.CheckpointError, match=r"lacks the key\(s\) 'model', 'epoch'"):
        _checkpoint.load(tmp_path / "part.pt", required=("model", "epoch"))
