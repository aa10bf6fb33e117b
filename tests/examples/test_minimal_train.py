"""examples/minimal_train.py: short, self-contained, and it trains."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "minimal_train.py"


def test_is_short_and_needs_only_the_installed_packages() -> None:
    source = SCRIPT.read_text(encoding="utf-8")
    assert len(source.splitlines()) <= 80
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module is not None
            imported.add(node.module.split(".")[0])
    assert imported <= {"argparse", "torch", "sklearn", "neokd_losses"}, imported


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_trains_and_evaluates_every_exit(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("minimal_train", SCRIPT)
    assert spec is not None and spec.loader is not None
    module: Any = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = ["--epochs", "2", "--train-size", "640", "--batch-size", "16", "--steps", "1"]
    results = module.main([*args, "--eval-steps", "2"])

    assert list(results) == ["clean", "PGD max-average", "PGD average"]
    clean = results["clean"]
    assert len(clean.accuracies) == 3 and clean.num_samples == 500
    # Two short epochs lift the mean clean accuracy well above chance (10 %) ...
    assert clean.mean > 0.2
    # ... and the attacks lower it.
    for name in ("PGD max-average", "PGD average"):
        assert results[name].mean < clean.mean
    out = capsys.readouterr().out
    assert "epoch 2/2" in out and "| PGD max-average |" in out
