"""attach_exits: ResNet-18 and user modules, heads, order, errors, copies, compile, cost."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import Tensor, nn
from torchvision.models import resnet18

from neokd_losses.evaluation.flops import exit_costs
from neokd_losses.models import AttachedExits, attach_exits

_STAGES = ["layer1", "layer2", "layer3", "layer4"]


def _resnet_features(net: nn.Module, x: Tensor) -> list[Tensor]:
    """The four stage outputs of a torchvision ResNet, computed by hand."""
    h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    features = []
    for stage in _STAGES:
        h = getattr(net, stage)(h)
        features.append(h)
    return features


def _stack(width: int = 8) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, width, 3), nn.ReLU(), nn.Conv2d(width, 2 * width, 3), nn.ReLU()
    )


def test_resnet18_gets_four_exits_whose_gradients_reach_the_backbone() -> None:
    net = resnet18(weights=None)
    model = attach_exits(net, _STAGES, num_classes=10)
    x, y = torch.rand(2, 3, 32, 32), torch.randint(0, 10, (2,))
    out = model(x)
    assert len(out) == 4 and all(z.shape == (2, 10) for z in out)
    for i in range(4):
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x)[i], y).backward()
        assert net.conv1.weight.grad is not None and net.conv1.weight.grad.abs().sum() > 0
        stage = getattr(net, _STAGES[i])
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stage.parameters())
        if i < 3:  # later stages do not feed this exit
            assert all(p.grad is None for p in getattr(net, _STAGES[i + 1]).parameters())


def test_pool_heads_equal_global_average_pooling_and_linear() -> None:
    net = resnet18(weights=None).eval()
    model = attach_exits(net, _STAGES, num_classes=5).eval()
    x = torch.rand(2, 3, 32, 32)
    for head, feature, logits in zip(model.heads, _resnet_features(net, x), model(x), strict=True):
        pooled = feature.mean(dim=(2, 3))
        torch.testing.assert_close(logits, pooled @ head.linear.weight.T + head.linear.bias)
    assert [h.linear.in_features for h in model.heads] == [64, 128, 256, 512]


def test_include_output_appends_the_backbones_own_logits() -> None:
    net = resnet18(weights=None, num_classes=10).eval()
    model = attach_exits(net, _STAGES[:3], num_classes=10, include_output=True).eval()
    x = torch.rand(2, 3, 32, 32)
    out = model(x)
    assert len(out) == 4
    torch.testing.assert_close(out[-1], net(x))


def test_exits_come_in_execution_order() -> None:
    net = resnet18(weights=None).eval()
    model = attach_exits(net, ["layer3", "layer1"], num_classes=4).eval()
    x = torch.rand(1, 3, 32, 32)
    f1, _, f3, _ = _resnet_features(net, x)
    out = model(x)
    torch.testing.assert_close(out[0], model.heads[1](f1))  # layer1 runs first
    torch.testing.assert_close(out[1], model.heads[0](f3))


def test_backbone_alone_is_unaffected_by_the_hooks() -> None:
    net = resnet18(weights=None).eval()
    x = torch.rand(1, 3, 32, 32)
    before = net(x)
    model = attach_exits(net, _STAGES, num_classes=3)
    torch.testing.assert_close(net(x), before)
    assert model._session.taps is None


def test_msdnet_head_and_custom_factory() -> None:
    model = attach_exits(_stack(), ["1", "3"], num_classes=6, head="msdnet")
    assert [z.shape for z in model(torch.rand(2, 3, 12, 12))] == [(2, 6), (2, 6)]
    conv = model.heads[1].features[0][0]
    assert (conv.in_channels, conv.out_channels, conv.stride) == (16, 128, (2, 2))

    widths: list[int] = []

    def factory(in_channels: int, num_classes: int) -> nn.Module:
        widths.append(in_channels)
        return nn.Sequential(
            nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes)
        )

    model = attach_exits(_stack(), ["0", "2"], num_classes=3, head=factory)
    x = torch.rand(2, 3, 12, 12)
    out = model(x)
    assert widths == [8, 16]
    expected = model.heads[0][2](model.backbone[0](x).amax(dim=(2, 3)))
    torch.testing.assert_close(out[0], expected)


class _Doubler(nn.Module):
    """Declares no width: returns its input repeated twice along the channels."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, x], dim=1)


def test_example_input_measures_widths_that_cannot_be_guessed() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), _Doubler(), nn.ReLU())
    guessed = attach_exits(net, ["2"], num_classes=2)  # guesses 4, the conv's width
    with pytest.raises(ValueError, match=r"built for 4 channels .* `example_input=`"):
        guessed(torch.rand(1, 3, 8, 8))
    measured = attach_exits(net, ["2"], num_classes=2, example_input=torch.rand(1, 3, 8, 8))
    assert measured.heads[0].linear.in_features == 8
    assert measured(torch.rand(2, 3, 8, 8))[0].shape == (2, 2)
    assert net.training  # the measuring pass restored the mode


def test_no_declared_width_at_all_asks_for_example_input() -> None:
    with pytest.raises(ValueError, match=r"cannot infer .* \['0'\].*example_input"):
        attach_exits(nn.Sequential(_Doubler(), nn.Flatten()), ["0"], num_classes=2)


def test_unknown_layer_name_lists_the_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown layer name\(s\) \['layer5'\].*layer1, .*layer4"):
        attach_exits(resnet18(weights=None), ["layer1", "layer5"], num_classes=10)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"layers": "1"}, TypeError, r"`layers` must be a list of layer names, got str"),
        ({"layers": [1]}, TypeError, r"`layers` must hold layer names \(str\), got int"),
        ({"layers": ["1", "1"]}, ValueError, r"must not repeat a name"),
        ({"layers": []}, ValueError, r"would have no exit"),
        ({"layers": [""]}, ValueError, r"unknown layer name"),
        ({"head": "mlp"}, ValueError, r"`head` must be 'pool', 'msdnet' or a callable, got 'mlp'"),
        ({"head": 3}, TypeError, r"`head` must be .* got int"),
        ({"head": lambda c, k: "head"}, TypeError, r"must return an nn.Module, got str"),
        ({"num_classes": 0}, ValueError, r"`num_classes` must be >= 1"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, object], error: type, match: str) -> None:
    arguments: dict[str, object] = {"backbone": _stack(), "layers": ["1"], "num_classes": 3}
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        attach_exits(**arguments)  # type: ignore[arg-type]


def test_backbone_must_be_a_module() -> None:
    with pytest.raises(TypeError, match=r"`backbone` must be an nn.Module, got function"):
        attach_exits(lambda x: x, ["a"], num_classes=2)  # type: ignore[arg-type]


def test_a_reused_module_is_rejected() -> None:
    model = attach_exits(resnet18(weights=None), ["layer1.0.relu"], num_classes=2)
    with pytest.raises(ValueError, match=r"run exactly once .*'layer1.0.relu': 2"):
        model(torch.rand(2, 3, 32, 32))


def test_include_output_checks_the_number_of_classes() -> None:
    model = attach_exits(resnet18(weights=None), ["layer1"], num_classes=10, include_output=True)
    with pytest.raises(ValueError, match=r"returns 1000 classes but .* num_classes=10"):
        model(torch.rand(2, 3, 32, 32))


def test_heads_follow_the_backbones_dtype() -> None:
    model = attach_exits(_stack().double(), ["1", "3"], num_classes=3)
    out = model(torch.rand(2, 3, 10, 10, dtype=torch.float64))
    assert all(z.dtype == torch.float64 for z in out)


def test_state_dict_round_trip_and_deepcopy() -> None:
    torch.manual_seed(1)
    source = attach_exits(_stack(), ["1", "3"], num_classes=3).eval()
    torch.manual_seed(2)
    target = attach_exits(_stack(), ["1", "3"], num_classes=3).eval()
    x = torch.rand(2, 3, 10, 10)
    target.load_state_dict(source.state_dict())
    for a, b in zip(source(x), target(x), strict=True):
        assert torch.equal(a, b)
    clone = copy.deepcopy(source)
    assert isinstance(clone, AttachedExits)
    for a, b in zip(source(x), clone(x), strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():
        clone.heads[0].linear.bias.add_(1.0)  # the copy's hooks use the copy's heads
    torch.testing.assert_close(clone(x)[0], source(x)[0] + 1.0)


def test_costs_are_cumulative_in_execution_order() -> None:
    model = attach_exits(_stack(width=4), ["1", "3"], num_classes=2)
    costs = exit_costs(model, torch.rand(1, 3, 10, 10))
    conv1, relu1 = 8 * 8 * 4 * 3 * 9, 8 * 8 * 4
    head1 = 4 * 8 * 8 + (4 * 2 + 2)  # global mean over 8×8, then linear
    conv2, relu2 = 6 * 6 * 8 * 4 * 9, 6 * 6 * 8
    head2 = 8 * 6 * 6 + (8 * 2 + 2)
    assert costs == [conv1 + relu1 + head1, conv1 + relu1 + head1 + conv2 + relu2 + head2]


def test_torch_compile_traces_hooks_in_one_graph() -> None:
    torch._dynamo.reset()
    model = attach_exits(_stack(), ["1", "3"], num_classes=3).eval()
    x = torch.rand(2, 3, 10, 10)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    for a, b in zip(model(x), compiled(x), strict=True):
        torch.testing.assert_close(a, b)


def test_multi_exit_pgd_attacks_a_wrapped_resnet() -> None:
    from neokd_losses.attacks.pgd import MultiExitPGD

    model = attach_exits(resnet18(weights=None), _STAGES, num_classes=10)
    x, y = torch.rand(2, 3, 32, 32), torch.randint(0, 10, (2,))
    adv = MultiExitPGD(model, eps=8 / 255, alpha=2 / 255, steps=1, mode="average")(x, y)
    assert adv.shape == x.shape and (adv - x).abs().max() <= 8 / 255 + 1e-6


def test_a_discarded_wrapper_and_its_heads_are_freed() -> None:
    # The hooks stay on the backbone; they must not keep the wrapper (and its heads) alive.
    import gc
    import weakref

    net = _stack()
    model = attach_exits(net, ["1", "3"], num_classes=4)
    model(torch.rand(1, 3, 8, 8))
    wrapper, head = weakref.ref(model), weakref.ref(model.heads[0])
    del model
    gc.collect()
    assert wrapper() is None and head() is None
    again = attach_exits(net, ["1", "3"], num_classes=4)  # a new wrapper on the same backbone
    assert [z.shape for z in again(torch.rand(2, 3, 8, 8))] == [(2, 4), (2, 4)]


class _Rendezvous(nn.Module):
    """Holds every calling thread until all of them have reached it (mid-forward)."""

    def __init__(self, parties: int) -> None:
        super().__init__()
        self.barrier = threading.Barrier(parties, timeout=30)

    def forward(self, x: Tensor) -> Tensor:
        self.barrier.wait()
        return x


def test_concurrent_forwards_from_threads_get_their_own_exits() -> None:
    # nn.DataParallel runs its replicas, which share the backbone's hooks, in threads. Both
    # threads here are inside the backbone at once, after the tapped layer has run.
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), _Rendezvous(2), nn.Conv2d(4, 4, 3))
    model = attach_exits(net, ["1", "3"], num_classes=5).eval()
    inputs = [torch.rand(2, 3, 8, 8), torch.rand(3, 3, 8, 8)]
    results: dict[int, list[Tensor]] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            with torch.no_grad():
                results[i] = model(inputs[i])
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    net[2] = nn.Identity()  # no rendezvous for the sequential reference
    with torch.no_grad():
        for i, x in enumerate(inputs):
            f1 = net[1](net[0](x))
            f3 = net[3](net[2](f1))
            expected = [model.heads[0](f1), model.heads[1](f3)]
            for got, want in zip(results[i], expected, strict=True):
                torch.testing.assert_close(got, want)


def test_torch_save_of_the_whole_wrapper_round_trips(tmp_path) -> None:
    model = attach_exits(_stack(), ["1", "3"], num_classes=4).eval()
    x = torch.rand(2, 3, 8, 8)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    for a, b in zip(loaded(x), model(x), strict=True):
        torch.testing.assert_close(a, b)
    assert loaded._session is not model._session


def test_example_input_keeps_every_submodule_mode() -> None:
    backbone = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(4, 4, 3)
    )
    backbone.train()
    backbone[1].eval()  # a frozen BatchNorm in a training backbone
    backbone.eval()
    backbone[3].train()  # Monte-Carlo dropout in an eval backbone
    attach_exits(backbone, ["2"], num_classes=5, example_input=torch.rand(1, 3, 8, 8))
    assert [m.training for m in backbone] == [False, False, False, True, False]


def test_missing_stages_say_why() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            return self.b(self.a(x))

    model = attach_exits(Net(), ["a"], num_classes=3, example_input=torch.rand(1, 4))
    for name in ("forward_stage", "forward_block", "forward_exit"):
        with pytest.raises(
            AttributeError, match="has no stages: its backbone is not an nn.Sequential"
        ):
            getattr(model, name)
        assert not hasattr(model, name)
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        model.nonexistent  # noqa: B018
