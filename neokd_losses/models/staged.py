"""The staged-model protocol: a multi-exit network as E stages that can stop early.

A multi-exit model is *staged* when it exposes its computation as E stages. Stage k
maps a state to ``(next_state, exit_k_logits)``; the state of stage 0 is the input
batch, later states are whatever the network carries between exits (a tensor, or a
tuple / list / dict of tensors, batch first; MSDNet carries its multi-scale features).
The next state of the last stage is ignored. ``forward`` stays the public contract and
returns the list of all exits; it is built on the stages, so a staged model works
everywhere a plain multi-exit model does.

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

A staged model may also split each stage in two, when its exit head reads the next
state: ``forward_block(index, state) -> next_state`` (the backbone part) and
``forward_exit(index, next_state) -> logits`` (the head), with ``forward_stage`` their
composition (:func:`has_exit_split`). Attacks then skip the heads of the exits they do
not attack: a single-exit attack on exit k runs blocks 0..k and head k only.
``SmallCNN``, ``MSDNet`` and staged ``attach_exits`` models split their stages.

On top of the stages, :func:`run_until` computes exits 0..k and nothing deeper, and
:class:`~neokd_losses.inference.EarlyExitClassifier` lets samples leave the batch at
the first exit whose confidence reaches its threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from neokd_losses._validation import check_exit_index, check_int, is_compiling

__all__ = [
    "StagedModel",
    "has_exit_split",
    "is_staged",
    "require_staged",
    "run_stages",
    "run_until",
]

# What flows between stages: a tensor, or a tuple / list / dict of tensors, batch first.
StageState = Any

_HOW_TO = (
    "give the model an int attribute `num_exits` and a method "
    "`forward_stage(index, state) -> (next_state, exit_logits)` (see 'Staged models' in "
    "the docs' concepts page, docs/concepts.md)"
)


@runtime_checkable
class StagedModel(Protocol):
    """A multi-exit model that exposes its E stages (see the module docstring).

    ``forward_stage(index, state)`` runs stage ``index`` (0-based) and returns
    ``(next_state, exit_logits)``. The state of stage 0 is the input batch; every
    state is a tensor or a tuple / list / dict of tensors whose first dimension is the
    batch, so that samples can be dropped from it (``state[keep]`` on every tensor).
    Stages must treat samples independently (no batch statistics in eval mode), as
    any network does at inference.

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

    That is: an ``nn.Module`` with an int attribute ``num_exits`` and a callable
    ``forward_stage``. :class:`~neokd_losses.models.AttachedExits` has stages only for
    the backbones listed in :func:`~neokd_losses.models.attach_exits`.

    Example:
        >>> from torch import nn
        >>> from neokd_losses.models import SmallCNN
        >>> is_staged(nn.Linear(2, 2)), is_staged(SmallCNN())
        (False, True)
    """
    num_exits = getattr(model, "num_exits", None)
    return (
        isinstance(model, nn.Module)
        and isinstance(num_exits, int)
        and not isinstance(num_exits, bool)
        and num_exits >= 1
        and callable(getattr(model, "forward_stage", None))
    )


def has_exit_split(model: object) -> bool:
    """True when a staged model also splits its stages into blocks and exit heads.

    That is: :func:`is_staged`, plus callable ``forward_block(index, state) ->
    next_state`` and ``forward_exit(index, next_state) -> logits`` whose composition is
    ``forward_stage``. The attacks use them to leave out the heads of exits they do not
    attack (a single-exit attack on exit k runs head k only; in the batched max-average,
    head s reads the rows of candidate s only).

    Example:
        >>> import torch
        >>> from neokd_losses.models import SmallCNN
        >>> model = SmallCNN().eval()
        >>> x = torch.rand(2, 1, 28, 28)
        >>> h = model.forward_block(0, x)
        >>> has_exit_split(model), torch.equal(model.forward_exit(0, h), model(x)[0])
        (True, True)
    """
    return (
        is_staged(model)
        and callable(getattr(model, "forward_block", None))
        and callable(getattr(model, "forward_exit", None))
    )


def require_staged(model: object, what: str) -> StagedModel:
    """Return ``model`` if it is staged; otherwise raise a TypeError that says how to add stages.

    Args:
        model: the model to check.
        what: what needs the stages, for the message (e.g. ``"EarlyExitClassifier"``).

    Raises:
        TypeError: if ``model`` does not implement the staged-model protocol.

    Example:
        >>> from neokd_losses.models import SmallCNN
        >>> require_staged(SmallCNN(), "this example").num_exits
        3
    """
    if is_staged(model):
        staged: StagedModel = model  # type: ignore[assignment]
        return staged
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} needs an nn.Module with stages, got {type(model).__name__}.")
    fix = f"To add stages, {_HOW_TO}."
    if hasattr(model, "has_stages"):  # an AttachedExits whose backbone cannot be staged
        fix = (
            "attach_exits gives stages only to an nn.Sequential backbone whose exits sit on "
            f"its direct children: use such a backbone, or write the model yourself and {_HOW_TO}."
        )
    raise TypeError(
        f"{what} needs a staged model, but {type(model).__name__} has no stages "
        f"(num_exits = {getattr(model, 'num_exits', None)!r}, forward_stage "
        f"{'present' if hasattr(model, 'forward_stage') else 'missing'}). {fix}"
    )


def _describe_state(state: StageState) -> str:
    leaves = tree_flatten(state)[0]
    shapes = [tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__ for v in leaves]
    return f"{type(state).__name__} with leaves {shapes}"


def check_stage_output(
    model: object, index: int, state: StageState, logits: object, batch: int, *, last: bool
) -> None:
    """Check that stage ``index`` returned batch-first tensors of ``batch`` samples.

    Raises:
        TypeError: if the logits or a state leaf is not a tensor.
        ValueError: if the logits are not (batch, K) or a state tensor is not batch
            first with ``batch`` rows (the next state of the last stage is not checked).
    """
    name = type(model).__name__
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"stage {index} of {name} must return (next_state, exit_logits) with exit_logits "
            f"a Tensor (B, K), got {type(logits).__name__}."
        )
    if is_compiling():  # shapes may be data dependent while torch.compile / export trace
        return
    if logits.dim() != 2 or logits.shape[0] != batch:
        raise ValueError(
            f"stage {index} of {name} returned exit logits of shape {tuple(logits.shape)} for "
            f"a batch of {batch} samples; expected ({batch}, K). Stages must keep the batch "
            "first and never mix samples."
        )
    if last:
        return
    for leaf in tree_flatten(state)[0]:
        if not isinstance(leaf, Tensor):
            raise TypeError(
                f"stage {index} of {name} returned a next state holding a "
                f"{type(leaf).__name__}; a state must be a tensor or a tuple / list / dict of "
                f"tensors, got {_describe_state(state)}."
            )
        if leaf.dim() == 0 or leaf.shape[0] != batch:
            raise ValueError(
                f"stage {index} of {name} returned a next state that is not batch first with "
                f"{batch} samples: expected every tensor to have shape ({batch}, ...), got "
                f"{_describe_state(state)}. Keep the batch as dimension 0 of every state "
                "tensor (move it with `.movedim`/`.transpose`)."
            )


def _batch_size(x: object) -> int:
    if not isinstance(x, Tensor) or x.dim() == 0:
        kind = "a 0-d tensor" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"the input must be a Tensor batch (B, ...), got {kind}.")
    return int(x.shape[0])


def run_stages(model: StagedModel, x: Tensor, last: int | None = None) -> list[Tensor]:
    """Run stages 0..``last`` (all when None) on ``x``; return their exit logits in order.

    This is the ``forward`` of a staged model (``last=None``) and the truncated forward
    of :func:`run_until`. Every stage's output is checked: the exit logits must be
    (B, K) and the next state batch first with B rows.

    Args:
        model: a staged model.
        x: the input batch (state 0).
        last: index of the last stage to run, in [0, E); None for all E.

    Returns:
        The exit logits of stages 0..``last``.

    Raises:
        TypeError: if ``x`` is not a tensor with a batch dimension, or a stage returns
            something other than tensors.
        ValueError: if ``last`` is out of range or a stage returns a batch of another
            size or a state that is not batch first.

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
    num_exits = require_staged(model, "run_stages").num_exits
    stop = num_exits - 1 if last is None else check_exit_index(last, num_exits, name="last")
    state: StageState = x
    logits: list[Tensor] = []
    batch = 0
    for index in range(stop + 1):
        state, z = model.forward_stage(index, state)
        if index == 0:  # stage 0 validates the input itself; its batch size is now known
            batch = _batch_size(x)
        check_stage_output(model, index, state, z, batch, last=index == num_exits - 1)
        logits.append(z)
    return logits


def run_until(model: nn.Module, x: Tensor, exit_index: int) -> list[Tensor]:
    """Logits of exits 0..``exit_index``, computing nothing deeper when the model allows.

    - Staged models (:func:`is_staged`: :class:`~neokd_losses.models.SmallCNN`, every
      :class:`~neokd_losses.models.MSDNet`, your own): stages 0..``exit_index`` run,
      later stages do not.
    - :class:`~neokd_losses.models.AttachedExits` without stages (any backbone that is
      not an ``nn.Sequential`` with exits on its direct children, e.g. a torchvision
      ResNet): the backbone runs until the layer of exit ``exit_index`` has produced
      its output and its head has run, then stops (the forward hook of that layer
      raises a private exception that the wrapper catches). With
      ``include_output=True`` and the last exit, the whole backbone runs.
    - Any other multi-exit model: the full forward runs and its output is sliced; no
      computation is saved.

    Negative indices count from the last exit (-1 is the last one). The result equals
    ``model(x)[: exit_index + 1]``.

    Args:
        model: a multi-exit model.
        x: the input batch.
        exit_index: k, the last exit to compute.

    Returns:
        A list of k + 1 logits tensors (B, K).

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``, ``exit_index`` not an int, or
            the model's output is not a sequence of tensors.
        ValueError: if ``exit_index`` is out of range for the model's E exits.

    Shape:
        - x: (B, ...), what the model accepts.
        - output: a list of k + 1 tensors (B, K).

    Example:
        >>> import torch
        >>> from neokd_losses.models import SmallCNN
        >>> model = SmallCNN().eval()
        >>> x = torch.rand(2, 1, 28, 28)
        >>> early = run_until(model, x, 0)
        >>> len(early), torch.allclose(early[0], model(x)[0])
        (1, True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}.")
    if is_staged(model):
        staged: StagedModel = model  # type: ignore[assignment]
        return run_stages(staged, x, last=check_exit_index(exit_index, staged.num_exits))
    truncated = getattr(model, "_run_until", None)
    if callable(truncated):  # AttachedExits without stages: stop the backbone early
        result: list[Tensor] = truncated(x, exit_index)
        return result
    check_int(exit_index, "exit_index")
    outputs = model(x)
    if isinstance(outputs, Tensor) or not isinstance(outputs, Sequence):
        raise TypeError(
            f"`model` must return a list or tuple of E exit logits tensors (B, K), got "
            f"{type(outputs).__name__}."
        )
    index = check_exit_index(exit_index, len(outputs))
    return list(outputs[: index + 1])
