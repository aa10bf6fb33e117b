"""SmallCNN: the 3-exit MNIST network of Triple Wins, used by NEO-KD for MNIST."""

from __future__ import annotations

from torch import Tensor, nn

from neokd_losses._validation import check_image_input, check_positive_int, check_real
from neokd_losses.models.staged import StageState, run_stages

__all__ = ["SmallCNN"]

_IMAGE_SIZE = 28


def _linear_head(in_features: int, num_classes: int, dropout: float) -> nn.Sequential:
    """flatten → linear in→200 → dropout → linear 200→200 → linear 200→K (no nonlinearity)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, 200),
        nn.Dropout(dropout),
        nn.Linear(200, 200),
        nn.Linear(200, num_classes),
    )


class SmallCNN(nn.Module):
    """The 3-exit SmallCNN of Triple Wins (Hu et al., ICLR 2020) for 28×28 images.

    NEO-KD (Ham et al., NeurIPS 2023) uses it for its MNIST experiments.
    The forward returns logits (not probabilities) of the three exits, earliest first.

    Configuration (no padding; every convolution and linear layer has a bias)::

        trunk:  conv 3×3 C→32, ReLU                                  → exit 1
                conv 3×3 32→32, ReLU, maxpool 2, conv 3×3 32→64, ReLU → exit 2
                conv 3×3 64→64, ReLU, maxpool 2, flatten 1024,
                fc 1024→200, ReLU, dropout 0.5, fc 200→200, ReLU, fc 200→K = exit 3
        exit 1: conv 3×3 stride 2 32→16, maxpool 2, flatten 576,
                linear 576→200, dropout 0.5, linear 200→200, linear 200→K
        exit 2: maxpool 2, flatten 1600,
                linear 1600→200, dropout 0.5, linear 200→200, linear 200→K

    Initialization: Kaiming-normal convolution weights with zero biases; the trunk's last
    layer (fc 200→K) starts at zero weight and bias, so exit 3 outputs zeros at first;
    other linear layers keep PyTorch's default.

    Staged (see :class:`~neokd_losses.models.staged.StagedModel`): stage 0 is block 1
    and exit 1 (state: the 32-channel features), stage 1 is block 2 and exit 2 (state:
    the 64-channel features), stage 2 is block 3 (the trunk's end is exit 3).

    Parameters: 836,846 with the defaults (K = 10, C = 1).

    Cost per exit for one 1×28×28 input, measured with
    :func:`~neokd_losses.evaluation.flops.exit_costs` (multiply-adds of convolutions,
    linear layers with biases, ReLUs and pooling): 1,039,786; 8,603,476; 11,218,574.

    Args:
        num_classes: K, the number of classes of every exit.
        in_channels: C, the number of input channels (1 for MNIST).
        dropout: drop probability of the dropout layers (0.5 in the paper).

    Raises:
        TypeError: if ``num_classes`` or ``in_channels`` is not an int, or ``dropout`` is
            not a real number.
        ValueError: if ``num_classes`` or ``in_channels`` is < 1, or ``dropout`` is not in
            [0, 1); at call time, if the input is not (B, C, 28, 28).

    Shape:
        - input: (B, C, 28, 28), values in [0, 1].
        - output: a list of E = 3 tensors (B, K).

    Example:
        >>> import torch
        >>> model = SmallCNN()
        >>> sum(p.numel() for p in model.parameters())
        836846
        >>> [tuple(z.shape) for z in model(torch.rand(2, 1, 28, 28))]
        [(2, 10), (2, 10), (2, 10)]
    """

    num_exits = 3

    def __init__(self, num_classes: int = 10, in_channels: int = 1, dropout: float = 0.5) -> None:
        super().__init__()
        self.num_classes = check_positive_int(num_classes, "num_classes")
        self.in_channels = check_positive_int(in_channels, "in_channels")
        if not 0.0 <= check_real(dropout, "dropout") < 1.0:
            raise ValueError(f"`dropout` must lie in [0, 1), got {dropout!r}.")
        self.block1 = nn.Sequential(nn.Conv2d(in_channels, 32, 3), nn.ReLU())
        self.block2 = nn.Sequential(
            nn.Conv2d(32, 32, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
        )
        self.block3 = nn.Sequential(
            nn.Conv2d(64, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 200),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(200, 200),
            nn.ReLU(),
            nn.Linear(200, num_classes),
        )
        self.exit1 = nn.Sequential(
            nn.Conv2d(32, 16, 3, stride=2),
            nn.MaxPool2d(2),
            _linear_head(16 * 6 * 6, num_classes, dropout),
        )
        self.exit2 = nn.Sequential(nn.MaxPool2d(2), _linear_head(64 * 5 * 5, num_classes, dropout))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal convolutions with zero bias; zero last trunk layer (Triple Wins)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        last = self.block3[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward_block(self, index: int, state: StageState) -> Tensor:
        """Block ``index`` (0, 1, 2) of the trunk: the features exit ``index`` reads.

        Block 0 takes the images (B, C, 28, 28) and checks them; block 2 ends with the
        last exit's logits.
        """
        i = self._stage_index(index)
        if i == 0:
            check_image_input(
                state, self.in_channels, (_IMAGE_SIZE, _IMAGE_SIZE), type(self).__name__
            )
        features: Tensor = (self.block1, self.block2, self.block3)[i](state)
        return features

    def forward_exit(self, index: int, features: Tensor) -> Tensor:
        """Exit ``index``'s logits from block ``index``'s features (block 2's are the logits)."""
        i = self._stage_index(index)
        if i == 2:
            return features
        logits: Tensor = (self.exit1, self.exit2)[i](features)
        return logits

    @staticmethod
    def _stage_index(index: int) -> int:
        if index not in (0, 1, 2):
            raise ValueError(f"SmallCNN has stages 0, 1 and 2, got index {index!r}.")
        return int(index)

    def forward_stage(self, index: int, state: StageState) -> tuple[StageState, Tensor]:
        """Stage ``index`` (0, 1, 2): block ``index``'s features and the exit's logits.

        Stage 0 takes the images (B, C, 28, 28) and checks them; the next state of stage
        2 is its logits.
        """
        features = self.forward_block(index, state)
        return features, self.forward_exit(index, features)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Logits of the three exits, earliest first; see the class docstring for shapes."""
        return run_stages(self, x)
