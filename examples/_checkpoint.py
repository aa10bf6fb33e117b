"""Atomic checkpoints that load with ``weights_only=True`` and restore every RNG stream.

A checkpoint holds only tensors and primitive containers (dict, list, tuple, str, int,
float, bool, None), so ``torch.load(..., weights_only=True)`` accepts it: RNG states of
numpy and Python's ``random`` are converted to tensors and lists, the LR scheduler's
``Counter`` of milestones to a plain dict. It is written to a temporary file in the same
directory, flushed to disk and renamed over the old one, so a crash mid-write never
leaves a truncated checkpoint.
"""

from __future__ import annotations

import collections
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1


def capture_rng() -> dict[str, Any]:
    """The global RNG states of torch (CPU and every CUDA device), numpy and ``random``."""
    np_state = np.random.get_state()  # noqa: NPY002
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng` captured (CUDA states only when devices match)."""
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    n = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            "MT19937",
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def scheduler_state(scheduler: Any) -> dict[str, Any]:
    """A scheduler's state dict with ``Counter`` values turned into plain dicts."""
    return {
        k: dict(v) if isinstance(v, collections.Counter) else v
        for k, v in scheduler.state_dict().items()
    }


def load_scheduler_state(scheduler: Any, state: dict[str, Any]) -> None:
    """Inverse of :func:`scheduler_state` (MultiStepLR needs its milestones as a Counter)."""
    fixed = dict(state)
    if isinstance(fixed.get("milestones"), dict):
        fixed["milestones"] = collections.Counter(fixed["milestones"])
    scheduler.load_state_dict(fixed)


def save_atomic(payload: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU with ``weights_only=True``; check its format version.

    Raises:
        FileNotFoundError: if there is no checkpoint at ``path``.
        ValueError: if the file is not a checkpoint of this training loop.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {str(path)!r}; run without --resume to start fresh."
        )
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(
            f"{path} is not a checkpoint of examples/train.py (format {FORMAT_VERSION} "
            f"expected, found {found!r})."
        )
    return payload
