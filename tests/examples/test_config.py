"""Config loading: every shipped config validates; invalid ones fail with clear messages."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import _config
import pytest
from _config import ConfigError
from _methods import build_criterion

from .conftest import DIGITS, EXAMPLES

SHIPPED = sorted((EXAMPLES / "configs").glob("*.toml"))
PAPER_SETTINGS = {
    "mnist_smallcnn",
    "cifar10_msdnet3",
    "cifar100_msdnet7",
    "tinyimagenet_msdnet5",
    "imagenet_msdnet5",
    "digits",
}


def test_every_paper_setting_ships() -> None:
    assert {p.stem for p in SHIPPED} >= PAPER_SETTINGS


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_configs_load_and_build_their_loss(path: Path) -> None:
    config = _config.load(path)
    assert config.name == path.stem
    for method in ("adv", "neokd", "nkd", "eokd", "skd", "ard"):
        cfg = _config.load(path, {"loss.method": method})
        criterion = build_criterion(cfg.loss)
        assert criterion.method == method


def test_paper_hyper_parameters() -> None:
    """docs/paper.md: objective, attacks, training setups, checked on the shipped configs."""
    expected = {
        # name: (epochs, batch, lr, milestones, eps, step, exit weights)
        "mnist_smallcnn": (150, 128, 0.01, [50], 0.3, 20 / 255, [1.0, 1.0, 1.0]),
        "cifar10_msdnet3": (150, 128, 0.1, [75, 115], 8 / 255, 2 / 255, [1.0, 1.0, 1.0]),
        "cifar100_msdnet7": (
            150,
            128,
            0.1,
            [75, 115],
            8 / 255,
            2 / 255,
            [1.0, 1.0, 1.0, 1.5, 1.5, 1.5, 1.5],
        ),
        "tinyimagenet_msdnet5": (
            150,
            128,
            0.1,
            [50, 100],
            2 / 255,
            2 / 3 * 2 / 255,
            [1.0, 1.0, 1.0, 1.5, 1.5],
        ),
    }
    for name, (epochs, batch, lr, milestones, eps, step, gamma) in expected.items():
        c = _config.load(EXAMPLES / "configs" / f"{name}.toml")
        assert (c.optim.epochs, c.optim.batch_size, c.optim.lr, c.optim.milestones) == (
            epochs,
            batch,
            lr,
            milestones,
        )
        assert c.attack.eps == pytest.approx(eps, abs=1e-4) and c.attack.step_size == pytest.approx(
            step, abs=1e-4
        )
        assert (c.attack.train_steps, c.attack.eval_steps, c.attack.train_mode) == (
            7,
            50,
            "max-average",
        )
        assert c.optim.momentum == 0.9 and c.optim.weight_decay == 5e-4
        assert c.loss.neokd["alpha"] == 3.0 and c.loss.neokd["beta"] == 1.0
        assert c.loss.neokd["exit_weights"] == gamma
    imagenet = _config.load(EXAMPLES / "configs" / "imagenet_msdnet5.toml")
    assert imagenet.optim.lr == 0.001 and imagenet.optim.milestones == []


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"optim.lrr": 0.1}, r"unknown key `optim.lrr`.*Did you mean 'lr'"),
        ({"optimizer.lr": 0.1}, r"unknown section \[optimizer\].*Did you mean 'optim'"),
        ({"optim.epochs": "ten"}, r"`optim.epochs` must be an integer, got 'ten' \(str\)"),
        ({"optim.epochs": 2.5}, r"`optim.epochs` must be an integer, got 2.5"),
        ({"optim.epochs": 0}, r"`optim.epochs` must be >= 1, got 0"),
        ({"optim.lr": 0}, r"`optim.lr` must be > 0, got 0.0"),
        ({"optim.milestones": [10, 5]}, r"strictly increasing"),
        ({"optim.milestones": [1, "x"]}, r"list of integers"),
        ({"eval.plots": "yes"}, r"`eval.plots` must be true or false"),
        ({"loss.method": "neo-kd"}, r"`loss.method` must be one of .*Did you mean 'neokd'"),
        (
            {"attack.train_mode": "single"},
            r"`attack.train_mode` must be one of 'max-average', 'average'",
        ),
        ({"attack.eps": 8}, r"`attack.eps` must be <= 1 .*8/255 = 0.0314"),
        ({"attack.step_size": -0.1}, r"`attack.step_size` must be > 0"),
        ({"data.dataset": "svhn"}, r"`data.dataset` must be one of"),
        ({"data.test_size": 0}, r"`data.test_size` must be >= 1 for the digits dataset"),
        ({"data.val_size": 0}, r"`data.val_size` must be >= 1"),
        ({"run.amp": "fp8"}, r"`run.amp` must be one of 'none', 'bf16', 'fp16'"),
        ({"run.device": "tpu"}, r"`run.device` must be 'auto', 'cpu'"),
        ({"run.device": "cudax"}, r"`run.device` must be 'auto', 'cpu'.*got 'cudax'"),
        ({"run.device": "cuda:x"}, r"`run.device` must be 'auto', 'cpu'.*got 'cuda:x'"),
        ({"loss.neokd": 3}, r"`loss.neokd` must be a table"),
        ({"data": 1}, r"`\[data\]` must be a table"),
        ({"data.augment": True}, r"`data.augment` has no augmentation defined for 'digits'"),
    ],
)
def test_invalid_values_name_key_and_value(overrides: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _config.load(DIGITS, overrides)


def test_missing_section_and_key(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(
        '[data]\ndataset = "digits"\ntest_size = 10\n[model]\nname = "digits_cnn"\n[loss]\n[optim]\nepochs = 1\n'
    )
    with pytest.raises(ConfigError, match=r"missing section\(s\): \[attack\]"):
        _config.load(path)
    path.write_text(path.read_text() + "[attack]\neps = 0.1\n")
    with pytest.raises(
        ConfigError, match=r"missing required key\(s\) in \[optim\]: optim.batch_size, optim.lr"
    ):
        _config.load(path)


def test_syntax_error_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[data\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        _config.load(path)
    with pytest.raises(
        FileNotFoundError, match=r"not found; the shipped ones are in examples/configs/: .*digits"
    ):
        _config.load(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            {"loss.method": "neokd", "loss.neokd.gamma": 1.0},
            r"unknown key `loss.neokd.gamma`: NEOKDLoss takes alpha, beta",
        ),
        ({"loss.method": "neokd", "loss.neokd.reduction": "sum"}, r"set by the training loop"),
        (
            {"loss.method": "neokd", "loss.neokd.alpha": -1.0},
            r"\[loss.neokd\] rejected by NEOKDLoss: .*alpha",
        ),
        ({"loss.method": "ard", "loss.ard.alpha": 2.0}, r"\[loss.ard\] rejected by ARDLoss"),
    ],
)
def test_loss_tables_are_checked_against_the_loss(overrides: dict, match: str) -> None:
    config = _config.load(DIGITS, overrides)
    with pytest.raises(ConfigError, match=match):
        build_criterion(config.loss)


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("optim.lr=0.5", ["optim", "lr"], 0.5),
        ("optim.milestones=[3, 4]", ["optim", "milestones"], [3, 4]),
        ("loss.method=skd", ["loss", "method"], "skd"),
        ('loss.method="skd"', ["loss", "method"], "skd"),
        ("eval.plots=false", ["eval", "plots"], False),
        ("loss.neokd.alpha = 2", ["loss", "neokd", "alpha"], 2),
    ],
)
def test_parse_override(text: str, key: list, value: object) -> None:
    assert _config.parse_override(text) == (key, value)


@pytest.mark.parametrize("text", ["optim.lr", "lr=1", "optim..lr=1"])
def test_parse_override_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="override"):
        _config.parse_override(text)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    config = _config.load(
        DIGITS, {"optim.milestones": [3], "loss.neokd.exit_weights": [1.0, 2.0, 1.5]}
    )
    path = tmp_path / "digits.toml"
    path.write_text(_config.dumps_toml(config))
    assert _config.load(path) == config


def test_training_identity_ignores_only_harmless_keys() -> None:
    base = _config.load(DIGITS)
    same = _config.load(
        DIGITS,
        {
            "optim.epochs": 99,
            "data.data_dir": "/x",
            "eval.batch_size": 7,
            "run.device": "cpu",
            "attack.eval_steps": 3,
        },
    )
    assert same.training_identity() == base.training_identity()
    for key, value in [
        ("optim.lr", 0.5),
        ("attack.eps", 0.1),
        ("loss.method", "adv"),
        ("run.seed", 3),
        ("data.train_cap", 5),
    ]:
        other = _config.load(DIGITS, {key: value})
        diffs = _config.describe_mismatch(base.training_identity(), other.training_identity())
        assert len(diffs) == 1 and diffs[0].startswith(key + ":")


@pytest.mark.parametrize(
    ("method", "alpha", "beta"), [("neokd", 3.0, 1.0), ("nkd", 3.0, 0.0), ("eokd", 0.0, 1.0)]
)
def test_ablations_zero_one_coefficient(method: str, alpha: float, beta: float) -> None:
    module = build_criterion(_config.load(DIGITS, {"loss.method": method}).loss).module
    assert (module.alpha, module.beta) == (alpha, beta)


def test_config_reads_toml_on_python_3_10_through_tomli(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the standard library's tomllib (Python 3.10), the examples extra's tomli is used."""
    import importlib.util
    import sys

    tomllib = pytest.importorskip("tomllib")  # on Python 3.10 every other test covers tomli
    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` now fails
    monkeypatch.setitem(sys.modules, "tomli", tomllib)  # stands in for the tomli package
    spec = importlib.util.spec_from_file_location("_config_py310", EXAMPLES / "_config.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "_config_py310", module)
    spec.loader.exec_module(module)
    assert module.tomllib is tomllib
    config = module.load(DIGITS, {"optim.milestones": module.parse_override("k.v=[3, 4]")[1]})
    assert (config.optim.epochs, config.optim.milestones) == (20, [3, 4])


FLOAT_KEYS = [
    f"{section}.{f.name}"
    for section, cls in _config._SECTIONS.items()
    for f in dataclasses.fields(cls)
    if str(f.type) == "float"
]


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_every_number_must_be_finite(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"`{key}` must be a finite number, got {value!r}"):
        _config.load(DIGITS, {key: value})


def test_every_shipped_exit_weights_fits_its_model() -> None:
    import train

    for path in SHIPPED:
        config = _config.load(path)
        train.check_exit_weights(config, train.count_exits(config))
        assert train.count_exits(config) is not None, path.stem
