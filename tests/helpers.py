"""Tiny multi-exit models for tests: cheap enough for many attack steps on 2 CPU cores."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TinyMultiExit(nn.Module):
    """A 3-exit CNN on (B, C, 8, 8) images in [0, 1]; forward returns a list of logits."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.block3 = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.head1 = nn.Sequential(
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, num_classes)
        )
        self.head2 = nn.Sequential(
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, num_classes)
        )
        self.head3 = nn.Sequential(nn.Flatten(), nn.Linear(8 * width, num_classes))
        self.dropout = nn.Dropout(0.0)

    def forward(self, x: Tensor) -> list[Tensor]:
        h1 = self.block1(x)
        h2 = self.block2(h1)
        h3 = self.block3(h2)
        return [self.head1(h1), self.head2(h2), self.dropout(self.head3(h3))]


class TinyMLPExits(nn.Module):
    """An E-exit MLP on flat (B, D) inputs; exit i reads hidden layer i."""

    def __init__(
        self, in_features: int = 16, num_classes: int = 5, num_exits: int = 3, width: int = 16
    ) -> None:
        super().__init__()
        dims = [in_features] + [width] * num_exits
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(dims[i], dims[i + 1]), nn.Tanh()) for i in range(num_exits)
        )
        self.heads = nn.ModuleList(nn.Linear(width, num_classes) for _ in range(num_exits))

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        h = x.flatten(1)
        for layer, head in zip(self.layers, self.heads):
            h = layer(h)
            outs.append(head(h))
        return outs


def random_exits(
    num_exits: int,
    batch: int,
    classes: int,
    *,
    scale: float = 3.0,
    dtype: torch.dtype = torch.float32,
    requires_grad: bool = False,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """E random logits tensors (B, K)."""
    return [
        (scale * torch.randn(batch, classes, dtype=dtype, generator=generator)).requires_grad_(
            requires_grad
        )
        for _ in range(num_exits)
    ]
