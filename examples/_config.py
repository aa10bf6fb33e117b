"""Experiment configuration: TOML files with strict validation and command-line overrides.

A config is a TOML file with the sections below (every key documented in
``examples/README.md``; ``configs/digits.toml`` is a complete example)::

    [data]    dataset, data_dir, download, val_size, test_size, train_cap, eval_cap,
              augment, normalize, num_workers, split_seed
    [model]   name, init_from
    [loss]    method, and one sub-table per method with constructor keywords:
              [loss.neokd] (also used by nkd / eokd), [loss.skd], [loss.ard], [loss.adv]
              (also used by adv-half), [loss.lw]
    [optim]   epochs, batch_size, lr, momentum, weight_decay, milestones, gamma, nesterov
    [attack]  eps, step_size, train_steps, train_mode, eval_steps, random_start
    [eval]    batch_size, budget_points, transfer_cap, plots
    [run]     seed, out_dir, device, amp, compile, channels_last, tensorboard

Unknown sections or keys, values of the wrong type and values out of range raise a
``ConfigError`` that names the key, the expected and the received value; every number
must be finite (NaN and infinity are rejected with the key). Command-line
overrides use the same dotted keys (``--set optim.lr=0.05``), their values parsed as TOML.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the `examples` extra installs tomli
    import tomli as tomllib

DATASETS = ("digits", "mnist", "cifar10", "cifar100", "tinyimagenet", "imagenet")
MODELS = (
    "digits_cnn",
    "smallcnn",
    "msdnet_cifar10",
    "msdnet_cifar100",
    "msdnet_tinyimagenet",
    "msdnet_imagenet",
)
EVAL_SUITES = ("paper", "strong")
"""eval.suite: the paper's evaluation, or that plus the worst-case / exit-policy / slow-down suite."""
METHODS = ("adv", "adv-half", "lw", "neokd", "nkd", "eokd", "skd", "ard")
TRAIN_ATTACKS = ("max-average", "average")
AMP_MODES = ("none", "bf16", "fp16")
DEVICES_HINT = "'auto', 'cpu', 'cuda' or 'cuda:N'"


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the fix."""


@dataclass(frozen=True)
class DataConfig:
    dataset: str
    data_dir: str = "data"
    download: bool = True
    val_size: int = 5000
    test_size: int = 0
    train_cap: int = 0
    eval_cap: int = 0
    augment: bool = False
    normalize: bool = False
    num_workers: int = 0
    split_seed: int = 0


@dataclass(frozen=True)
class ModelConfig:
    name: str
    init_from: str = ""  # a state dict or a checkpoint of this loop to start from (fine-tuning)


@dataclass(frozen=True)
class LossConfig:
    method: str = "neokd"
    neokd: dict[str, Any] = field(default_factory=dict)
    skd: dict[str, Any] = field(default_factory=dict)
    ard: dict[str, Any] = field(default_factory=dict)
    adv: dict[str, Any] = field(default_factory=dict)
    lw: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OptimConfig:
    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    nesterov: bool = False


@dataclass(frozen=True)
class AttackConfig:
    eps: float
    step_size: float
    train_steps: int = 7
    train_mode: str = "max-average"
    eval_steps: int = 50
    random_start: bool = True


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 256
    budget_points: int = 39
    transfer_cap: int = 0
    plots: bool = True
    suite: str = "paper"


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    out_dir: str = ""
    device: str = "auto"
    amp: str = "none"
    compile: bool = False
    channels_last: str = "auto"
    tensorboard: str = ""  # a folder for TensorBoard event files ("" = off)


@dataclass(frozen=True)
class Config:
    """A validated experiment configuration; ``name`` is the setting (the file's stem)."""

    name: str
    data: DataConfig
    model: ModelConfig
    loss: LossConfig
    optim: OptimConfig
    attack: AttackConfig
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of the whole config (JSON and checkpoint safe)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @property
    def out_dir(self) -> Path:
        """The run directory: ``run.out_dir``, default ``runs/<setting>/<method>``."""
        if self.run.out_dir:
            return Path(self.run.out_dir)
        return Path("runs") / self.name / self.loss.method

    def training_identity(self) -> dict[str, Any]:
        """The settings that define the training trajectory; a resume must match them.

        Everything except what can change without altering the weights' trajectory: the
        number of epochs (a run may be extended), paths (``model.init_from`` included: a
        resumed run takes its weights from the checkpoint), worker counts, the device,
        speed and logging options, and every evaluation setting.
        """
        d = self.to_dict()
        d.pop("name")
        d["model"].pop("init_from")
        d.pop("eval")
        for key in ("data_dir", "download", "num_workers", "eval_cap"):
            d["data"].pop(key)
        d["optim"].pop("epochs")
        d["attack"].pop("eval_steps")
        d["run"] = {"seed": d["run"]["seed"], "amp": d["run"]["amp"]}
        return d


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "attack": AttackConfig,
    "eval": EvalConfig,
    "run": RunConfig,
}

_REQUIRED_SECTIONS = ("data", "model", "loss", "optim", "attack")


def _suggest(name: str, options: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _type_name(value: Any) -> str:
    return type(value).__name__


def _check_type(key: str, value: Any, annotation: str) -> Any:
    """Check one value against the field annotation (as a string); return it normalized."""
    if annotation == "bool":
        if not isinstance(value, bool):
            raise ConfigError(
                f"`{key}` must be true or false, got {value!r} ({_type_name(value)})."
            )
        return value
    if annotation == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"`{key}` must be an integer, got {value!r} ({_type_name(value)}).")
        return value
    if annotation == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"`{key}` must be a number, got {value!r} ({_type_name(value)}).")
        if not math.isfinite(value):
            raise ConfigError(
                f"`{key}` must be a finite number, got {value!r}; set it to a finite value "
                "(examples/configs/*.toml show the usual ones)."
            )
        return float(value)
    if annotation == "str":
        if not isinstance(value, str):
            raise ConfigError(f"`{key}` must be a string, got {value!r} ({_type_name(value)}).")
        return value
    if annotation == "list[int]":
        if not isinstance(value, list) or any(
            isinstance(v, bool) or not isinstance(v, int) for v in value
        ):
            raise ConfigError(f"`{key}` must be a list of integers, got {value!r}.")
        return list(value)
    if annotation == "dict[str, Any]":
        if not isinstance(value, dict):
            raise ConfigError(
                f"`{key}` must be a table of keyword arguments, got {value!r} ({_type_name(value)})."
            )
        return dict(value)
    raise AssertionError(f"unhandled annotation {annotation}")  # pragma: no cover


def _build_section(section: str, raw: Any) -> Any:
    cls = _SECTIONS[section]
    if not isinstance(raw, dict):
        raise ConfigError(f"`[{section}]` must be a table, got {raw!r} ({_type_name(raw)}).")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(
                f"unknown key `{section}.{key}`; known keys of [{section}]: "
                f"{', '.join(fields)}.{_suggest(key, list(fields))}"
            )
        kwargs[key] = _check_type(f"{section}.{key}", value, str(fields[key].type))
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(
            f"missing required key(s) in [{section}]: {', '.join(f'{section}.{m}' for m in missing)}."
        )
    return cls(**kwargs)


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(
            f"`{key}` must be one of {', '.join(repr(o) for o in options)}, got {value!r}."
            f"{_suggest(value, options)}"
        )


def _at_least(key: str, value: float, low: float, strict: bool = False) -> None:
    if value < low or (strict and value == low):
        relation = ">" if strict else ">="
        raise ConfigError(f"`{key}` must be {relation} {low}, got {value!r}.")


def validate(config: Config) -> Config:
    """Check every value of a config; return it unchanged or raise ``ConfigError``."""
    d, o, a, e, r = config.data, config.optim, config.attack, config.eval, config.run
    _choice("data.dataset", d.dataset, DATASETS)
    _choice("model.name", config.model.name, MODELS)
    _choice("loss.method", config.loss.method, METHODS)
    _choice("attack.train_mode", a.train_mode, TRAIN_ATTACKS)
    _choice("run.amp", r.amp, AMP_MODES)
    _choice("run.channels_last", r.channels_last, ("auto", "on", "off"))
    _choice("eval.suite", config.eval.suite, EVAL_SUITES)
    if d.augment and d.dataset in ("digits", "mnist"):
        raise ConfigError(
            f"`data.augment` has no augmentation defined for {d.dataset!r} (crops and flips "
            "are for the CIFAR, Tiny-ImageNet and ImageNet settings); set it to false."
        )
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", r.device):
        raise ConfigError(f"`run.device` must be {DEVICES_HINT}, got {r.device!r}.")
    for key, value in (
        ("data.val_size", d.val_size),
        ("data.test_size", d.test_size),
        ("data.train_cap", d.train_cap),
        ("data.eval_cap", d.eval_cap),
        ("data.num_workers", d.num_workers),
        ("eval.transfer_cap", e.transfer_cap),
        ("optim.weight_decay", o.weight_decay),
        ("optim.momentum", o.momentum),
        ("attack.eps", a.eps),
        ("attack.train_steps", a.train_steps),
        ("attack.eval_steps", a.eval_steps),
    ):
        _at_least(key, value, 0)
    for key, value in (
        ("optim.epochs", o.epochs),
        ("optim.batch_size", o.batch_size),
        ("eval.batch_size", e.batch_size),
        ("eval.budget_points", e.budget_points),
    ):
        _at_least(key, value, 1)
    _at_least("optim.lr", o.lr, 0, strict=True)
    _at_least("attack.step_size", a.step_size, 0, strict=True)
    if o.momentum >= 1:
        raise ConfigError(
            f"`optim.momentum` must be < 1 (SGD diverges otherwise), got {o.momentum!r}; "
            "the paper uses 0.9."
        )
    if not 0 < o.gamma <= 1:
        raise ConfigError(f"`optim.gamma` must be in (0, 1], got {o.gamma!r}.")
    if a.eps > 1:
        raise ConfigError(
            f"`attack.eps` must be <= 1 (images are in [0, 1]), got {a.eps!r}; "
            "write it in [0, 1] units, e.g. 8/255 = 0.0314."
        )
    if sorted(set(o.milestones)) != o.milestones or any(m < 1 for m in o.milestones):
        raise ConfigError(
            f"`optim.milestones` must be strictly increasing epochs >= 1, got {o.milestones!r}."
        )
    if d.dataset == "digits" and d.test_size < 1:
        raise ConfigError(
            "`data.test_size` must be >= 1 for the digits dataset (it has no official test "
            f"split; the test set is carved out with `data.split_seed`), got {d.test_size}."
        )
    if d.dataset != "digits" and d.test_size:
        raise ConfigError(
            f"`data.test_size` applies to the digits dataset only (the {d.dataset} test split "
            f"is the official one), got {d.test_size}; use `data.eval_cap` to evaluate on fewer."
        )
    if d.val_size < 1:
        raise ConfigError(
            "`data.val_size` must be >= 1: the budgeted evaluation fits its thresholds on a "
            f"validation split held out of the training set, got {d.val_size}."
        )
    return config


def from_dict(raw: dict[str, Any], name: str = "config") -> Config:
    """Build and validate a ``Config`` from a nested dict (a parsed TOML file)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a table, got {_type_name(raw)}.")
    unknown = [k for k in raw if k not in _SECTIONS]
    if unknown:
        raise ConfigError(
            f"unknown section [{unknown[0]}]; known sections: {', '.join(_SECTIONS)}."
            f"{_suggest(unknown[0], list(_SECTIONS))}"
        )
    missing = [s for s in _REQUIRED_SECTIONS if s not in raw]
    if missing:
        raise ConfigError(f"missing section(s): {', '.join(f'[{s}]' for s in missing)}.")
    sections = {s: _build_section(s, raw.get(s, {})) for s in _SECTIONS}
    return validate(Config(name=name, **sections))


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` (value in TOML syntax, bare words taken as strings)."""
    if "=" not in text:
        raise ConfigError(f"an override must look like `section.key=value`, got {text!r}.")
    key, _, value_text = text.partition("=")
    path = key.strip().split(".")
    if len(path) < 2 or not all(path):
        raise ConfigError(f"an override key must be `section.key`, got {key.strip()!r}.")
    try:
        value = tomllib.loads(f"v = {value_text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = value_text.strip()
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``raw`` with dotted-key ``overrides`` set (sections created)."""
    out = json.loads(json.dumps(raw))
    for dotted, value in overrides.items():
        node = out
        path = dotted.split(".")
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"cannot set `{dotted}`: `{part}` is not a table.")
            node = child
        node[path[-1]] = value
    return out


def load(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read a TOML config file, apply dotted-key overrides and validate.

    Args:
        path: the TOML file; its stem becomes the setting name.
        overrides: ``{"optim.epochs": 3, ...}`` applied before validation.

    Raises:
        FileNotFoundError: if the file does not exist.
        ConfigError: for a TOML syntax error or an invalid setting.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"config file {str(path)!r} not found; the shipped ones are in examples/configs/: "
            + ", ".join(sorted(p.stem for p in (Path(__file__).parent / "configs").glob("*.toml")))
        )
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from err
    return from_dict(apply_overrides(raw, overrides or {}), name=path.stem)


def dumps_toml(config: Config) -> str:
    """Render a config as TOML (the resolved config saved next to every run)."""

    def fmt(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return json.dumps(value)
        if isinstance(value, list):
            return "[" + ", ".join(fmt(v) for v in value) + "]"
        return repr(value)

    lines = [f"# resolved config of setting {config.name!r}"]
    d = config.to_dict()
    d.pop("name")
    for section, values in d.items():
        nested = {k: v for k, v in values.items() if isinstance(v, dict)}
        lines.append(f"\n[{section}]")
        lines += [f"{k} = {fmt(v)}" for k, v in values.items() if not isinstance(v, dict)]
        for sub, table in nested.items():
            lines.append(f"\n[{section}.{sub}]")
            lines += [f"{k} = {fmt(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def describe_mismatch(
    saved: dict[str, Any], current: dict[str, Any], prefix: str = ""
) -> list[str]:
    """List ``key: saved -> current`` for every leaf that differs between two dicts."""
    out: list[str] = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += describe_mismatch(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint has {a!r}, this run has {b!r}")
    return out
