"""Distil a robust teacher into a small multi-exit student with BSS, AB and NEO-KD.

    python examples/distill_bss_ab.py                 # a few minutes on a laptop CPU
    python examples/distill_bss_ab.py --epochs 20 --eval-steps 50

Data: scikit-learn's bundled 8x8 handwritten digits (1797 images, offline), scaled to
[0, 1], with a seeded train / test split.

1. Teacher: a SmallCNN-like single-output CNN, adversarially trained for a few epochs
   on 0.5·CE(clean) + 0.5·CE(PGD) (the Triple Wins mix) so that it is robust.
2. Students: a smaller 3-exit CNN, trained three ways, each adding one ingredient:
   - ``bss``: boundary-supporting-sample distillation (Heo et al., AAAI 2019): CE +
     α·Hinton KD + β·KD on samples that the teacher's ``BoundarySupportingAttack`` pushed
     just across its decision boundary, with the reference α/β schedule; every exit
     learns from the teacher.
   - ``ab+bss``: first an activation-boundary (AB) initialization stage: the student's
     convolution feeding each exit learns, through a 1x1-conv + BN connector, which of
     the matching teacher layer's neurons fire; then the BSS training above.
   - ``ab+bss+neokd``: the same AB initialization, then adversarial training with the
     NEO-KD objective on max-average PGD examples of the student, plus the BSS
     distillation terms (without a second clean cross-entropy).
3. Prints the per-exit clean and adversarial accuracy (max-average PGD, which attacks
   every exit) of each student, and the teacher's.

Numbers depend on the CPU, the seed and the (small) defaults; this is a demonstration of
the API, not a benchmark.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchattacks
from torch import Tensor, nn

from neokd_losses.attacks.pgd import MultiExitPGD
from neokd_losses.distill.activation_boundary import (
    ActivationBoundaryLoss,
    FeatureRecorder,
    ab_connector,
)
from neokd_losses.distill.boundary import BoundarySupportingAttack
from neokd_losses.distill.bss import BSSDistillationLoss, bss_weight_schedule
from neokd_losses.losses.neokd import NEOKDLoss

METHODS = ("bss", "ab+bss", "ab+bss+neokd")
DIGITS_SIZE = 1797  # images in scikit-learn's digits set


# --------------------------------------------------------------------------- models


class Teacher(nn.Module):
    """SmallCNN-like single-output CNN for 8x8 images (width w, default 16).

    conv 3x3 1->w, ReLU, conv 3x3 w->2w, ReLU, maxpool 2, conv 3x3 2w->2w, ReLU,
    maxpool 2, flatten 8w, fc 8w->128, ReLU, fc 128->10. Padding 1 throughout.
    """

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(1, w, 3, padding=1)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * w, 2 * w, 3, padding=1)
        self.fc1 = nn.Linear(8 * w, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv1(x))  # 8x8
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # 4x4
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)  # 2x2
        return self.fc2(F.relu(self.fc1(h.flatten(1))))

    def boundary_layers(self) -> list[nn.Module]:
        """The layers (before their ReLU) matched to the student's exits by AB."""
        return [self.conv1, self.conv2, self.conv3]


class Student(nn.Module):
    """A smaller 3-exit CNN for 8x8 images (width w, default 4); returns 3 exit logits.

    conv1 1->w @8x8 -> [exit 1: maxpool 2, flatten 16w, linear -> 10]
    conv2 w->2w @8x8, maxpool -> [exit 2: maxpool 2, flatten 8w, linear -> 10]
    conv3 2w->2w @4x4, maxpool -> [exit 3: flatten 8w, linear 8w->64, ReLU, linear -> 10]
    Each conv's output (before the ReLU) has the teacher's matching layer's spatial size.
    """

    def __init__(self, width: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(1, w, 3, padding=1)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * w, 2 * w, 3, padding=1)
        self.head1 = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * w, num_classes))
        self.head2 = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * w, num_classes))
        self.head3 = nn.Sequential(
            nn.Flatten(), nn.Linear(8 * w, 64), nn.ReLU(), nn.Linear(64, num_classes)
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        h1 = F.relu(self.conv1(x))
        h2 = F.max_pool2d(F.relu(self.conv2(h1)), 2)
        h3 = F.max_pool2d(F.relu(self.conv3(h2)), 2)
        return [self.head1(h1), self.head2(h2), self.head3(h3)]

    def boundary_layers(self) -> list[nn.Module]:
        """The convolution feeding each exit, paired with ``Teacher.boundary_layers``."""
        return [self.conv1, self.conv2, self.conv3]


# --------------------------------------------------------------------------- data


def load_digits_split(
    test_size: int, seed: int, max_train: int | None, max_test: int | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = order[:test_size], order[test_size:]
    if max_train is not None:
        train = train[:max_train]
    if max_test is not None:
        test = test[:max_test]
    return x[train], y[train], x[test], y[test]


def batches(x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator):
    order = torch.randperm(len(y), generator=generator)
    for start in range(0, len(y), batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]


# --------------------------------------------------------------------------- training


def sgd(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)


def train_teacher(teacher: Teacher, data, args, gen: torch.Generator) -> None:
    """PGD adversarial training with the Triple Wins mix: 0.5 CE(clean) + 0.5 CE(adv)."""
    x_train, y_train = data
    attack = torchattacks.PGD(teacher, eps=args.eps, alpha=args.step_size, steps=args.train_steps)
    optimizer = sgd(teacher.parameters(), args.lr)
    for epoch in range(args.teacher_epochs):
        teacher.train()
        for xb, yb in batches(x_train, y_train, args.batch_size, gen):
            adv = attack(xb, yb)
            loss = 0.5 * F.cross_entropy(teacher(xb), yb) + 0.5 * F.cross_entropy(teacher(adv), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"  teacher epoch {epoch + 1}/{args.teacher_epochs}: loss {loss.item():.3f}")
    teacher.eval()


def ab_initialize(student: Student, teacher: Teacher, data, args, gen: torch.Generator) -> None:
    """AB stage: the student's exit-feeding convolutions learn the teacher's activation
    boundaries through one connector per exit; the connectors are then discarded."""
    x_train, _ = data
    t_layers, s_layers = teacher.boundary_layers(), student.boundary_layers()
    connectors = [
        ab_connector(s.out_channels, t.out_channels)
        for s, t in zip(s_layers, t_layers, strict=True)
    ]
    # The AB loss sums over neurons; weigh each layer by 1 / its number of neurons so that
    # layers of different sizes count alike.
    with torch.no_grad(), FeatureRecorder(t_layers) as probe:
        teacher(x_train[:1])
        sizes = [f[0].numel() for f in probe.features]
    criterion = ActivationBoundaryLoss(
        margin=1.0, connectors=connectors, exit_weights=[1.0 / n for n in sizes]
    )
    params = [p for layer in s_layers for p in layer.parameters()] + list(criterion.parameters())
    optimizer = sgd(params, args.student_lr)
    student.train()
    with FeatureRecorder(t_layers) as t_rec, FeatureRecorder(s_layers) as s_rec:
        for epoch in range(args.ab_epochs):
            for xb, _ in batches(x_train, torch.zeros(len(x_train)), args.batch_size, gen):
                with torch.no_grad():
                    teacher(xb)
                student(xb)
                loss = criterion(s_rec.features, [f.detach() for f in t_rec.features])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            print(f"  AB epoch {epoch + 1}/{args.ab_epochs}: AB loss {loss.item():.2f}")


def train_student(
    student: Student, teacher: Teacher, data, args, gen: torch.Generator, neokd: bool
) -> None:
    x_train, y_train = data
    bss_attack = BoundarySupportingAttack(teacher, eta=0.3, max_steps=10, generator=gen)
    distil = BSSDistillationLoss(temperature=args.temperature, ce_weight=0.0 if neokd else 1.0)
    neokd_loss = NEOKDLoss(alpha=3.0, beta=1.0, generator=gen)
    pgd = MultiExitPGD(
        student, eps=args.eps, alpha=args.step_size, steps=args.train_steps, mode="max-average"
    )
    optimizer = sgd(student.parameters(), args.student_lr)
    for epoch in range(args.epochs):
        distil.alpha, distil.beta = bss_weight_schedule(epoch, args.epochs)
        student.train()
        for xb, yb in batches(x_train, y_train, args.batch_size, gen):
            bss = bss_attack.generate(xb, yb)
            with torch.no_grad():
                t_clean, t_bss = teacher(xb), teacher(bss.samples)
            clean = student(xb)
            loss = distil(
                clean, t_clean, yb, student(bss.samples), t_bss, bss.batch_index, bss.weight
            )
            if neokd:
                adv = pgd(xb, yb)
                loss = loss + neokd_loss(student(adv), clean, yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(
            f"  epoch {epoch + 1}/{args.epochs}: loss {loss.item():.3f} "
            f"(alpha={distil.alpha:.2f}, beta={distil.beta:.2f}, "
            f"{bss.crossed.float().mean().item():.0%} of BSS crossed)"
        )
    student.eval()


# --------------------------------------------------------------------------- evaluation


def evaluate_student(
    student: Student, x: Tensor, y: Tensor, args
) -> tuple[list[float], list[float]]:
    student.eval()
    with torch.no_grad():
        clean = [(z.argmax(1) == y).float().mean().item() for z in student(x)]
    attack = MultiExitPGD(
        student,
        eps=args.eps,
        alpha=args.step_size,
        steps=args.eval_steps,
        mode="max-average",
        generator=torch.Generator().manual_seed(args.seed),
    )
    adv = attack(x, y)
    with torch.no_grad():
        robust = [(z.argmax(1) == y).float().mean().item() for z in student(adv)]
    return clean, robust


def evaluate_teacher(teacher: Teacher, x: Tensor, y: Tensor, args) -> tuple[float, float]:
    teacher.eval()
    attack = torchattacks.PGD(teacher, eps=args.eps, alpha=args.step_size, steps=args.eval_steps)
    adv = attack(x, y)
    with torch.no_grad():
        return (
            (teacher(x).argmax(1) == y).float().mean().item(),
            (teacher(adv).argmax(1) == y).float().mean().item(),
        )


def print_table(rows: list[tuple[str, list[float], list[float]]]) -> None:
    num_exits = len(rows[0][1])
    head = " | ".join(f"exit {i + 1} clean / adv" for i in range(num_exits))
    print(f"\n| method | {head} | mean clean / adv |")
    print("|---|" + "---|" * (num_exits + 1))
    for name, clean, robust in rows:
        cells = " | ".join(
            f"{100 * c:5.1f} / {100 * r:5.1f}" for c, r in zip(clean, robust, strict=True)
        )
        mean = f"{100 * sum(clean) / len(clean):5.1f} / {100 * sum(robust) / len(robust):5.1f}"
        print(f"| {name} | {cells} | {mean} |")


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {', '.join(METHODS)}",
    )
    p.add_argument("--teacher-epochs", type=int, default=10)
    p.add_argument("--ab-epochs", type=int, default=3, help="epochs of the AB initialization stage")
    p.add_argument("--epochs", type=int, default=10, help="student training epochs")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--lr", type=float, default=0.05, help="teacher learning rate (SGD, momentum 0.9)"
    )
    p.add_argument(
        "--student-lr",
        type=float,
        default=0.01,
        help="student learning rate, AB stage included (the KD terms at alpha = 4, T = 3 make larger rates unstable)",
    )
    p.add_argument("--temperature", type=float, default=3.0, help="KD temperature of the BSS loss")
    p.add_argument(
        "--eps",
        type=float,
        default=0.2,
        help="L-inf radius in [0, 1] pixels (as configs/digits.toml)",
    )
    p.add_argument("--step-size", type=float, default=0.05)
    p.add_argument("--train-steps", type=int, default=5, help="PGD steps for adversarial training")
    p.add_argument("--eval-steps", type=int, default=20, help="PGD steps for evaluation")
    p.add_argument("--teacher-width", type=int, default=16)
    p.add_argument("--student-width", type=int, default=4)
    p.add_argument("--test-size", type=int, default=400)
    p.add_argument("--max-train", type=int, default=None, help="cap on training images (tiny runs)")
    p.add_argument("--max-test", type=int, default=None, help="cap on test images (tiny runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        p.error(
            f"--methods must be a comma-separated subset of {', '.join(METHODS)}, got {args.methods!r}"
        )
    args.methods = methods
    for name in ("teacher_epochs", "ab_epochs", "epochs", "train_steps", "eval_steps"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in (
        "batch_size",
        "teacher_width",
        "student_width",
        "max_train",
        "max_test",
        "threads",
    ):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("lr", "student_lr", "temperature", "step_size"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) > 0):
            p.error(
                f"--{name.replace('_', '-')} must be a finite number > 0, got {getattr(args, name)}"
            )
    if not 0 <= args.eps <= 1:
        p.error(f"--eps must be in [0, 1] (images are in [0, 1]), got {args.eps}")
    if not 1 <= args.test_size < DIGITS_SIZE:
        p.error(
            f"--test-size must be in [1, {DIGITS_SIZE - 1}] (the digits set has {DIGITS_SIZE} "
            f"images, the rest train), got {args.test_size}"
        )
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, tuple[list[float], list[float]]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = load_digits_split(
        args.test_size, args.seed, args.max_train, args.max_test
    )
    print(f"digits: {len(y_train)} training and {len(y_test)} test images, eps = {args.eps}")

    gen = torch.Generator().manual_seed(args.seed)
    print("training the teacher (PGD adversarial training)")
    teacher = Teacher(args.teacher_width)
    train_teacher(teacher, (x_train, y_train), args, gen)
    for p in teacher.parameters():
        p.requires_grad_(False)
    t_clean, t_adv = evaluate_teacher(teacher, x_test, y_test, args)
    print(f"teacher: clean {100 * t_clean:.1f} %, PGD-{args.eval_steps} {100 * t_adv:.1f} %")

    results: dict[str, tuple[list[float], list[float]]] = {}
    for method in args.methods:
        print(f"student: {method}")
        torch.manual_seed(args.seed)  # every student starts from the same weights
        student = Student(args.student_width)
        if method.startswith("ab"):
            ab_initialize(student, teacher, (x_train, y_train), args, gen)
        train_student(
            student, teacher, (x_train, y_train), args, gen, neokd=method.endswith("neokd")
        )
        results[method] = evaluate_student(student, x_test, y_test, args)

    print(
        f"\nTest accuracy (%) per exit, clean / max-average PGD-{args.eval_steps} at eps = {args.eps}"
    )
    print(f"teacher (single exit): clean {100 * t_clean:.1f} / adv {100 * t_adv:.1f}")
    print_table([(m, *results[m]) for m in args.methods])
    print(f"\ntotal time {time.perf_counter() - start:.0f} s")
    return results


if __name__ == "__main__":
    main()
