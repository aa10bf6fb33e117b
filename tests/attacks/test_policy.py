"""The exit-policy attack: the deployed decision against a naive loop, the relaxation, and
its strength against max-average PGD on the deployed accuracy of a small trained model."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neokd_losses.attacks import ExitPolicyAttack, MultiExitPGD, deployed_decision
from neokd_losses.attacks.policy import firing_weights
from neokd_losses.evaluation import exit_assignment, exit_proportions, fit_thresholds
from tests.helpers import TinyMultiExit


@functools.cache
def trained_digits() -> tuple[nn.Module, Tensor, Tensor, Tensor, Tensor]:
    """A 3-exit CNN trained for 60 steps on sklearn's 8×8 digits: (model, xv, yv, xt, yt).

    Validation: 300 samples; test: 200 samples (images in [0, 1], (N, 1, 8, 8)).
    """
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    torch.manual_seed(0)
    model = TinyMultiExit(num_classes=10, width=8)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    train_x, train_y = x[500:], y[500:]
    g = torch.Generator().manual_seed(1)
    for _ in range(60):
        idx = torch.randint(0, train_x.shape[0], (128,), generator=g)
        loss = sum(F.cross_entropy(z, train_y[idx]) for z in model(train_x[idx]))
        opt.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        opt.step()
    model.eval()
    return model, x[:300], y[:300], x[300:500], y[300:500]


def _naive_decision(logits: Tensor, thresholds: list[float]) -> tuple[list[int], list[int]]:
    exits, answers = [], []
    for n in range(logits.shape[1]):
        for k in range(logits.shape[0]):
            p = logits[k, n].softmax(-1)
            if k == logits.shape[0] - 1 or float(p.max()) >= thresholds[k]:
                exits.append(k)
                answers.append(int(p.argmax()))
                break
    return exits, answers


def test_deployed_decision_matches_a_naive_loop_and_exit_assignment() -> None:
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(3, 40, 4, generator=g)
    thresholds = [0.7, 0.9, 0.95]
    exits, answers = deployed_decision(logits, thresholds)
    ref_exits, ref_answers = _naive_decision(logits, thresholds)
    assert exits.tolist() == ref_exits and answers.tolist() == ref_answers
    assert torch.equal(exits, exit_assignment(logits, torch.tensor(thresholds)))


def test_deployed_decision_ties_at_fitted_thresholds_equal_exit_assignment() -> None:
    # A threshold fitted on float32 logits is one sample's float32 confidence: that
    # sample must leave (confidence >= T) in the deployed rule as in exit_assignment.
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        logits = (2 * torch.randn(3, 200, 5, generator=g)).to(dtype)
        confidence = (
            logits.float().softmax(-1).amax(-1)
            if dtype != torch.float64
            else (logits.softmax(-1).amax(-1))
        )
        for n in range(0, 200, 7):
            thresholds = [float(confidence[0, n]), float(confidence[1, n]), 0.0]
            exits, _ = deployed_decision(logits, thresholds)
            assert torch.equal(exits, exit_assignment(logits, thresholds)), (dtype, n)
            assert int(exits[n]) == 0, (dtype, n)


def test_firing_weights_naive_formula_and_limit() -> None:
    g = torch.Generator().manual_seed(1)
    logits = 2 * torch.randn(3, 10, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.6, 0.8, 0.3], dtype=torch.float64)
    tau = 0.05
    w = firing_weights(logits, t, tau)
    for n in range(10):
        s = [torch.sigmoid((logits[k, n].softmax(-1).max() - t[k]) / tau) for k in range(2)]
        s.append(torch.tensor(1.0, dtype=torch.float64))
        expected = [s[0], s[1] * (1 - s[0]), (1 - s[0]) * (1 - s[1])]
        torch.testing.assert_close(w[:, n], torch.stack(expected))
    torch.testing.assert_close(w.sum(0), torch.ones(10, dtype=torch.float64))
    sharp = firing_weights(logits, t, 1e-6).argmax(0)
    assert torch.equal(sharp, deployed_decision(logits, t.tolist())[0])


def test_thresholds_must_match_the_exits() -> None:
    model = TinyMultiExit(num_classes=5)
    atk = ExitPolicyAttack(model, [0.5, 0.5], eps=0.1, alpha=0.05, steps=1)
    with pytest.raises(ValueError, match="one threshold per exit of the model: it has 3 exits"):
        atk(torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    good = ExitPolicyAttack(model, [0.5, 0.5, 0.0], eps=0.1, alpha=0.05, steps=1)
    with pytest.raises(ValueError, match="`labels` must lie in \\[0, 5\\)"):
        good(torch.rand(2, 1, 8, 8), torch.tensor([0, 9]))
    with pytest.raises(ValueError, match="`loss`"):
        ExitPolicyAttack(model, [0.5, 0.5, 0.0], loss=("ce", "dlr"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`thresholds`"):
        ExitPolicyAttack(model, "0.5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NaN"):
        ExitPolicyAttack(model, [0.5, float("nan"), 0.0])
    with pytest.raises(ValueError, match="`tau\\[1\\]`"):
        ExitPolicyAttack(model, [0.5, 0.5, 0.0], tau=(0.1, 0.0))


def test_bound_range_determinism_and_input_untouched() -> None:
    torch.manual_seed(0)
    model = TinyMultiExit(num_classes=5).eval()
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 5, (6,))
    copy = x.clone()
    for norm, eps in (("Linf", 0.1), ("L2", 0.5)):
        runs = [
            ExitPolicyAttack(
                model,
                [0.3, 0.3, 0.0],
                eps=eps,
                alpha=eps / 4,
                steps=4,
                norm=norm,  # type: ignore[arg-type]
                generator=torch.Generator().manual_seed(3),
            )(x, y)
            for _ in range(2)
        ]
        assert torch.equal(runs[0], runs[1])
        d = (runs[0] - x).flatten(1)
        dist = d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)
        assert float(dist.max()) <= eps + 1e-6
        assert 0 <= float(runs[0].min()) and float(runs[0].max()) <= 1
    assert torch.equal(x, copy)


def test_at_least_as_strong_as_max_average_on_the_deployed_accuracy() -> None:
    model, xv, _, xt, yt = trained_digits()
    with torch.no_grad():
        val = torch.stack(model(xv))
        clean = torch.stack(model(xt))
    eps, steps = 0.1, 10
    clean_acc = []
    for p in (10, 30):
        t = fit_thresholds(val, exit_proportions(p, 3)).tolist()
        _, answer = deployed_decision(clean, t)
        clean_acc.append(float((answer == yt).float().mean()))
        pgd = MultiExitPGD(
            model,
            eps=eps,
            alpha=2.5 * eps / steps,
            steps=steps,
            generator=torch.Generator().manual_seed(0),
        )
        policy = ExitPolicyAttack(
            model,
            t,
            eps=eps,
            alpha=2.5 * eps / steps,
            steps=steps,
            generator=torch.Generator().manual_seed(0),
        )
        with torch.no_grad():
            _, answer_pgd = deployed_decision(torch.stack(model(pgd(xt, yt))), t)
            _, answer_policy = deployed_decision(torch.stack(model(policy(xt, yt))), t)
        acc_pgd = float((answer_pgd == yt).float().mean())
        acc_policy = float((answer_policy == yt).float().mean())
        assert acc_policy <= acc_pgd, (p, acc_policy, acc_pgd)
        assert acc_policy < clean_acc[-1]
    assert min(clean_acc) > 0.6  # the model did learn: the comparison is meaningful


def test_deployed_decision_is_the_answer_of_the_staged_early_exit_classifier() -> None:
    from neokd_losses.inference import EarlyExitClassifier
    from neokd_losses.models import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN().eval()
    nn.init.normal_(model.block3[-1].weight, std=0.05)  # the last layer starts at zero
    x = torch.rand(32, 1, 28, 28)
    with torch.no_grad():
        logits = torch.stack(model(x))
    confidence = logits.softmax(-1).amax(-1)
    for thresholds in ([0.5, 0.5, 0.0], confidence.median(1).values.tolist()):
        exits, answers = deployed_decision(logits, thresholds)
        with torch.no_grad():
            out = EarlyExitClassifier(model, thresholds)(x)
        assert torch.equal(exits, out.exit_index) and torch.equal(answers, out.prediction)
