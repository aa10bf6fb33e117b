"""ExitView: one exit of a multi-exit model as a single-output module."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchattacks
from torch import nn

from neokd_losses.attacks.exit_view import ExitView
from tests.helpers import TinyMLPExits


@pytest.fixture
def model():
    return TinyMLPExits(in_features=16, num_classes=5, num_exits=3).eval()


@pytest.mark.parametrize(
    ("index", "position"), [(0, 0), (1, 1), (2, 2), (-1, 2), (-3, 0), (np.int64(1), 1)]
)
def test_returns_the_chosen_exit(model, index, position):
    x = torch.rand(4, 16)
    torch.testing.assert_close(ExitView(model, index)(x), model(x)[position], rtol=0, atol=0)


def test_tuple_outputs_and_gradients_flow():
    class TupleExits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return (self.fc(x), 3 * self.fc(x))

    m = TupleExits()
    x = torch.rand(2, 3, requires_grad=True)
    out = ExitView(m, 1)(x)
    assert torch.equal(out, m(x)[1])
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(grad, 3 * m.fc.weight.sum(0).expand(2, 3))


@pytest.mark.parametrize("index", [3, -4])
def test_out_of_range_index_raises_at_call(model, index):
    view = ExitView(model, index)
    with pytest.raises(
        ValueError,
        match=rf"`exit_index` must lie in \[-3, 3\) for a model with 3 exits, got {index}",
    ):
        view(torch.rand(2, 16))


@pytest.mark.parametrize(("index", "kind"), [(1.0, "float"), (True, "bool"), ("0", "str")])
def test_index_must_be_an_int(model, index, kind):
    with pytest.raises(TypeError, match=rf"`exit_index` must be an int, got {kind}"):
        ExitView(model, index)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match=r"`model` must be an nn.Module .* got function"):
        ExitView(lambda x: [x], 0)


def test_single_output_model_raises_a_helpful_type_error():
    view = ExitView(nn.Linear(16, 5), 0)
    with pytest.raises(
        TypeError,
        match=r"Linear returned a single Tensor of shape \(2, 5\).*stock torchattacks attack",
    ):
        view(torch.rand(2, 16))


def test_non_tensor_exit_raises():
    class Bad(nn.Module):
        def forward(self, x):
            return [x, "logits"]

    with pytest.raises(
        TypeError, match=r"exit 1 of Bad's output must be a Tensor \(B, K\), got str"
    ):
        ExitView(Bad(), 0)(torch.rand(2, 3))


def test_training_flag_is_the_wrapped_models(model):
    view = ExitView(model, -1)
    model.train()
    assert view.training
    model.eval()
    assert not view.training
    view.train()
    assert model.training and all(m.training for m in model.modules())
    view.eval()
    assert not model.training


def test_shares_parameters_and_state(model):
    view = ExitView(model, 0)
    assert [id(p) for p in view.parameters()] == [id(p) for p in model.parameters()]
    assert set(view.state_dict()) == {f"model.{k}" for k in model.state_dict()}
    assert "exit_index=0" in repr(view)


def test_stock_torchattacks_attacks_target_one_exit(model):
    x, y = torch.rand(6, 1, 4, 4), torch.randint(0, 5, (6,))  # APGD needs image-shaped inputs
    view = ExitView(model, 1)
    adv = torchattacks.PGD(view, eps=0.1, alpha=0.05, steps=3)(x, y)
    assert (adv - x).abs().max() <= 0.1 + 1e-6
    ce = nn.functional.cross_entropy
    with torch.no_grad():
        assert ce(model(adv)[1], y) > ce(model(x)[1], y)
    adv = torchattacks.APGD(view, eps=0.1, steps=3, n_restarts=1)(x, y)
    assert (adv - x).abs().max() <= 0.1 + 1e-6


class _LinearExits(nn.Module):
    """Exits z_i = A_i x + c_i on flattened inputs: every input gradient has a closed form."""

    def __init__(self, in_features: int, num_classes: int, num_exits: int) -> None:
        super().__init__()
        self.exits = nn.ModuleList(
            nn.Linear(in_features, num_classes, dtype=torch.float64) for _ in range(num_exits)
        )

    def forward(self, x):
        return [layer(x.flatten(1)) for layer in self.exits]


@pytest.mark.parametrize("index", [0, 1, -1])
def test_fgsm_through_the_view_is_the_closed_form_step_on_that_exit(index):
    model = _LinearExits(in_features=4, num_classes=3, num_exits=3).eval()
    x = torch.rand(8, 1, 2, 2, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    eps = 0.05
    adv = torchattacks.FGSM(ExitView(model, index), eps=eps)(x, y)

    def closed_form(exit_layer):
        # ∇ₓ CE(A x + c, y) = (softmax(z) - onehot(y)) A per sample (the batch mean only
        # rescales it, which sign() ignores).
        with torch.no_grad():
            z = x.flatten(1) @ exit_layer.weight.T + exit_layer.bias
            residual = z.softmax(1) - nn.functional.one_hot(y, 3).double()
            grad = (residual @ exit_layer.weight).view_as(x)
        return (x + eps * grad.sign()).clamp(0, 1)

    expected = closed_form(model.exits[index])
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)
    others = [i for i in range(3) if i != index % 3]
    assert all(not torch.allclose(closed_form(model.exits[i]), expected) for i in others)


@pytest.mark.parametrize("name", ["APGD", "CW"])
def test_apgd_and_cw_through_the_view_fool_that_exit(name):
    # Both attacks return an input unchanged unless they found an adversarial example for
    # the attacked model; so every changed row must be misclassified by the chosen exit.
    torch.manual_seed(1)
    model = TinyMLPExits(in_features=16, num_classes=5, num_exits=3).eval()
    x = torch.rand(16, 1, 4, 4)
    index = 1
    with torch.no_grad():
        y = model(x)[index].argmax(1)  # every input starts correctly classified at exit 1
    view = ExitView(model, index)
    if name == "APGD":
        atk = torchattacks.APGD(view, eps=0.5, steps=10, n_restarts=1)
    else:
        atk = torchattacks.CW(view, c=10.0, steps=30, lr=0.1)
    adv = atk(x, y)
    changed = (adv != x).flatten(1).any(1)
    assert int(changed.sum()) >= 4  # the attack did something on this easy model
    with torch.no_grad():
        assert bool((model(adv)[index].argmax(1)[changed] != y[changed]).all())
    assert torch.equal(adv[~changed], x[~changed])


def test_view_holds_the_model_itself_not_a_copy(model):
    view = ExitView(model, 0)
    assert view.model is model
    with torch.no_grad():
        model.heads[0].bias.add_(1.0)  # an update to the model is seen through the view
    x = torch.rand(3, 16)
    torch.testing.assert_close(view(x), model(x)[0], rtol=0, atol=0)


class _Returns(nn.Module):
    """Two exits of one linear layer, returned as ``kind`` says."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.kind = kind

    def forward(self, x):
        a, b = self.fc(x), 2 * self.fc(x)
        if self.kind == "dict":
            return {"exit1": a, "exit2": b}
        if self.kind == "stacked":
            return torch.stack([a, b])
        return [a, b], x  # (exits, features)


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        (
            "dict",
            r"_Returns returned dict with keys \['exit1', 'exit2'\]\. Return the exits as a "
            r"list in exit order, `\[out\[k\] for k in \['exit1', 'exit2'\]\]`.*`ExitList` "
            r"module of the how-to 'Wrap your own multi-exit model'",
        ),
        (
            "stacked",
            r"_Returns returned a single Tensor of shape \(2, 5, 3\), which looks like E = 2 "
            r"exits stacked as \(E, B, K\)\. Unstack it: make the model's forward return "
            r"`list\(out.unbind\(0\)\)`\.$",
        ),
        (
            "nested",
            r"_Returns returned tuple whose first item is a list of 2 items \(followed by "
            r"Tensor\), which looks like `\(exits, features\)`\. Return the exit logits only: "
            r"`return exits` instead of `return exits, features`",
        ),
    ],
)
def test_other_output_kinds_name_what_was_returned_and_the_fix(kind, match):
    with pytest.raises(TypeError, match=match) as info:
        ExitView(_Returns(kind), 0)(torch.rand(5, 4))
    # A stacked (E, B, K) output is a multi-exit model: never suggest a single-output attack.
    assert "torchattacks.PGD" not in str(info.value)
