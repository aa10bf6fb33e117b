"""MultiExitPGD fails early, with the expected and received values in the message."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neokd_losses.attacks.pgd import MultiExitPGD
from tests.helpers import TinyMLPExits


@pytest.fixture
def model():
    return TinyMLPExits(in_features=16, num_classes=5, num_exits=3).eval()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eps": -0.1}, r"`eps` must be >= 0, got -0\.1"),
        ({"eps": float("nan")}, r"`eps` must be finite, got nan"),
        ({"alpha": 0.0}, r"`alpha` \(the step size\) must be > 0, got 0\.0"),
        ({"alpha": -1}, r"`alpha` .* must be > 0, got -1"),
        ({"steps": -1}, r"`steps` must be >= 0, got -1"),
        (
            {"mode": "worst"},
            r"`mode` must be one of 'single', 'average', 'max-average', got 'worst'",
        ),
        ({"norm": "L1"}, r"`norm` must be one of 'Linf', 'L2', got 'L1'"),
        ({"mode": "single"}, r"mode='single' attacks one exit: pass `exit_index`"),
        ({"mode": "average", "exit_index": 0}, r"only used by mode='single', got exit_index=0"),
        ({"mode": "single", "exit_index": 0, "exit_weights": [1, 1, 1]}, r"mode='single' has none"),
        ({"exit_weights": [1.0, -1.0, 1.0]}, r"finite and non-negative, got \[1\.0, -1\.0, 1\.0\]"),
        ({"exit_weights": [0.0, 0.0]}, r"at least one positive weight, got \[0\.0, 0\.0\]"),
        ({"max_batch": 0}, r"`max_batch` .* must be >= 1 or None, got 0"),
    ],
)
def test_constructor_value_errors(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiExitPGD(model, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eps": "0.1"}, r"`eps` must be a real number, got str"),
        ({"steps": 2.5}, r"`steps` must be an int, got float"),
        ({"steps": True}, r"`steps` must be an int, got bool"),
        ({"random_start": 1}, r"`random_start` must be a bool, got int"),
        ({"mode": "single", "exit_index": 1.0}, r"`exit_index` must be an int, got float"),
        ({"max_batch": 1.5}, r"`max_batch` must be an int, got float"),
        ({"generator": 0}, r"`generator` must be a torch.Generator or None, got int"),
    ],
)
def test_constructor_type_errors(model, kwargs, match):
    with pytest.raises(TypeError, match=match):
        MultiExitPGD(model, **kwargs)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match=r"`model` must be an nn.Module .* got function"):
        MultiExitPGD(lambda x: [x])


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.full((2, 16), 1.5), r"must lie in \[0, 1\], got values in \[1\.5, 1\.5\]"),
        (torch.full((2, 16), -0.25), r"must lie in \[0, 1\], got values in \[-0\.25, -0\.25\]"),
        (torch.full((2, 16), float("nan")), r"`images` contain NaN \(32 of 32 values\)"),
        (torch.rand(16), r"at least 2 dimensions, got shape \(16,\)"),
    ],
)
def test_image_value_errors(model, images, match):
    with pytest.raises(ValueError, match=match):
        MultiExitPGD(model, steps=1)(images, torch.zeros(images.shape[0], dtype=torch.long))


def test_image_type_errors(model):
    with pytest.raises(
        TypeError, match=r"floating point in \[0, 1\], got dtype torch.uint8.*/ 255"
    ):
        MultiExitPGD(model)(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match=r"`images` must be a Tensor .* got list"):
        MultiExitPGD(model)([[0.0] * 16], torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize("mode", ["single", "average", "max-average"])
@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (
            torch.zeros(3, dtype=torch.long),
            r"`labels` must have shape \(B,\) = \(2,\) .* got \(3,\)",
        ),
        (
            torch.zeros(2, 1, dtype=torch.long),
            r"`labels` must have shape \(B,\) = \(2,\) .* got \(2, 1\)",
        ),
        (
            torch.tensor([0, 5]),
            r"`labels` must lie in \[0, 5\) for K = 5 classes, got values in \[0, 5\]",
        ),
        (torch.tensor([-1, 0]), r"`labels` must lie in \[0, .*got values in \[-1, 0\]"),
    ],
)
def test_label_value_errors(model, mode, labels, match):
    kwargs = {"exit_index": 0} if mode == "single" else {}
    for steps in (0, 2):
        with pytest.raises(ValueError, match=match):
            MultiExitPGD(model, steps=steps, mode=mode, **kwargs)(torch.rand(2, 16), labels)


def test_label_type_errors(model):
    with pytest.raises(TypeError, match=r"integer class indices .* got dtype torch.float32"):
        MultiExitPGD(model)(torch.rand(2, 16), torch.zeros(2))
    with pytest.raises(TypeError, match=r"needs the labels: call atk\(images, labels\)"):
        MultiExitPGD(model)(torch.rand(2, 16))


@pytest.mark.parametrize("steps", [0, 2])
@pytest.mark.parametrize("index", [3, -4])
def test_exit_index_out_of_range(model, steps, index):
    atk = MultiExitPGD(model, steps=steps, mode="single", exit_index=index)
    with pytest.raises(
        ValueError,
        match=rf"`exit_index` must lie in \[-3, 3\) for a model with 3 exits, got {index}",
    ):
        atk(torch.rand(2, 16), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("mode", ["average", "max-average"])
def test_exit_weights_of_wrong_length(model, mode):
    atk = MultiExitPGD(model, steps=1, mode=mode, exit_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"one weight per exit: expected 3, got 2"):
        atk(torch.rand(2, 16), torch.zeros(2, dtype=torch.long))


class _SingleOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize("mode", ["single", "average", "max-average"])
def test_single_tensor_model_gets_a_helpful_type_error(mode):
    kwargs = {"exit_index": 0} if mode == "single" else {}
    atk = MultiExitPGD(_SingleOutput(), mode=mode, **kwargs)
    with pytest.raises(
        TypeError,
        match=r"_SingleOutput returned a single Tensor of shape \(2, 5\).*stock torchattacks attack.*return the list of exit logits",
    ):
        atk(torch.rand(2, 16), torch.zeros(2, dtype=torch.long))


class _BadExits(nn.Module):
    def __init__(self, output) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 5)
        self.output = output

    def forward(self, x):
        z = self.fc(x)
        return self.output(z)


@pytest.mark.parametrize(
    ("output", "error", "match"),
    [
        (lambda z: {"a": z}, TypeError, r"returned dict"),
        (lambda z: [z, z.argmax(1)], TypeError, r"floating-point logits, got dtype torch.int64"),
        (
            lambda z: [z, z[:, :3]],
            ValueError,
            r"same shape \(B, K\): exit 0 is \(2, 5\), exit 1 is \(2, 3\)",
        ),
        (lambda z: [z[:1], z[:1]], ValueError, r"batch size 1 for an input batch of 2"),
    ],
)
def test_malformed_model_outputs(output, error, match):
    with pytest.raises(error, match=match):
        MultiExitPGD(_BadExits(output), steps=1, mode="average")(
            torch.rand(2, 16), torch.zeros(2, dtype=torch.long)
        )


def test_normalized_images_out_of_range():
    atk = MultiExitPGD(TinyMLPExits(in_features=16, num_classes=5).eval(), steps=1)
    atk.set_normalization_used(mean=[0.5] * 16, std=[0.25] * 16)
    with pytest.raises(
        ValueError, match=r"lie in \[0, 1\] once un-normalized; got values in \[1\.5, 1\.5\]"
    ):
        atk(torch.full((2, 16, 1, 1), 4.0), torch.zeros(2, dtype=torch.long))


# ---------------------------------------------------------------- what a new user trips over


@pytest.mark.parametrize("mode", ["single", "average", "max-average"])
@pytest.mark.parametrize("steps", [0, 2])
def test_negative_labels_name_the_real_number_of_classes(model, mode, steps):
    kwargs = {"exit_index": 0} if mode == "single" else {}
    with pytest.raises(
        ValueError,
        match=r"`labels` must lie in \[0, 5\) for K = 5 classes, got values in \[-1, 0\]",
    ):
        MultiExitPGD(model, steps=steps, mode=mode, **kwargs)(
            torch.rand(2, 16), torch.tensor([-1, 0])
        )


def test_negative_labels_in_targeted_mode(model):
    atk = MultiExitPGD(model, steps=1)
    atk.set_mode_targeted_least_likely(quiet=True)
    with pytest.raises(ValueError, match=r"class indices in \[0, K\), got values in \[-3, 0\]"):
        atk(torch.rand(2, 16), torch.tensor([-3, 0]))


@pytest.mark.parametrize("eps", [8, 2.0, 16])
def test_linf_eps_above_one_warns_a_forgotten_division(model, eps):
    with pytest.warns(UserWarning, match=rf"eps={eps!r} / 255 = .*forgotten|forgotten `/ 255`"):
        MultiExitPGD(model, eps=eps)


@pytest.mark.parametrize(("eps", "norm"), [(1.0, "Linf"), (8 / 255, "Linf"), (3.0, "L2")])
def test_plausible_eps_does_not_warn(model, eps, norm, recwarn):
    MultiExitPGD(model, eps=eps, norm=norm)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_images_without_channel_dimension_for_an_image_model():
    from tests.helpers import TinyMultiExit

    atk = MultiExitPGD(TinyMultiExit().eval(), steps=1)
    with pytest.raises(
        ValueError,
        match=r"TinyMultiExit failed on images of shape \(2, 8, 8\) \(B, H, W\).*`images\.unsqueeze\(1\)`",
    ):
        atk(torch.rand(2, 8, 8), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("mode", ["single", "average", "max-average"])
def test_float64_images_with_a_float32_model_are_cast_for_the_model(model, mode):
    kwargs = {"exit_index": 1} if mode == "single" else {}
    x64 = torch.rand(4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3])
    atk = MultiExitPGD(
        model, eps=0.05, alpha=0.02, steps=2, random_start=False, mode=mode, **kwargs
    )
    adv = atk(x64, y)
    assert adv.dtype == torch.float64
    assert (adv - x64).abs().max() <= 0.05 + 1e-12 and not torch.equal(adv, x64)
    # The model sees float32 inputs: the same signs of the gradient as a float32 attack.
    torch.testing.assert_close(adv.float(), atk(x64.float(), y), rtol=0, atol=1e-6)


def test_normalization_with_a_channel_count_unlike_the_images():
    atk = MultiExitPGD(TinyMLPExits(in_features=16, num_classes=5).eval(), steps=1)
    atk.set_normalization_used(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    with pytest.raises(
        ValueError,
        match=r"given 3 means / stds .* must be \(B, 3, H, W\), got shape \(2, 1, 4, 4\)",
    ):
        atk(torch.rand(2, 1, 4, 4), torch.zeros(2, dtype=torch.long))


def test_normalization_mean_and_std_of_different_lengths():
    atk = MultiExitPGD(TinyMLPExits(in_features=16, num_classes=5).eval())
    with pytest.raises(ValueError, match=r"the same number: got 3 means and 1 stds"):
        atk.set_normalization_used(mean=[0.5, 0.5, 0.5], std=[0.25])
    with pytest.raises(ValueError, match=r"`std` must be non-zero, got \[0\.0\]"):
        atk.set_normalization_used(mean=[0.5], std=[0.0])
