"""Status messages, the JSON-lines epoch log and optional TensorBoard scalars (rank 0 only).

``log.jsonl`` is a view of the checkpoint: every checkpoint carries the epoch entries
written so far, an entry is appended to the file only after the checkpoint that holds it
is in place, and a resumed run rewrites the file from its checkpoint (:meth:`RunLog.rewrite`),
so after any crash the log lists exactly the epochs that the checkpoint has trained.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class RunLog:
    """Writes one JSON object per line to ``path`` and status lines to stderr.

    On ranks other than 0 (``enabled=False``) both are silent.
    """

    def __init__(self, path: str | Path, *, enabled: bool = True, quiet: bool = False) -> None:
        self.path, self.enabled, self.quiet = Path(path), enabled, quiet

    def info(self, message: str) -> None:
        if not self.enabled or self.quiet:
            return
        try:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)
        except ImportError:  # pragma: no cover - tqdm is an examples dependency
            print(message, file=sys.stderr)

    def record(self, entry: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")

    def rewrite(self, entries: Sequence[dict[str, Any]]) -> None:
        """Replace the file by ``entries`` atomically (temporary file, then rename)."""
        if not self.enabled:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
        os.replace(tmp, self.path)


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """All entries of a JSON-lines log."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class TensorBoardLog:
    """Epoch entries and final results as TensorBoard scalars (``run.tensorboard``).

    Tags: ``train/loss``, ``train/lr``, ``train/clean_acc/exit<k>`` and
    ``train/adv_acc/exit<k>`` (k from 1, plus ``/mean``), ``train/terms/<name>`` at step =
    epoch; after the evaluation ``eval/<clean|max-average|average>/exit<k>`` and ``/mean``
    and ``eval/transferability/off_diagonal_mean`` at step = the number of epochs. A
    resumed run purges the events written after its checkpoint.
    """

    def __init__(self, folder: str | Path, *, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder), purge_step=purge_step)

    def _per_exit(self, prefix: str, values: Sequence[float], step: int) -> None:
        for k, value in enumerate(values, start=1):
            self.writer.add_scalar(f"{prefix}/exit{k}", value, step)
        if values:
            self.writer.add_scalar(f"{prefix}/mean", sum(values) / len(values), step)

    def epoch(self, entry: dict[str, Any]) -> None:
        step = int(entry["epoch"])
        self.writer.add_scalar("train/loss", entry["loss"], step)
        self.writer.add_scalar("train/lr", entry["lr"], step)
        self._per_exit("train/clean_acc", entry["train_clean_acc"], step)
        self._per_exit("train/adv_acc", entry["train_adv_acc"], step)
        for name, value in entry.get("terms", {}).items():
            self.writer.add_scalar(f"train/terms/{name}", value, step)
        self.writer.flush()

    def results(self, results: dict[str, Any], step: int) -> None:
        for name, row in results.get("anytime", {}).items():
            self._per_exit(f"eval/{name}", row.get("per_exit", []), step)
        transfer = results.get("transferability", {})
        if "off_diagonal_mean" in transfer:
            value = transfer["off_diagonal_mean"]
            self.writer.add_scalar("eval/transferability/off_diagonal_mean", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
