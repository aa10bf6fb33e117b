"""Atomic checkpoints that load with ``weights_only=True`` and restore every RNG stream.

A checkpoint holds only tensors and primitive containers (dict, list, tuple, str, int,
float, bool, None), so ``torch.load(..., weights_only=True)`` accepts it: RNG states of
numpy and Python's ``random`` are converted to tensors and lists, the LR scheduler's
``Counter`` of milestones to a plain dict. It is written to a temporary file in the same
directory, flushed to disk and renamed over the old one, so a crash mid-write never
leaves a truncated checkpoint; it gets the mode of any file the process creates
(``0o666`` less the umask, like ``config.toml`` and the log), not ``mkstemp``'s 0600.
A temporary file left by a killed write (``.checkpoint.pt.*.tmp``) is removed by
:func:`remove_stale_temporaries` when the run starts or resumes.
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


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or is not one of this training loop's."""


def _file_mode() -> int:
    """``0o666`` less the process umask: the mode ``open(path, "w")`` gives a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def temporary_files(path: str | Path) -> list[Path]:
    """The temporary files :func:`save_atomic` creates beside ``path`` (left by a kill)."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.is_dir() else []


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete the temporary files of earlier writes of ``path``; return what was removed."""
    removed = temporary_files(path)
    for tmp in removed:
        tmp.unlink(missing_ok=True)
    return removed


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
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load a checkpoint on the CPU with ``weights_only=True``; check its format and keys.

    Args:
        path: the checkpoint file.
        required: keys the payload must have.

    Raises:
        FileNotFoundError: if there is no checkpoint at ``path``.
        CheckpointError: (a ValueError) if the file cannot be read, is not a checkpoint of
            this training loop, or lacks a required key; the message names the file and
            what is wrong, in one paragraph.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {str(path)!r}; run without --resume to start fresh."
        )
    advice = "Start a new run with --overwrite or another --out-dir."
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any failure to unpickle means the same here
        # torch's own message suggests weights_only=False, which is unsafe for a file of
        # unknown origin: keep only the kind of failure.
        kind = type(err).__name__
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({kind}: truncated, corrupted, or not "
            f"a torch file holding only tensors and plain containers). {advice}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{path} is not a checkpoint of examples/train.py (format {FORMAT_VERSION} "
            f"expected, found {found!r}). {advice}"
        )
    missing = [key for key in required if key not in payload]
    if missing:
        raise CheckpointError(
            f"{path} is incomplete: it lacks the key(s) {', '.join(map(repr, missing))}. {advice}"
        )
    return payload
