"""Models of the reference loop: the digits CNN, the package's architectures, normalization.

Every model takes images in [0, 1] and returns a list of E exit logits (B, K), earliest
exit first. Settings that normalize their inputs get a ``Normalized`` wrapper whose first
step is ``(x - mean) / std``, so attacks keep working in pixel space.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


class DigitsCNN(nn.Module):
    """A 3-exit CNN for scikit-learn's 8x8 digits, a scaled-down SmallCNN.

    With width w (default 16):
    trunk: conv 3x3 1->w (pad 1), ReLU -> [exit 1] -> conv 3x3 w->w, ReLU, maxpool 2 ->
    conv 3x3 w->2w, ReLU -> [exit 2] -> conv 3x3 2w->2w, ReLU, maxpool 2 -> flatten 8w ->
    fc 8w->128, ReLU, dropout -> fc 128->K [exit 3].
    Exit 1 head: conv 3x3 stride 2 w->w -> flatten 16w -> linear 16w->64 -> linear 64->K.
    Exit 2 head: maxpool 2 -> flatten 8w -> linear 8w->64 -> linear 64->K.
    Convolutions are Kaiming-normal initialized with zero biases.

    Shape:
        - input: (B, C, 8, 8) in [0, 1].
        - output: list of 3 tensors (B, K).
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, width: int = 16, dropout: float = 0.3
    ) -> None:
        super().__init__()
        w = width
        self.block1 = nn.Sequential(nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(
            nn.Conv2d(w, w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
        )
        self.block3 = nn.Sequential(
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * w, 128),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(128, num_classes),
        )
        self.head1 = nn.Sequential(
            nn.Conv2d(w, w, 3, stride=2, padding=1),
            nn.Flatten(),
            nn.Linear(16 * w, 64),
            nn.Linear(64, num_classes),
        )
        self.head2 = nn.Sequential(
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * w, 64), nn.Linear(64, num_classes)
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    num_exits = 3

    def forward_stage(self, index: int, state: Tensor) -> tuple[Tensor, Tensor]:
        """Stage ``index`` of the staged-model protocol: (next features, exit logits)."""
        if index == 0:
            h1 = self.block1(state)
            return h1, self.head1(h1)
        if index == 1:
            h2 = self.block2(state)
            return h2, self.head2(h2)
        return state, self.block3(state)

    def forward(self, x: Tensor) -> list[Tensor]:
        # Built on the stages: each exit right after the block it reads, so exit_costs
        # charges exit 1 only block 1 and its head, and early exit can stop after it.
        from neokd_losses.models import run_stages

        return run_stages(self, x)


class Normalized(nn.Module):
    """Apply ``(x - mean) / std`` per channel, then the wrapped multi-exit model."""

    mean: Tensor
    std: Tensor

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def _normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.model(self._normalize(x))  # type: ignore[no-any-return]


class NormalizedStaged(Normalized):
    """``Normalized`` for a staged model: stays staged (normalizes before stage 0)."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__(model, mean, std)
        self.num_exits: int = model.num_exits  # type: ignore[assignment]

    def forward_stage(self, index: int, state: object) -> tuple[object, Tensor]:
        if index == 0:
            state = self._normalize(state)  # type: ignore[arg-type]
        return self.model.forward_stage(index, state)  # type: ignore[no-any-return,operator]

    # The split stages (forward_block / forward_exit) exist exactly when the wrapped
    # model has them, so that the attacks skip unread exit heads of an MSDNet too.
    @property
    def forward_block(self) -> Callable[[int, object], object]:
        inner = self.model.forward_block  # AttributeError when the model has no split

        def block(index: int, state: object) -> object:
            if index == 0:
                state = self._normalize(state)  # type: ignore[arg-type]
            return inner(index, state)

        return block

    @property
    def forward_exit(self) -> Callable[[int, object], Tensor]:
        return self.model.forward_exit  # type: ignore[no-any-return]


def build_model(
    name: str,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """Instantiate a model of the config's ``model.name``, wrapped in ``Normalized`` if asked."""
    from neokd_losses import models

    model: nn.Module
    if name == "digits_cnn":
        model = DigitsCNN(num_classes=num_classes, in_channels=in_channels)
    elif name == "smallcnn":
        model = models.SmallCNN(num_classes=num_classes, in_channels=in_channels)
    else:
        factory = getattr(models, name)
        model = factory(num_classes=num_classes, in_channels=in_channels)
    if mean is not None and std is not None:
        from neokd_losses.models import is_staged

        model = (NormalizedStaged if is_staged(model) else Normalized)(model, mean, std)
    return model
