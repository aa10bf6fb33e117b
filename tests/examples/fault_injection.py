"""Fault injection for the reference loop: kill -9 at random moments, resume, compare.

    python tests/examples/fault_injection.py --trials 20 [--seed 0] [--sigterm] [--work DIR]

A reference run of a short digits setting trains uninterrupted. Each trial starts the
same run in its own directory and kills it with SIGKILL at a uniformly random moment of
its training: from the moment the run directory is prepared (``config.toml`` appears)
to the moment the reference wrote its last log line (plus 10 %), so kills land in steps,
checkpoint writes and log writes alike. It then resumes the run (``--resume`` when a checkpoint exists, a plain
start otherwise) and requires the uninterrupted run's exact weights, the same log (times
aside), a finished checkpoint that loads with ``weights_only=True``, and no temporary
checkpoint file left. With ``--sigterm`` every second trial sends SIGTERM instead (a
graceful stop, which checkpoints in the middle of an epoch: exit 143 expected). Prints
one line per trial and ``N trials, F failures``; exits 1
on any failure. ``tests/examples/test_fault_injection.py`` runs it with 2 trials.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SETTINGS = {
    "data.train_cap": "64",
    "data.val_size": "24",
    "data.test_size": "24",
    "optim.batch_size": "16",
    "optim.epochs": "2",
    "attack.train_steps": "1",
}


def command(out_dir: Path, epochs: int, resume: bool = False) -> list[str]:
    cmd = [sys.executable, str(EXAMPLES / "train.py"), "--out-dir", str(out_dir)]
    cmd += ["--no-progress", "--no-eval", "--epochs", str(epochs)]
    for key, value in SETTINGS.items():
        if key != "optim.epochs":
            cmd += ["--set", f"{key}={value}"]
    return [*cmd, "--resume"] if resume else cmd


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def start(out_dir: Path, epochs: int, resume: bool = False) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command(out_dir, epochs, resume),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=_env(),
    )


def wait_for_training(proc: subprocess.Popen[bytes], out_dir: Path) -> float:
    """Block until the run has prepared its directory (or ended); return that moment."""
    while not (out_dir / "config.toml").exists() and proc.poll() is None:
        time.sleep(0.005)
    return time.monotonic()


def finish(out_dir: Path, epochs: int) -> str | None:
    """Resume (or start, without a checkpoint) until done; an error message or None."""
    resume = (out_dir / "checkpoint.pt").exists()
    proc = subprocess.run(command(out_dir, epochs, resume), capture_output=True, env=_env())
    if proc.returncode != 0:
        return f"resume exited {proc.returncode}: {proc.stderr.decode()[-500:]}"
    return None


def _log(out_dir: Path, whole_lines_only: bool = False) -> list[dict[str, Any]]:
    import json

    path = out_dir / "log.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    # (a line being appended right now may be incomplete: only whole lines count)
    return [
        {k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines if x.endswith("}")
    ]


def compare(got: Path, ref: Path) -> str | None:
    """Why the run in ``got`` differs from the reference in ``ref`` (None if it does not)."""
    try:
        a = torch.load(ref / "checkpoint.pt", map_location="cpu", weights_only=True)
        b = torch.load(got / "checkpoint.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable checkpoint is a failure
        return f"checkpoint unreadable: {type(err).__name__}"
    if not b.get("finished"):
        return f"checkpoint not finished (epoch {b.get('epoch')}, batch {b.get('batch')})"
    if a["model"].keys() != b["model"].keys():
        return "weights have different keys"
    differ = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    if differ:
        return f"weights differ: {', '.join(differ[:3])}"
    if _log(got) != _log(ref):
        return f"log differs: {len(_log(got))} lines, reference {len(_log(ref))}"
    leftovers = sorted(p.name for p in got.glob(".checkpoint.pt.*.tmp"))
    if leftovers:
        return f"temporary files left: {', '.join(leftovers)}"
    return None


def where(out_dir: Path) -> str:
    """What the killed run left: the checkpoint position and the log length."""
    path = out_dir / "checkpoint.pt"
    try:
        lines: Any = len(_log(out_dir))
    except ValueError:
        lines = "a broken"
    if not path.exists():
        return f"no checkpoint, {lines} log line(s)"
    try:
        c = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        return f"unreadable checkpoint ({type(err).__name__})"
    return f"checkpoint at epoch {c['epoch']} batch {c['batch']}, {lines} log line(s)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=int(SETTINGS["optim.epochs"]))
    parser.add_argument("--sigterm", action="store_true", help="odd trials send SIGTERM")
    parser.add_argument("--work", help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        ref = work / "reference"
        proc = start(ref, args.epochs)
        began = wait_for_training(proc, ref)
        while proc.poll() is None and len(_log(ref, whole_lines_only=True)) < args.epochs:
            time.sleep(0.005)
        duration = 1.1 * (time.monotonic() - began)
        _, stderr = proc.communicate()
        if proc.returncode != 0:
            print(f"reference run failed ({proc.returncode}): {stderr.decode()[-800:]}")
            return 1
        print(f"reference: {args.epochs} epochs, training {duration:.2f}s", flush=True)
        failures = 0
        for trial in range(args.trials):
            out = work / f"trial{trial}"
            delay = rng.uniform(0, duration)
            proc = start(out, args.epochs)
            began = wait_for_training(proc, out)
            while proc.poll() is None and time.monotonic() - began < delay:
                time.sleep(0.002)
            sig = signal.SIGTERM if args.sigterm and trial % 2 else signal.SIGKILL
            sent = proc.poll() is None
            if sent:
                proc.send_signal(sig)
            code = proc.wait()
            left = where(out)
            problem = None
            if sig == signal.SIGTERM and sent and code not in (0, 143):
                problem = f"exit code {code} after SIGTERM (143 or 0 expected)"
            problem = problem or finish(out, args.epochs) or compare(out, ref)
            failures += problem is not None
            what = f"{sig.name} sent" if sent else f"finished before {sig.name}"
            print(
                f"trial {trial}: {what} after {delay:.2f}s ({left}): {problem or 'ok'}", flush=True
            )
        print(f"{args.trials} trials, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
