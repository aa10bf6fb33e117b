"""The staged-model protocol: a multi-exit network as E stages that can stop early.

A multi-exit model is *staged* when it exposes its computation as E stages. Stage k
maps a state to ``(next_state, exit_k_logits)``; the state of stage 0 is the input
batch, later states are whatever the network carries between exits (a tensor, or a
tuple / list / dict of tensors, batch first; MSDNet carries its multi-scale features).
``forward`` stays the public contract and returns the list of all exits; it is built on
the stages, so a staged model works everywhere a plain multi-exit model does.

A model implements the protocol with one attribute and one method::

    class MyNet(nn.Module):
        num_exits = 2

        def forward_stage(self, index, state):
            if index == 0:
                h = self.block1(state)
                return h, self.head1(h)
            h = self.block2(state)
            return h, self.head2(h)

        def forward(self, x):
            return run_stages(self, x)

On top of the stages, :func:`run_until` computes exits 0..k and nothing deeper, and
:class:`~neokd_losses.inference.EarlyExitClassifier` lets samples leave the batch at
the first exit whose confidence reaches its threshold.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

__all__ = ["StagedModel", "is_staged", "run_stages"]

# What flows between stages: a tensor, or a tuple / list / dict of tensors, batch first.
StageState = Any


@runtime_checkable
class StagedModel(Protocol):
    """A multi-exit model that exposes its E stages (see the module docstring).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class Staged(nn.Module):
        ...     num_exits = 2
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.body = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        ...         self.heads = nn.ModuleList([nn.Linear(4, 3), nn.Linear(4, 3)])
        ...     def forward_stage(self, index, state):
        ...         h = torch.relu(self.body[index](state))
        ...         return h, self.heads[index](h)
        ...     def forward(self, x):
        ...         return run_stages(self, x)
        >>> isinstance(Staged(), StagedModel), [z.shape for z in Staged()(torch.rand(5, 4))]
        (True, [torch.Size([5, 3]), torch.Size([5, 3])])
    """

    num_exits: int

    def forward_stage(self, index: int, state: StageState) -> tuple[StageState, Tensor]:
        """Run stage ``index`` (0-based) on ``state``; return the next state and exit logits."""
        ...


def is_staged(model: object) -> bool:
    """True when ``model`` implements the staged-model protocol.

    Example:
        >>> from torch import nn
        >>> is_staged(nn.Linear(2, 2))
        False
    """
    return (
        isinstance(model, nn.Module)
        and callable(getattr(model, "forward_stage", None))
        and isinstance(getattr(model, "num_exits", None), int)
    )


def run_stages(model: StagedModel, x: Tensor, last: int | None = None) -> list[Tensor]:
    """Run stages 0..``last`` (all when None) on ``x``; return their exit logits in order.

    Shape:
        - x: the model's input batch (B, ...).
        - output: a list of ``last + 1`` tensors (B, K).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class Staged(nn.Module):
        ...     num_exits = 3
        ...     def forward_stage(self, index, state):
        ...         return state + 1, state.sum(1, keepdim=True).expand(-1, 2)
        >>> [z[0].tolist() for z in run_stages(Staged(), torch.zeros(1, 3), last=1)]
        [[0.0, 0.0], [3.0, 3.0]]
    """
    stop = model.num_exits - 1 if last is None else last
    state: StageState = x
    logits: list[Tensor] = []
    for index in range(stop + 1):
        state, z = model.forward_stage(index, state)
        logits.append(z)
    return logits
