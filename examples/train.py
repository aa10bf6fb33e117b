"""Reference training loop: adversarial training of a multi-exit network with any method.

    python examples/train.py --config examples/configs/digits.toml --method neokd
    torchrun --nproc_per_node 2 examples/train.py --config examples/configs/cifar10_msdnet3.toml

Each step draws adversarial examples with ``MultiExitPGD`` (max-average or average
attack, ``attack.train_steps`` steps), runs the model on the clean and the adversarial
batch and minimizes the method's loss ``loss(adv_logits, clean_logits, targets)``. After
the last epoch the model is evaluated (``_evaluate.py``): anytime accuracy on clean
inputs and under ``attack.eval_steps``-step max-average and average PGD, the budgeted
curve with thresholds from the validation split, the transferability matrix, plots.

Runs on CUDA when present (``--amp bf16|fp16``, channels_last, ``--compile``) and on
several GPUs or nodes with ``torchrun`` (DistributedDataParallel; gloo on CPU). A
checkpoint is written atomically after every epoch, on SIGINT / SIGTERM and before
stopping on a non-finite loss; ``--resume`` continues it exactly (see "Never losing
work" in examples/README.md for what is guaranteed).

Layout, for forking: :func:`train_step` is one adversarial step (attack, forward, loss,
backward: the part a new method changes), :func:`train_one_epoch` the loop over batches
(statistics, signals, the non-finite guard), :func:`run` the setup, the epoch loop and
the evaluation.

Exit codes: 0 done, 2 invalid config, data, run directory or checkpoint, 3 non-finite
loss, 130 / 143 stopped by SIGINT / SIGTERM (checkpoint saved).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _checkpoint
import _distributed
import numpy as np
import torch
from _checkpoint import CheckpointError
from _config import (
    EVAL_SUITES,
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
from _logging import RunLog, TensorBoardLog, read_log
from _methods import Criterion, build_criterion, loss_section
from _models import build_model
from _signals import Interrupted, StopRequest
from torch import Tensor, nn
from torch.utils.data import DataLoader

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
CONFIG = "config.toml"


class ResumeError(ValueError):
    """A checkpoint cannot be continued with this configuration."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message gives the epoch, batch and checkpoint."""


class OutputError(RuntimeError):
    """The run directory cannot be used or written; the message gives the path and the OS error."""


# The failures reported in one line with exit code 2 (and decided on every rank).
_EXIT_2_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    DatasetError,
    ResumeError,
    CheckpointError,
    OutputError,
    FileNotFoundError,
)


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
    before_training: Callable[[nn.Module], None] | None = None  # the plain model


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


# --------------------------------------------------------------------- start-up checks

# (classes, input channels, image side) of each dataset: enough to count a model's exits
# on the meta device before any data is loaded.
_DATA_SHAPES = {
    "digits": (10, 1, 8),
    "mnist": (10, 1, 28),
    "cifar10": (10, 3, 32),
    "cifar100": (100, 3, 32),
    "tinyimagenet": (200, 3, 64),
    "imagenet": (1000, 3, 224),
}


def count_exits(config: Config) -> int | None:
    """The number of exits of ``model.name`` for ``data.dataset`` (None if it cannot tell).

    The model is built on the meta device: no memory, no RNG drawn, no file read.
    """
    classes, channels, side = _DATA_SHAPES[config.data.dataset]
    try:
        with torch.device("meta"):
            model = build_model(config.model.name, classes, channels)
            return len(model(torch.zeros(1, channels, side, side)))
    except Exception:  # a mismatched model/dataset pair fails later, clearly
        return None


def check_exit_weights(config: Config, num_exits: int | None) -> None:
    """``loss.<table>.exit_weights`` must give one weight per exit of the model."""
    section = loss_section(config.loss.method)
    weights = getattr(config.loss, section, {}).get("exit_weights")
    if num_exits is None or not isinstance(weights, list) or len(weights) == num_exits:
        return
    raise ConfigError(
        f"`loss.{section}.exit_weights` = {weights!r} has {len(weights)} entries, but "
        f"model.name = {config.model.name!r} has {num_exits} exits; give one weight per exit, "
        f"e.g. {[1.0] * num_exits!r}."
    )


def _mnist_mirrors_reachable(timeout: float = 3.0) -> bool:
    """Whether one of torchvision's MNIST mirrors accepts a TCP connection (no download)."""
    import socket
    from urllib.parse import urlparse

    from torchvision.datasets import MNIST

    for mirror in MNIST.mirrors:
        url = urlparse(mirror)
        try:
            socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
            return True
        except OSError:
            continue
    return False


def check_data_source(config: Config) -> None:
    """Fail early, touching no file, when MNIST is neither in data_dir nor downloadable.

    (torchvision would otherwise create folders under data_dir and raise a RuntimeError.)
    """
    d = config.data
    if d.dataset != "mnist":
        return
    from _data import find_mnist_files

    if find_mnist_files(d.data_dir) is not None:
        return
    expected = (
        "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte"
        f"[.gz] and t10k-labels-idx1-ubyte[.gz] in {d.data_dir!r} or {d.data_dir!r}/MNIST/raw"
    )
    if not d.download:
        raise DatasetError(
            f"`data.data_dir` = {d.data_dir!r} holds no MNIST files (expected {expected}) and "
            "`data.download` is false: put the files there, pass --data-dir, or set "
            "data.download = true."
        )
    if not _mnist_mirrors_reachable():
        raise DatasetError(
            f"`data.data_dir` = {d.data_dir!r} holds no MNIST files (expected {expected}) and "
            "no MNIST mirror can be reached to download them (no network?): copy the four "
            "files there, or pass --data-dir to where they are."
        )


def check_init_from(config: Config) -> None:
    path = config.model.init_from
    if path and not Path(path).is_file():
        raise ConfigError(
            f"`model.init_from` = {path!r} is not a file; give the path of a state dict or of "
            "a checkpoint.pt written by this loop, or set it to '' to train from scratch."
        )


def check_tensorboard(config: Config) -> None:
    if not config.run.tensorboard:
        return
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"`run.tensorboard` = {config.run.tensorboard!r} needs the tensorboard package: "
            "pip install tensorboard (it is in the `examples` extra), or drop --tensorboard."
        ) from None


def check_out_dir(out_dir: Path) -> None:
    """Create ``out_dir`` and prove it writable, or raise ``OutputError`` with the reason."""
    for path in (out_dir, *out_dir.parents):
        if path.exists():
            if not path.is_dir():
                where = "is" if path == out_dir else f"is below {path}, which is"
                raise OutputError(
                    f"--out-dir {str(out_dir)!r} {where} a file, not a folder; "
                    "choose another --out-dir."
                )
            break
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=out_dir)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        raise OutputError(
            f"--out-dir {str(out_dir)!r} is not writable: {err.strerror or err}; "
            "choose another --out-dir or fix its permissions."
        ) from None


def _broadcast_error(action: Callable[[], None], env: _distributed.DistEnv) -> None:
    """Run ``action`` on rank 0 and raise the same error on every rank if it failed.

    Under torchrun, a refusal decided on rank 0 alone would leave the other ranks waiting
    in a collective (and dying with a gloo "Connection closed by peer" traceback).
    """
    error: tuple[str, str] | None = None
    if env.is_main:
        try:
            action()
        except _EXIT_2_ERRORS as err:
            error = (type(err).__name__, str(err))
    error = _distributed.broadcast_object(error)
    if error is not None:
        raise {cls.__name__: cls for cls in _EXIT_2_ERRORS}[error[0]](error[1])


# ------------------------------------------------------------------------ checkpoint

# What a resumed run reads from a checkpoint (an older file without "log" still resumes).
REQUIRED_KEYS = (
    "identity",
    "epoch",
    "batch",
    "finished",
    "world_size",
    "model",
    "optimizer",
    "scheduler",
    "scaler",
    "ranks",
)


def capture_rank_rng(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """This rank's RNG streams: the global ones and the attack's and loss's generators."""
    return {
        "rng": _checkpoint.capture_rng(),
        "generators": {k: g.get_state() for k, g in generators.items()},
    }


def _position_state(
    epoch: int,
    batch: int,
    stats: dict[str, Tensor],
    loop: Loop,
    finished: bool = False,
    rng: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The checkpoint payload (on rank 0; None elsewhere). A collective: call on every rank.

    ``rng``: this rank's RNG states to save instead of the current ones (the states at
    the start of a batch that is not taken).
    """
    rank_state = {
        **(rng or capture_rank_rng(loop.generators)),
        "stats": {k: v.detach().cpu() for k, v in stats.items()},
    }
    per_rank = _distributed.gather_objects(rank_state)
    if not loop.env.is_main:
        return None
    config = loop.config
    return {
        "format": _checkpoint.FORMAT_VERSION,
        "setting": config.name,
        "identity": config.training_identity(),
        "config": config.to_dict(),
        "epoch": epoch,
        "batch": batch,
        "finished": finished,
        "world_size": loop.env.world_size,
        "model": unwrap(loop.model).state_dict(),
        "optimizer": loop.optimizer.state_dict(),
        "scheduler": _checkpoint.scheduler_state(loop.scheduler),
        "scaler": loop.scaler.state_dict(),
        "ranks": per_rank,
        "log": list(loop.history),  # the log lines this checkpoint accounts for
        "torch_version": str(torch.__version__),
    }


def save_checkpoint(
    payload: dict[str, Any] | None, out_dir: Path, env: _distributed.DistEnv
) -> None:
    """Write the payload atomically on rank 0; a failed write raises OutputError on every rank.

    A collective (it also synchronises the ranks).
    """

    def write() -> None:
        if payload is None:
            return
        path = out_dir / CHECKPOINT
        try:
            _checkpoint.save_atomic(payload, path)
        except OSError as err:
            raise OutputError(
                f"cannot write {path}: {err.strerror or err}; the previous checkpoint is "
                "intact (or none was written yet). Free space or choose another --out-dir."
            ) from None

    _broadcast_error(write, env)


def check_resumable(
    ckpt: dict[str, Any], config: Config, env: _distributed.DistEnv, path: Path
) -> None:
    """Refuse a checkpoint trained with a different configuration (or world size mid-epoch),
    or that has already trained more than ``optim.epochs``."""
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
    epoch, batch, epochs = int(ckpt["epoch"]), int(ckpt["batch"]), config.optim.epochs
    if epochs < epoch or (epochs == epoch and batch):
        done = f"{epoch} epoch(s)" + (
            f" and {batch} batch(es) of epoch {epoch + 1}" if batch else ""
        )
        need = epoch + 1 if batch else epoch
        raise ResumeError(
            f"cannot resume {path} with optim.epochs = {epochs}: it has already trained {done}. "
            f"Pass --epochs {need} or more to continue it (its own setting was "
            f"{ckpt.get('config', {}).get('optim', {}).get('epochs', '?')}), or --out-dir for "
            "a new run."
        )


def load_initial_weights(model: nn.Module, path: str | Path) -> None:
    """Load ``model.init_from``: a state dict, or a checkpoint of this loop (its ``model``).

    Loaded with ``weights_only=True``; keys and shapes must match exactly.

    Raises:
        ConfigError: naming the file and the missing, unexpected or mismatched keys.
    """
    key = f"`model.init_from` = {str(path)!r}"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # see _checkpoint.load
        raise ConfigError(
            f"{key} cannot be read ({type(err).__name__}): not a torch file holding only "
            "tensors and plain containers (state dicts and this loop's checkpoints are)."
        ) from None
    state = payload
    if isinstance(payload, dict) and "model" in payload and "format" in payload:
        state = payload["model"]
    if not (
        isinstance(state, dict)
        and state
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items())
    ):
        raise ConfigError(
            f"{key} holds neither a state dict (names -> tensors) nor a checkpoint of "
            "examples/train.py; save the weights with torch.save(model.state_dict(), path)."
        )
    own = unwrap(model).state_dict()

    def listed(keys: list[str]) -> str:
        return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")

    problems = []
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing:
        problems.append(f"missing keys: {listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {listed(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch: {listed(shapes)}")
    if problems:
        raise ConfigError(
            f"{key} does not fit the model {model_name(model)}: "
            + "; ".join(problems)
            + ". Use weights of the same model.name, number of classes and data.normalize."
        )
    unwrap(model).load_state_dict(state)


def model_name(model: nn.Module) -> str:
    return type(unwrap(model)).__name__


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


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any (a collective)."""
    box = torch.tensor([float(flag)], device=device)
    return bool(_distributed.all_reduce_sum(box).item() > 0)


@dataclass
class Step:
    """What one training step returns: the loss (detached), its terms, the exits' logits."""

    loss: Tensor
    terms: dict[str, Tensor]
    clean_logits: Sequence[Tensor]
    adv_logits: Sequence[Tensor]


class NonFiniteStep(ArithmeticError):
    """The loss of a step is NaN or infinite on some rank; no update was made."""

    def __init__(self, loss: float) -> None:
        super().__init__(f"non-finite loss ({loss})")
        self.loss = loss


def train_step(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    attack: Callable[[Tensor, Tensor], Tensor],
    criterion: Criterion,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    amp: str = "none",
) -> Step:
    """One adversarial training step: attack, forward clean and adversarial, loss, update.

    This is the function to change for a new training recipe. ``model`` is the module to
    train (possibly DDP- or compile-wrapped; ``attack`` holds the plain one). Raises
    ``NonFiniteStep`` before the update when the loss is NaN or infinite on any rank.
    """
    with autocast(images.device, amp):
        adv_images = attack(images, labels)
    model.train()
    with autocast(images.device, amp):
        clean_logits = model(images)
        adv_logits = model(adv_images)
    loss, terms = criterion(adv_logits, clean_logits, labels)
    if _any_rank(not bool(torch.isfinite(loss.detach())), images.device):
        raise NonFiniteStep(loss.item())
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return Step(loss.detach(), {k: t.detach() for k, t in terms.items()}, clean_logits, adv_logits)


def _accumulate(stats: dict[str, Tensor], step: Step, labels: Tensor) -> None:
    """Add a step's loss, terms and per-exit correct counts to the epoch statistics."""
    with torch.no_grad():
        n = labels.shape[0]
        stats["loss_sum"] += step.loss.double() * n
        stats["samples"] += n
        for key, logits in (("clean_correct", step.clean_logits), ("adv_correct", step.adv_logits)):
            stats[key] += torch.stack([(z.argmax(-1) == labels).sum() for z in logits]).double()
        if step.terms:
            values = torch.stack([t.double() for t in step.terms.values()]) * n
            stats["terms"] = values if stats["terms"].numel() == 0 else stats["terms"] + values


@dataclass
class Loop:
    """Everything the epoch loop needs; built by :func:`build_loop`."""

    config: Config
    env: _distributed.DistEnv
    splits: Splits
    model: nn.Module  # the plain model
    train_model: nn.Module  # DDP / compile wrapped
    attack: Any
    criterion: Criterion
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    generators: dict[str, torch.Generator]
    loader: DataLoader[Any]
    sampler: ShardedSampler
    per_rank_batch: int
    channels_last: bool
    num_exits: int
    log: RunLog
    history: list[dict[str, Any]]
    tensorboard: TensorBoardLog | None = None

    @property
    def out_dir(self) -> Path:
        return self.config.out_dir

    def save(
        self,
        epoch: int,
        batch: int,
        stats: dict[str, Tensor],
        *,
        finished: bool = False,
        rng: dict[str, Any] | None = None,
    ) -> None:
        """Checkpoint the position (epoch, batch); a collective."""
        payload = _position_state(epoch, batch, stats, self, finished, rng)
        save_checkpoint(payload, self.out_dir, self.env)


def train_one_epoch(
    loop: Loop,
    epoch: int,
    start_batch: int,
    stats: dict[str, Tensor],
    stop: StopRequest,
    hooks: Hooks,
    progress: bool,
) -> int | None:
    """Train ``epoch`` from batch ``start_batch``, adding to ``stats``.

    Returns None at the end of the epoch, or the batch position at which a SIGINT /
    SIGTERM (on any rank) stopped it, after checkpointing there. On a non-finite loss,
    checkpoints the state from before that batch (RNG streams included) and raises
    ``NonFiniteLossError``.
    """
    config, env = loop.config, loop.env
    loop.sampler.set_epoch(epoch, skip=start_batch * loop.per_rank_batch)
    loop.loader.generator.manual_seed(config.run.seed * 7919 + epoch)  # type: ignore[union-attr]
    desc = f"epoch {epoch + 1}/{config.optim.epochs}"
    bar = _progress(loop.loader, len(loop.loader), progress and env.is_main, desc, start_batch)
    for batch, (images, labels) in enumerate(bar, start=start_batch):
        images, labels = _to_device(images, labels, env.device, loop.channels_last)
        at_start = capture_rank_rng(loop.generators)  # what a resume from this batch restores
        try:
            step = train_step(
                loop.train_model,
                images,
                labels,
                loop.attack,
                loop.criterion,
                loop.optimizer,
                loop.scaler,
                config.run.amp,
            )
        except NonFiniteStep as err:
            loop.save(epoch, batch, stats, rng=at_start)
            raise NonFiniteLossError(
                f"non-finite loss ({err.loss}) at epoch {epoch + 1}, batch index {batch} "
                f"(0-based, {loop.per_rank_batch} samples per process); the state before this "
                f"batch (weights, optimizer, RNG streams) is saved in {loop.out_dir / CHECKPOINT}. "
                "Lower optim.lr or try run.amp = 'bf16' / 'none' and start over with --overwrite "
                "(--resume continues only with unchanged settings)."
            ) from None
        _accumulate(stats, step, labels)
        if hooks.after_step is not None:
            hooks.after_step(epoch, batch)
        if bar is not loop.loader and batch % 5 == 0:
            seen = stats["samples"].clamp(min=1)
            bar.set_postfix(
                loss=f"{(stats['loss_sum'] / seen).item():.3f}",
                clean=f"{(stats['clean_correct'].mean() / seen).item():.3f}",
                adv=f"{(stats['adv_correct'].mean() / seen).item():.3f}",
            )
        # Every rank stops at the same step, whichever of them got the signal. At the
        # epoch's last batch the epoch ends instead (its checkpoint is an epoch boundary,
        # where a resume may change the number of processes); the run stops after it.
        if _any_rank(stop.requested, env.device) and batch + 1 < len(loop.loader):
            loop.save(epoch, batch + 1, stats)
            return batch + 1
    if bar is not loop.loader:
        bar.close()
    return None


def epoch_entry(epoch: int, lr: float, stats: dict[str, Tensor], seconds: float) -> dict[str, Any]:
    """The epoch's log line from its statistics summed over ranks."""
    totals = {k: _distributed.all_reduce_sum(v.clone()) for k, v in stats.items()}
    seen = float(totals["samples"].clamp(min=1))
    entry: dict[str, Any] = {
        "epoch": epoch + 1,
        "lr": lr,
        "loss": float(totals["loss_sum"]) / seen,
        "train_clean_acc": (totals["clean_correct"] / seen).tolist(),
        "train_adv_acc": (totals["adv_correct"] / seen).tolist(),
        "samples": int(seen),
        "seconds": round(seconds, 3),
    }
    if totals["terms"].numel():
        names = ("clean_ce", "adv_ce", "nkd", "eokd")
        entry["terms"] = dict(zip(names, (totals["terms"] / seen).tolist(), strict=False))
    return entry


def build_loop(config: Config, env: _distributed.DistEnv, log: RunLog) -> Loop:
    """Data, model, optimizer, schedule, AMP scaler, loss, attack: a fresh run's state."""
    device = env.device
    # Data: rank 0 first, so that a download happens once.
    splits: Splits | None = None
    if env.is_main:
        splits = build_splits(config.data)
    _distributed.barrier()
    if splits is None:
        splits = build_splits(config.data)
    per_rank_batch = config.optim.batch_size // env.world_size
    loader, sampler = make_train_loader(splits.train, per_rank_batch, config, env)

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
    return Loop(
        config,
        env,
        splits,
        model,
        train_model,
        attack,
        criterion,
        optimizer,
        scheduler,
        scaler,
        generators,
        loader,
        sampler,
        per_rank_batch,
        channels_last,
        num_exits,
        log,
        history=[],
    )


def restore(loop: Loop, ckpt: dict[str, Any], path: Path) -> dict[str, Tensor] | None:
    """Load a checkpoint's state into ``loop``; return the saved mid-epoch statistics.

    Raises:
        CheckpointError: the file's contents do not fit this model and optimizer.
    """
    env = loop.env
    try:
        unwrap(loop.model).load_state_dict(ckpt["model"])
        loop.optimizer.load_state_dict(ckpt["optimizer"])
        _checkpoint.load_scheduler_state(loop.scheduler, ckpt["scheduler"])
        loop.scaler.load_state_dict(ckpt["scaler"])
        ranks = ckpt["ranks"]
        stats = None
        if len(ranks) == env.world_size:
            state = ranks[env.rank]
            _checkpoint.restore_rng(state["rng"])
            for name, gen in loop.generators.items():
                gen.set_state(state["generators"][name])
            if ckpt["batch"]:
                stats = {k: v.to(env.device) for k, v in state["stats"].items()}
        else:
            loop.log.info(
                f"note: checkpoint saved with {len(ranks)} process(es), resuming with "
                f"{env.world_size}; RNG streams are re-seeded, so this run is not bit-identical."
            )
        saved_log = ckpt.get("log")
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"{path} does not fit this run ({type(err).__name__}: {detail}). Start a new run "
            "with --overwrite or another --out-dir."
        ) from None
    if saved_log is None:  # a checkpoint from before the log was stored in it
        old = read_log(loop.out_dir / LOG) if (loop.out_dir / LOG).is_file() else []
        saved_log = old[: int(ckpt["epoch"])]
    loop.history = list(saved_log)
    return stats


def prepare_out_dir(loop: Loop, resume: bool) -> None:
    """Rank 0: make the run directory hold this run only (a collective: call on every rank).

    A fresh start (or ``--overwrite``) deletes the earlier checkpoint before anything
    else, so a crash now cannot leave an old checkpoint beside a new config; then its log,
    results and TensorBoard events go. A resume rewrites the log from the checkpoint. Both
    remove temporary files of killed checkpoint writes and write the current config.toml.
    """
    out_dir = loop.out_dir

    def prepare() -> None:
        path = out_dir
        try:
            if not resume:
                path = out_dir / CHECKPOINT
                path.unlink(missing_ok=True)
                # Nothing of an earlier run stays beside the new checkpoint: not its log,
                # and not its results, which --no-eval would not replace.
                for stale in (LOG, *RESULT_FILES):
                    path = out_dir / stale
                    path.unlink(missing_ok=True)
            path = out_dir / CHECKPOINT
            _checkpoint.remove_stale_temporaries(path)
            if resume:
                path = out_dir / LOG
                loop.log.rewrite(loop.history)
            path = out_dir / CONFIG
            tmp = out_dir / f".{CONFIG}.tmp"
            tmp.write_text(dumps_toml(loop.config))
            os.replace(tmp, path)
        except OSError as err:
            raise OutputError(f"cannot write {path}: {err.strerror or err}") from None

    _broadcast_error(prepare, loop.env)


def _remove_results(out_dir: Path) -> None:
    for name in RESULT_FILES:
        (out_dir / name).unlink(missing_ok=True)
    (out_dir / ".results.json.tmp").unlink(missing_ok=True)


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
        ConfigError, DatasetError: invalid settings or data (before any file is written).
        OutputError: the run directory cannot be written.
        ResumeError: the checkpoint belongs to another configuration, or is further along.
        CheckpointError: the checkpoint cannot be read.
        NonFiniteLossError: the loss became NaN or infinite (a checkpoint was saved).
    """
    hooks = hooks or Hooks()
    if resume and overwrite:
        raise ResumeError(
            "--resume and --overwrite contradict each other: --resume continues the run in "
            "--out-dir, --overwrite deletes it and starts again. Pass one of them."
        )
    env = _distributed.setup(config.run.device)
    try:
        return _run(config, env, resume, overwrite, progress, quiet, evaluate, hooks)
    finally:
        _distributed.cleanup()


def _run(
    config: Config,
    env: _distributed.DistEnv,
    resume: bool,
    overwrite: bool,
    progress: bool,
    quiet: bool,
    evaluate: bool,
    hooks: Hooks,
) -> Outcome:
    out_dir = config.out_dir
    ckpt_path = out_dir / CHECKPOINT
    log = RunLog(out_dir / LOG, enabled=env.is_main, quiet=quiet)

    # 1. Settings that cannot work, found without touching the disk.
    if config.optim.batch_size % env.world_size:
        raise ConfigError(
            f"`optim.batch_size` = {config.optim.batch_size} is the global batch and must be "
            f"divisible by the world size {env.world_size}."
        )
    build_criterion(config.loss)  # the loss table's values, checked by the loss itself
    check_exit_weights(config, count_exits(config))
    check_init_from(config)
    check_tensorboard(config)
    _broadcast_error(lambda: check_data_source(config), env)

    # 2. The run directory: writable, and holding what --resume / --overwrite expect.
    def check_dir() -> None:
        if resume and not ckpt_path.is_file():
            raise FileNotFoundError(
                f"--resume: no checkpoint at {ckpt_path}; run without --resume to start."
            )
        check_out_dir(out_dir)
        if ckpt_path.exists() and not (resume or overwrite):
            raise ResumeError(
                f"{out_dir} already holds a checkpoint; pass --resume to continue it, "
                "--overwrite to start again from scratch, or --out-dir for a separate run."
            )

    _broadcast_error(check_dir, env)
    ckpt: dict[str, Any] | None = None
    if resume:
        ckpt = _checkpoint.load(ckpt_path, required=REQUIRED_KEYS)
        try:
            check_resumable(ckpt, config, env, ckpt_path)
        except (KeyError, TypeError) as err:
            raise CheckpointError(
                f"{ckpt_path} is malformed ({type(err).__name__}: {err}). Start a new run with "
                "--overwrite or another --out-dir."
            ) from None

    # 3. Training state, fresh or from the checkpoint; then the run directory is prepared.
    device = env.device
    seed_everything(config.run.seed + env.rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    loop = build_loop(config, env, log)
    start_epoch, start_batch = 0, 0
    stats: dict[str, Tensor] | None = None
    if ckpt is not None:
        stats = restore(loop, ckpt, ckpt_path)
        start_epoch, start_batch = int(ckpt["epoch"]), int(ckpt["batch"])
        if config.model.init_from:
            log.info(
                "note: model.init_from is ignored on --resume: the weights are the checkpoint's."
            )
    elif config.model.init_from:
        load_initial_weights(loop.model, config.model.init_from)
    prepare_out_dir(loop, resume)
    if ckpt is not None:
        where = (
            f"finished after {start_epoch} epoch(s): evaluating it as it is"
            if start_epoch == config.optim.epochs
            else f"at epoch {start_epoch + 1}, batch {start_batch}"
        )
        log.info(f"resumed {ckpt_path} {where}")
    if env.is_main:
        log.info(
            f"{config.name}/{config.loss.method}: {len(loop.splits.train)} train, "
            f"{len(loop.splits.val)} val, {len(loop.splits.test)} test samples; device {device}, "
            f"world size {env.world_size}, amp {config.run.amp}; out_dir {out_dir}"
        )
        if config.run.amp != "none" and device.type != "cuda":
            log.info(
                f"note: run.amp = {config.run.amp!r} on {device.type}: the attack and the forward "
                f"passes run under torch.autocast({device.type!r}, {config.run.amp}), which is "
                "usually slower than float32 there; mixed precision is meant for GPUs."
            )
        if config.run.tensorboard:
            loop.tensorboard = TensorBoardLog(config.run.tensorboard, purge_step=start_epoch + 1)
    if hooks.before_training is not None:
        hooks.before_training(loop.model)
    try:
        return train_and_evaluate(loop, start_epoch, start_batch, stats, hooks, progress, evaluate)
    finally:
        if loop.tensorboard is not None:
            loop.tensorboard.close()


def train_and_evaluate(
    loop: Loop,
    start_epoch: int,
    start_batch: int,
    stats: dict[str, Tensor] | None,
    hooks: Hooks,
    progress: bool,
    evaluate: bool,
) -> Outcome:
    """The epoch loop from (start_epoch, start_batch), then the final evaluation.

    A SIGINT / SIGTERM ends the run after a checkpoint, wherever it arrives: during a step
    (checkpoint after it), during an epoch's checkpoint (the run stops right after it),
    or during the evaluation (interrupted at once: the training is saved, the partial
    results are removed and ``--resume`` evaluates again).
    """
    config, env, log = loop.config, loop.env, loop.log
    out_dir, device, epochs = loop.out_dir, env.device, config.optim.epochs

    def stopped(stop: StopRequest, epoch: int, where: str) -> Outcome:
        signum = stop.received
        log.info(
            f"stopped by signal {signum or 'on another rank'} {where}; checkpoint saved to "
            f"{out_dir / CHECKPOINT}. Continue with --resume."
        )
        return Outcome("interrupted", stop.exit_code if signum else 143, out_dir, epoch)

    with StopRequest() as stop:
        for epoch in range(start_epoch, epochs):
            skip = start_batch if epoch == start_epoch else 0
            if stats is None or skip == 0:
                stats = _new_stats(loop.num_exits, device)
            started = time.perf_counter()
            position = train_one_epoch(loop, epoch, skip, stats, stop, hooks, progress)
            if position is not None:
                return stopped(stop, epoch, f"at epoch {epoch + 1}, batch {position}")
            # The loss check runs before each update; the epoch's last update is checked
            # here, before a checkpoint (the final one included) can hold its weights.
            finite = all(bool(torch.isfinite(p).all()) for p in loop.model.parameters())
            if _any_rank(not finite, device):
                raise NonFiniteLossError(
                    f"the weights became NaN or infinite in the last update of epoch "
                    f"{epoch + 1}; no checkpoint holds them (the last one in {out_dir}, if "
                    "any, is from an earlier epoch). Lower optim.lr or try run.amp = "
                    "'bf16' / 'none' and start over with --overwrite."
                )
            lr = loop.optimizer.param_groups[0]["lr"]
            loop.scheduler.step()
            entry = epoch_entry(epoch, lr, stats, time.perf_counter() - started)
            loop.history.append(entry)
            stats = _new_stats(loop.num_exits, device)
            loop.save(epoch + 1, 0, stats, finished=epoch + 1 == epochs)
            # Only now, with the checkpoint that holds it in place, does the line go to the
            # log: a crash before this line is repaired by --resume (log rewritten from it).
            log.record(entry)
            if loop.tensorboard is not None:
                loop.tensorboard.epoch(entry)
            log.info(
                f"epoch {epoch + 1}/{epochs}: loss {entry['loss']:.4f}, train clean acc "
                f"{100 * float(np.mean(entry['train_clean_acc'])):.2f}%, adv acc "
                f"{100 * float(np.mean(entry['train_adv_acc'])):.2f}% ({entry['seconds']:.1f}s)"
            )
            if _any_rank(stop.requested, device):  # a signal during the checkpoint window
                return stopped(stop, epoch + 1, f"after epoch {epoch + 1}")

        # Evaluation: no step to finish, so a signal interrupts it at once.
        results = None
        try:
            stop.immediate = True
            if stop.requested:
                return stopped(stop, epochs, "before the evaluation")
            if evaluate:
                from _evaluate import evaluate as run_evaluation

                try:
                    results = run_evaluation(
                        unwrap(loop.model),
                        loop.splits,
                        config,
                        env,
                        progress=progress and env.is_main,
                        log=log,
                    )
                except OSError as err:
                    raise OutputError(
                        f"cannot write the results into {out_dir}: {err.strerror or err}"
                    ) from None
        except Interrupted:
            if env.is_main:
                _remove_results(out_dir)
            return stopped(
                stop,
                epochs,
                "during the evaluation (the training is finished; --resume evaluates again)",
            )
        finally:
            stop.immediate = False
    if loop.tensorboard is not None and results is not None:
        loop.tensorboard.results(results, epochs)
    return Outcome("finished", 0, out_dir, epochs, results)


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
        "--tensorboard", metavar="DIR", help="run.tensorboard: write TensorBoard scalars to DIR"
    )
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
    p.add_argument(
        "--eval-suite",
        choices=EVAL_SUITES,
        help="eval.suite: 'strong' adds the worst case over an attack suite, budgeted "
        "accuracy under the exit-policy attack and the slow-down factor",
    )
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
    "eval_suite": "eval.suite",
    "workers": "data.num_workers",
    "seed": "run.seed",
    "device": "run.device",
    "amp": "run.amp",
    "compile": "run.compile",
    "channels_last": "run.channels_last",
    "tensorboard": "run.tensorboard",
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


def _error(err: BaseException) -> None:
    """Print an error once: on rank 0 under torchrun (every rank raises the same one)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {err}", file=sys.stderr)


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
    except _EXIT_2_ERRORS as err:
        _error(err)
        return 2
    except NonFiniteLossError as err:
        _error(err)
        return 3
    if outcome.results is not None:
        from _evaluate import summary_markdown

        print(summary_markdown(outcome.results))
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
