"""Speed and memory of MultiExitPGD against baselines measured in the same run.

The 3-exit SmallCNN (MNIST, 1×28×28, 836,846 parameters), B = 128, 10 PGD steps,
ε = 0.3, α = 20/255 (the paper's MNIST setting), random starts, model in eval mode:

(a) ``MultiExitPGD(mode="single", exit_index=-1)`` vs ``torchattacks.PGD(ExitView(model, -1))``:
    time ratio, target <= 1.05 (the multi-exit machinery costs nothing).
(b) max-average, all E candidates batched (``max_batch=None``) vs one candidate at a time
    (``max_batch=1``, whose backward pass stops at the attacked exit, as E separate
    single-exit attacks would): time ratio, target <= 1.0 on CPU, and the peak memory of both
    (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the peak rise of the resident set
    size, sampled every 0.5 ms, of a fresh process running that one attack).
    Also printed: the ratio of their matmul/convolution FLOPs (forward and backward,
    counted with the formulas of ``torch.utils.flop_counter``), the arithmetic each
    path does whatever the hardware, and the time ratio at the small batch sizes of
    ``--small-batches``, where per-operator overhead rather than arithmetic dominates.
(c) ``mode="average"`` vs a naive PGD loop that sums the per-exit cross-entropies in
    Python: time ratio, target <= 1.05.

Times are the fastest of ``--repeats`` runs after a warm-up, the attacks taking turns.

    python benchmarks/bench_attacks.py [--device cuda] [--repeats 5] [--batch 128]
        [--small-batches 1,4,16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import torchattacks
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from neokd_losses.attacks import ExitView, MultiExitPGD

EPS, ALPHA, STEPS = 0.3, 20 / 255, 10


def make_model(device: torch.device) -> nn.Module:
    """The library's SmallCNN (or a CNN of its layout before the models issue landed).

    SmallCNN's last layer starts at zero (the paper's init), which makes every input
    gradient of exit 3 exactly zero; it is re-drawn here so every exit is attackable.
    """
    try:
        from neokd_losses.models.small_cnn import SmallCNN
    except ImportError:  # pragma: no cover - only before the models issue landed
        model: nn.Module = _FallbackSmallCNN()
    else:
        model = SmallCNN()
    for layer in model.modules():
        if isinstance(layer, nn.Linear) and not bool(layer.weight.any()):
            layer.reset_parameters()
    return model.to(device).eval()


class _FallbackSmallCNN(nn.Module):
    """docs/paper.md's SmallCNN layout (3 exits, 1×28×28 inputs)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU())
        self.conv23 = nn.Sequential(
            nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3), nn.ReLU()
        )
        self.rest = nn.Sequential(
            nn.Conv2d(64, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(1024, 200),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(200, 200),
            nn.ReLU(),
            nn.Linear(200, num_classes),
        )
        self.exit1 = nn.Sequential(
            nn.Conv2d(32, 16, 3, stride=2),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(576, 200),
            nn.Dropout(0.5),
            nn.Linear(200, 200),
            nn.Linear(200, num_classes),
        )
        self.exit2 = nn.Sequential(
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(1600, 200),
            nn.Dropout(0.5),
            nn.Linear(200, 200),
            nn.Linear(200, num_classes),
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        h1 = self.conv1(x)
        h2 = self.conv23(h1)
        return [self.exit1(h1), self.exit2(h2), self.rest(h2)]


def naive_average_pgd(model: nn.Module, images: Tensor, labels: Tensor, steps: int) -> Tensor:
    """Average-attack PGD written plainly: a Python sum over the exits' mean CE."""
    x = (images + torch.empty_like(images).uniform_(-EPS, EPS)).clamp(0, 1)
    for _ in range(steps):
        x.requires_grad_(True)
        exits = model(x)
        loss = sum(F.cross_entropy(z, labels) for z in exits) / len(exits)
        (grad,) = torch.autograd.grad(loss, x)
        x = x.detach() + ALPHA * grad.sign()
        x = (images + (x - images).clamp(-EPS, EPS)).clamp(0, 1).detach()
    return x


def attacks(model: nn.Module, steps: int) -> dict[str, Callable[[Tensor, Tensor], Tensor]]:
    kw = {"eps": EPS, "alpha": ALPHA, "steps": steps}
    return {
        "single": MultiExitPGD(model, mode="single", exit_index=-1, **kw),
        "stock_pgd": torchattacks.PGD(ExitView(model, -1), **kw),
        "max_average_batched": MultiExitPGD(model, mode="max-average", **kw),
        "max_average_one_at_a_time": MultiExitPGD(model, mode="max-average", max_batch=1, **kw),
        "average": MultiExitPGD(model, mode="average", **kw),
        "naive_average": lambda x, y: naive_average_pgd(model, x, y, steps),
    }


def data(batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 1, 28, 28, generator=g).to(device)
    labels = torch.randint(0, 10, (batch,), generator=g).to(device)
    return images, labels


def timed_all(
    fns: dict[str, Callable[[], object]], repeats: int, device: torch.device
) -> dict[str, float]:
    """The fastest of ``repeats`` calls of each function, in seconds.

    The functions run round-robin (a, b, c, a, b, c, ...) so that a slow spell of a shared
    machine hits all of them alike; the minimum is the least noisy statistic.
    """
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


class _FlopCount(TorchDispatchMode):
    """Sum the FLOPs of every operator ``torch.utils.flop_counter`` has a formula for.

    ``FlopCounterMode`` itself cannot be used: its module tracker refuses
    ``torch.autograd.grad`` w.r.t. a leaf input, which is what every attack computes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


def count_flops(fn: Callable[[], object]) -> int:
    """Matmul/convolution FLOPs (forward and backward) of one call of ``fn``."""
    with _FlopCount() as counter:
        fn()
    return counter.total


def small_batch_ratios(
    model: nn.Module, sizes: list[int], repeats: int, device: torch.device
) -> dict[int, float]:
    """Time ratio batched / one candidate at a time of max-average at each batch size."""
    ratios = {}
    for size in sizes:
        images, labels = data(size, device)
        atks = attacks(model, STEPS)
        pair = {n: atks[n] for n in ("max_average_batched", "max_average_one_at_a_time")}
        for atk in pair.values():
            atk(images, labels)
        times = timed_all(
            {n: (lambda atk=atk, x=images, y=labels: atk(x, y)) for n, atk in pair.items()},
            repeats,
            device,
        )
        ratios[size] = times["max_average_batched"] / times["max_average_one_at_a_time"]
    return ratios


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_mib(name: str, batch: int, device: torch.device) -> float:
    """Peak extra memory of one run of attack ``name``, in MiB."""
    if device.type == "cuda":
        torch.manual_seed(0)
        model = make_model(device)
        images, labels = data(batch, device)
        atk = attacks(model, STEPS)[name]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        atk(images, labels)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    # CPU: a fresh process per attack, so that one attack's peak does not hide another's.
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", name, "--batch", str(batch)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ},
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"])


def memory_child(name: str, batch: int) -> None:
    """Print the peak rise of the resident set size while attack ``name`` runs once."""
    torch.manual_seed(0)
    model = make_model(torch.device("cpu"))
    images, labels = data(batch, torch.device("cpu"))
    atk = attacks(model, STEPS)[name]
    attacks(model, 1)[name](images[:2], labels[:2])  # load kernels, allocator warm-up
    before = _rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample() -> None:  # torch kernels release the GIL, so this thread keeps sampling
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        atk(images, labels)
    finally:
        done.set()
        sampler.join()
    print(json.dumps({"peak_mib": (max(peak[0], _rss_bytes()) - before) / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument(
        "--small-batches",
        default="1,4,16",
        help="comma-separated batch sizes for the small-batch (b) ratios ('' for none)",
    )
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child is not None:
        memory_child(args.memory_child, args.batch)
        return
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = make_model(device)
    images, labels = data(args.batch, device)
    atks = attacks(model, STEPS)
    warm = attacks(model, 1)
    for name in atks:
        warm[name](images, labels)
    times = timed_all(
        {name: (lambda atk=atk: atk(images, labels)) for name, atk in atks.items()},
        args.repeats,
        device,
    )

    params = sum(p.numel() for p in model.parameters())
    print(
        f"{type(model).__name__} ({params:,} parameters), B = {args.batch}, {STEPS} steps, "
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
        f"fastest of {args.repeats} runs"
    )
    for name, seconds in times.items():
        print(f"  {name:<28s} {seconds * 1000:9.1f} ms")
    ratio_a = times["single"] / times["stock_pgd"]
    ratio_b = times["max_average_batched"] / times["max_average_one_at_a_time"]
    ratio_c = times["average"] / times["naive_average"]
    mem_batched = peak_memory_mib("max_average_batched", args.batch, device)
    mem_single = peak_memory_mib("max_average_one_at_a_time", args.batch, device)
    flops = {
        name: count_flops(lambda name=name: atks[name](images, labels))
        for name in ("max_average_batched", "max_average_one_at_a_time")
    }
    sizes = [int(v) for v in args.small_batches.split(",") if v.strip()]
    small = small_batch_ratios(model, sizes, args.repeats, device)
    print(f"(a) single(exit -1) / torchattacks.PGD(ExitView):  {ratio_a:.3f}  (target <= 1.05)")
    print(
        f"(b) max-average batched / one candidate at a time: {ratio_b:.3f}  (target <= 1.0 on CPU)"
    )
    print(
        f"    peak memory: batched {mem_batched:.1f} MiB, one at a time {mem_single:.1f} MiB "
        f"(ratio {mem_batched / max(mem_single, 1e-9):.2f})"
    )
    print(
        f"    matmul/conv FLOPs: batched {flops['max_average_batched'] / 1e9:.1f} G, one at a "
        f"time {flops['max_average_one_at_a_time'] / 1e9:.1f} G (ratio "
        f"{flops['max_average_batched'] / flops['max_average_one_at_a_time']:.3f}: batched "
        "rows back-propagate through every layer, a lone candidate only to its exit)"
    )
    for size, ratio in small.items():
        print(f"    time ratio at B = {size}: {ratio:.3f}")
    print(f"(c) average / naive per-exit loop:               {ratio_c:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
