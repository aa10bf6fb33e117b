"""Speed and memory of MultiExitPGD against baselines measured in the same run.

The 3-exit SmallCNN (MNIST, 1×28×28, 836,846 parameters), B = 128, 10 PGD steps,
ε = 0.3, α = 20/255 (the paper's MNIST setting), random starts, model in eval mode:

(a) ``MultiExitPGD(mode="single", exit_index=-1)`` vs ``torchattacks.PGD(ExitView(model, -1))``:
    time ratio, target <= 1.05 (the multi-exit machinery costs nothing); also the
    functional core ``multi_exit_pgd`` vs the ``MultiExitPGD`` adapter over it (the
    adapter adds no per-step work: about 1.0).
(b) max-average on the *staged* SmallCNN (issue 14), all E candidates batched *and*
    truncated (at stage s only the rows of candidates i >= s continue) vs one candidate
    at a time (``max_batch=1``, truncated too): the median of ``--repeats`` alternating
    runs, target <= 1.05; both paths' matmul/convolution FLOPs (forward and backward,
    counted with the formulas of ``torch.utils.flop_counter``), which are equal, beside
    those of the generic (untruncated) batched path; the peak memory of both (CUDA:
    ``torch.cuda.max_memory_allocated``; CPU: the peak rise of the resident set size,
    sampled every 0.5 ms, of a fresh process running that one attack); the time
    ratio at the small batch sizes of ``--small-batches``; and, at the batch sizes of
    ``--step-batches``, where the batched path's extra time goes: one gradient of all
    E candidates (forward and backward, no PGD step) as the batched path computes it,
    with the one-at-a-time calls but one backward pass, and one backward per candidate.
(c) ``mode="average"`` vs a naive PGD loop that sums the per-exit cross-entropies in
    Python: time ratio, target <= 1.05.

The 7-exit MSDNet for CIFAR-100 (3×32×32, 3,067,960 parameters), B = ``--msd-batch`` (32),
ε = 8/255, α = 2/255, 7 steps (NEO-KD's training attack):

(d) max-average with truncation (the staged model) vs the generic path (the same
    network behind a plain ``forward``, which runs every stage on every row): median
    time ratio, target <= 0.75, with the FLOP ratio beside it.
(e) one NEO-KD training step (the max-average attack in eval mode, then clean and
    adversarial forwards in training mode, ``NEOKDLoss`` and the backward pass): time
    with the generic attack and with the truncated one.

On CPU with glibc, large freed buffers go back to the system (above malloc's mmap
threshold, at most 32 MiB, or when the free top of the heap exceeds the trim threshold)
and are page-faulted in again at the next step; the batched path, which holds every
candidate's activations until its one backward pass (1.6-1.9 times the peak memory),
pays this more. (b) prints the system time and minor page faults of both paths: on the
development machine at B = 128, runs with about 200,000 faults per batched attack gave
1.25-1.31, runs without 1.09. Set
``MALLOC_MMAP_THRESHOLD_=2000000000 MALLOC_TRIM_THRESHOLD_=4000000000`` (or use
jemalloc / tcmalloc) to time the computation alone; the header says which was used.

SmallCNN and MSDNet implement the staged-model protocol (``neokd_losses.models.staged``);
``Unstaged`` hides it to time the generic path. Times are the fastest (or the median,
where said) of ``--repeats`` runs after a warm-up, the attacks taking turns.

    python benchmarks/bench_attacks.py [--device cuda] [--repeats 5] [--batch 128]
        [--small-batches 1,4,16] [--step-batches 128,32] [--msd-batch 32]
        [--sections abcde]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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

from neokd_losses import NEOKDLoss
from neokd_losses.attacks import ExitView, MultiExitPGD
from neokd_losses.attacks._pgd_core import ExitForward
from neokd_losses.functional import multi_exit_pgd
from neokd_losses.models.msdnet import msdnet_cifar100
from neokd_losses.models.small_cnn import SmallCNN
from neokd_losses.models.staged import require_staged

EPS, ALPHA, STEPS = 0.3, 20 / 255, 10
MSD_EPS, MSD_ALPHA, MSD_STEPS = 8 / 255, 2 / 255, 7


# --------------------------------------------------------------------------- models


def make_model(device: torch.device) -> nn.Module:
    """The library's SmallCNN, with every exit attackable.

    SmallCNN's last layer starts at zero (the paper's init), which makes every input
    gradient of exit 3 exactly zero; it is re-drawn here so every exit is attackable.
    """
    model = SmallCNN()
    for layer in model.modules():
        if isinstance(layer, nn.Linear) and not bool(layer.weight.any()):
            layer.reset_parameters()
    return model.to(device).eval()


def as_staged(model: nn.Module) -> nn.Module:
    """``model``, checked to implement the staged-model protocol (SmallCNN, MSDNet do)."""
    return require_staged(model, "the truncated attacks of this benchmark")  # type: ignore[return-value]


class Unstaged(nn.Module):
    """The same network behind a plain ``forward``: the attacks' generic path."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> list[Tensor]:
        out: list[Tensor] = self.model(x)
        return out


# --------------------------------------------------------------------------- attacks


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
    """The attacks of (a)-(c); the max-average pair runs on the staged model."""
    kw: dict[str, Any] = {"eps": EPS, "alpha": ALPHA, "steps": steps}
    staged = as_staged(model)
    return {
        "single": MultiExitPGD(model, mode="single", exit_index=-1, **kw),
        "stock_pgd": torchattacks.PGD(ExitView(model, -1), **kw),
        "functional_single": lambda x, y: multi_exit_pgd(
            model, x, y, mode="single", exit_index=-1, **kw
        ),
        "max_average_batched": MultiExitPGD(staged, mode="max-average", **kw),
        "max_average_one_at_a_time": MultiExitPGD(staged, mode="max-average", max_batch=1, **kw),
        "average": MultiExitPGD(model, mode="average", **kw),
        "naive_average": lambda x, y: naive_average_pgd(model, x, y, steps),
    }


def data(batch: int, device: torch.device, shape: tuple[int, ...] = (1, 28, 28), k: int = 10):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, *shape, generator=g).to(device)
    labels = torch.randint(0, k, (batch,), generator=g).to(device)
    return images, labels


def timed_all(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    device: torch.device,
    cpu: dict[str, list[float]] | None = None,
    kernel: dict[str, list[tuple[float, int]]] | None = None,
) -> dict[str, list[float]]:
    """Every wall-clock time of ``repeats`` calls of each function, in seconds.

    The functions run round-robin (a, b, c, a, b, c, ...) so that a slow spell of a shared
    machine hits all of them alike. ``cpu``, when given, receives the CPU time of this
    process for every call (all threads summed): on a machine shared with other work it
    moves far less than the wall clock. ``kernel``, when given (POSIX only), receives the
    system time and the minor page faults of every call: memory the allocator gave back
    to the system and touches again.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            before = _kernel_usage() if kernel is not None else (0.0, 0)
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
            if cpu is not None:
                cpu.setdefault(name, []).append(time.process_time() - start_cpu)
            if kernel is not None:
                after = _kernel_usage()
                kernel.setdefault(name, []).append((after[0] - before[0], after[1] - before[1]))
    return times


def _kernel_usage() -> tuple[float, int]:
    """This process's system CPU time (s) and minor page faults so far; zeros off POSIX."""
    try:
        import resource
    except ImportError:  # Windows
        return 0.0, 0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_stime, usage.ru_minflt


def median_ratio(times: dict[str, list[float]], top: str, bottom: str) -> float:
    """The median over the alternating runs of the per-run time ratio top / bottom."""
    return statistics.median(a / b for a, b in zip(times[top], times[bottom], strict=True))


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
    """Median time ratio batched / one candidate at a time of staged max-average per B."""
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
        ratios[size] = median_ratio(times, "max_average_batched", "max_average_one_at_a_time")
    return ratios


def step_decomposition(
    model: nn.Module, sizes: list[int], repeats: int, device: torch.device
) -> dict[int, dict[str, float]]:
    """Median time (s) of one max-average gradient (forward and backward, all E candidates)
    three ways, per B: where the batched path's extra time goes.

    ``batched``: the library's step (:meth:`ExitForward.candidate_losses` on the E·B rows,
    rows of several candidates merged in one call per block, one backward pass);
    ``one_backward``: the same per-candidate calls as one at a time
    (:meth:`ExitForward.exit_loss` on each candidate's B rows) but one backward pass for
    all; ``per_candidate``: one backward pass per candidate, as ``max_batch=1`` does.
    """
    fwd = ExitForward(as_staged(model))
    exits = int(getattr(model, "num_exits"))  # noqa: B009
    results = {}
    for size in sizes:
        images, labels = data(size, device)
        x = images.repeat(exits, 1, 1, 1)
        y = labels.repeat(exits)

        def batched(x: Tensor = x, y: Tensor = y) -> Tensor:
            leaf = x.detach().requires_grad_(True)
            return torch.autograd.grad(fwd.candidate_losses(leaf, y, 0, exits).sum(), leaf)[0]

        def one_backward(x: Tensor = x, y: Tensor = y) -> Tensor:
            leaf = x.detach().requires_grad_(True)
            parts, ys = leaf.chunk(exits), y.chunk(exits)
            loss = torch.cat([fwd.exit_loss(parts[i], ys[i], i) for i in range(exits)])
            return torch.autograd.grad(loss.sum(), leaf)[0]

        def per_candidate(x: Tensor = x, y: Tensor = y) -> Tensor:
            grads = []
            for i, (part, yi) in enumerate(zip(x.chunk(exits), y.chunk(exits), strict=True)):
                leaf = part.detach().requires_grad_(True)
                grads.append(torch.autograd.grad(fwd.exit_loss(leaf, yi, i).sum(), leaf)[0])
            return torch.cat(grads)

        fns: dict[str, Callable[[], object]] = {
            "batched": batched,
            "one_backward": one_backward,
            "per_candidate": per_candidate,
        }
        reference = per_candidate()
        for name in ("batched", "one_backward"):  # the same gradient, three ways
            torch.testing.assert_close(fns[name](), reference, rtol=1e-4, atol=1e-5, msg=name)
        times = timed_all(fns, repeats, device)
        results[size] = {name: statistics.median(values) for name, values in times.items()}
    return results


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


# --------------------------------------------------------------------------- MSDNet


def msdnet_section(batch: int, repeats: int, device: torch.device) -> None:
    """(d) truncated vs generic max-average, (e) one NEO-KD training step, on MSDNet-7."""
    torch.manual_seed(0)
    net = msdnet_cifar100().to(device)
    staged, generic = as_staged(net), Unstaged(net)
    images, labels = data(batch, device, (3, 32, 32), 100)
    kw: dict[str, Any] = {"eps": MSD_EPS, "alpha": MSD_ALPHA, "steps": MSD_STEPS}
    atks = {
        "truncated": MultiExitPGD(staged, **kw),
        "generic": MultiExitPGD(generic, **kw),
    }
    net.eval()
    for model in (staged, generic):  # warm-up
        MultiExitPGD(model, eps=MSD_EPS, alpha=MSD_ALPHA, steps=1)(images[:2], labels[:2])
    cpu: dict[str, list[float]] = {}
    times = timed_all(
        {name: (lambda atk=atk: atk(images, labels)) for name, atk in atks.items()},
        repeats,
        device,
        cpu,
    )
    flops = {name: count_flops(lambda atk=atk: atk(images, labels)) for name, atk in atks.items()}
    params = sum(p.numel() for p in net.parameters())
    print(
        f"msdnet_cifar100 ({params:,} parameters, 7 exits), B = {batch}, {MSD_STEPS} steps, "
        f"max-average; median of {repeats} alternating runs"
    )
    for name in atks:
        print(
            f"  {name:<28s} {statistics.median(times[name]) * 1000:9.1f} ms  "
            f"{flops[name] / 1e9:8.1f} GFLOPs"
        )
    print(
        f"(d) max-average truncated / generic: {median_ratio(times, 'truncated', 'generic'):.3f}"
        f"  (target <= 0.75); FLOP ratio {flops['truncated'] / flops['generic']:.3f}; "
        f"CPU-time ratio {median_ratio(cpu, 'truncated', 'generic'):.3f}"
    )

    criterion = NEOKDLoss()

    def train_step(atk: MultiExitPGD) -> None:
        net.train()
        adv = atk(images, labels)  # the attack runs the model in eval mode
        loss = criterion(net(adv), net(images), labels)
        loss.backward()
        net.zero_grad(set_to_none=True)

    cpu_steps: dict[str, list[float]] = {}
    steps = timed_all(
        {name: (lambda atk=atk: train_step(atk)) for name, atk in atks.items()},
        repeats,
        device,
        cpu_steps,
    )
    net.eval()
    print(
        f"(e) one NEO-KD training step (attack + loss + backward): generic "
        f"{statistics.median(steps['generic']) * 1000:.1f} ms, truncated "
        f"{statistics.median(steps['truncated']) * 1000:.1f} ms "
        f"(ratio {median_ratio(steps, 'truncated', 'generic'):.3f}; CPU-time ratio "
        f"{median_ratio(cpu_steps, 'truncated', 'generic'):.3f})"
    )


# --------------------------------------------------------------------------- main


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
    parser.add_argument(
        "--step-batches",
        default="128,32",
        help="comma-separated B for the (b) one-step decomposition ('' for none)",
    )
    parser.add_argument("--msd-batch", type=int, default=32, help="B of (d) and (e); 0 skips")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument(
        "--sections", default="abcde", help="'abc' (SmallCNN), 'de' (MSDNet) or both"
    )
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child is not None:
        memory_child(args.memory_child, args.batch)
        return
    device = torch.device(args.device)
    if "a" in args.sections:
        smallcnn_section(args, device)
    if "d" in args.sections and args.msd_batch:
        msdnet_section(args.msd_batch, args.repeats, device)


def smallcnn_section(args: argparse.Namespace, device: torch.device) -> None:
    """(a), (b) and (c) on SmallCNN."""
    torch.manual_seed(0)
    model = make_model(device)
    images, labels = data(args.batch, device)
    atks = attacks(model, STEPS)
    warm = attacks(model, 1)
    for name in atks:
        warm[name](images, labels)
    cpu: dict[str, list[float]] = {}
    kernel: dict[str, list[tuple[float, int]]] = {}
    times = timed_all(
        {name: (lambda atk=atk: atk(images, labels)) for name, atk in atks.items()},
        args.repeats,
        device,
        cpu,
        kernel,
    )
    best = {name: min(values) for name, values in times.items()}

    params = sum(p.numel() for p in model.parameters())
    print(
        f"{type(model).__name__} ({params:,} parameters), B = {args.batch}, {STEPS} steps, "
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
        f"fastest (median for b) of {args.repeats} runs; MALLOC_MMAP_THRESHOLD_="
        f"{os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}"
    )
    for name, seconds in best.items():
        print(f"  {name:<28s} {seconds * 1000:9.1f} ms")
    ratio_a = best["single"] / best["stock_pgd"]
    ratio_core = best["functional_single"] / best["single"]
    ratio_b = median_ratio(times, "max_average_batched", "max_average_one_at_a_time")
    ratio_c = best["average"] / best["naive_average"]
    generic_batched = MultiExitPGD(Unstaged(model), eps=EPS, alpha=ALPHA, steps=STEPS)
    flops = {
        name: count_flops(lambda fn=fn: fn(images, labels))
        for name, fn in (
            ("max_average_batched", atks["max_average_batched"]),
            ("max_average_one_at_a_time", atks["max_average_one_at_a_time"]),
            ("generic_batched", generic_batched),
        )
    }
    sizes = [int(v) for v in args.small_batches.split(",") if v.strip()]
    small = small_batch_ratios(model, sizes, args.repeats, device)
    step_sizes = [int(v) for v in args.step_batches.split(",") if v.strip()]
    steps = step_decomposition(model, step_sizes, 3 * args.repeats, device)
    best_cpu = {name: min(values) for name, values in cpu.items()}
    print(
        f"(a) single(exit -1) / torchattacks.PGD(ExitView):  {ratio_a:.3f}  (target <= 1.05); "
        f"CPU-time ratio {best_cpu['single'] / best_cpu['stock_pgd']:.3f}"
    )
    print(
        f"    functional multi_exit_pgd / MultiExitPGD:      {ratio_core:.3f}  (about 1); "
        f"CPU-time ratio {best_cpu['functional_single'] / best_cpu['single']:.3f}"
    )
    print(
        f"(b) staged max-average, batched and truncated / one candidate at a time: "
        f"{ratio_b:.3f}  (median, target <= 1.05); CPU-time ratio "
        f"{median_ratio(cpu, 'max_average_batched', 'max_average_one_at_a_time'):.3f}"
    )
    for name in ("max_average_batched", "max_average_one_at_a_time"):
        system = statistics.median(v[0] for v in kernel[name])
        faults = statistics.median(v[1] for v in kernel[name])
        print(
            f"    {name[12:]:<14s} per run (median): system time {system * 1000:6.0f} ms, "
            f"minor page faults {faults:9.0f}"
        )
    if not args.no_memory:
        mem_batched = peak_memory_mib("max_average_batched", args.batch, device)
        mem_single = peak_memory_mib("max_average_one_at_a_time", args.batch, device)
        print(
            f"    peak memory: batched {mem_batched:.1f} MiB, one at a time "
            f"{mem_single:.1f} MiB (ratio {mem_batched / max(mem_single, 1e-9):.2f})"
        )
    print(
        f"    matmul/conv FLOPs: batched {flops['max_average_batched'] / 1e9:.1f} G, one at a "
        f"time {flops['max_average_one_at_a_time'] / 1e9:.1f} G (ratio "
        f"{flops['max_average_batched'] / flops['max_average_one_at_a_time']:.3f}); generic "
        f"batched (untruncated) {flops['generic_batched'] / 1e9:.1f} G"
    )
    for size, ratio in small.items():
        print(f"    time ratio at B = {size}: {ratio:.3f}")
    for size, step in steps.items():
        base = step["per_candidate"]
        print(
            f"    one gradient of all candidates at B = {size} (median of "
            f"{3 * args.repeats}): batched {step['batched'] * 1000:.1f} ms, the same calls "
            f"as one at a time with one backward {step['one_backward'] * 1000:.1f} ms, one "
            f"backward per candidate {base * 1000:.1f} ms (ratios "
            f"{step['batched'] / base:.3f} / {step['one_backward'] / base:.3f})"
        )
    print(
        f"(c) average / naive per-exit loop:               {ratio_c:.3f}  (target <= 1.05); "
        f"CPU-time ratio {best_cpu['average'] / best_cpu['naive_average']:.3f}"
    )


if __name__ == "__main__":
    main()
