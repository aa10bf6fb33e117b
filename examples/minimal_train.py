"""NEO-KD adversarial training and per-exit evaluation in one short file.

    python examples/minimal_train.py --epochs 10

A 3-exit CNN (an nn.Sequential with exits attached) on scikit-learn's 8x8 digits: each
step crafts max-average PGD examples and minimizes the NEO-KD loss on the clean and the
adversarial batch; then every exit is scored clean and under PGD. examples/train.py is
the full-featured loop.
"""

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn

from neokd_losses import NEOKDLoss
from neokd_losses.attacks import MultiExitPGD
from neokd_losses.evaluation import anytime_accuracy, anytime_table
from neokd_losses.models import attach_exits


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-size", type=int, default=1297, help="at most 1297 images")
    p.add_argument("--steps", type=int, default=7, help="PGD steps in training")
    p.add_argument("--eval-steps", type=int, default=20, help="PGD steps in evaluation")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)

    # Digits: 1797 images 8x8, values 0..16 -> [0, 1]; 500 seeded test images.
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, train = order[:500], order[500:][: args.train_size]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x[train], y[train]), batch_size=args.batch_size, shuffle=True
    )
    test_loader = [(x[test], y[test])]

    backbone = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),  # exit 1 reads this ReLU ("1")
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # exit 2 ("4")
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 2 * 2, 10),  # exit 3: the backbone's output
    )  # fmt: skip

    def head(c, k):  # each early exit: pool to 2x2, then a linear layer C*4 -> K
        return nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * c, k))

    model = attach_exits(backbone, ["1", "4"], 10, head, include_output=True, example_input=x[:2])

    # The digits recipe of examples/configs/digits.toml: eps 0.2, step 0.05.
    attack = MultiExitPGD(model, eps=0.2, alpha=0.05, steps=args.steps, mode="max-average")
    criterion = NEOKDLoss(alpha=3.0, beta=1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for epoch in range(args.epochs):
        model.train()
        for images, labels in loader:
            adv_images = attack(images, labels)  # the attack runs in eval mode
            loss = criterion(model(adv_images), model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"epoch {epoch + 1}/{args.epochs}: last batch loss {loss.item():.3f}")

    results = {"clean": anytime_accuracy(model, test_loader, progress=False)}
    for mode in ("max-average", "average"):
        test_attack = MultiExitPGD(model, eps=0.2, alpha=0.05, steps=args.eval_steps, mode=mode)
        results[f"PGD {mode}"] = anytime_accuracy(model, test_loader, test_attack, progress=False)
    print(anytime_table(results))
    return results


if __name__ == "__main__":
    main()
