"""``model.init_from``: start from a state dict or a checkpoint of the loop (fine-tuning)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import _checkpoint
import _config
import pytest
import torch
import train
from _config import ConfigError
from _models import build_model

from .conftest import EXAMPLES


def _fresh_digits_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("digits_cnn", 10, 1)


def _starting_weights(config: Any) -> dict[str, torch.Tensor]:
    """The weights the loop trains from, captured before the first step."""
    seen: dict[str, torch.Tensor] = {}

    def grab(model: torch.nn.Module) -> None:
        seen.update({k: v.detach().clone() for k, v in model.state_dict().items()})

    train.run(
        config,
        progress=False,
        quiet=True,
        evaluate=False,
        hooks=train.Hooks(before_training=grab),
    )
    return seen


def test_a_plain_state_dict_is_loaded(tiny_config: Any, tmp_path: Path) -> None:
    source = _fresh_digits_model(seed=123).state_dict()
    torch.save(source, tmp_path / "weights.pt")
    got = _starting_weights(tiny_config(model__init_from=str(tmp_path / "weights.pt")))
    assert got.keys() == source.keys() and all(torch.equal(got[k], source[k]) for k in source)
    # Without it the loop starts from its own seeded initialization, which differs.
    own = _starting_weights(tiny_config("scratch"))
    assert not all(torch.equal(own[k], source[k]) for k in source)


def test_a_checkpoint_of_the_loop_is_loaded(tiny_config: Any) -> None:
    first = tiny_config("first", run__seed=7)
    train.run(first, progress=False, quiet=True, evaluate=False)
    trained = _checkpoint.load(first.out_dir / train.CHECKPOINT)["model"]
    got = _starting_weights(
        tiny_config("second", model__init_from=str(first.out_dir / train.CHECKPOINT))
    )
    assert all(torch.equal(got[k], trained[k]) for k in trained)


def test_mismatching_weights_name_the_keys(tmp_path: Path) -> None:
    state = _fresh_digits_model(seed=0).state_dict()
    state.pop("head1.3.bias")
    state["block3.7.weight"] = torch.zeros(5, 128)  # 5 classes instead of 10
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ConfigError) as info:
        train.load_initial_weights(_fresh_digits_model(seed=0), tmp_path / "bad.pt")
    message = str(info.value)
    assert "missing keys: head1.3.bias" in message
    assert "unexpected keys: extra.weight" in message
    assert "shape mismatch: block3.7.weight (file (5, 128), model (10, 128))" in message


def test_unreadable_or_missing_files_are_config_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "obj.pt").write_bytes(pickle.dumps(object(), protocol=2))
    with pytest.raises(ConfigError, match="cannot be read"):
        train.load_initial_weights(_fresh_digits_model(seed=0), tmp_path / "obj.pt")
    torch.save({"weights": [1, 2]}, tmp_path / "list.pt")
    with pytest.raises(ConfigError, match="holds neither a state dict"):
        train.load_initial_weights(_fresh_digits_model(seed=0), tmp_path / "list.pt")
    out = tmp_path / "run"
    argv = ["--set", f'model.init_from="{tmp_path / "none.pt"}"', "--out-dir", str(out)]
    assert train.main(argv) == 2
    assert "`model.init_from`" in capsys.readouterr().err and not out.exists()


def test_imagenet_config_fine_tunes() -> None:
    config = _config.load(EXAMPLES / "configs" / "imagenet_msdnet5.toml")
    assert (
        config.model.init_from
    )  # fine-tuning an already trained MSDNet, as the paper's lr implies
    assert config.optim.lr == 0.001 and config.optim.milestones == []
    assert "init_from" not in config.training_identity()["model"]  # a path may move
