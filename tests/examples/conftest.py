"""Fixtures for the examples/ tests: the examples folder on sys.path and tiny digits configs."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DIGITS = EXAMPLES / "configs" / "digits.toml"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

# A few batches of digits, one-step attacks, tiny evaluation: seconds per run.
TINY: dict[str, Any] = {
    "data.train_cap": 48,
    "data.val_size": 24,
    "data.test_size": 24,
    "optim.batch_size": 16,
    "optim.epochs": 1,
    "attack.train_steps": 1,
    "attack.eval_steps": 1,
    "eval.batch_size": 64,
    "eval.budget_points": 3,
    "eval.plots": False,
}


@pytest.fixture
def tiny_config(tmp_path: Path) -> Callable[..., Any]:
    """``tiny_config(**overrides)`` -> a validated digits Config writing under tmp_path.

    Keyword names use ``__`` for the dot: ``tiny_config(optim__epochs=2)``.
    """
    import _config

    def make(name: str = "run", **overrides: Any) -> Any:
        values = dict(TINY)
        values["run.out_dir"] = str(tmp_path / name)
        values.update({k.replace("__", "."): v for k, v in overrides.items()})
        return _config.load(DIGITS, values)

    return make
