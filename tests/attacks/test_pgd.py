"""MultiExitPGD against naive references written here from docs/paper.md#attacks, plus
the properties every attack must keep (bound, range, loss increase, determinism, ...)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neokd_losses.attacks.pgd import MultiExitPGD
from tests.helpers import TinyMLPExits, TinyMultiExit

EPS_LINF, ALPHA_LINF = 0.1, 0.03
EPS_L2, ALPHA_L2 = 0.5, 0.2


def _model64() -> nn.Module:
    torch.manual_seed(1)
    return TinyMLPExits(in_features=12, num_classes=5, num_exits=3, width=16).double().eval()


def _data64(batch: int = 8) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.rand(batch, 12, generator=g, dtype=torch.float64), torch.randint(
        0, 5, (batch,), generator=g
    )


def _eps_alpha(norm: str) -> tuple[float, float]:
    return (EPS_LINF, ALPHA_LINF) if norm == "Linf" else (EPS_L2, ALPHA_L2)


# ---------------------------------------------------------------- naive references


def _ce(logits_1k: Tensor, label: Tensor) -> Tensor:
    """-log softmax(z)[y] for one sample, written out."""
    return torch.logsumexp(logits_1k[0], dim=0) - logits_1k[0, label]


def naive_pgd_one_sample(model, x, y, loss_fn, eps, alpha, steps, norm, sign=1.0):
    """PGD on ONE sample x (D,) from x itself, ascending sign * loss_fn(list of exits (1, K), y)."""
    x0 = x.clone()
    xa = x.clone()
    for _ in range(steps):
        xa = xa.detach().requires_grad_(True)
        loss = sign * loss_fn(model(xa.unsqueeze(0)), y)
        (g,) = torch.autograd.grad(loss, xa)
        xa = xa.detach()
        if norm == "Linf":
            xa = xa + alpha * torch.sign(g)
            xa = torch.maximum(torch.minimum(xa, x0 + eps), x0 - eps)
        else:
            xa = xa + alpha * g / (g.norm() + 1e-10)
            d = xa - x0
            if d.norm() > eps:
                d = d * (eps / d.norm())
            xa = x0 + d
        xa = xa.clamp(0.0, 1.0)
    return xa


def single_loss(i):
    return lambda exits, y: _ce(exits[i], y)


def average_loss(weights):
    def loss(exits, y):
        total = sum(w * _ce(z, y) for w, z in zip(weights, exits))
        return total / sum(weights)

    return loss


def naive_max_average(model, x, y, eps, alpha, steps, norm, weights=None, sign=1.0):
    """Per sample: E single-exit candidates, keep the first with the largest average loss."""
    num_exits = len(model(x[:1]))
    weights = [1.0] * num_exits if weights is None else weights
    outputs, choices, all_candidates = [], [], []
    for j in range(x.shape[0]):
        candidates = [
            naive_pgd_one_sample(model, x[j], y[j], single_loss(i), eps, alpha, steps, norm, sign)
            for i in range(num_exits)
        ]
        best, best_score = 0, None
        with torch.no_grad():
            for i, cand in enumerate(candidates):
                score = sign * float(average_loss(weights)(model(cand.unsqueeze(0)), y[j]))
                if best_score is None or score > best_score:
                    best, best_score = i, score
        outputs.append(candidates[best])
        choices.append(best)
        all_candidates.append(candidates)
    return torch.stack(outputs), choices, all_candidates


# ---------------------------------------------------------------- equality with references


@pytest.mark.parametrize(
    ("norm", "exit_index"),
    [("Linf", 0), ("Linf", 1), ("Linf", 2), ("Linf", -1), ("L2", -3), ("L2", 2)],
)
def test_single_matches_naive_reference(norm, exit_index):
    model, (x, y) = _model64(), _data64()
    eps, alpha = _eps_alpha(norm)
    atk = MultiExitPGD(
        model,
        eps=eps,
        alpha=alpha,
        steps=4,
        random_start=False,
        mode="single",
        exit_index=exit_index,
        norm=norm,
    )
    expected = torch.stack(
        [
            naive_pgd_one_sample(model, x[j], y[j], single_loss(exit_index), eps, alpha, 4, norm)
            for j in range(len(x))
        ]
    )
    torch.testing.assert_close(atk(x, y), expected, rtol=0, atol=1e-8)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("weights", [None, [1.0, 0.0, 3.0]])
def test_average_matches_naive_reference(norm, weights):
    model, (x, y) = _model64(), _data64()
    eps, alpha = _eps_alpha(norm)
    atk = MultiExitPGD(
        model,
        eps=eps,
        alpha=alpha,
        steps=4,
        random_start=False,
        mode="average",
        exit_weights=weights,
        norm=norm,
    )
    loss = average_loss([1.0, 1.0, 1.0] if weights is None else weights)
    expected = torch.stack(
        [naive_pgd_one_sample(model, x[j], y[j], loss, eps, alpha, 4, norm) for j in range(len(x))]
    )
    torch.testing.assert_close(atk(x, y), expected, rtol=0, atol=1e-8)


def test_average_with_weights_differs_from_uniform():
    model, (x, y) = _model64(), _data64()
    kwargs = dict(eps=EPS_LINF, alpha=ALPHA_LINF, steps=4, random_start=False, mode="average")
    uniform = MultiExitPGD(model, **kwargs)(x, y)
    weighted = MultiExitPGD(model, exit_weights=[1.0, 0.0, 3.0], **kwargs)(x, y)
    assert not torch.equal(uniform, weighted)


@pytest.mark.parametrize(("norm", "max_batch"), [("Linf", None), ("L2", None), ("Linf", 2)])
def test_max_average_matches_naive_reference(norm, max_batch):
    model, (x, y) = _model64(), _data64()
    eps, alpha = _eps_alpha(norm)
    atk = MultiExitPGD(
        model, eps=eps, alpha=alpha, steps=4, random_start=False, norm=norm, max_batch=max_batch
    )
    expected, choices, candidates = naive_max_average(model, x, y, eps, alpha, 4, norm)
    # The test can only fail on a wrong choice if candidates differ and choices vary.
    assert len(set(choices)) > 1
    assert all(not torch.equal(c[0], c[1]) for c in candidates)
    torch.testing.assert_close(atk(x, y), expected, rtol=0, atol=1e-8)


def test_max_average_choice_is_argmax_of_weighted_average_loss():
    model, (x, y) = _model64(), _data64()
    weights = [0.0, 1.0, 0.5]
    atk = MultiExitPGD(
        model, eps=EPS_LINF, alpha=ALPHA_LINF, steps=4, random_start=False, exit_weights=weights
    )
    expected, choices, _ = naive_max_average(
        model, x, y, EPS_LINF, ALPHA_LINF, 4, "Linf", weights=weights
    )
    _, uniform_choices, _ = naive_max_average(model, x, y, EPS_LINF, ALPHA_LINF, 4, "Linf")
    assert choices != uniform_choices  # the weights change the selection on this data
    torch.testing.assert_close(atk(x, y), expected, rtol=0, atol=1e-8)


@pytest.mark.parametrize("mode", ["single", "average", "max-average"])
def test_targeted_by_function_matches_naive_reference(mode):
    model, (x, y) = _model64(), _data64()
    target = (y + 1) % 5
    kwargs = {"exit_index": 1} if mode == "single" else {}
    atk = MultiExitPGD(
        model, eps=EPS_LINF, alpha=ALPHA_LINF, steps=4, random_start=False, mode=mode, **kwargs
    )
    atk.set_mode_targeted_by_function(lambda images, labels: (labels + 1) % 5, quiet=True)
    if mode == "max-average":
        expected, _, _ = naive_max_average(
            model, x, target, EPS_LINF, ALPHA_LINF, 4, "Linf", sign=-1.0
        )
    else:
        loss = single_loss(1) if mode == "single" else average_loss([1.0, 1.0, 1.0])
        expected = torch.stack(
            [
                naive_pgd_one_sample(
                    model, x[j], target[j], loss, EPS_LINF, ALPHA_LINF, 4, "Linf", sign=-1.0
                )
                for j in range(len(x))
            ]
        )
    torch.testing.assert_close(atk(x, y), expected, rtol=0, atol=1e-8)


def test_conv_model_float32_single_matches_reference():
    model = TinyMultiExit().eval()
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    atk = MultiExitPGD(
        model,
        eps=EPS_LINF,
        alpha=ALPHA_LINF,
        steps=3,
        random_start=False,
        mode="single",
        exit_index=0,
    )
    expected = torch.stack(
        [
            naive_pgd_one_sample(model, x[j], y[j], single_loss(0), EPS_LINF, ALPHA_LINF, 3, "Linf")
            for j in range(4)
        ]
    )
    # float32 round-off may flip the sign of a near-zero gradient entry: compare most pixels.
    close = (atk(x, y) - expected).abs() <= 1e-6
    assert close.float().mean() > 0.99


# ---------------------------------------------------------------- properties


def _mlp(num_classes: int = 5) -> nn.Module:
    return TinyMLPExits(in_features=16, num_classes=num_classes, num_exits=3).eval()


def _trained_model() -> tuple[nn.Module, Tensor, Tensor]:
    """TinyMLPExits fitted by 30 plain gradient steps to 'which group of 4 features is high'."""
    torch.manual_seed(3)
    y = torch.arange(64) % 4
    x = 0.4 * torch.rand(64, 16)
    x.view(64, 4, 4)[torch.arange(64), y] += 0.5
    model = TinyMLPExits(in_features=16, num_classes=4, num_exits=3)
    for _ in range(30):  # plain SGD by hand: building a torch.optim optimizer is slow to import
        model.zero_grad()
        sum(F.cross_entropy(z, y) for z in model(x)).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.5 * p.grad
    model.zero_grad(set_to_none=True)
    return model.eval(), x[:16], y[:16]


@pytest.fixture(scope="module")
def trained():
    return _trained_model()


def _avg_ce(model, x, y):
    with torch.no_grad():
        return torch.stack([F.cross_entropy(z, y) for z in model(x)]).mean()


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("mode", ["single", "average", "max-average"])
def test_attack_raises_the_attacked_loss(trained, mode, norm):
    model, x, y = trained
    kwargs = {"exit_index": 1} if mode == "single" else {}
    eps = 0.15 if norm == "Linf" else 0.6
    adv = MultiExitPGD(model, eps=eps, alpha=eps / 4, steps=5, mode=mode, norm=norm, **kwargs)(x, y)
    if mode == "single":
        with torch.no_grad():
            clean, attacked = F.cross_entropy(model(x)[1], y), F.cross_entropy(model(adv)[1], y)
    else:
        clean, attacked = _avg_ce(model, x, y), _avg_ce(model, adv, y)
    assert clean < 0.1  # the model did learn the task
    assert attacked > 3 * clean


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("mode", ["single", "average", "max-average"])
def test_perturbation_bound_and_range(mode, norm):
    model = _mlp()
    x, y = torch.rand(6, 1, 4, 4), torch.randint(0, 5, (6,))
    x[0] = 0.0
    x[1] = 1.0  # saturated images exercise the [0, 1] clipping
    eps = 0.05 if norm == "Linf" else 0.4
    kwargs = {"exit_index": -1} if mode == "single" else {}
    adv = MultiExitPGD(model, eps=eps, alpha=eps / 2, steps=4, mode=mode, norm=norm, **kwargs)(x, y)
    delta = (adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-6).all()
    assert (size > 0).any()
    assert adv.min() >= 0 and adv.max() <= 1
    assert adv.dtype == x.dtype and adv.device == x.device and not adv.requires_grad


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_random_start_lies_in_ball(norm):
    model = _mlp()
    x, y = torch.rand(8, 16), torch.randint(0, 5, (8,))
    eps = 0.05 if norm == "Linf" else 0.4
    adv = MultiExitPGD(model, eps=eps, steps=0, mode="average", norm=norm)(x, y)
    delta = (adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-6).all() and (size > 0).all()


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_batched_and_chunked_max_average_agree(norm):
    model = _mlp()
    x, y = torch.rand(8, 16), torch.randint(0, 5, (8,))
    eps, alpha = (0.05, 0.02) if norm == "Linf" else (0.4, 0.15)
    outs = [
        MultiExitPGD(
            model,
            eps=eps,
            alpha=alpha,
            steps=3,
            norm=norm,
            max_batch=chunk,
            generator=torch.Generator().manual_seed(5),
        )(x, y)
        for chunk in (None, 1, 2, 3, 10)
    ]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["average", "max-average"])
def test_seeded_generator_is_deterministic(mode):
    model = _mlp()
    x, y = torch.rand(4, 16), torch.randint(0, 5, (4,))

    def run(seed):
        return MultiExitPGD(
            model, steps=2, mode=mode, generator=torch.Generator().manual_seed(seed)
        )(x, y)

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    torch.manual_seed(0)
    a = MultiExitPGD(model, steps=2, mode=mode)(x, y)
    torch.manual_seed(0)
    assert torch.equal(a, MultiExitPGD(model, steps=2, mode=mode)(x, y))


def test_degenerate_budgets_return_the_input():
    model = _mlp()
    x, y = torch.rand(4, 16), torch.randint(0, 5, (4,))
    assert torch.equal(MultiExitPGD(model, eps=0.0, steps=3)(x, y), x)
    assert torch.equal(MultiExitPGD(model, eps=0.0, steps=3, norm="L2")(x, y), x)
    assert torch.equal(MultiExitPGD(model, steps=0, random_start=False, mode="average")(x, y), x)
    empty = torch.rand(0, 16)
    assert MultiExitPGD(model, steps=2)(empty, torch.zeros(0, dtype=torch.long)).shape == (0, 16)


class _Flaky(nn.Module):
    """A 3-exit model that raises on its n-th call; its dropout stays in eval on purpose."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.inner = TinyMultiExit()
        self.calls, self.fail_at = 0, fail_at

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("boom")
        return self.inner(x)


@pytest.mark.parametrize("mode", ["single", "average", "max-average"])
def test_mode_restored_when_the_model_raises(mode):
    model = _Flaky(fail_at=2).train()
    model.inner.dropout.eval()
    before = {name: m.training for name, m in model.named_modules()}
    kwargs = {"exit_index": 0} if mode == "single" else {}
    atk = MultiExitPGD(model, steps=3, mode=mode, **kwargs)
    atk.set_normalization_used(mean=[0.5], std=[0.5])
    with pytest.raises(RuntimeError, match="boom"):
        atk(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    assert {name: m.training for name, m in model.named_modules()} == before
    assert atk._normalization_applied is True  # the normalization switch is restored too


def test_model_is_in_eval_during_the_attack_and_restored_after():
    seen = []

    class Recorder(TinyMultiExit):
        def forward(self, x):
            seen.append((self.training, self.dropout.training))
            return super().forward(x)

    model = Recorder().train()
    MultiExitPGD(model, steps=2)(torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    assert seen and all(s == (False, False) for s in seen)
    assert model.training and model.dropout.training


def test_input_untouched_no_parameter_grad_and_works_under_no_grad():
    model = _mlp()
    x, y = torch.rand(4, 16), torch.randint(0, 5, (4,))
    x_copy, y_copy = x.clone(), y.clone()
    with torch.no_grad():
        adv = MultiExitPGD(model, steps=3)(x, y)
    assert torch.equal(x, x_copy) and torch.equal(y, y_copy)
    assert not torch.equal(adv, x)
    assert all(p.grad is None for p in model.parameters())
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        assert MultiExitPGD(model, steps=2)(xi, yi).shape == x.shape


def test_leaves_existing_parameter_grads_alone():
    model = _mlp()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    MultiExitPGD(model, steps=2)(torch.rand(2, 16), torch.zeros(2, dtype=torch.long))
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


def test_float64_images_and_float64_model():
    model, (x, y) = _model64(), _data64(4)
    adv = MultiExitPGD(model, steps=2)(x, y)
    assert adv.dtype == torch.float64


def test_works_under_autocast_with_low_precision_logits():
    model = _mlp()
    x, y = torch.rand(4, 16), torch.randint(0, 5, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x)[0].dtype == torch.bfloat16
        adv = MultiExitPGD(model, eps=0.05, steps=3)(x, y)
    assert adv.dtype == torch.float32
    assert (adv - x).abs().max() <= 0.05 + 1e-6 and not torch.equal(adv, x)


def test_get_exit_logits_returns_every_exit():
    model = TinyMultiExit().eval()
    x = torch.rand(3, 1, 8, 8)
    atk = MultiExitPGD(model)
    for got, want in zip(atk.get_exit_logits(x), model(x), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.cuda
def test_cuda_model_with_cpu_generator():
    model = TinyMultiExit().cuda().eval()
    x, y = torch.rand(4, 1, 8, 8, device="cuda"), torch.randint(0, 10, (4,), device="cuda")
    gen = torch.Generator().manual_seed(0)
    adv = MultiExitPGD(model, steps=2, generator=gen)(x, y)
    assert adv.device == x.device and (adv - x).abs().max() <= 8 / 255 + 1e-6
    with torch.autocast("cuda", dtype=torch.float16):
        assert MultiExitPGD(model, steps=2)(x, y).dtype == torch.float32


class _Softmaxed(TinyMLPExits):
    def forward(self, x):
        return [z.softmax(-1) for z in super().forward(x)]


class _Detached(TinyMLPExits):
    def forward(self, x):
        return super().forward(x.detach())


class _Rounded(TinyMLPExits):
    def forward(self, x):
        return super().forward(torch.round(x))  # zero gradient almost everywhere


def test_warns_when_the_model_returns_probabilities():
    with pytest.warns(RuntimeWarning, match=r"look like probabilities .* Return the logits"):
        MultiExitPGD(_Softmaxed(in_features=16, num_classes=5).eval(), steps=1)(
            torch.rand(2, 16), torch.zeros(2, dtype=torch.long)
        )


def test_warns_when_every_gradient_is_zero():
    with pytest.warns(
        RuntimeWarning, match=r"input gradient of _Rounded was exactly zero in all 2 steps"
    ):
        MultiExitPGD(_Rounded(in_features=16, num_classes=5).eval(), steps=2, mode="average")(
            torch.rand(2, 16), torch.zeros(2, dtype=torch.long)
        )


def test_no_warning_on_a_normal_model(recwarn):
    MultiExitPGD(_mlp(), steps=2)(torch.rand(2, 16), torch.zeros(2, dtype=torch.long))
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("mode", ["single", "max-average"])
def test_model_that_detaches_its_input_raises(mode):
    kwargs = {"exit_index": 0} if mode == "single" else {}
    with pytest.raises(RuntimeError, match=r"_Detached do not depend on its input"):
        MultiExitPGD(_Detached(in_features=16, num_classes=5).eval(), steps=1, mode=mode, **kwargs)(
            torch.rand(2, 16), torch.zeros(2, dtype=torch.long)
        )


@pytest.mark.parametrize(("norm", "max_batch"), [("Linf", 1), ("L2", 1), ("L2", 2)])
def test_max_average_chunked_matches_naive_reference(norm, max_batch):
    model, (x, y) = _model64(), _data64()
    eps, alpha = _eps_alpha(norm)
    atk = MultiExitPGD(
        model, eps=eps, alpha=alpha, steps=4, random_start=False, norm=norm, max_batch=max_batch
    )
    expected, choices, _ = naive_max_average(model, x, y, eps, alpha, 4, norm)
    assert len(set(choices)) > 1
    torch.testing.assert_close(atk(x, y), expected, rtol=0, atol=1e-8)


class _Halves(nn.Module):
    """Two exits, one shared head on each half of the input: a symmetric input gives two
    different candidates (one per half) with exactly equal average losses."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.fc = nn.Linear(4, 3).double()

    def forward(self, x):
        return [self.fc(x[:, :4]), self.fc(x[:, 4:])]


@pytest.mark.parametrize("max_batch", [None, 1])
def test_max_average_ties_go_to_the_earliest_exit(max_batch):
    model = _Halves().eval()
    half = torch.rand(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    x, y = torch.cat([half, half], 1), torch.tensor([0, 1, 2, 0, 1])
    adv = MultiExitPGD(
        model, eps=0.1, alpha=0.05, steps=2, random_start=False, max_batch=max_batch
    )(x, y)
    _, _, candidates = naive_max_average(model, x, y, 0.1, 0.05, 2, "Linf")
    for j, (first, second) in enumerate(candidates):
        assert not torch.equal(first, second)  # different images ...
        with torch.no_grad():  # ... with exactly the same average loss
            scores = [
                float(average_loss([1.0, 1.0])(model(c[None]), y[j])) for c in (first, second)
            ]
        assert scores[0] == scores[1]
    assert torch.equal(adv[:, 4:], half) and not torch.equal(adv[:, :4], half)  # exit 0's


@pytest.mark.parametrize("mode", ["single", "average", "max-average"])
def test_one_exit_and_one_sample(mode):
    """E = 1: every mode is the single attack on that exit; B = 1 works too."""
    torch.manual_seed(1)
    model = TinyMLPExits(in_features=12, num_classes=5, num_exits=1).double().eval()
    x, y = _data64(3)
    kwargs = {"exit_index": 0} if mode == "single" else {}
    atk = MultiExitPGD(
        model, eps=EPS_LINF, alpha=ALPHA_LINF, steps=3, random_start=False, mode=mode, **kwargs
    )
    expected = torch.stack(
        [
            naive_pgd_one_sample(model, x[j], y[j], single_loss(0), EPS_LINF, ALPHA_LINF, 3, "Linf")
            for j in range(3)
        ]
    )
    torch.testing.assert_close(atk(x, y), expected, rtol=0, atol=1e-8)
    torch.testing.assert_close(atk(x[1:2], y[1:2]), expected[1:2], rtol=0, atol=1e-8)


class _TupleExits(TinyMLPExits):
    def forward(self, x):
        return tuple(super().forward(x))


@pytest.mark.parametrize("mode", ["average", "max-average"])
def test_tuple_output_model_equals_list_output_model(mode):
    torch.manual_seed(1)
    as_list = TinyMLPExits(in_features=16, num_classes=5).eval()
    as_tuple = _TupleExits(in_features=16, num_classes=5).eval()
    as_tuple.load_state_dict(as_list.state_dict())
    x, y = torch.rand(4, 16), torch.randint(0, 5, (4,))
    kwargs = dict(steps=3, random_start=False, mode=mode)
    torch.testing.assert_close(
        MultiExitPGD(as_tuple, **kwargs)(x, y),
        MultiExitPGD(as_list, **kwargs)(x, y),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("mode", ["single", "average", "max-average"])
def test_strided_inputs_give_the_contiguous_result(mode):
    model = TinyMultiExit(in_channels=3).eval()
    x, y = torch.rand(4, 3, 8, 8), torch.randint(0, 10, (4,))
    kwargs = {"exit_index": 1} if mode == "single" else {}
    atk = MultiExitPGD(model, steps=2, random_start=False, mode=mode, **kwargs)
    expected = atk(x, y)
    transposed = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    channels_last = x.contiguous(memory_format=torch.channels_last)
    for strided in (transposed, channels_last):
        assert not strided.is_contiguous()
        torch.testing.assert_close(atk(strided, y), expected, rtol=0, atol=1e-6)


class _ZeroGradient(nn.Module):
    """Two exits whose logits do not change with the input (gradient exactly zero)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        z = self.fc(torch.zeros_like(x)) + 0 * x.sum(1, keepdim=True)
        return [z, 2 * z]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("eps", [0.0, 0.5])
def test_l2_zero_gradient_in_half_precision_is_not_nan(dtype, eps):
    # In float16 the gradient norm (0) plus torchattacks' 1e-10 guard is 0: 0 / 0 = NaN.
    model = _ZeroGradient().to(dtype).eval()
    x, y = torch.rand(3, 16).to(dtype), torch.randint(0, 5, (3,))
    with pytest.warns(RuntimeWarning, match="exactly zero"):
        adv = MultiExitPGD(model, eps=eps, steps=2, norm="L2", mode="average")(x, y)
    assert adv.dtype == dtype and not adv.isnan().any()
    assert (adv.double() - x.double()).norm(dim=1).max() <= eps


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("mode", ["average", "max-average"])
def test_half_precision_model_stays_inside_the_ball(dtype, norm, mode):
    # Rounding the step to nearest in bfloat16 used to leave the ball by up to 0.002.
    torch.manual_seed(2)
    model = TinyMLPExits(in_features=16, num_classes=5).to(dtype).eval()
    x, y = torch.rand(32, 16).to(dtype), torch.randint(0, 5, (32,))
    eps = 8 / 255 if norm == "Linf" else 0.3
    adv = MultiExitPGD(model, eps=eps, alpha=eps / 3, steps=3, norm=norm, mode=mode)(x, y)
    delta = (adv.double() - x.double()).flatten(1)
    size = delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)
    assert adv.dtype == dtype
    assert (size <= eps).all() and (size > 0.5 * eps).any()
    assert adv.min() >= 0 and adv.max() <= 1


class _FaintExits(nn.Module):
    """Two float16 exits with weights of order 1e-5: input gradients near fp16's floor."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 5)
        with torch.no_grad():
            self.fc.weight.uniform_(-2e-5, 2e-5)

    def forward(self, x):
        z = self.fc(x)
        return [z, 2 * z]


@pytest.mark.parametrize("mode", ["single", "average", "max-average"])
def test_float16_gradients_of_a_large_batch_do_not_underflow(mode):
    # Per sample, ∂CE/∂x is about 1e-5 here, which float16 holds (as a subnormal); scaled
    # by 1/B for a batch mean with B = 512 it would round to 0 and the attack would stall.
    torch.manual_seed(0)
    model = _FaintExits().half().eval()
    x = (0.1 + 0.8 * torch.rand(512, 16)).half()
    y = torch.randint(0, 5, (512,))
    kwargs = {"exit_index": 0} if mode == "single" else {}
    atk = MultiExitPGD(model, eps=0.1, alpha=0.05, steps=1, random_start=False, mode=mode, **kwargs)
    adv = atk(x, y)
    moved = (adv != x).double().mean().item()
    assert moved > 0.9, f"only {moved:.1%} of the pixels moved"
