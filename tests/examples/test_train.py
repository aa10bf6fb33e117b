"""The reference training loop end to end on digits: every method, exact resume, failures."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path
from typing import Any

import _checkpoint
import _methods
import pytest
import torch
import train
from _config import Config
from _data import build_splits
from _logging import read_log
from _models import build_model

METHODS = ["adv", "neokd", "nkd", "eokd", "skd", "ard"]


def _model_from_checkpoint(config: Config) -> torch.nn.Module:
    splits = build_splits(config.data)
    model = build_model(
        config.model.name, splits.num_classes, splits.in_channels, splits.mean, splits.std
    )
    model.load_state_dict(_checkpoint.load(config.out_dir / train.CHECKPOINT)["model"])
    return model.eval()


def _weights(config: Config) -> dict[str, torch.Tensor]:
    return _checkpoint.load(config.out_dir / train.CHECKPOINT)["model"]


def _log_without_times(config: Config) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in e.items() if k != "seconds"} for e in read_log(config.out_dir / train.LOG)
    ]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_evaluates(tiny_config: Any, method: str) -> None:
    config = tiny_config(loss__method=method, eval__plots=method == "neokd")
    outcome = train.run(config, progress=False, quiet=True)
    assert (outcome.status, outcome.exit_code, outcome.epoch) == ("finished", 0, 1)
    results = json.loads((config.out_dir / "results.json").read_text())
    assert results == json.loads(json.dumps(outcome.results))
    assert (results["method"], results["num_exits"], results["samples"]) == (
        method,
        3,
        {"train": 48, "val": 24, "test": 24},
    )

    # Clean anytime accuracy, recomputed independently from the saved weights.
    splits = build_splits(config.data)
    images = torch.stack([splits.test[i][0] for i in range(len(splits.test))])
    labels = torch.tensor([splits.test[i][1] for i in range(len(splits.test))])
    with torch.no_grad():
        outputs = _model_from_checkpoint(config)(images)
    correct = [int((z.argmax(1) == labels).sum()) for z in outputs]
    assert results["anytime"]["clean"]["correct"] == correct
    for name in ("clean", "max-average", "average"):
        r = results["anytime"][name]
        assert r["num_samples"] == 24 and len(r["per_exit"]) == 3
        assert r["mean"] == pytest.approx(sum(r["per_exit"]) / 3)

    curve = results["budget"]["max-average"]
    assert len(curve["accuracies"]) == 3 and len(results["exit_costs"]) == 3
    assert results["exit_costs"] == sorted(results["exit_costs"]) and results["exit_costs"][0] > 0
    matrix = results["transferability"]["matrix"]
    assert len(matrix) == 3 and all(
        len(row) == 3 and all(0 <= v <= 1 for v in row) for row in matrix
    )
    off = [matrix[i][j] for i in range(3) for j in range(3) if i != j]
    assert results["transferability"]["off_diagonal_mean"] == pytest.approx(sum(off) / 6)

    (entry,) = read_log(config.out_dir / train.LOG)
    assert entry["epoch"] == 1 and entry["samples"] == 48 and math.isfinite(entry["loss"])
    assert ("terms" in entry) == (method in ("neokd", "nkd", "eokd"))
    if method == "nkd":
        assert entry["terms"]["eokd"] == 0.0 and entry["terms"]["nkd"] > 0
    report = (config.out_dir / "results.md").read_text()
    assert "| PGD max-average |" in report and "off-diagonal mean" in report
    plots = (
        sorted(p.name for p in (config.out_dir / "plots").glob("*.png"))
        if method == "neokd"
        else []
    )
    assert plots == (
        ["budget.png", "exits.png", "transferability.png"] if method == "neokd" else []
    )


RESUME = {"optim__epochs": 2, "data__train_cap": 64, "loss__method": "neokd"}  # 4 batches per epoch


@pytest.fixture
def reference(tiny_config: Any) -> Config:
    config = tiny_config("reference", **RESUME)
    assert train.run(config, progress=False, quiet=True, evaluate=False).status == "finished"
    return config


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_epoch_then_resume_is_exact(
    tiny_config: Any, reference: Config, sig: int, code: int
) -> None:
    config = tiny_config("interrupted", **RESUME)

    def send(epoch: int, batch: int) -> None:
        if (epoch, batch) == (1, 1):
            signal.raise_signal(sig)

    before = signal.getsignal(sig)
    outcome = train.run(
        config, progress=False, quiet=True, evaluate=False, hooks=train.Hooks(after_step=send)
    )
    assert (outcome.status, outcome.exit_code) == ("interrupted", code)
    saved = _checkpoint.load(config.out_dir / train.CHECKPOINT)
    assert (saved["epoch"], saved["batch"], saved["finished"]) == (1, 2, False)
    assert signal.getsignal(sig) is before  # the loop's handlers are uninstalled
    assert signal.getsignal(sig) is not None and signal.getsignal(sig) == signal.getsignal(
        sig
    )  # handlers restored below
    resumed = train.run(config, resume=True, progress=False, quiet=True, evaluate=False)
    assert resumed.status == "finished"
    ref, got = _weights(reference), _weights(config)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert _log_without_times(config) == _log_without_times(reference)


def test_signal_at_the_last_batch_of_an_epoch_stops_at_the_epoch_boundary(
    tiny_config: Any, reference: Config
) -> None:
    config = tiny_config("boundary", **RESUME)

    def send(epoch: int, batch: int) -> None:
        if (epoch, batch) == (0, 3):  # the last of 4 batches
            signal.raise_signal(signal.SIGTERM)

    outcome = train.run(
        config, progress=False, quiet=True, evaluate=False, hooks=train.Hooks(after_step=send)
    )
    assert (outcome.status, outcome.exit_code) == ("interrupted", 143)
    saved = _checkpoint.load(config.out_dir / train.CHECKPOINT)
    assert (saved["epoch"], saved["batch"], saved["finished"]) == (1, 0, False)
    assert len(read_log(config.out_dir / train.LOG)) == 1  # the epoch was logged
    resumed = train.run(config, resume=True, progress=False, quiet=True, evaluate=False)
    assert resumed.status == "finished"
    ref, got = _weights(reference), _weights(config)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert _log_without_times(config) == _log_without_times(reference)


def test_non_finite_weights_after_the_last_update_stop_the_run(
    tiny_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config("nan-weights", **{**RESUME, "optim__epochs": 1})
    loops: list[Any] = []
    original = train.build_loop

    def capture(*args: Any, **kwargs: Any) -> Any:
        loops.append(original(*args, **kwargs))
        return loops[-1]

    def break_weights(epoch: int, batch: int) -> None:  # as a diverging last update would
        if batch == 3:
            with torch.no_grad():
                next(loops[-1].model.parameters()).fill_(math.inf)

    monkeypatch.setattr(train, "build_loop", capture)
    with pytest.raises(
        train.NonFiniteLossError,
        match=r"weights became NaN or infinite in the last update of epoch 1",
    ):
        train.run(config, progress=False, quiet=True, hooks=train.Hooks(after_step=break_weights))
    path = config.out_dir / train.CHECKPOINT
    if path.exists():  # no checkpoint holds the broken weights
        saved = _checkpoint.load(path)
        assert all(torch.isfinite(v).all() for v in saved["model"].values())


def test_extending_a_finished_run_is_exact(tiny_config: Any, reference: Config) -> None:
    short = tiny_config("extended", **{**RESUME, "optim__epochs": 1})
    train.run(short, progress=False, quiet=True, evaluate=False)
    longer = tiny_config("extended", **RESUME)
    train.run(longer, resume=True, progress=False, quiet=True, evaluate=False)
    ref, got = _weights(reference), _weights(longer)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_resume_refuses_a_different_config(tiny_config: Any, reference: Config) -> None:
    changed = tiny_config("reference", **RESUME, optim__lr=0.5, attack__eps=0.1)
    with pytest.raises(
        train.ResumeError,
        match=r"(?s)different configuration:.*attack.eps: checkpoint has 0.2, this run has 0.1.*optim.lr: checkpoint has 0.02, this run has 0.5",
    ):
        train.run(changed, resume=True, progress=False, quiet=True)
    with pytest.raises(train.ResumeError, match="already holds a checkpoint; pass --resume"):
        train.run(reference, progress=False, quiet=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        train.run(tiny_config("fresh"), resume=True, progress=False, quiet=True)


def test_overwrite_leaves_no_results_of_the_earlier_run(
    tiny_config: Any, reference: Config
) -> None:
    # With --no-eval nothing would replace them: stale results beside a new checkpoint.
    stale = ["results.json", "results.md", "plots/budget.png", "plots/exits.png"]
    for name in stale:
        (reference.out_dir / name).parent.mkdir(exist_ok=True)
        (reference.out_dir / name).write_text("from the earlier run")
    mine = reference.out_dir / "plots" / "notes.txt"  # not ours: left alone
    mine.write_text("user file")
    outcome = train.run(reference, overwrite=True, progress=False, quiet=True, evaluate=False)
    assert outcome.status == "finished"
    assert [n for n in stale if (reference.out_dir / n).exists()] == []
    assert mine.read_text() == "user file"
    assert (reference.out_dir / train.CHECKPOINT).is_file()


def test_non_finite_loss_stops_with_batch_index_and_checkpoint(
    tiny_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    original = _methods.Criterion.__call__

    def nan_on_third_call(self: Any, *args: Any) -> Any:
        total, terms = original(self, *args)
        calls["n"] += 1
        return (total * math.nan if calls["n"] == 3 else total), terms

    monkeypatch.setattr(_methods.Criterion, "__call__", nan_on_third_call)
    config = tiny_config()
    with pytest.raises(
        train.NonFiniteLossError,
        match=r"non-finite loss \(nan\) at epoch 1, batch index 2 .* saved in .*checkpoint.pt",
    ):
        train.run(config, progress=False, quiet=True)
    saved = _checkpoint.load(config.out_dir / train.CHECKPOINT)
    assert (saved["epoch"], saved["batch"]) == (0, 2)
    assert all(torch.isfinite(v).all() for v in saved["model"].values())


def test_cli_exit_codes_and_messages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train.main(["--set", "optim.lr=-1", "--out-dir", str(tmp_path)]) == 2
    assert "error: `optim.lr` must be > 0, got -1.0." in capsys.readouterr().err
    assert train.main(["--device", "cuda:x", "--out-dir", str(tmp_path)]) == 2
    assert "error: `run.device` must be 'auto', 'cpu'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert train.main(["--device", "cuda", "--out-dir", str(tmp_path)]) == 2
        assert "CUDA is not available; use 'cpu' or 'auto'" in capsys.readouterr().err
    assert train.main(["--config", str(tmp_path / "missing.toml")]) == 2
    assert "not found" in capsys.readouterr().err
    args = train.build_parser().parse_args(
        [
            "--method",
            "skd",
            "--epochs",
            "3",
            "--data-dir",
            "/d",
            "--eval-cap",
            "9",
            "--no-compile",
            "--set",
            "attack.eps=0.1",
        ]
    )
    assert train.overrides_from_args(args) == {
        "loss.method": "skd",
        "optim.epochs": 3,
        "data.data_dir": "/d",
        "data.eval_cap": 9,
        "run.compile": False,
        "attack.eps": 0.1,
    }


@pytest.mark.parametrize(("amp", "channels_last"), [("bf16", "on"), ("fp16", "off")])
def test_mixed_precision_and_channels_last_on_cpu(
    tiny_config: Any, amp: str, channels_last: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny_config(run__amp=amp, run__channels_last=channels_last, run__device="cpu")
    outcome = train.run(config, progress=False, evaluate=False)
    assert outcome.status == "finished"
    # AMP on the CPU does run (autocast on the CPU) and says so.
    assert f"note: run.amp = '{amp}' on cpu: the attack and the forward passes run under" in (
        capsys.readouterr().err
    )
    saved = _checkpoint.load(config.out_dir / train.CHECKPOINT)
    assert all(
        v.dtype == torch.float32 for k, v in saved["model"].items()
    )  # master weights stay float32
    assert (saved["scaler"] != {}) == (amp == "fp16")  # a GradScaler only for fp16


@pytest.mark.cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_amp_compile_channels_last(tiny_config: Any, amp: str) -> None:
    config = tiny_config(run__amp=amp, run__compile=True, run__device="cuda")
    outcome = train.run(config, progress=False, quiet=True)
    assert outcome.status == "finished" and outcome.results is not None
    assert outcome.results["device"].startswith("cuda")


def test_help_shows_real_defaults_only(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "configs/digits.toml)" in text  # --config has a real default, shown
    assert "A flag left out keeps the value of the config file" in text


class _RandomCrop(torch.utils.data.Dataset):
    """Stands in for an augmented training set: every load draws from torch's RNG."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.rand(2), index


def test_augmentation_of_a_resumed_epoch_matches_with_worker_processes(tiny_config: Any) -> None:
    """The paper settings augment in DataLoader workers; a resumed epoch must see the same
    crops as an uninterrupted one (which a worker-seeded augmentation does not give)."""
    config = tiny_config(data__num_workers=2)
    env = train._distributed.DistEnv(0, 0, 1, torch.device("cpu"))

    def epochs(first: int, last: int, skip: int = 0) -> list[list[torch.Tensor]]:
        loader, sampler = train.make_train_loader(_RandomCrop(), 3, config, env)
        out = []
        for epoch in range(first, last + 1):
            sampler.set_epoch(epoch, skip=skip if epoch == first else 0)
            loader.generator.manual_seed(epoch)
            out.append([images for images, _ in loader])
        return out

    uninterrupted = epochs(0, 1)[1]
    resumed = epochs(1, 1, skip=3)[0]  # stopped after 1 of 4 batches of epoch 2
    assert len(uninterrupted) == 4 and len(resumed) == 3
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted[1:], resumed, strict=True))
