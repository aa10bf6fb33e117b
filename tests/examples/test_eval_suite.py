"""The examples' extra evaluation: real early-exit timing and ``--eval-suite strong``."""

from __future__ import annotations

import json
from typing import Any

import _evaluate
import pytest
import reproduce
import torch
import train
from _models import DigitsCNN, Normalized, NormalizedStaged, build_model

from neokd_losses.evaluation import budgeted_accuracy, exit_proportions, fit_thresholds
from neokd_losses.models import is_staged


def test_digits_cnn_is_staged_and_its_forward_is_unchanged() -> None:
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        h1 = model.block1(x)
        h2 = model.block2(h1)
        expected = [model.head1(h1), model.head2(h2), model.block3(h2)]
        got = model(x)
    assert is_staged(model)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert isinstance(build_model("digits_cnn", 10, 1, [0.5], [0.25]), NormalizedStaged)
    unstaged = build_model("msdnet_cifar10", 10, 3, [0.5] * 3, [0.25] * 3)
    assert type(unstaged) is Normalized or is_staged(unstaged)


def test_normalized_staged_forwards_the_split_stages_of_the_model_it_wraps() -> None:
    # MSDNet splits its stages, so the wrapper does (with the normalization in block 0);
    # DigitsCNN does not, so neither does its wrapper. Attacks agree with the plain path.
    from neokd_losses.attacks import MultiExitPGD
    from neokd_losses.models import MSDNet, has_exit_split

    torch.manual_seed(0)
    inner = MSDNet(num_classes=5, num_blocks=3, base=2, step=1, num_channels=8).double().eval()
    wrapped = NormalizedStaged(inner, [0.5] * 3, [0.25] * 3)
    assert has_exit_split(wrapped) and not has_exit_split(
        NormalizedStaged(DigitsCNN(), [0.5], [0.25])
    )
    x, y = torch.rand(3, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 4])
    state = block = x
    for index in range(3):
        state, logits = wrapped.forward_stage(index, state)
        block = wrapped.forward_block(index, block)
        assert torch.equal(wrapped.forward_exit(index, block), logits)
    plain = Normalized(inner, [0.5] * 3, [0.25] * 3)
    runs = [
        MultiExitPGD(
            net, eps=0.05, alpha=0.02, steps=2, generator=torch.Generator().manual_seed(1)
        )(x, y)
        for net in (wrapped, plain)
    ]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=1e-12)


def test_early_exit_timing_matches_the_simulated_budgeted_accuracy() -> None:
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    val, test = torch.rand(40, 1, 8, 8), torch.rand(30, 1, 8, 8)
    labels = torch.randint(0, 10, (30,))
    with torch.no_grad():
        val_logits = torch.stack(model(val))
        test_logits = torch.stack(model(test))
    costs = [1.0, 3.0, 6.0]
    rows = _evaluate.early_exit_timing(model, test, labels, val_logits, costs, batch_size=7)
    assert isinstance(rows, list) and [r["budget_index"] for r in rows] == [10, 20, 30]
    for row in rows:
        q = exit_proportions(row["budget_index"], 3)
        thresholds = fit_thresholds(val_logits, q)
        accuracy, mean_cost = budgeted_accuracy(test_logits, labels, thresholds, costs)
        assert row["accuracy"] == pytest.approx(accuracy, abs=1e-12)
        assert row["mean_cost"] == pytest.approx(mean_cost, rel=1e-9)
        assert row["predicted_speedup"] == pytest.approx(6.0 / mean_cost)
        assert row["early_exit_seconds"] > 0 and row["full_forward_seconds"] > 0


def test_early_exit_timing_skips_a_model_without_stages() -> None:
    class Plain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            return [self.fc(x), self.fc(x)]

    why = _evaluate.early_exit_timing(
        Plain(), torch.rand(4, 4), torch.zeros(4), torch.zeros(2, 4, 3), [1.0, 2.0], 4
    )
    assert isinstance(why, str) and "forward_stage" in why


def test_strong_suite_lands_in_results_and_the_summary_table(tiny_config: Any) -> None:
    config = tiny_config(eval__suite="strong")
    outcome = train.run(config, progress=False, quiet=True)
    assert outcome.status == "finished"
    results = json.loads((config.out_dir / "results.json").read_text())
    assert results["eval_suite"] == "strong"
    summary = results["strong"]["summary"]
    assert len(summary["worst_case_accuracy"]) == 3
    assert summary["budgets"] == [10, 20, 30]
    assert all(f >= 1 for f in summary["slowdown_factor"])
    # The worst case can only be lower than the clean and the paper's attacks' accuracy.
    for name in ("clean", "max-average", "average"):
        per_exit = results["anytime"][name]["per_exit"]
        assert all(w <= a + 1e-12 for w, a in zip(summary["worst_case_accuracy"], per_exit))
    assert [r["budget_index"] for r in results["early_exit"]] == [10, 20, 30]
    text = (config.out_dir / "results.md").read_text()
    assert "Strong evaluation suite" in text and "Real early exit" in text
    table = reproduce.strong_table({"neokd": results})
    assert "worst-case mean" in table and table.count("\n|") >= 2


def test_eval_suite_flag_and_config_value() -> None:
    args = train.build_parser().parse_args(["--eval-suite", "strong"])
    assert train.overrides_from_args(args)["eval.suite"] == "strong"
    import _config

    with pytest.raises(_config.ConfigError, match="eval.suite"):
        _config.load(reproduce.CONFIGS / "digits.toml", {"eval.suite": "strongest"})
