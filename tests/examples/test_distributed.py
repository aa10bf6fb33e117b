"""DistributedDataParallel through torchrun: 2 CPU processes with the gloo backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import _checkpoint
import _config
import pytest
import torch
import train
from _data import build_splits
from _distributed import DistEnv
from _logging import read_log
from _models import build_model

from .conftest import DIGITS, EXAMPLES, TINY


def test_two_process_gloo_run(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    sets = [f"{k}={json.dumps(v)}" for k, v in TINY.items()]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(EXAMPLES / "train.py"),
        "--config",
        str(DIGITS),
        "--method",
        "neokd",
        "--out-dir",
        str(out),
        "--no-progress",
        "--device",
        "cpu",
    ]
    for item in sets:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2
    # Each rank evaluated half of the 24 test samples; the counts are summed over ranks.
    assert {r["num_samples"] for r in results["anytime"].values()} == {24}
    assert results["transferability"]["num_samples"] == 24
    # Only rank 0 writes: one log line for the one epoch, covering all 48 training samples.
    (entry,) = read_log(out / "log.jsonl")
    assert entry["samples"] == 48

    # The all-reduced clean accuracy equals a single-process count with the saved weights.
    config = _config.load(DIGITS, dict(TINY))
    splits = build_splits(config.data)
    model = build_model(config.model.name, splits.num_classes, splits.in_channels)
    model.load_state_dict(_checkpoint.load(out / "checkpoint.pt")["model"])
    images = torch.stack([splits.test[i][0] for i in range(len(splits.test))])
    labels = torch.tensor([splits.test[i][1] for i in range(len(splits.test))])
    with torch.no_grad():
        correct = [int((z.argmax(1) == labels).sum()) for z in model.eval()(images)]
    assert results["anytime"]["clean"]["correct"] == correct
    # Real early exit: predictions compared with the labels of the same images (the
    # gathered logits are in rank order, the images in dataset order).
    from neokd_losses.evaluation import exit_proportions, fit_thresholds
    from neokd_losses.inference import EarlyExitClassifier

    val_images = torch.stack([splits.val[i][0] for i in range(len(splits.val))])
    with torch.no_grad():
        val_logits = torch.stack(model(val_images))
        for row in results["early_exit"]:
            q = exit_proportions(row["budget_index"], val_logits.shape[0])
            classifier = EarlyExitClassifier(model, fit_thresholds(val_logits, q))
            accuracy = float((classifier(images).prediction == labels).double().mean())
            assert abs(row["accuracy"] - accuracy) <= 1 / len(labels) + 1e-12, (row, accuracy)
    saved = _checkpoint.load(out / "checkpoint.pt")
    assert saved["world_size"] == 2 and len(saved["ranks"]) == 2
    # Both ranks keep their own RNG streams (different attack random starts).
    assert not torch.equal(
        saved["ranks"][0]["generators"]["attack"], saved["ranks"][1]["generators"]["attack"]
    )

    # The same command again: the existing run is refused on every rank (decided on rank 0
    # and broadcast), printed once, and no rank dies waiting for another.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert again.returncode != 0
    assert again.stderr.count("already holds a checkpoint; pass --resume") == 1, again.stderr
    assert "Connection closed by peer" not in again.stderr
    assert "exitcode  : 2" in again.stderr  # the workers exit 2 (torchrun then prints its
    assert 'train.py", line' not in again.stderr  # own summary), with no traceback of theirs


def test_mid_epoch_resume_with_another_world_size_is_refused(tiny_config) -> None:
    config = tiny_config()
    env = DistEnv(rank=0, local_rank=0, world_size=2, device=torch.device("cpu"))
    ckpt = {"identity": config.training_identity(), "batch": 2, "epoch": 0, "world_size": 1}
    with pytest.raises(
        train.ResumeError,
        match=r"in the middle of epoch 1 with 2 process\(es\): it was saved with 1",
    ):
        train.check_resumable(ckpt, config, env, Path("ckpt.pt"))
    train.check_resumable(
        {**ckpt, "batch": 0}, config, env, Path("ckpt.pt")
    )  # epoch boundary: fine
