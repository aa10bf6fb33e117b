"""LW: adversarial cross-entropy of every exit plus λ Σ_i ||W_i||², against a naive loop."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from neokd_losses import LWLoss
from neokd_losses.functional import exit_classifiers, lw_loss
from neokd_losses.losses.lw import DEFAULT_LW_LAMBDA
from neokd_losses.models import MSDNet, SmallCNN, attach_exits
from tests.helpers import TinyMLPExits, random_exits


def _ce(z: list[float], label: int) -> float:
    top = max(z)
    return top + math.log(sum(math.exp(v - top) for v in z)) - z[label]


def ref_lw(adv, targets, weights, lam, gamma=None) -> list[list[float]]:
    """L_ij = γ_i (CE(z_i(x_j^adv), y_j) + λ Σ_{k,d} W_i[k, d]²), one entry at a time."""
    num_exits, batch = len(adv), adv[0].shape[0]
    gamma = gamma or [1.0] * num_exits
    rows = []
    for i in range(num_exits):
        penalty = sum(v * v for v in weights[i].flatten().tolist())
        rows.append(
            [
                gamma[i] * (_ce(adv[i][j].tolist(), int(targets[j])) + lam * penalty)
                for j in range(batch)
            ]
        )
    return rows


def _problem(num_exits=3, batch=5, classes=6, dtype=torch.float64):
    adv = random_exits(num_exits, batch, classes, dtype=dtype)
    targets = torch.randint(0, classes, (batch,))
    weights = [torch.randn(classes, 4 + i, dtype=dtype) for i in range(num_exits)]
    return adv, targets, weights


@pytest.mark.parametrize("num_exits", [1, 3, 5])
@pytest.mark.parametrize("lam", [0.0, DEFAULT_LW_LAMBDA, 0.3])
@pytest.mark.parametrize("gamma", [None, [1.0, 0.5, 2.0, 1.5, 1.5]])
def test_matches_naive(num_exits: int, lam: float, gamma: list[float] | None) -> None:
    adv, y, weights = _problem(num_exits)
    g = None if gamma is None else gamma[:num_exits]
    got = lw_loss(adv, y, weights, lambda_=lam, exit_weights=g, reduction="none")
    expected = torch.tensor(ref_lw(adv, y, weights, lam, g), dtype=torch.float64)
    torch.testing.assert_close(got, expected)


def test_reductions_add_the_penalty_once_per_sample() -> None:
    adv, y, weights = _problem(3, batch=4)
    lam = 0.2
    penalty = sum(float(w.square().sum()) for w in weights)
    ce = sum(
        torch.nn.functional.cross_entropy(a, y, reduction="sum").item() for a in adv
    )  # summed over exits and samples
    mean = lw_loss(adv, y, weights, lambda_=lam)
    total = lw_loss(adv, y, weights, lambda_=lam, reduction="sum")
    assert mean.item() == pytest.approx(ce / 4 + lam * penalty, rel=1e-12)
    assert total.item() == pytest.approx(ce + 4 * lam * penalty, rel=1e-12)


def test_linear_modules_and_their_weights_agree() -> None:
    model = TinyMLPExits(in_features=6, num_classes=4, num_exits=3, width=5).double()
    x, y = torch.randn(7, 6, dtype=torch.float64), torch.randint(0, 4, (7,))
    heads = list(model.heads)
    by_module = lw_loss(model(x), y, heads, lambda_=0.1)
    by_tensor = lw_loss(model(x), y, [h.weight for h in heads], lambda_=0.1)
    torch.testing.assert_close(by_module, by_tensor)
    by_module.backward()
    # The penalty's gradient is 2λW on top of the cross-entropy's; the bias is not penalized.
    with_penalty = [h.weight.grad.clone() for h in heads]
    bias_grad = [h.bias.grad.clone() for h in heads]
    model.zero_grad()
    lw_loss(model(x), y, heads, lambda_=0.0).backward()
    for h, g in zip(heads, with_penalty, strict=True):
        torch.testing.assert_close(g - h.weight.grad, 0.2 * h.weight.detach())
    for h, g in zip(heads, bias_grad, strict=True):
        torch.testing.assert_close(g, h.bias.grad)


def test_gradcheck() -> None:
    adv, y, weights = _problem(3, batch=3, classes=4)
    leaves = [t.requires_grad_(True) for t in [*adv, *weights]]

    def fn(*tensors):
        return lw_loss(
            list(tensors[:3]), y, list(tensors[3:]), lambda_=0.7, exit_weights=[1.0, 2.0, 0.5]
        )

    assert torch.autograd.gradcheck(fn, tuple(leaves))


def test_module_equals_function() -> None:
    adv, y, weights = _problem(3)
    criterion = LWLoss(lambda_=0.05, exit_weights=[1.0, 1.0, 1.5], reduction="sum")
    expected = lw_loss(adv, y, weights, lambda_=0.05, exit_weights=[1, 1, 1.5], reduction="sum")
    torch.testing.assert_close(criterion(adv, y, weights), expected)
    assert list(criterion.state_dict()) == ["exit_weights"]
    assert repr(LWLoss()) == f"LWLoss(lambda_={DEFAULT_LW_LAMBDA}, reduction='mean')"


def test_dtype_follows_logits_and_weights() -> None:
    adv, y, weights = _problem(3, dtype=torch.float32)
    assert lw_loss(adv, y, weights).dtype == torch.float32
    doubled = [w.double() for w in weights]
    assert lw_loss(adv, y, doubled).dtype == torch.float64
    half = lw_loss([a.bfloat16() for a in adv], y, weights)
    assert half.dtype == torch.float32


# --- exit_classifiers ---------------------------------------------------------------------


def test_exit_classifiers_small_cnn() -> None:
    model = SmallCNN(num_classes=7)
    found = exit_classifiers(model)
    assert found[0] is model.exit1[-1][-1]
    assert found[1] is model.exit2[-1][-1]
    assert found[2] is model.block3[-1]
    assert all(layer.out_features == 7 for layer in found)


def test_exit_classifiers_msdnet() -> None:
    model = MSDNet(5, 2, 1, 1, 4, growth_rate=2, gr_factor=(1, 2), bn_factor=(1, 2), image_size=16)
    found = exit_classifiers(model)
    assert found == [head.linear for head in model.heads]


def test_exit_classifiers_attached_exits_and_wrappers() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(64, 5)
    )
    model = attach_exits(net, ["1", "2"], num_classes=5, example_input=torch.zeros(1, 3, 8, 8))
    assert exit_classifiers(model) == [model.heads[0].linear, model.heads[1].linear]
    with_output = attach_exits(
        net, ["1"], num_classes=5, include_output=True, example_input=torch.zeros(1, 3, 8, 8)
    )
    assert exit_classifiers(with_output) == [with_output.heads[0].linear, net[-1]]
    assert exit_classifiers(nn.DataParallel(model)) == exit_classifiers(model)


def test_exit_classifiers_errors() -> None:
    with pytest.raises(TypeError, match=r"knows SmallCNN, MSDNet and AttachedExits.*TinyMLPExits"):
        exit_classifiers(TinyMLPExits())
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 9))
    model = attach_exits(
        net, ["1"], num_classes=5, include_output=True, example_input=torch.zeros(1, 3, 8, 8)
    )
    with pytest.raises(ValueError, match=r"maps to 9 features, not the model's 5 classes"):
        exit_classifiers(model)


# --- errors ---------------------------------------------------------------------------------


def test_input_errors() -> None:
    adv, y, weights = _problem(3)
    with pytest.raises(TypeError, match="must be a list of the E exit classifiers"):
        lw_loss(adv, y, weights[0])
    with pytest.raises(TypeError, match="must be a list of the E exit classifiers"):
        lw_loss(adv, y, nn.Linear(2, 3))
    with pytest.raises(ValueError, match="one classifier per exit: expected 3, got 2"):
        lw_loss(adv, y, weights[:2])
    with pytest.raises(TypeError, match=r"`classifiers\[1\]` must be an nn.Linear"):
        lw_loss(adv, y, [weights[0], nn.ReLU(), weights[2]])
    with pytest.raises(TypeError, match=r"`classifiers\[0\]`.*dtype torch.int64"):
        lw_loss(adv, y, [w.long() for w in weights])
    with pytest.raises(ValueError, match=r"must lie in \[0, 6\)"):
        lw_loss(adv, torch.full_like(y, 6), weights)
    with pytest.raises(ValueError, match="empty batch"):
        lw_loss([a[:0] for a in adv], y[:0], weights)


@pytest.mark.parametrize(
    ("value", "error"),
    [(-0.1, ValueError), (float("nan"), ValueError), ("0.1", TypeError), (True, TypeError)],
)
def test_lambda_errors(value: object, error: type[Exception]) -> None:
    adv, y, weights = _problem(3)
    with pytest.raises(error, match="`lambda_` must be"):
        lw_loss(adv, y, weights, lambda_=value)  # type: ignore[arg-type]
    with pytest.raises(error, match="`lambda_` must be"):
        LWLoss(lambda_=value)  # type: ignore[arg-type]
