"""Status messages and the JSON-lines epoch log (rank 0 only)."""

from __future__ import annotations

import json
import sys
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


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """All entries of a JSON-lines log."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
