"""EarlyExitClassifier and stage_costs: decisions, shrinking batches, saving, export, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

from neokd_losses import EarlyExitClassifier as TopLevelClassifier
from neokd_losses import run_until as top_level_run_until
from neokd_losses.evaluation.budgeted import (
    budget_curve,
    budgeted_accuracy,
    exit_assignment,
)
from neokd_losses.evaluation.flops import exit_costs
from neokd_losses.inference import EarlyExitClassifier, EarlyExitOutput, run_until, stage_costs
from neokd_losses.models import MSDNet, SmallCNN, attach_exits
from neokd_losses.models import run_until as models_run_until


class _Table(nn.Module):
    """A staged model that reads precomputed logits: the state is the (B, E, K) table.

    Row-wise indexing is exact, so decisions can be compared bit for bit with the
    simulation on the same logits. ``sizes`` records the batch size each stage saw.
    """

    def __init__(self, num_exits: int) -> None:
        super().__init__()
        self.num_exits = num_exits
        self.sizes: list[int] = []

    def forward_stage(self, index: int, state: Tensor) -> tuple[Tensor, Tensor]:
        self.sizes.append(state.shape[0])
        return state, state[:, index]

    def forward(self, table: Tensor) -> list[Tensor]:
        return [table[:, k] for k in range(self.num_exits)]


def _tied_logits(num_exits: int, n: int, k: int, generator: torch.Generator) -> Tensor:
    """(N, E, K) logits on a coarse grid, so that many confidences tie exactly."""
    return torch.randint(0, 4, (n, num_exits, k), generator=generator).float() / 2


def _naive(
    table: Tensor, thresholds: list[float], ensemble: bool
) -> tuple[list[int], list[int], list[float]]:
    """Per-sample loop: first exit whose confidence (of the mean softmax) reaches T_k."""
    n, num_exits, _ = table.shape
    preds, exits, confs = [], [], []
    for i in range(n):
        total = None
        for k in range(num_exits):
            probs = table[i, k].softmax(-1)
            if ensemble:
                total = probs if total is None else total + probs
                probs = total / (k + 1)
            conf, pred = probs.max(-1)
            t = torch.tensor(thresholds[k], dtype=conf.dtype)
            if k == num_exits - 1 or bool(conf >= t):
                preds.append(int(pred))
                exits.append(k)
                confs.append(float(conf))
                break
    return preds, exits, confs


def _random_thresholds(
    confidence: Tensor, generator: torch.Generator, draws: int
) -> list[list[float]]:
    """Thresholds equal to observed confidences (ties), random values and ±inf."""
    num_exits = confidence.shape[0]
    flat = confidence.flatten()
    out = []
    for d in range(draws):
        row = []
        for k in range(num_exits):
            kind = (d + k) % 4
            if kind == 0:
                row.append(float(flat[torch.randint(flat.numel(), (1,), generator=generator)]))
            elif kind == 1:
                row.append(float(confidence[k, torch.randint(confidence.shape[1], (1,))]))
            elif kind == 2:
                row.append(float(torch.rand((), generator=generator)))
            else:
                row.append(math.inf if d % 2 else -math.inf)
        out.append(row)
    return out


@pytest.mark.parametrize("ensemble", [False, True])
def test_decisions_equal_the_simulation_and_a_naive_loop(ensemble: bool) -> None:
    g = torch.Generator().manual_seed(0)
    num_exits, n = 4, 60
    table = _tied_logits(num_exits, n, 3, g)
    stacked = table.permute(1, 0, 2)  # (E, N, K) for the simulation
    targets = torch.randint(0, 3, (n,), generator=g)
    costs = [1.0, 2.5, 4.0, 7.0]
    confidence = stacked.softmax(-1).max(-1).values
    for thresholds in _random_thresholds(confidence, g, draws=100):
        out = EarlyExitClassifier(_Table(num_exits), thresholds, costs, ensemble=ensemble)(table)
        preds, exits, confs = _naive(table, thresholds, ensemble)
        assert out.exit_index.tolist() == exits
        assert out.prediction.tolist() == preds
        assert out.confidence.tolist() == confs
        assert out.cost is not None and out.cost.tolist() == [costs[e] for e in exits]
        if not ensemble:
            assert torch.equal(out.exit_index, exit_assignment(stacked, thresholds))
            accuracy, mean_cost = budgeted_accuracy(stacked, targets, thresholds, costs)
            assert float((out.prediction == targets).double().mean()) == accuracy
            assert float(out.cost.mean()) == mean_cost


def test_ensemble_ties_at_fitted_thresholds_equal_the_simulation() -> None:
    # Thresholds equal to ensemble confidences (as fit_thresholds picks them) on logits
    # off any grid: the simulation's running mean must round as the classifier's does.
    g = torch.Generator().manual_seed(3)
    num_exits, n = 5, 200
    table = 3 * torch.randn(n, num_exits, 7, generator=g)
    stacked = table.permute(1, 0, 2)
    probs = stacked.softmax(-1)
    total, means = probs[0], []
    for k in range(num_exits):  # the naive running mean, one exit after the other
        total = probs[0] if k == 0 else total + probs[k]
        means.append(total / (k + 1))
    confidence = torch.stack(means).amax(-1)  # (E, N)
    for i in range(0, n, 5):
        for k in range(1, num_exits - 1):  # sample i must leave exactly at exit k
            thresholds = [math.inf] * k + [float(confidence[k, i])]
            thresholds += [0.0] * (num_exits - k - 1)
            out = EarlyExitClassifier(_Table(num_exits), thresholds, ensemble=True)(table)
            simulated = exit_assignment(stacked, thresholds, ensemble=True)
            assert int(out.exit_index[i]) == k == int(simulated[i])
            assert torch.equal(out.exit_index, simulated)


def test_later_stages_run_only_on_the_samples_that_remain() -> None:
    g = torch.Generator().manual_seed(1)
    table = _tied_logits(3, 40, 4, g)
    model = _Table(3)
    thresholds = [0.45, 0.4, 0.0]
    out = EarlyExitClassifier(model, thresholds)(table)
    _, exits, _ = _naive(table, thresholds, ensemble=False)
    assert model.sizes == [40, 40 - exits.count(0), exits.count(2)]
    assert 0 < exits.count(0) < 40 and exits.count(2) > 0
    assert out.cost is None


def test_stops_once_every_sample_has_left() -> None:
    model = _Table(3)
    EarlyExitClassifier(model, [0.0, 0.0, 0.0])(torch.randn(5, 3, 2))
    assert model.sizes == [5]


def _small_cnn() -> SmallCNN:
    model = SmallCNN().eval()
    nn.init.normal_(model.block3[-1].weight, std=0.05)  # type: ignore[arg-type]
    return model


def _quantile_thresholds(logits: list[Tensor], share: float) -> list[float]:
    """Thresholds that let about ``share`` of the samples leave at each early exit."""
    return [float(z.softmax(-1).max(-1).values.quantile(1 - share)) for z in logits[:-1]] + [0.0]


@pytest.mark.parametrize("kind", ["small_cnn", "msdnet", "sequential"])
def test_real_models_match_the_simulation(kind: str) -> None:
    model: nn.Module
    if kind == "small_cnn":
        model, x = _small_cnn(), torch.rand(32, 1, 28, 28)
    elif kind == "msdnet":
        model = MSDNet(num_classes=5, num_blocks=3, base=2, step=1, num_channels=8).eval()
        x = torch.rand(24, 3, 32, 32)
    else:
        net = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten()
        )
        model = attach_exits(net, ["1", "3"], 5, include_output=False).eval()
        x = torch.rand(24, 3, 8, 8)
    with torch.no_grad():
        logits = model(x)
    stacked = torch.stack(logits)
    for share in (0.2, 0.4):
        # Offset the quantiles so that no confidence sits within rounding of a threshold.
        thresholds = [t + 1e-4 for t in _quantile_thresholds(logits, share)]
        with torch.inference_mode():
            out = EarlyExitClassifier(model, thresholds)(x)
        want = exit_assignment(stacked, thresholds)
        assert torch.equal(out.exit_index, want)
        chosen = stacked.argmax(-1).gather(0, want[None])[0]
        assert torch.equal(out.prediction, chosen)
        assert 0 < int((want == 0).sum()) < len(x)


def test_budget_curve_points_are_what_a_real_run_measures() -> None:
    """Issue 14 item 5: a budget_curve point equals the classifier's accuracy and cost."""
    torch.manual_seed(3)
    model = _small_cnn()
    val_x, test_x = torch.rand(64, 1, 28, 28), torch.rand(64, 1, 28, 28)
    with torch.no_grad():
        val_logits, test_logits = model(val_x), model(test_x)
    # Labels that agree with the last exit half the time, so accuracies vary by exit.
    val_y = torch.where(torch.rand(64) < 0.5, val_logits[-1].argmax(-1), torch.randint(10, (64,)))
    test_y = torch.where(torch.rand(64) < 0.5, test_logits[-1].argmax(-1), torch.randint(10, (64,)))
    costs = stage_costs(model, test_x[:1])
    curve = budget_curve(val_logits, val_y, test_logits, test_y, costs, num_points=7)
    for p in range(len(curve.budget_indices)):
        classifier = EarlyExitClassifier(model, list(curve.thresholds[p]), costs)
        with torch.no_grad():
            out = classifier(test_x)
        assert out.cost is not None
        assert float((out.prediction == test_y).double().mean()) == curve.accuracies[p]
        assert float(out.cost.mean()) == curve.mean_costs[p]
        fractions = [float((out.exit_index == k).double().mean()) for k in range(3)]
        assert tuple(fractions) == pytest.approx(curve.exit_fractions[p], abs=0)


def test_state_dict_round_trip_with_weights_only(tmp_path) -> None:
    model = _small_cnn()
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        thresholds = _quantile_thresholds(model(x), 0.3)
    classifier = EarlyExitClassifier(model, thresholds, costs=[1.0, 2.0, 3.0], ensemble=True)
    torch.save(classifier.state_dict(), tmp_path / "classifier.pt")
    fresh = EarlyExitClassifier(SmallCNN().eval(), [0.0, 0.0, 0.0])
    fresh.load_state_dict(torch.load(tmp_path / "classifier.pt", weights_only=True))
    assert fresh.ensemble and fresh.has_costs
    assert torch.equal(fresh.thresholds, torch.tensor(thresholds, dtype=torch.float64))
    with torch.no_grad():
        a, b = classifier(x), fresh(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))  # type: ignore[arg-type]


def test_buffers_follow_the_module() -> None:
    classifier = EarlyExitClassifier(_Table(2), [0.5, 0.0], [1.0, 2.0])
    names = dict(classifier.named_buffers())
    assert set(names) == {"thresholds", "costs"}
    assert names["thresholds"].dtype == torch.float64


def test_dtype_conversions_keep_the_decision_rule_in_float64() -> None:
    thresholds, costs = [0.999, 0.8, 0.0], [1039786.0, 8603476.0, 11218574.0]
    model = _small_cnn()
    x = torch.rand(64, 1, 28, 28)
    for dtype in (torch.float16, torch.bfloat16):
        classifier = EarlyExitClassifier(copy.deepcopy(model), thresholds, costs).to(dtype)
        assert classifier.thresholds.dtype == classifier.costs.dtype == torch.float64
        assert classifier.thresholds.tolist() == thresholds  # not rounded to 1.0
        assert next(classifier.model.parameters()).dtype == dtype
        with torch.no_grad():
            out = classifier(x.to(dtype))
            logits = torch.stack(classifier.model(x.to(dtype)))
        assert out.cost is not None and out.cost.dtype == torch.float64
        assert bool(torch.isfinite(out.cost).all())  # 1.1e7 is inf in float16
        assert torch.equal(out.exit_index, exit_assignment(logits, thresholds))
    half = EarlyExitClassifier(copy.deepcopy(model), thresholds, costs).half()
    assert half.thresholds.dtype == torch.float64


def test_nan_logits_raise() -> None:
    table = torch.zeros(3, 2, 4)
    table[1, 0, 2] = float("nan")
    with pytest.raises(ValueError, match="exit 0 returned NaN logits for 1 of 3 samples"):
        EarlyExitClassifier(_Table(2), [-math.inf, 0.0])(table)


def test_training_mode_warns() -> None:
    with pytest.warns(UserWarning, match=r"training mode.*\.eval\(\)"):
        EarlyExitClassifier(SmallCNN().train(), [0.5, 0.5, 0.0])(torch.rand(2, 1, 28, 28))


class _Tiny(nn.Module):
    """A small staged MLP (fast to compile and export)."""

    num_exits = 3

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.ModuleList(nn.Linear(6, 6) for _ in range(3))
        self.heads = nn.ModuleList(nn.Linear(6, 4) for _ in range(3))

    def forward_stage(self, index: int, state: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.relu(self.body[index](state))
        return h, self.heads[index](h)

    def forward(self, x: Tensor) -> list[Tensor]:
        from neokd_losses.models import run_stages

        return run_stages(self, x)


def test_torch_export_with_a_dynamic_batch() -> None:
    model = _Tiny().eval()
    x = torch.randn(32, 6)
    with torch.no_grad():
        thresholds = _quantile_thresholds(model(x), 0.3)
    classifier = EarlyExitClassifier(model, thresholds, [1.0, 2.0, 3.0]).eval()
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(classifier, (x,), dynamic_shapes={"x": {0: batch}})
    for n in (32, 7, 1):
        y = torch.randn(n, 6)
        got, want = program.module()(y), classifier(y)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_torch_compile_with_dynamic_batches() -> None:
    model = _Tiny().eval()
    x = torch.randn(16, 6)
    with torch.no_grad():
        thresholds = _quantile_thresholds(model(x), 0.3)
    classifier = EarlyExitClassifier(model, thresholds).eval()
    compiled = torch.compile(classifier, backend="eager", dynamic=True)
    with torch.no_grad():
        for n in (16, 5):
            y = torch.randn(n, 6)
            got, want = compiled(y), classifier(y)
            assert all(torch.equal(a, b) for a, b in zip(got[:3], want[:3], strict=True))


@pytest.mark.cuda
def test_cuda_matches_cpu() -> None:
    model = _small_cnn()
    x = torch.rand(32, 1, 28, 28)
    with torch.no_grad():
        thresholds = [t + 1e-4 for t in _quantile_thresholds(model(x), 0.3)]
    cpu = EarlyExitClassifier(model, thresholds, [1.0, 2.0, 3.0])
    with torch.no_grad():
        want = cpu(x)
        got = cpu.to("cuda")(x.cuda())
    assert got.prediction.device.type == "cuda"
    assert torch.equal(got.exit_index.cpu(), want.exit_index)


# --- stage_costs -------------------------------------------------------------------------


def test_stage_costs_equal_exit_costs_on_models_built_on_stages() -> None:
    model = SmallCNN()
    x = torch.zeros(2, 1, 28, 28)
    assert stage_costs(model, x) == exit_costs(model, x)


def test_stage_costs_are_exact_when_the_forward_runs_the_trunk_first() -> None:
    class TrunkFirst(_Tiny):
        def forward(self, x: Tensor) -> list[Tensor]:
            features = []
            for layer in self.body:
                x = torch.relu(layer(x))
                features.append(x)
            return [head(h) for head, h in zip(self.heads, features, strict=True)]

    model = TrunkFirst()
    block = 6 * 6 + 6 + 6  # linear 6->6 with bias, then ReLU
    head = 6 * 4 + 4
    want = [float((k + 1) * (block + head)) for k in range(3)]
    assert stage_costs(model, torch.zeros(1, 6)) == want
    with pytest.warns(RuntimeWarning, match="charges each exit what the model computed"):
        charged = exit_costs(model, torch.zeros(1, 6))  # the simulation's blind spot, flagged
    assert charged[0] > want[0]


# --- public places and bad input ------------------------------------------------------


def test_public_names() -> None:
    assert TopLevelClassifier is EarlyExitClassifier
    assert top_level_run_until is run_until is models_run_until
    assert EarlyExitOutput._fields == ("prediction", "exit_index", "confidence", "cost")


@pytest.mark.parametrize(
    ("thresholds", "costs", "error", "match"),
    [
        ([0.5, 0.5], None, ValueError, r"shape \(3,\) for a model with 3 exits, got shape \(2,\)"),
        ([0.5, math.nan, 0.0], None, ValueError, "thresholds.*NaN"),
        ("0.5", None, TypeError, "thresholds.*got str"),
        ([0.5, True, 0.0], None, TypeError, "thresholds.*real numbers"),
        (torch.zeros(3, dtype=torch.bool), None, TypeError, "real numbers"),
        ([0.5, 0.5, 0.0], [1.0, 2.0], ValueError, r"costs.*\(3,\).*got shape \(2,\)"),
        ([0.5, 0.5, 0.0], [1.0, -2.0, 3.0], ValueError, "finite and non-negative"),
        ([0.5, 0.5, 0.0], [1.0, math.inf, 3.0], ValueError, "finite and non-negative"),
        ([0.5, 0.5, 0.0], [3.0, 2.0, 4.0], ValueError, r"non-decreasing.*\[3\.0, 2\.0, 4\.0\]"),
    ],
)
def test_bad_thresholds_and_costs(
    thresholds: object, costs: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        EarlyExitClassifier(SmallCNN(), thresholds, costs)  # type: ignore[arg-type]


def test_ensemble_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="ensemble"):
        EarlyExitClassifier(SmallCNN(), [0.5, 0.5, 0.0], ensemble=1)  # type: ignore[arg-type]


def test_a_model_without_stages_gets_told_how_to_add_them() -> None:
    class Plain(nn.Module):
        def forward(self, x: Tensor) -> list[Tensor]:
            return [x, x]

    with pytest.raises(TypeError, match=r"no stages.*num_exits.*forward_stage.*Staged models"):
        EarlyExitClassifier(Plain(), [0.5, 0.0])
    chain = nn.Module()
    chain.a, chain.b = nn.Linear(4, 4), nn.Linear(4, 4)
    chain.forward = lambda x: chain.b(chain.a(x))  # type: ignore[method-assign]
    attached = attach_exits(chain, ["a", "b"], 3)
    with pytest.raises(TypeError, match=r"nn\.Sequential backbone.*Staged models"):
        EarlyExitClassifier(attached, [0.5, 0.0])


class _Misbehaving(nn.Module):
    num_exits = 2

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward_stage(self, index: int, state: Tensor) -> tuple[Tensor, Tensor]:
        logits = state[:, :3]
        if index == 0 and self.mode == "batch":
            return state, logits[:-1]
        if index == 0 and self.mode == "transposed":
            return state.t().contiguous(), logits
        return state, logits


@pytest.mark.parametrize(
    ("mode", "match"),
    [
        ("batch", r"stage 0 .* shape \(3, 3\) for a batch of 4 samples; expected \(4, K\)"),
        ("transposed", r"stage 0 .* not batch first with 4 samples.*\(5, 4\)"),
    ],
)
def test_misbehaving_stages_raise_in_the_classifier(mode: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EarlyExitClassifier(_Misbehaving(mode), [2.0, 0.0])(torch.rand(4, 5))


def test_input_must_be_a_batch() -> None:
    classifier = EarlyExitClassifier(SmallCNN().eval(), [0.5, 0.5, 0.0])
    with pytest.raises(TypeError, match=r"Tensor batch \(B, \.\.\.\), got list"):
        classifier([torch.rand(1, 28, 28)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
        classifier(torch.rand(1, 28, 28))
