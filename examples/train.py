"""Reference training loop: adversarial training of a multi-exit network with any method.

    python examples/train.py --config examples/configs/digits.toml --method neokd
    torchrun --nproc_per_node 2 examples/train.py --config examples/configs/cifar10_msdnet3.toml

Each step draws adversarial examples with ``MultiExitPGD`` (max-average or average
attack, ``attack.train_steps`` steps), runs the model on the clean and the adversarial
batch and minimises the method's loss ``loss(adv_logits, clean_logits, targets)``. After
the last epoch the model is evaluated (``_evaluate.py``): anytime accuracy on clean
inputs and under ``attack.eval_steps``-step max-average and average PGD, the budgeted
curve with thresholds from the validation split, the transferability matrix, plots.

Runs on CUDA when present (``--amp bf16|fp16``, channels_last, ``--compile``) and on
several GPUs or nodes with ``torchrun`` (DistributedDataParallel; gloo on CPU). A
checkpoint is written atomically after every epoch, on SIGINT / SIGTERM and before
stopping on a non-finite loss; ``--resume`` continues it exactly.

Exit codes: 0 done, 2 invalid config or data, 3 non-finite loss, 130 / 143 stopped by
SIGINT / SIGTERM (checkpoint saved).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _checkpoint
import _distributed
import numpy as np
import torch
from _config import (
    METHODS,
    Config,
    ConfigError,
    describe_mismatch,
    dumps_toml,
    load,
    parse_override,
)
from _data import DatasetError, EpochSeeded, ShardedSampler, Splits, build_splits
from _evaluate import RESULT_FILES
from _logging import RunLog
from _methods import build_criterion
from _models import build_model
from _signals import StopRequest
from torch import Tensor, nn
from torch.utils.data import DataLoader

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"


class ResumeError(ValueError):
    """A checkpoint cannot be continued with this configuration."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message gives the epoch, batch and checkpoint."""


@dataclass
class Outcome:
    """How a run ended: ``status`` is "finished" or "interrupted"; results when finished."""

    status: str
    exit_code: int
    out_dir: Path
    epoch: int
    results: dict[str, Any] | None = None


@dataclass
class Hooks:
    """Test and instrumentation hooks, called on every rank (all optional)."""

    after_step: Callable[[int, int], None] | None = None  # (epoch, batch index)


# ----------------------------------------------------------------------------- setup


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` for ``run.amp`` (bf16 / fp16), or a no-op for ``none``."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def use_channels_last(config: Config, device: torch.device) -> bool:
    mode = config.run.channels_last
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def make_loader(
    dataset: Any, batch_size: int, sampler: ShardedSampler, config: Config, device: torch.device
) -> DataLoader[Any]:
    workers = config.data.num_workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        # A dedicated generator (re-seeded per epoch) keeps the DataLoader from drawing its
        # worker seed from the global RNG, so resuming mid-epoch leaves that stream intact.
        # Random transforms do not use the workers' seeds: EpochSeeded seeds every sample.
        generator=torch.Generator(),
    )


def make_train_loader(
    dataset: Any, batch_size: int, config: Config, env: _distributed.DistEnv
) -> tuple[DataLoader[Any], ShardedSampler]:
    """This rank's training loader and its sampler (``sampler.set_epoch`` before each epoch).

    The samples' random transforms are seeded per (seed, epoch, index) (``EpochSeeded``),
    so the augmentation of a resumed run matches an uninterrupted one, workers or not.
    """
    sampler = ShardedSampler(
        dataset,
        rank=env.rank,
        world_size=env.world_size,
        seed=config.run.seed,
        shuffle=True,
        pad=True,
        with_epoch=True,
    )
    data = EpochSeeded(dataset, config.run.seed)
    return make_loader(data, batch_size, sampler, config, env.device), sampler


def make_train_attack(model: nn.Module, config: Config, generator: torch.Generator) -> Any:
    from neokd_losses.attacks.pgd import MultiExitPGD

    a = config.attack
    return MultiExitPGD(
        model,
        eps=a.eps,
        alpha=a.step_size,
        steps=a.train_steps,
        random_start=a.random_start,
        mode=a.train_mode,
        generator=generator,
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile and DistributedDataParallel wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


# ------------------------------------------------------------------------ checkpoint


def _position_state(
    epoch: int,
    batch: int,
    stats: dict[str, Tensor],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    generators: dict[str, torch.Generator],
    config: Config,
    env: _distributed.DistEnv,
    finished: bool = False,
) -> dict[str, Any] | None:
    """The checkpoint payload (on rank 0; None elsewhere). A collective: call on every rank."""
    rank_state = {
        "rng": _checkpoint.capture_rng(),
        "generators": {k: g.get_state() for k, g in generators.items()},
        "stats": {k: v.detach().cpu() for k, v in stats.items()},
    }
    per_rank = _distributed.gather_objects(rank_state)
    if not env.is_main:
        return None
    return {
        "format": _checkpoint.FORMAT_VERSION,
        "setting": config.name,
        "identity": config.training_identity(),
        "config": config.to_dict(),
        "epoch": epoch,
        "batch": batch,
        "finished": finished,
        "world_size": env.world_size,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": _checkpoint.scheduler_state(scheduler),
        "scaler": scaler.state_dict(),
        "ranks": per_rank,
        "torch_version": str(torch.__version__),
    }


def save_checkpoint(payload: dict[str, Any] | None, out_dir: Path) -> None:
    if payload is not None:
        _checkpoint.save_atomic(payload, out_dir / CHECKPOINT)
    _distributed.barrier()


def check_resumable(
    ckpt: dict[str, Any], config: Config, env: _distributed.DistEnv, path: Path
) -> None:
    """Refuse a checkpoint trained with a different configuration (or world size mid-epoch)."""
    diffs = describe_mismatch(ckpt["identity"], config.training_identity())
    if diffs:
        raise ResumeError(
            f"cannot resume {path}: it was trained with a different configuration:\n  "
            + "\n  ".join(diffs)
            + "\nResume with the original settings (only optim.epochs, paths, workers, device, "
            "speed and evaluation settings may change), or pass --out-dir to start a new run."
        )
    if ckpt["batch"] and ckpt["world_size"] != env.world_size:
        raise ResumeError(
            f"cannot resume {path} in the middle of epoch {ckpt['epoch'] + 1} with "
            f"{env.world_size} process(es): it was saved with {ckpt['world_size']}. Resume with "
            f"--nproc_per_node {ckpt['world_size']} (the world size may change at epoch boundaries)."
        )


# ---------------------------------------------------------------------------- train


def _to_device(
    images: Tensor, labels: Tensor, device: torch.device, channels_last: bool
) -> tuple[Tensor, Tensor]:
    non_blocking = device.type == "cuda"
    images = images.to(device, non_blocking=non_blocking)
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=non_blocking)


def _new_stats(num_exits: int, device: torch.device) -> dict[str, Tensor]:
    return {
        "loss_sum": torch.zeros((), dtype=torch.float64, device=device),
        "samples": torch.zeros((), dtype=torch.float64, device=device),
        "clean_correct": torch.zeros(num_exits, dtype=torch.float64, device=device),
        "adv_correct": torch.zeros(num_exits, dtype=torch.float64, device=device),
        "terms": torch.zeros(0, dtype=torch.float64, device=device),
    }


def _progress(iterable: Any, total: int, enabled: bool, desc: str, initial: int) -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(
        iterable, total=total + initial, initial=initial, desc=desc, leave=False, dynamic_ncols=True
    )


def run(
    config: Config,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    quiet: bool = False,
    evaluate: bool = True,
    hooks: Hooks | None = None,
) -> Outcome:
    """Train (and evaluate) one configuration; see the module docstring.

    Args:
        config: a validated configuration.
        resume: continue from ``<out_dir>/checkpoint.pt`` (must exist).
        overwrite: start afresh even though ``out_dir`` holds a checkpoint.
        progress: tqdm bars (rank 0).
        quiet: no status lines (the JSON log and results are still written).
        evaluate: run the final evaluation after training.
        hooks: optional callbacks (tests).

    Raises:
        ConfigError, DatasetError: invalid settings or data.
        ResumeError: the checkpoint belongs to another configuration.
        NonFiniteLossError: the loss became NaN or infinite (a checkpoint was saved).
    """
    hooks = hooks or Hooks()
    env = _distributed.setup(config.run.device)
    out_dir = config.out_dir
    log = RunLog(out_dir / LOG, enabled=env.is_main, quiet=quiet)
    ckpt_path = out_dir / CHECKPOINT
    if env.is_main and ckpt_path.exists() and not (resume or overwrite):
        raise ResumeError(
            f"{out_dir} already holds a checkpoint; pass --resume to continue it, --overwrite "
            "to start again from scratch, or --out-dir for a separate run."
        )
    if resume and not ckpt_path.is_file():
        raise FileNotFoundError(
            f"--resume: no checkpoint at {ckpt_path}; run without --resume to start."
        )
    device = env.device
    seed_everything(config.run.seed + env.rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # Data: rank 0 first, so that a download happens once.
    splits: Splits | None = None
    if env.is_main:
        splits = build_splits(config.data)
    _distributed.barrier()
    if splits is None:
        splits = build_splits(config.data)
    per_rank_batch = config.optim.batch_size // env.world_size
    if per_rank_batch * env.world_size != config.optim.batch_size:
        raise ConfigError(
            f"`optim.batch_size` = {config.optim.batch_size} is the global batch and must be "
            f"divisible by the world size {env.world_size}."
        )
    loader, sampler = make_train_loader(splits.train, per_rank_batch, config, env)

    # Model, optimiser, schedule, AMP scaler, loss, attack.
    channels_last = use_channels_last(config, device)
    model = build_model(
        config.model.name, splits.num_classes, splits.in_channels, splits.mean, splits.std
    )
    model = (
        model.to(device, memory_format=torch.channels_last) if channels_last else model.to(device)
    )
    o = config.optim
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=o.lr,
        momentum=o.momentum,
        weight_decay=o.weight_decay,
        nesterov=o.nesterov,
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=o.milestones, gamma=o.gamma
    )
    scaler = torch.amp.GradScaler(device.type, enabled=config.run.amp == "fp16")
    generators = {
        "attack": torch.Generator(device=device).manual_seed(
            config.run.seed * 1000 + 2 * env.rank + 1
        ),
        "loss": torch.Generator(device=device).manual_seed(
            config.run.seed * 1000 + 2 * env.rank + 2
        ),
    }
    criterion = build_criterion(config.loss, generators["loss"], model=model)
    criterion.module.to(device)

    train_model: nn.Module = model
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    attack_model: nn.Module = model
    if config.run.compile:
        train_model = torch.compile(train_model)  # type: ignore[assignment]
        attack_model = torch.compile(model)  # type: ignore[assignment]
    attack = make_train_attack(attack_model, config, generators["attack"])

    with torch.no_grad():
        probe = splits.train[0][0].unsqueeze(0).to(device)
        num_exits = len(model.eval()(probe))
    model.train()

    start_epoch, start_batch = 0, 0
    stats = _new_stats(num_exits, device)
    if resume:
        ckpt = _checkpoint.load(ckpt_path)
        check_resumable(ckpt, config, env, ckpt_path)
        unwrap(model).load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        _checkpoint.load_scheduler_state(scheduler, ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, start_batch = int(ckpt["epoch"]), int(ckpt["batch"])
        ranks = ckpt["ranks"]
        if len(ranks) == env.world_size:
            state = ranks[env.rank]
            _checkpoint.restore_rng(state["rng"])
            for name, gen in generators.items():
                gen.set_state(state["generators"][name])
            if start_batch:
                stats = {k: v.to(device) for k, v in state["stats"].items()}
        else:
            log.info(
                f"note: checkpoint saved with {len(ranks)} process(es), resuming with "
                f"{env.world_size}; RNG streams are re-seeded, so this run is not bit-identical."
            )
        log.info(f"resumed {ckpt_path} at epoch {start_epoch + 1}, batch {start_batch}")
    elif env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        # A fresh start (or --overwrite) leaves nothing of an earlier run beside the new
        # checkpoint: not its log, and not its results, which --no-eval would not replace.
        for stale in (LOG, *RESULT_FILES):
            (out_dir / stale).unlink(missing_ok=True)
        (out_dir / "config.toml").write_text(dumps_toml(config))
    if env.is_main:
        log.info(
            f"{config.name}/{config.loss.method}: {len(splits.train)} train, {len(splits.val)} val, "
            f"{len(splits.test)} test samples; device {device}, world size {env.world_size}, "
            f"amp {config.run.amp}; out_dir {out_dir}"
        )
        if config.run.amp != "none" and device.type != "cuda":
            log.info(
                f"note: run.amp = {config.run.amp!r} on {device.type}: the attack and the forward "
                f"passes run under torch.autocast({device.type!r}, {config.run.amp}), which is "
                "usually slower than float32 there; mixed precision is meant for GPUs."
            )

    def checkpoint(epoch: int, batch: int, finished: bool = False) -> None:
        payload = _position_state(
            epoch,
            batch,
            stats,
            model,
            optimizer,
            scheduler,
            scaler,
            generators,
            config,
            env,
            finished,
        )
        save_checkpoint(payload, out_dir)

    non_finite = torch.zeros(1, device=device)
    stop_flag = torch.zeros(1, device=device)
    with StopRequest() as stop:
        for epoch in range(start_epoch, o.epochs):
            skip = start_batch if epoch == start_epoch else 0
            sampler.set_epoch(epoch, skip=skip * per_rank_batch)
            loader.generator.manual_seed(config.run.seed * 7919 + epoch)  # type: ignore[union-attr]
            if skip == 0:
                stats = _new_stats(num_exits, device)
            started = time.perf_counter()
            bar = _progress(
                loader, len(loader), progress and env.is_main, f"epoch {epoch + 1}/{o.epochs}", skip
            )
            batch = skip
            for batch, (images, labels) in enumerate(bar, start=skip):
                images, labels = _to_device(images, labels, device, channels_last)
                with autocast(device, config.run.amp):
                    adv_images = attack(images, labels)
                model.train()
                with autocast(device, config.run.amp):
                    clean_logits = train_model(images)
                    adv_logits = train_model(adv_images)
                loss, terms = criterion(adv_logits, clean_logits, labels)
                non_finite.fill_(float(not bool(torch.isfinite(loss.detach()))))
                _distributed.all_reduce_sum(non_finite)
                if non_finite.item() > 0:
                    checkpoint(epoch, batch)
                    raise NonFiniteLossError(
                        f"non-finite loss ({loss.item()}) at epoch {epoch + 1}, batch index {batch} "
                        f"(0-based, {per_rank_batch} samples per process); the state before this "
                        f"batch is saved in {ckpt_path}. Lower optim.lr or try run.amp = 'bf16' / 'none' "
                        "and start over with --overwrite (--resume continues only with unchanged "
                        "settings)."
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                with torch.no_grad():
                    n = labels.shape[0]
                    stats["loss_sum"] += loss.detach().double() * n
                    stats["samples"] += n
                    for key, logits in (
                        ("clean_correct", clean_logits),
                        ("adv_correct", adv_logits),
                    ):
                        stats[key] += torch.stack(
                            [(z.argmax(-1) == labels).sum() for z in logits]
                        ).double()
                    if terms:
                        values = torch.stack([t.detach().double() for t in terms.values()]) * n
                        stats["terms"] = (
                            values if stats["terms"].numel() == 0 else stats["terms"] + values
                        )
                if hooks.after_step is not None:
                    hooks.after_step(epoch, batch)
                if bar is not loader and batch % 5 == 0:
                    seen = stats["samples"].clamp(min=1)
                    bar.set_postfix(
                        loss=f"{(stats['loss_sum'] / seen).item():.3f}",
                        clean=f"{(stats['clean_correct'].mean() / seen).item():.3f}",
                        adv=f"{(stats['adv_correct'].mean() / seen).item():.3f}",
                    )
                # Every rank stops at the same step, whichever of them got the signal.
                stop_flag.fill_(float(stop.requested))
                _distributed.all_reduce_sum(stop_flag)
                if stop_flag.item() > 0:
                    checkpoint(epoch, batch + 1)
                    log.info(
                        f"stopped by signal {stop.received or 'on another rank'} at epoch {epoch + 1}, "
                        f"batch {batch + 1}; checkpoint saved to {ckpt_path}. Continue with --resume."
                    )
                    _distributed.cleanup()
                    return Outcome(
                        "interrupted", stop.exit_code if stop.requested else 143, out_dir, epoch
                    )
            if bar is not loader:
                bar.close()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            totals = {k: _distributed.all_reduce_sum(v.clone()) for k, v in stats.items()}
            seen = float(totals["samples"].clamp(min=1))
            entry = {
                "epoch": epoch + 1,
                "lr": lr,
                "loss": float(totals["loss_sum"]) / seen,
                "train_clean_acc": (totals["clean_correct"] / seen).tolist(),
                "train_adv_acc": (totals["adv_correct"] / seen).tolist(),
                "samples": int(seen),
                "seconds": round(time.perf_counter() - started, 3),
            }
            if totals["terms"].numel():
                names = ("clean_ce", "adv_ce", "nkd", "eokd")
                entry["terms"] = dict(zip(names, (totals["terms"] / seen).tolist(), strict=False))
            log.record(entry)
            log.info(
                f"epoch {epoch + 1}/{o.epochs}: loss {entry['loss']:.4f}, train clean acc "
                f"{100 * float(np.mean(entry['train_clean_acc'])):.2f}%, adv acc "
                f"{100 * float(np.mean(entry['train_adv_acc'])):.2f}% ({entry['seconds']:.1f}s)"
            )
            stats = _new_stats(num_exits, device)
            checkpoint(epoch + 1, 0, finished=epoch + 1 == o.epochs)

    results = None
    if evaluate:
        from _evaluate import evaluate as run_evaluation

        results = run_evaluation(
            unwrap(model), splits, config, env, progress=progress and env.is_main, log=log
        )
    _distributed.cleanup()
    return Outcome("finished", 0, out_dir, o.epochs, results)


# ------------------------------------------------------------------------------ CLI


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only for flags that have one; the others keep the config's value."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Adversarial training of a multi-exit network with NEO-KD or a baseline.",
        epilog="A flag left out keeps the value of the config file; the flags and --set "
        "override it. Exit codes: 0 done, 2 invalid config or data, 3 non-finite loss, "
        "130 / 143 stopped by SIGINT / SIGTERM (checkpoint saved, continue with --resume).",
        formatter_class=_HelpFormatter,
    )
    default_config = Path(__file__).parent / "configs" / "digits.toml"
    p.add_argument("--config", default=str(default_config), help="TOML config file")
    p.add_argument("--method", choices=METHODS, help="loss.method")
    p.add_argument("--train-attack", choices=("max-average", "average"), help="attack.train_mode")
    p.add_argument("--epochs", type=int, help="optim.epochs")
    p.add_argument("--batch-size", type=int, help="optim.batch_size (global, over all processes)")
    p.add_argument("--lr", type=float, help="optim.lr")
    p.add_argument("--data-dir", help="data.data_dir")
    p.add_argument("--out-dir", help="run.out_dir (default runs/<setting>/<method>)")
    p.add_argument(
        "--train-cap", type=int, help="data.train_cap: at most this many training samples"
    )
    p.add_argument("--eval-cap", type=int, help="data.eval_cap: at most this many test samples")
    p.add_argument("--workers", type=int, help="data.num_workers")
    p.add_argument("--seed", type=int, help="run.seed")
    p.add_argument("--device", help="run.device: auto, cpu, cuda, cuda:N")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), help="run.amp")
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None, help="run.compile"
    )
    p.add_argument("--channels-last", choices=("auto", "on", "off"), help="run.channels_last")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config key, e.g. --set attack.eps=0.1",
    )
    p.add_argument("--resume", action="store_true", help="continue <out_dir>/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="start afresh over an existing run")
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return p


_FLAG_KEYS = {
    "method": "loss.method",
    "train_attack": "attack.train_mode",
    "epochs": "optim.epochs",
    "batch_size": "optim.batch_size",
    "lr": "optim.lr",
    "data_dir": "data.data_dir",
    "out_dir": "run.out_dir",
    "train_cap": "data.train_cap",
    "eval_cap": "data.eval_cap",
    "workers": "data.num_workers",
    "seed": "run.seed",
    "device": "run.device",
    "amp": "run.amp",
    "compile": "run.compile",
    "channels_last": "run.channels_last",
}


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for text in args.set:
        path, value = parse_override(text)
        overrides[".".join(path)] = value
    for attr, key in _FLAG_KEYS.items():
        value = getattr(args, attr)
        if value is not None:
            overrides[key] = value
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load(args.config, overrides_from_args(args))
        outcome = run(
            config,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            evaluate=not args.no_eval,
        )
    except (ConfigError, DatasetError, ResumeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    if outcome.results is not None:
        from _evaluate import summary_markdown

        print(summary_markdown(outcome.results))
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
