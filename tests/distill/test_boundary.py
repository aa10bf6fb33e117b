"""Tests of BoundarySupportingAttack: the BSS step rule on linear models with closed-form
boundaries, the target sampling, and the torchattacks conventions."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from neokd_losses.attacks.exit_view import ExitView
from neokd_losses.distill.boundary import BoundarySupportingAttack, BoundarySupportingSamples
from tests.helpers import TinyMLPExits

OFFSET = 1e-4  # the 1e-4 of the BSS step rule


def _linear(weight: list[list[float]], bias: list[float], dtype=torch.float64) -> nn.Linear:
    layer = nn.Linear(len(weight[0]), len(weight), dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight, dtype=dtype))
        layer.bias.copy_(torch.tensor(bias, dtype=dtype))
    return layer


def _reference_walk(x0, w, c, b, k, eta, max_steps):
    """The BSS step rule for a linear model z = W x + c, in plain Python floats.

    L = z_b - z_k and ∇(z_k - z_b) = W_k - W_b = d are closed-form: every step moves
    η (L + 1e-4) along d / ‖d‖ and lowers L by η (L + 1e-4) ‖d‖.
    Returns the final point, the number of steps and the length of the last step.
    """
    d = [wk - wb for wk, wb in zip(w[k], w[b], strict=True)]
    norm = math.sqrt(sum(v * v for v in d))
    x = list(x0)

    def scores(point):
        return [
            sum(wi * xi for wi, xi in zip(row, point, strict=True)) + ci
            for row, ci in zip(w, c, strict=True)
        ]

    steps, last = 0, 0.0
    while steps < max_steps:
        z = scores(x)
        if max(range(len(z)), key=z.__getitem__) != b:
            break
        length = eta * (z[b] - z[k] + OFFSET)
        x = [xi + length * di / norm for xi, di in zip(x, d, strict=True)]
        steps, last = steps + 1, length
    z = scores(x)
    return x, steps, last, z[b] - z[k], norm


TWO_CLASS_W = [[1.0, -0.5, 0.25, 0.0], [-1.0, 0.5, 0.75, 0.5]]
TWO_CLASS_C = [0.3, -0.2]


@pytest.mark.parametrize(
    ("contraction", "max_steps"),
    [(0.9, 10), (1.6, 10), (0.5, 40), (0.2, 3)],
    ids=["few-steps", "one-overshooting-step", "many-steps", "step-cap"],
)
def test_step_rule_on_linear_model_matches_closed_form(contraction: float, max_steps: int) -> None:
    # η ‖d‖ = contraction: L + 1e-4 shrinks by (1 - contraction) per step.
    model = _linear(TWO_CLASS_W, TWO_CLASS_C)
    d_norm = math.dist(TWO_CLASS_W[0], TWO_CLASS_W[1])
    eta = contraction / d_norm
    x = torch.rand(12, 4, dtype=torch.float64)
    labels = model(x).argmax(1)
    atk = BoundarySupportingAttack(model, eta=eta, max_steps=max_steps, clip=False)
    bss = atk.generate(x, labels)
    assert bss.batch_index.tolist() == list(range(12))  # every input is "correct"
    for m in range(12):
        b = int(labels[m])
        k = 1 - b
        assert int(bss.target[m]) == k
        x_ref, steps, last, margin, norm = _reference_walk(
            x[m].tolist(), TWO_CLASS_W, TWO_CLASS_C, b, k, eta, max_steps
        )
        torch.testing.assert_close(bss.samples[m], torch.tensor(x_ref, dtype=torch.float64))
        assert int(bss.steps[m]) == steps
        assert bool(bss.crossed[m]) == (margin < 0)
        # Closed-form distance to the boundary z_b = z_k: |L| / ‖d‖.
        z = model(bss.samples[m : m + 1])[0].detach()
        distance = abs(float(z[b] - z[k])) / norm
        if bss.crossed[m]:
            assert float(z[k] - z[b]) > 0  # on the target side
            assert distance <= last + 1e-12  # within one step of the boundary
        else:
            assert steps == max_steps and float(z[b] - z[k]) >= 0


def test_samples_stop_just_across_the_boundary_in_many_classes() -> None:
    # Three classes; with targets drawn from all non-top classes the walk may leave b
    # toward another class, but it always stops right after leaving b.
    w = [[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]]
    model = _linear(w, [0.0, 0.0, 0.0])
    x = torch.rand(20, 3, dtype=torch.float64)
    labels = model(x).argmax(1)
    atk = BoundarySupportingAttack(model, eta=0.3, max_steps=30, sampling="all", clip=False)
    bss = atk.generate(x, labels)
    assert bss.samples.shape == (40, 3)
    assert bool(bss.crossed.all())
    for m in range(40):
        j = int(bss.batch_index[m])
        x_ref, steps, last, _, _ = _reference_walk(
            x[j].tolist(), w, [0.0] * 3, int(bss.base[m]), int(bss.target[m]), 0.3, 30
        )
        torch.testing.assert_close(bss.samples[m], torch.tensor(x_ref, dtype=torch.float64))
        assert int(bss.steps[m]) == steps
    assert bool((model(bss.samples).argmax(1) != bss.base).all())


def _non_top(logits: list[float], base: int) -> list[float]:
    e = [math.exp(v - max(logits)) for v in logits]
    p = [v / sum(e) for v in e]
    return [0.0 if k == base else p[k] / (1 - p[base]) for k in range(len(p))]


def test_sampling_frequencies_match_non_top_probabilities() -> None:
    model = _linear([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [-1.0, 0.2]], [1.0, 0.2, 0.4, 0.6])
    x = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]], dtype=torch.float64)
    labels = model(x).argmax(1)
    draws = 6000
    gen = torch.Generator().manual_seed(3)
    atk = BoundarySupportingAttack(model, max_steps=1, num_targets=draws, generator=gen)
    bss = atk.generate(x, labels)
    assert bss.samples.shape == (3 * draws, 2)
    torch.testing.assert_close(
        bss.weight, torch.full((3 * draws,), 1.0 / draws, dtype=torch.float64)
    )
    for j in range(3):
        rows = bss.batch_index == j
        assert int(rows.sum()) == draws
        p = _non_top(model(x[j : j + 1])[0].tolist(), int(labels[j]))
        counts = torch.bincount(bss.target[rows], minlength=4).double() / draws
        for k in range(4):
            sigma = math.sqrt(p[k] * (1 - p[k]) / draws)
            assert abs(float(counts[k]) - p[k]) <= 4 * sigma + 1e-12, (j, k, float(counts[k]), p[k])
        assert counts[int(labels[j])] == 0
        torch.testing.assert_close(
            bss.probability[rows], torch.tensor(p, dtype=torch.float64)[bss.target[rows]]
        )


def test_all_targets_weighted_by_non_top_probabilities() -> None:
    model = _linear([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [-1.0, 0.2]], [1.0, 0.2, 0.4, 0.6])
    x = torch.rand(5, 2, dtype=torch.float64)
    labels = model(x).argmax(1)
    bss = BoundarySupportingAttack(model, sampling="all", max_steps=2).generate(x, labels)
    assert bss.batch_index.tolist() == [j for j in range(5) for _ in range(3)]
    for j in range(5):
        rows = bss.batch_index == j
        b = int(labels[j])
        assert bss.target[rows].tolist() == [k for k in range(4) if k != b]
        p = _non_top(model(x[j : j + 1])[0].tolist(), b)
        expected = torch.tensor([p[k] for k in range(4) if k != b], dtype=torch.float64)
        torch.testing.assert_close(bss.weight[rows], expected)
        torch.testing.assert_close(bss.probability[rows], expected)
        torch.testing.assert_close(bss.weight[rows].sum(), torch.tensor(1.0, dtype=torch.float64))


def test_saturated_teacher_still_gives_valid_probabilities() -> None:
    model = _linear([[500.0, 0.0], [0.0, 0.0], [0.0, 1.0]], [0.0, 0.0, 0.0], dtype=torch.float32)
    x = torch.tensor([[1.0, 1.0]])  # logits (500, 0, 1)
    bss = BoundarySupportingAttack(model, sampling="all").generate(x, torch.tensor([0]))
    # softmax gives p_b == 1 exactly in float32; p_n^k is still 1/(1+e) and e/(1+e).
    torch.testing.assert_close(
        bss.probability, torch.tensor([1 / (1 + math.e), math.e / (1 + math.e)])
    )


def test_only_correctly_classified_inputs_are_bases() -> None:
    model = _linear(TWO_CLASS_W, TWO_CLASS_C)
    x = torch.rand(10, 4, dtype=torch.float64)
    pred = model(x).argmax(1)
    labels = pred.clone()
    labels[::3] = 1 - labels[::3]  # misclassified on purpose
    x_before = x.clone()
    atk = BoundarySupportingAttack(model, num_targets=2)
    bss = atk.generate(x, labels)
    kept = [j for j in range(10) if j % 3 != 0]
    assert bss.batch_index.tolist() == [j for j in kept for _ in range(2)]
    assert bool((bss.base == labels[bss.batch_index]).all())
    out = atk(x, labels)
    assert out.shape == x.shape
    torch.testing.assert_close(out[::3], x[::3])  # misclassified: unchanged
    assert bool((model(out[kept]).argmax(1) != labels[kept]).all())
    torch.testing.assert_close(x, x_before)  # the input is not mutated


def test_clip_keeps_samples_in_the_unit_box() -> None:
    # The boundary x0 = 2 lies outside [0, 1]: clipped samples cannot reach it.
    model = _linear([[-1.0, 0.0], [0.0, 0.0]], [2.0, 0.0])
    x = torch.rand(6, 2, dtype=torch.float64)
    labels = torch.zeros(6, dtype=torch.long)
    bss = BoundarySupportingAttack(model, eta=1.0, max_steps=5).generate(x, labels)
    assert float(bss.samples.min()) >= 0 and float(bss.samples.max()) <= 1
    assert not bool(bss.crossed.any())
    assert bss.steps.tolist() == [5] * 6
    free = BoundarySupportingAttack(model, eta=1.0, max_steps=5, clip=False).generate(x, labels)
    assert bool(free.crossed.all())


def test_generator_makes_draws_reproducible() -> None:
    model = _linear([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], [0.0, 0.0, 0.0])
    x = torch.rand(8, 2, dtype=torch.float64)
    labels = model(x).argmax(1)

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return (
            BoundarySupportingAttack(model, num_targets=4, generator=gen).generate(x, labels).target
        )

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


class _ExitOne(nn.Module):
    """Exit 1 of TinyMLPExits, recomputed by hand (independent of ExitView)."""

    def __init__(self, net: TinyMLPExits) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        h = self.net.layers[1](self.net.layers[0](x.flatten(1)))
        return self.net.heads[1](h)


def test_one_exit_of_a_multi_exit_model_through_exit_view() -> None:
    net = TinyMLPExits(in_features=8, num_classes=4, num_exits=3).double()
    x = torch.rand(16, 8, dtype=torch.float64)
    labels = net(x)[1].argmax(1)
    labels[:4] = (labels[:4] + 1) % 4
    net.train()
    view = BoundarySupportingAttack(
        ExitView(net, 1), num_targets=3, generator=torch.Generator().manual_seed(0)
    )
    hand = BoundarySupportingAttack(
        _ExitOne(net), num_targets=3, generator=torch.Generator().manual_seed(0)
    )
    got, expected = view.generate(x, labels), hand.generate(x, labels)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
    assert net.training and all(m.training for m in net.modules())
    assert all(p.grad is None for p in net.parameters())
    assert bool(got.crossed.any())


def test_model_mode_restored_even_after_an_error() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 3)).train()
    atk = BoundarySupportingAttack(model)
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        atk(torch.rand(2, 3), torch.tensor([0, 7]))
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("model_training", [False, True])
def test_model_mode_during_the_walk_follows_set_model_training_mode(model_training) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 3)).train()
    seen: list[tuple[bool, bool]] = []
    model.register_forward_pre_hook(lambda m, args: seen.append((m.training, m[1].training)))
    atk = BoundarySupportingAttack(model, max_steps=3)
    atk.set_model_training_mode(model_training=model_training, dropout_training=True)
    x = torch.rand(6, 3)
    with torch.no_grad():
        labels = model.eval()(x).argmax(1)
    model.train()
    seen.clear()
    atk.generate(x, labels)
    atk(x, labels)
    assert len(seen) >= 4  # the clean pass and at least one walk step, per call
    assert set(seen) == {(model_training, model_training)}
    assert all(m.training for m in model.modules())


def test_normalization_matches_a_model_that_normalizes() -> None:
    mean, std = [0.3, 0.5], [0.2, 0.4]
    linear = _linear([[1.0, -1.0], [-0.5, 1.0], [0.2, 0.1]], [0.0, 0.1, -0.1])

    class Normalized(nn.Module):
        def forward(self, x):
            m = torch.tensor(mean, dtype=x.dtype)[None, :, None, None]
            s = torch.tensor(std, dtype=x.dtype)[None, :, None, None]
            return linear(((x - m) / s).mean((2, 3)))

    class Raw(nn.Module):
        def forward(self, x):
            return linear(x.mean((2, 3)))

    x = torch.rand(6, 2, 3, 3, dtype=torch.float64)
    labels = Normalized()(x).argmax(1)
    plain = BoundarySupportingAttack(Normalized(), sampling="all").generate(x, labels)
    atk = BoundarySupportingAttack(Raw(), sampling="all")
    atk.set_normalization_used(mean, std)
    m = torch.tensor(mean, dtype=torch.float64)[None, :, None, None]
    s = torch.tensor(std, dtype=torch.float64)[None, :, None, None]
    normed = atk.generate((x - m) / s, labels)
    torch.testing.assert_close(normed.samples * s + m, plain.samples)
    torch.testing.assert_close(normed.target, plain.target)


def test_returns_named_tuple_on_input_device_and_dtype(device) -> None:
    model = _linear(TWO_CLASS_W, TWO_CLASS_C, dtype=torch.float32).to(device)
    x = torch.rand(5, 4, device=device)
    labels = model(x).argmax(1)
    bss = BoundarySupportingAttack(model, num_targets=2).generate(x, labels)
    assert isinstance(bss, BoundarySupportingSamples)
    assert bss.samples.dtype == torch.float32 and bss.samples.device.type == device.type
    assert bss.batch_index.dtype == torch.long and bss.crossed.dtype == torch.bool


def test_empty_when_nothing_is_classified_correctly() -> None:
    model = _linear(TWO_CLASS_W, TWO_CLASS_C)
    x = torch.rand(4, 4, dtype=torch.float64)
    labels = 1 - model(x).argmax(1)
    for sampling in ("sample", "all"):
        bss = BoundarySupportingAttack(model, sampling=sampling).generate(x, labels)
        assert bss.samples.shape == (0, 4) and bss.weight.shape == (0,)


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"eta": 0.0}, ValueError, "`eta` must be a finite number > 0, got 0.0"),
        ({"eta": "big"}, TypeError, "`eta` must be a real number > 0, got str"),
        ({"max_steps": 0}, ValueError, "`max_steps` must be >= 1, got 0"),
        ({"max_steps": 2.5}, TypeError, "`max_steps` must be an int, got float"),
        ({"num_targets": 0}, ValueError, "`num_targets` must be >= 1, got 0"),
        ({"sampling": "top"}, ValueError, "`sampling` must be one of 'sample', 'all', got 'top'"),
        ({"clip": 1}, TypeError, "`clip` must be a bool"),
        ({"generator": 3}, TypeError, "`generator` must be a torch.Generator"),
    ],
)
def test_constructor_errors(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        BoundarySupportingAttack(nn.Linear(2, 3), **kwargs)


def test_call_errors() -> None:
    atk = BoundarySupportingAttack(nn.Linear(4, 3))
    x, y = torch.rand(5, 4), torch.randint(0, 3, (5,))
    with pytest.raises(TypeError, match="must be floating point"):
        atk((x * 255).to(torch.uint8), y)
    with pytest.raises(TypeError, match="must be a Tensor"):
        atk(x.tolist(), y)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\], got values in"):
        atk(x + 1, y)
    with pytest.raises(TypeError, match="needs the labels"):
        atk(x)
    with pytest.raises(TypeError, match="integer class indices"):
        atk.generate(x, y.float())
    with pytest.raises(ValueError, match=r"shape \(B,\) = \(5,\)"):
        atk(x, y[:4])
    with pytest.raises(TypeError, match="model"):
        BoundarySupportingAttack(lambda v: v)  # type: ignore[arg-type]
    multi = BoundarySupportingAttack(TinyMLPExits(in_features=4, num_classes=3))
    with pytest.raises(TypeError, match=r"ExitView\(model, i\)"):
        multi(x, y)
    with pytest.raises(ValueError, match="at least 2 classes"):
        BoundarySupportingAttack(nn.Linear(4, 1))(x, torch.zeros(5, dtype=torch.long))
