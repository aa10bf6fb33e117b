"""Smoke test of examples/distill_bss_ab.py: every method end to end on a few digits."""

from __future__ import annotations

import pytest

pytest.importorskip("sklearn")

import distill_bss_ab  # noqa: E402  (examples/ is put on sys.path by conftest.py)

TINY = [
    "--teacher-epochs", "1", "--ab-epochs", "1", "--epochs", "1",
    "--max-train", "48", "--max-test", "16", "--batch-size", "24",
    "--train-steps", "1", "--eval-steps", "1",
]  # fmt: skip


def test_tiny_run_prints_every_method(capsys) -> None:
    results = distill_bss_ab.main(TINY)
    out = capsys.readouterr().out
    assert list(results) == list(distill_bss_ab.METHODS)
    for method, (clean, robust) in results.items():
        assert len(clean) == len(robust) == 3
        assert all(0.0 <= v <= 1.0 for v in clean + robust)
        assert f"| {method} |" in out
    assert "teacher (single exit)" in out


def test_bad_method_is_refused() -> None:
    with pytest.raises(SystemExit):
        distill_bss_ab.parse_args(["--methods", "bss,kd"])
    with pytest.raises(SystemExit):
        distill_bss_ab.parse_args(["--epochs", "-1"])
