"""The staged-model protocol: stages of SmallCNN, MSDNet and attach_exits, run_until, errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import Tensor, nn

from neokd_losses.models import (
    MSDNet,
    SmallCNN,
    StagedModel,
    attach_exits,
    is_staged,
    run_stages,
    run_until,
)
from neokd_losses.models.staged import has_exit_split, require_staged


def _mini_msdnet() -> MSDNet:
    return MSDNet(num_classes=5, num_blocks=3, base=2, step=1, num_channels=8)


class _Chain(nn.Module):
    """A backbone that is not an nn.Sequential: four layers called in order."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)
        self.b = nn.ReLU()
        self.c = nn.Conv2d(4, 6, 3)
        self.d = nn.ReLU()
        self.e = nn.Sequential(nn.Flatten(), nn.Linear(6 * 4 * 4, 5))

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.e(self.d(self.c(self.b(self.a(x)))))
        return out


def _sequential() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 5),
    )


@contextmanager
def _count_calls(modules: dict[str, nn.Module]) -> Iterator[dict[str, int]]:
    counts = dict.fromkeys(modules, 0)

    def hook(name: str) -> object:
        def count(module: nn.Module, args: object) -> None:
            counts[name] += 1

        return count

    # Pre-hooks count every call that starts (a forward hook registered after the exit's
    # tap would not fire on the layer where the backbone is stopped).
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]  # type: ignore[arg-type]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


# --- forward equals the pre-stage implementation (written out here) ---------------------


def test_small_cnn_forward_is_bit_identical_to_the_unstaged_computation() -> None:
    model = SmallCNN()
    nn.init.normal_(model.block3[-1].weight)  # type: ignore[arg-type]
    x = torch.rand(4, 1, 28, 28)
    for train in (False, True):  # train mode: dropout draws in the same order
        model.train(train)
        torch.manual_seed(1)
        h1 = model.block1(x)
        z1 = model.exit1(h1)
        h2 = model.block2(h1)
        reference = [z1, model.exit2(h2), model.block3(h2)]
        torch.manual_seed(1)
        got = model(x)
        assert all(torch.equal(a, b) for a, b in zip(got, reference, strict=True))


def test_msdnet_forward_is_bit_identical_to_the_unstaged_computation() -> None:
    model = _mini_msdnet().eval()
    x = torch.rand(3, 3, 32, 32)
    features = model.stem(x)
    reference = []
    for block, head in zip(model.blocks, model.heads, strict=True):
        features = block(features)
        reference.append(head(features[-1]))
    got = model(x)
    assert model.num_exits == 3 and len(got) == 3
    assert all(torch.equal(a, b) for a, b in zip(got, reference, strict=True))


# --- run_until -------------------------------------------------------------------------


def _built_in(kind: str) -> tuple[nn.Module, Tensor]:
    """SmallCNN (last layer drawn: it starts at zero) or a mini MSDNet, and an input."""
    if kind == "small_cnn":
        model = SmallCNN()
        nn.init.normal_(model.block3[-1].weight)  # type: ignore[index, arg-type]
        return model, torch.rand(3, 1, 28, 28)
    return _mini_msdnet(), torch.rand(3, 3, 32, 32)


@pytest.mark.parametrize("kind", ["small_cnn", "msdnet", "sequential", "chain", "chain_output"])
def test_run_until_equals_the_first_exits_of_the_forward(kind: str) -> None:
    model: nn.Module
    if kind in ("small_cnn", "msdnet"):
        model, x = _built_in(kind)
    elif kind == "sequential":
        model = attach_exits(_sequential(), ["1", "3"], 5, include_output=True)
        x = torch.rand(3, 3, 8, 8)
    else:
        model = attach_exits(_Chain(), ["b", "d"], 5, include_output=kind == "chain_output")
        x = torch.rand(3, 3, 8, 8)
    model.eval()
    full = model(x)
    for k in range(len(full)):
        early = run_until(model, x, k)
        assert len(early) == k + 1
        for got, want in zip(early, full[: k + 1], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    negative = run_until(model, x, -1)
    assert len(negative) == len(full)


def test_run_until_does_not_run_deeper_small_cnn_modules() -> None:
    model = SmallCNN().eval()
    parts = {n: getattr(model, n) for n in ("block1", "exit1", "block2", "exit2", "block3")}
    with _count_calls(parts) as counts:
        run_until(model, torch.rand(2, 1, 28, 28), 0)
    assert counts == {"block1": 1, "exit1": 1, "block2": 0, "exit2": 0, "block3": 0}
    with _count_calls(parts) as counts:
        run_until(model, torch.rand(2, 1, 28, 28), 1)
    assert counts == {"block1": 1, "exit1": 1, "block2": 1, "exit2": 1, "block3": 0}


@pytest.mark.parametrize("k", [0, 1])
def test_run_until_does_not_run_deeper_msdnet_blocks_or_heads(k: int) -> None:
    model = _mini_msdnet().eval()
    parts: dict[str, nn.Module] = {f"block{i}": b for i, b in enumerate(model.blocks)}
    parts.update({f"head{i}": h for i, h in enumerate(model.heads)})
    with _count_calls(parts) as counts:
        run_until(model, torch.rand(2, 3, 32, 32), k)
    for i in range(3):
        assert counts[f"block{i}"] == counts[f"head{i}"] == int(i <= k)


@pytest.mark.parametrize("backbone", ["sequential", "chain"])
def test_run_until_stops_an_attached_backbone_after_the_exit(backbone: str) -> None:
    net: nn.Module = _sequential() if backbone == "sequential" else _Chain()
    names = ["1", "3"] if backbone == "sequential" else ["b", "d"]
    model = attach_exits(net, names, 5).eval()
    assert is_staged(model) == (backbone == "sequential")
    modules = dict(net.named_children())
    parts = {**modules, "head0": model.heads[0], "head1": model.heads[1]}
    with _count_calls(parts) as counts:
        run_until(model, torch.rand(2, 3, 8, 8), 0)
    order = list(modules)
    tap = order.index(names[0])
    for position, name in enumerate(order):
        assert counts[name] == int(position <= tap), (name, counts)
    assert counts["head0"] == 1 and counts["head1"] == 0
    # The wrapper is usable afterwards: the hooks are idle and a full forward works.
    assert len(model(torch.rand(2, 3, 8, 8))) == 2


def test_run_until_on_a_plain_multi_exit_model_slices_the_full_forward() -> None:
    class Plain(nn.Module):
        def forward(self, x: Tensor) -> list[Tensor]:
            return [x, 2 * x, 3 * x]

    x = torch.rand(2, 4)
    early = run_until(Plain(), x, 1)
    assert len(early) == 2 and torch.equal(early[1], 2 * x)


# --- attach_exits stages ------------------------------------------------------------------


def test_sequential_backbone_stages_follow_execution_order() -> None:
    net = _sequential()
    model = attach_exits(net, ["3", "1"], 5, include_output=True).eval()  # listed backwards
    assert model.has_stages and model.num_exits == 3
    x = torch.rand(2, 3, 8, 8)
    h1 = net[1](net[0](x))
    h3 = net[3](net[2](h1))
    want = [model.heads[1](h1), model.heads[0](h3), net[5](net[4](h3))]
    got = run_stages(model, x)  # type: ignore[arg-type]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(model(x), want, strict=True))


def test_backbones_without_real_stages() -> None:
    nested = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), nn.Conv2d(4, 4, 3))

    class MySequential(nn.Sequential):
        def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
            return super().forward(x) * 2

    overridden = MySequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    for net, layers in ((nested, ["0.1"]), (overridden, ["1"]), (_Chain(), ["b"])):
        model = attach_exits(net, layers, 5, example_input=torch.rand(1, 3, 8, 8))
        assert not model.has_stages and not is_staged(model)
        assert not isinstance(model, StagedModel)
        with pytest.raises(TypeError, match=r"nn\.Sequential.*Staged models"):
            require_staged(model, "EarlyExitClassifier")


def test_staged_protocol_membership() -> None:
    assert is_staged(SmallCNN()) and is_staged(_mini_msdnet())
    assert isinstance(SmallCNN(), StagedModel)
    assert not is_staged(nn.Linear(2, 2)) and not is_staged("model")


@pytest.mark.parametrize("kind", ["small_cnn", "msdnet", "sequential", "sequential_output"])
def test_split_stages_compose_to_forward_stage(kind: str) -> None:
    # forward_block then forward_exit is forward_stage, bit for bit, on every stage.
    model: nn.Module
    if kind in ("small_cnn", "msdnet"):
        model, x = _built_in(kind)
    else:
        model = attach_exits(
            _sequential(), ["3", "1"], 5, include_output=kind == "sequential_output"
        )
        x = torch.rand(3, 3, 8, 8)
    model.eval()
    assert has_exit_split(model)
    state = block = x
    for index in range(model.num_exits):  # type: ignore[arg-type]
        state, logits = model.forward_stage(index, state)  # type: ignore[operator]
        block = model.forward_block(index, block)  # type: ignore[operator]
        assert torch.equal(model.forward_exit(index, block), logits)  # type: ignore[operator]
    for method in (model.forward_block, model.forward_exit):
        with pytest.raises(ValueError, match="stages"):
            method(model.num_exits, block)  # type: ignore[operator]


def test_unstaged_attached_exits_have_no_split() -> None:
    model = attach_exits(_Chain(), ["b"], 5, example_input=torch.rand(1, 3, 8, 8))
    assert not has_exit_split(model)
    for name in ("forward_stage", "forward_block", "forward_exit"):
        with pytest.raises(AttributeError):
            getattr(model, name)


# --- bad input ------------------------------------------------------------------------


class _Bad(nn.Module):
    """A two-stage model whose stage 0 misbehaves in the way named by ``mode``."""

    num_exits = 2

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward_stage(self, index: int, state: object) -> tuple[object, object]:
        assert isinstance(state, Tensor)
        if index == 1:
            return state, state
        if self.mode == "batch":
            return state, state[:-1]
        if self.mode == "transposed":
            return {"h": state.t()}, state
        if self.mode == "scalar":
            return (state, 3), state
        if self.mode == "logits":
            return state, state.tolist()
        return state, state


@pytest.mark.parametrize(
    ("mode", "error", "match"),
    [
        ("batch", ValueError, r"shape \(2, 3\) for a batch of 3 samples; expected \(3, K\)"),
        ("transposed", ValueError, r"not batch first with 3 samples.*\(3, \.\.\.\).*\(3, 3\)"),
        ("scalar", TypeError, r"holding a int"),
        ("logits", TypeError, r"exit_logits a Tensor \(B, K\), got list"),
    ],
)
def test_misbehaving_stages_raise(mode: str, error: type[Exception], match: str) -> None:
    x = torch.rand(3, 3)
    if mode == "transposed":
        x = torch.rand(3, 4)
        match = r"not batch first with 3 samples.*\(3, \.\.\.\).*\(4, 3\)"
    with pytest.raises(error, match=match):
        run_stages(_Bad(mode), x)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("index", "error", "match"),
    [
        (3, ValueError, r"\[-3, 3\).*3 exits, got 3"),
        (-4, ValueError, r"\[-3, 3\).*got -4"),
        (True, TypeError, "exit_index"),
        (1.0, TypeError, "exit_index"),
    ],
)
def test_run_until_rejects_bad_exit_indices(index: object, error: type, match: str) -> None:
    models: list[nn.Module] = [
        SmallCNN(),
        attach_exits(_Chain(), ["b", "d"], 5, include_output=True),
    ]
    inputs = [torch.rand(1, 1, 28, 28), torch.rand(1, 3, 8, 8)]
    for model, x in zip(models, inputs, strict=True):
        with pytest.raises(error, match=match):
            run_until(model, x, index)  # type: ignore[arg-type]


def test_stages_required_error_says_how_to_add_them() -> None:
    with pytest.raises(TypeError, match=r"forward_stage\(index, state\).*Staged models"):
        run_stages(nn.Linear(2, 2), torch.rand(1, 2))  # type: ignore[arg-type]


def test_run_until_rejects_a_model_that_does_not_return_exits() -> None:
    with pytest.raises(TypeError, match="list or tuple of E exit logits"):
        run_until(nn.Linear(2, 2), torch.rand(1, 2), 0)
    with pytest.raises(TypeError, match="nn.Module"):
        run_until(lambda x: [x], torch.rand(1, 2), 0)  # type: ignore[arg-type]


def test_small_cnn_stage_checks_its_input() -> None:
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
        run_until(SmallCNN(), torch.rand(1, 1, 32, 32), 0)
