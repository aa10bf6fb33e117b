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


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "bss,kd"], "--methods must be a comma-separated subset of bss"),
        (["--epochs", "-1"], "--epochs must be >= 0, got -1"),
        (["--eps", "-0.1"], "--eps must be in [0, 1]"),
        (["--eps", "8"], "--eps must be in [0, 1]"),
        (["--step-size", "0"], "--step-size must be a finite number > 0, got 0.0"),
        (["--temperature", "0"], "--temperature must be a finite number > 0"),
        (["--student-lr", "-1"], "--student-lr must be a finite number > 0"),
        (["--lr", "inf"], "--lr must be a finite number > 0"),
        (["--test-size", "0"], "--test-size must be in [1, 1796]"),
        (["--test-size", "1797"], "--test-size must be in [1, 1796]"),
        (["--max-train", "0"], "--max-train must be >= 1, got 0"),
        (["--student-width", "0"], "--student-width must be >= 1, got 0"),
    ],
)
def test_bad_arguments_are_refused_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        distill_bss_ab.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
