"""SIGINT / SIGTERM: the handler itself, and a real signal sent to a training process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import _checkpoint
import _config
import pytest
import train
from _signals import StopRequest

from .conftest import DIGITS, EXAMPLES, TINY


def test_stop_request_flags_first_signal_and_restores_handlers() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert not stop.requested
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested and stop.received == signal.SIGTERM and stop.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is before


def test_second_sigint_interrupts_at_once() -> None:
    with StopRequest() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.exit_code == 130
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)


def test_sigterm_to_a_training_process_saves_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = {**TINY, "optim.epochs": 500}
    cmd = [
        sys.executable,
        str(EXAMPLES / "train.py"),
        "--config",
        str(DIGITS),
        "--out-dir",
        str(out),
        "--no-progress",
    ]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while (
            not (out / "log.jsonl").is_file()
            and time.monotonic() < deadline
            and proc.poll() is None
        ):
            time.sleep(0.1)
        assert (out / "log.jsonl").is_file(), "no epoch finished in time"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr[-2000:]
    assert "stopped by signal 15" in stderr and "Continue with --resume" in stderr
    saved = _checkpoint.load(out / "checkpoint.pt")
    assert saved["epoch"] >= 1 and not saved["finished"]
    # Shorten the run to the epoch in progress and finish it (epochs may change on resume).
    config = _config.load(
        DIGITS, {**overrides, "optim.epochs": saved["epoch"] + 1, "run.out_dir": str(out)}
    )
    outcome = train.run(config, resume=True, progress=False, quiet=True, evaluate=False)
    assert outcome.status == "finished" and _checkpoint.load(out / "checkpoint.pt")["finished"]
