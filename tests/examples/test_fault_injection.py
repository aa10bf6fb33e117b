"""The fault-injection script in CI: a few kill -9 trials, then its own comparison checked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from . import fault_injection


def test_kill_nine_and_sigterm_at_random_moments_then_resume_is_exact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        fault_injection.main(["--trials", "2", "--seed", "3", "--sigterm", "--work", str(tmp_path)])
        == 0
    )
    out = capsys.readouterr().out
    assert "2 trials, 0 failures" in out and out.count(": ok") == 2, out

    # The comparison it relies on does see a difference in the weights and in the log.
    ref, trial = tmp_path / "reference", tmp_path / "trial0"
    assert fault_injection.compare(trial, ref) is None
    ckpt = torch.load(trial / "checkpoint.pt", weights_only=True)
    name = next(iter(ckpt["model"]))
    ckpt["model"][name] = ckpt["model"][name] + 1e-6
    torch.save(ckpt, trial / "checkpoint.pt")
    assert fault_injection.compare(trial, ref) == f"weights differ: {name}"
    torch.save(torch.load(ref / "checkpoint.pt", weights_only=True), trial / "checkpoint.pt")
    with (trial / "log.jsonl").open("a") as handle:
        handle.write('{"epoch": 2}\n')
    assert fault_injection.compare(trial, ref) == "log differs: 3 lines, reference 2"
