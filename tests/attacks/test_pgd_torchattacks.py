"""MultiExitPGD as a torchattacks citizen: stock PGD equality, normalization, model
training mode, targeted modes (defined on the final exit), save(), MultiAttack, repr."""

from __future__ import annotations

import pytest
import torch
import torchattacks
from torch import Tensor, nn

from neokd_losses.attacks.exit_view import ExitView
from neokd_losses.attacks.pgd import MultiExitPGD
from tests.helpers import TinyMLPExits


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return TinyMLPExits(in_features=16, num_classes=5, num_exits=3).eval()


def _data(batch: int = 8) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.rand(batch, 16, generator=g), torch.randint(0, 5, (batch,), generator=g)


@pytest.mark.parametrize(
    ("norm", "stock", "eps", "alpha"),
    [("Linf", torchattacks.PGD, 0.1, 0.03), ("L2", torchattacks.PGDL2, 0.5, 0.2)],
)
@pytest.mark.parametrize("exit_index", [0, -1])
def test_single_equals_stock_attack_on_an_exit_view(norm, stock, eps, alpha, exit_index):
    model, (x, y) = _mlp(), _data()
    x = x.view(-1, 1, 4, 4)  # PGDL2 reshapes per-sample norms to (B, 1, 1, 1)
    ours = MultiExitPGD(
        model,
        eps=eps,
        alpha=alpha,
        steps=4,
        random_start=False,
        mode="single",
        exit_index=exit_index,
        norm=norm,
    )
    theirs = stock(ExitView(model, exit_index), eps=eps, alpha=alpha, steps=4, random_start=False)
    torch.testing.assert_close(ours(x, y), theirs(x, y), rtol=0, atol=1e-6)


MEAN, STD = [0.4, 0.6], [0.2, 0.3]


def _normalize(x: Tensor) -> Tensor:
    return (x - torch.tensor(MEAN).view(1, 2, 1, 1)) / torch.tensor(STD).view(1, 2, 1, 1)


@pytest.mark.parametrize("mode", ["average", "max-average"])
def test_set_normalization_used_attacks_in_pixel_space(mode):
    model = _mlp()  # takes (B, 2, 2, 4) images, normalized per channel
    x, y = torch.rand(4, 2, 2, 4), torch.randint(0, 5, (4,))
    atk = MultiExitPGD(model, eps=0.05, alpha=0.02, steps=3, random_start=False, mode=mode)
    atk.set_normalization_used(mean=MEAN, std=STD)
    adv_normalized = atk(_normalize(x), y)

    # Independent reference: the same attack on a model that normalizes [0, 1] inputs itself.
    class PixelModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, images):
            return self.inner(_normalize(images))

    expected = MultiExitPGD(
        PixelModel().eval(), eps=0.05, alpha=0.02, steps=3, random_start=False, mode=mode
    )(x, y)
    torch.testing.assert_close(adv_normalized, _normalize(expected), rtol=0, atol=1e-5)
    pixel = adv_normalized * torch.tensor(STD).view(1, 2, 1, 1) + torch.tensor(MEAN).view(
        1, 2, 1, 1
    )
    assert (pixel - x).abs().max() <= 0.05 + 1e-5
    # Outside an attack call, get_exit_logits takes normalized inputs, like get_logits.
    torch.testing.assert_close(atk.get_exit_logits(_normalize(x))[1], model(_normalize(x))[1])


class _ModeRecorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = TinyMLPExits(in_features=16, num_classes=5)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.0)
        self.seen: list[tuple[bool, bool, bool]] = []

    def forward(self, x):
        self.seen.append((self.training, self.bn.training, self.drop.training))
        return self.inner(self.drop(self.bn(x)))


@pytest.mark.parametrize("was_training", [True, False])
@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ({}, (False, False, False)),
        ({"model_training": True}, (True, False, False)),
        ({"model_training": True, "batchnorm_training": True}, (True, True, False)),
        ({"model_training": True, "dropout_training": True}, (True, False, True)),
    ],
)
def test_set_model_training_mode(setting, expected, was_training):
    model = _ModeRecorder().train(was_training)
    atk = MultiExitPGD(model, steps=2, mode="average")
    atk.set_model_training_mode(**setting)
    atk(torch.rand(4, 16), torch.zeros(4, dtype=torch.long))
    assert model.seen and set(model.seen) == {expected}
    assert all(m.training == was_training for m in model.modules())


def _least_likely_at_final_exit(model, x, y):
    """Naive: per sample, the class (not y) with the smallest final-exit logit."""
    with torch.no_grad():
        final = model(x)[-1]
    targets = []
    for j in range(len(y)):
        order = [k for k in range(final.shape[1]) if k != int(y[j])]
        targets.append(min(order, key=lambda k: float(final[j, k])))
    return torch.tensor(targets)


@pytest.mark.parametrize("mode", ["single", "max-average"])
def test_targeted_least_likely_uses_the_final_exit(mode):
    model, (x, y) = _mlp(), _data()
    kwargs = {"exit_index": 0} if mode == "single" else {}
    atk = MultiExitPGD(model, eps=0.1, alpha=0.03, steps=3, random_start=False, mode=mode, **kwargs)
    atk.set_mode_targeted_least_likely(quiet=True)
    by_label = MultiExitPGD(
        model, eps=0.1, alpha=0.03, steps=3, random_start=False, mode=mode, **kwargs
    )
    by_label.set_mode_targeted_by_label(quiet=True)
    targets = _least_likely_at_final_exit(model, x, y)
    # the final exit's least-likely classes differ from exit 0's on this data
    assert not torch.equal(targets, _least_likely_at_final_exit(lambda v: model(v)[:1], x, y))
    torch.testing.assert_close(atk(x, y), by_label(x, targets), rtol=0, atol=0)


def test_targeted_random_and_targeted_attack_lowers_target_loss():
    model, (x, y) = _mlp(), _data()
    atk = MultiExitPGD(model, eps=0.3, alpha=0.1, steps=5, mode="average")
    atk.set_mode_targeted_random(quiet=True)
    adv = atk(x, y)
    assert (adv - x).abs().max() <= 0.3 + 1e-6
    target = (y + 2) % 5
    atk.set_mode_targeted_by_function(lambda images, labels: (labels + 2) % 5, quiet=True)
    adv = atk(x, y)
    ce = nn.functional.cross_entropy
    with torch.no_grad():
        before = sum(ce(z, target) for z in model(x))
        after = sum(ce(z, target) for z in model(adv))
    assert after < before
    assert atk.targeted and atk.get_mode() == "targeted(custom)"


def test_save_writes_adversarial_images_and_final_exit_accuracy(tmp_path, capsys):
    model, (x, y) = _mlp(), _data(8)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    atk = MultiExitPGD(model, eps=0.1, alpha=0.03, steps=3, random_start=False)
    model.train()
    rob_acc, _, _ = atk.save(
        loader, save_path=tmp_path / "adv.pt", verbose=False, return_verbose=True
    )
    assert model.training and all(m.training for m in model.modules())
    saved = torch.load(tmp_path / "adv.pt")
    assert saved["adv_inputs"].shape == x.shape and torch.equal(saved["labels"], y)
    model.eval()
    expected_adv = torch.cat([atk(x[:4], y[:4]), atk(x[4:], y[4:])])
    torch.testing.assert_close(saved["adv_inputs"], expected_adv)
    with torch.no_grad():
        final_correct = (model(expected_adv)[-1].argmax(1) == y).float().mean().item()
    assert rob_acc == pytest.approx(100 * final_correct)


def test_multiattack_combines_multi_exit_and_stock_attacks():
    model, (x, y) = _mlp(), _data(8)
    first = MultiExitPGD(model, eps=0.1, alpha=0.03, steps=3, random_start=False, mode="average")
    second = MultiExitPGD(model, eps=0.1, alpha=0.03, steps=3, random_start=False)
    stock = torchattacks.PGD(first.model, eps=0.1, alpha=0.03, steps=3, random_start=False)
    assert first.model is second.model  # one shared final-exit view per network
    combined = torchattacks.MultiAttack([first, second, stock])
    adv = combined(x, y)
    assert (adv - x).abs().max() <= 0.1 + 1e-6
    # MultiAttack keeps the first attack's images where they fool the final exit.
    adv_first = first(x, y)
    with torch.no_grad():
        fooled = model(adv_first)[-1].argmax(1) != y
    assert fooled.any()
    torch.testing.assert_close(adv[fooled], adv_first[fooled])


def test_exit_view_as_model_chooses_the_exit_of_targets():
    model, (x, y) = _mlp(), _data()
    atk = MultiExitPGD(
        ExitView(model, 0), eps=0.1, alpha=0.03, steps=3, random_start=False, mode="average"
    )
    atk.set_mode_targeted_least_likely(quiet=True)
    by_label = MultiExitPGD(model, eps=0.1, alpha=0.03, steps=3, random_start=False, mode="average")
    by_label.set_mode_targeted_by_label(quiet=True)
    targets = _least_likely_at_final_exit(lambda v: model(v)[:1], x, y)
    torch.testing.assert_close(atk(x, y), by_label(x, targets), rtol=0, atol=0)
    assert atk.model_name == "TinyMLPExits"


def test_repr_shows_the_settings():
    text = repr(
        MultiExitPGD(
            _mlp(),
            eps=0.5,
            alpha=0.1,
            steps=7,
            norm="L2",
            mode="average",
            exit_weights=[1, 2, 3],
            max_batch=2,
        )
    )
    assert text.startswith("MultiExitPGD(model_name=TinyMLPExits")
    for part in [
        "eps=0.5",
        "alpha=0.1",
        "steps=7",
        "random_start=True",
        "mode=average",
        "exit_index=None",
        "exit_weights=(1.0, 2.0, 3.0)",
        "norm=L2",
        "max_batch=2",
        "attack_mode=default",
        "normalization_used=False",
    ]:
        assert part in text


@pytest.mark.parametrize(
    ("norm", "stock", "eps", "alpha"),
    [("Linf", torchattacks.PGD, 0.1, 0.03), ("L2", torchattacks.PGDL2, 0.5, 0.2)],
)
@pytest.mark.parametrize("steps", [0, 3])
def test_random_start_equals_stock_attack_under_the_same_seed(norm, stock, eps, alpha, steps):
    """Same distribution and the same draws: uniform in the L∞ box; for L2 a Gaussian
    direction scaled to U(0, 1)·ε, as torchattacks' PGDL2."""
    model, (x, y) = _mlp(), _data()
    x = x.view(-1, 1, 4, 4)
    ours = MultiExitPGD(
        model, eps=eps, alpha=alpha, steps=steps, mode="single", exit_index=-1, norm=norm
    )
    theirs = stock(ExitView(model, -1), eps=eps, alpha=alpha, steps=steps, random_start=True)
    torch.manual_seed(11)
    got = ours(x, y)
    torch.manual_seed(11)
    torch.testing.assert_close(got, theirs(x, y), rtol=0, atol=1e-6)
    assert not torch.equal(got, x)


def _mean_ce_per_sample(model, images, labels):
    """Per sample, the mean over exits of the cross-entropy, one sample at a time."""
    with torch.no_grad():
        return [
            sum(
                float(nn.functional.cross_entropy(z, labels[j : j + 1]))
                for z in model(images[j : j + 1])
            )
            / 3
            for j in range(len(labels))
        ]


@pytest.mark.parametrize(
    ("norm", "stock", "eps", "alpha"),
    [("Linf", torchattacks.PGD, 0.1, 0.03), ("L2", torchattacks.PGDL2, 0.5, 0.2)],
)
@pytest.mark.parametrize("max_batch", [None, 1])
def test_max_average_selects_among_stock_single_exit_attacks(norm, stock, eps, alpha, max_batch):
    """Reference: torchattacks' own PGD on each exit's ExitView, then per sample the first
    candidate with the largest mean cross-entropy over exits."""
    torch.manual_seed(2)  # a network on which the choice varies for both norms
    model, (x, y) = TinyMLPExits(in_features=16, num_classes=5).eval(), _data(16)
    x = x.view(-1, 1, 4, 4)
    candidates = [
        stock(ExitView(model, i), eps=eps, alpha=alpha, steps=4, random_start=False)(x, y)
        for i in range(3)
    ]
    scores = [_mean_ce_per_sample(model, c, y) for c in candidates]
    choices = [max(range(3), key=lambda i, j=j: (scores[i][j], -i)) for j in range(len(y))]
    assert len(set(choices)) > 1  # the selection matters on this data
    expected = torch.stack([candidates[i][j] for j, i in enumerate(choices)])
    ours = MultiExitPGD(
        model, eps=eps, alpha=alpha, steps=4, random_start=False, norm=norm, max_batch=max_batch
    )
    torch.testing.assert_close(ours(x, y), expected, rtol=0, atol=1e-6)


def test_targeted_random_draws_other_classes_at_the_final_exit():
    """Reference: torchattacks' rule, a uniform draw among the K - 1 classes other than
    the label, one torch.rand per sample from the global generator."""
    model, (x, y) = _mlp(), _data()
    atk = MultiExitPGD(model, eps=0.1, alpha=0.03, steps=3, random_start=False, mode="average")
    atk.set_mode_targeted_random(quiet=True)
    torch.manual_seed(5)
    adv = atk(x, y)
    torch.manual_seed(5)
    targets = []
    for label in y.tolist():
        others = [k for k in range(5) if k != label]
        targets.append(others[int(len(others) * torch.rand([1]))])
    targets_t = torch.tensor(targets)
    assert (targets_t != y).all() and len(set(targets)) > 1
    by_label = MultiExitPGD(model, eps=0.1, alpha=0.03, steps=3, random_start=False, mode="average")
    by_label.set_mode_targeted_by_label(quiet=True)
    torch.testing.assert_close(adv, by_label(x, targets_t), rtol=0, atol=0)


class _BuffersOnly(nn.Module):
    """Two fixed linear exits held in buffers: no parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("w1", torch.randn(16, 5))
        self.register_buffer("w2", torch.randn(16, 5))

    def forward(self, x):
        h = x.flatten(1)
        return [h @ self.w1, torch.tanh(h) @ self.w2]


def test_model_with_buffers_only(capsys):
    model = _BuffersOnly()
    atk = MultiExitPGD(model, eps=0.1, alpha=0.03, steps=3, mode="average")
    assert capsys.readouterr().out == ""  # no "Failed to set device automatically"
    assert atk.device == model.w1.device
    x, y = _data()
    adv = atk(x, y)
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and not torch.equal(adv, x)
    atk.set_mode_targeted_least_likely(quiet=True)
    assert atk(x, y).shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_set_normalization_used_accepts_low_precision_normalized_images(dtype):
    mean, std = [0.485, 0.456], [0.229, 0.224]
    model = _mlp().to(dtype)
    x, y = torch.rand(32, 2, 2, 4), torch.randint(0, 5, (32,))
    x[0], x[1] = 0.0, 1.0  # the corners, where the round trip leaves [0, 1] most
    normalized = (
        (x - torch.tensor(mean).view(1, 2, 1, 1)) / torch.tensor(std).view(1, 2, 1, 1)
    ).to(dtype)
    atk = MultiExitPGD(model, eps=0.05, alpha=0.02, steps=2, mode="average")
    atk.set_normalization_used(mean=mean, std=std)
    assert atk(normalized, y).dtype == dtype
    with pytest.raises(ValueError, match="once un-normalized"):
        atk(torch.full_like(normalized, 5.0), y)  # far outside: still caught


@pytest.mark.cuda
def test_save_with_a_cuda_model_and_a_cpu_loader(tmp_path):
    model, (x, y) = _mlp(), _data(8)
    model.cuda()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    atk = MultiExitPGD(model, eps=0.1, alpha=0.03, steps=3, random_start=False)
    rob_acc, _, _ = atk.save(
        loader, save_path=tmp_path / "adv.pt", verbose=False, return_verbose=True
    )
    saved = torch.load(tmp_path / "adv.pt")
    assert saved["adv_inputs"].device.type == "cpu" and saved["adv_inputs"].shape == x.shape
    assert (saved["adv_inputs"] - x).abs().max() <= 0.1 + 1e-6
    assert 0 <= rob_acc <= 100
    assert atk(x, y).device == x.device  # outside save(), outputs stay on the input's device
