"""Real early exit: samples leave the batch at the first confident exit, deeper stages skip them.

Budgeted prediction (MSDNet's dynamic evaluation, Huang et al., ICLR 2018; see
:mod:`neokd_losses.evaluation.budgeted`) *simulates* early exit: the whole network runs
and the exit is chosen afterwards. :class:`EarlyExitClassifier` runs it: stage by stage
on a staged model (:class:`~neokd_losses.models.staged.StagedModel`), every sample whose
confidence at exit k reaches the threshold T_k leaves the batch there, and stage k + 1
runs on the samples that remain. The rule is exactly that of
:func:`~neokd_losses.evaluation.budgeted.budgeted_accuracy`:

    confidence_k = max softmax(logits_k)       (ensemble: max of the mean of softmax_1..k)
    exit(x)      = first k with confidence_k ≥ T_k; the last exit takes every sample left

Inputs are images (or whatever the model takes); exits produce logits, never
probabilities.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple, Union

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from neokd_losses._validation import (
    check_bool,
    check_costs,
    check_exit_vector,
    is_compiling,
    upcast,
)
from neokd_losses.models.staged import (
    StagedModel,
    StageState,
    check_stage_output,
    require_staged,
    run_stages,
    run_until,
)

__all__ = ["EarlyExitClassifier", "EarlyExitOutput", "run_until", "stage_costs"]

Numbers = Union[Sequence[float], Tensor]


class EarlyExitOutput(NamedTuple):
    """What :class:`EarlyExitClassifier` returns for a batch, in input order.

    Attributes:
        prediction: predicted class of every sample (B,), long.
        exit_index: the exit (0-based) at which every sample left (B,), long.
        confidence: the confidence that decided, max softmax at that exit (B,), in the
            logits' floating dtype (float32 for half-precision logits).
        cost: the cumulative cost of the exit each sample left at (B,), float64, in the
            unit of the classifier's ``costs``; None when it has none.

    Shape:
        - prediction, exit_index, confidence, cost: (B,).

    Example:
        >>> from neokd_losses.models import SmallCNN
        >>> classifier = EarlyExitClassifier(SmallCNN().eval(), [0.5, 0.5, 0.0])
        >>> out = classifier(torch.rand(4, 1, 28, 28))
        >>> out.prediction.shape, out.exit_index.dtype, out.cost is None
        (torch.Size([4]), torch.int64, True)
    """

    prediction: Tensor
    exit_index: Tensor
    confidence: Tensor
    cost: Tensor | None


_BATCH_DEPENDENT = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._NormBase)


def _select(rows: Tensor, value: Any) -> Any:
    """The given rows of a tensor (the samples that stay); other leaves as they are."""
    return value.index_select(0, rows) if isinstance(value, Tensor) else value


def _state_device(state: StageState, fallback: torch.device) -> torch.device:
    """The device of the first tensor in ``state`` (stages may move the state)."""
    for leaf in tree_flatten(state)[0]:
        if isinstance(leaf, Tensor):
            found: torch.device = leaf.device
            return found
    return fallback


def _batch_dependent(model: nn.Module) -> bool:
    """True if a dropout or batch-norm layer of ``model`` is in training mode."""
    return any(m.training and isinstance(m, _BATCH_DEPENDENT) for m in model.modules())


class EarlyExitClassifier(nn.Module):
    """A staged multi-exit model that really exits early, one deployable module.

    The forward runs the model's stages in order on a shrinking batch. At exit k < E
    every remaining sample with confidence ≥ T_k leaves: its prediction, exit and
    confidence are recorded and it is dropped from the state (every state tensor is
    indexed along dimension 0). The last exit takes every sample left, whatever T_E is.
    The loop stops as soon as no sample remains. Decisions are those of
    :func:`~neokd_losses.evaluation.budgeted.budgeted_accuracy` (and
    :func:`~neokd_losses.evaluation.budgeted.exit_assignment`) on the logits the stages
    compute, ties included (confidence equal to T_k leaves). A network computes the
    same logits for a sample whatever the batch size only up to rounding (convolution
    algorithms depend on the batch size), so a sample whose confidence is within a
    rounding error of a threshold can exit one stage apart from a simulation on
    full-batch logits.

    With ``ensemble=True``, exit k predicts with the mean of the softmax outputs of
    exits 1..k (running sum divided by k), and its confidence is that mean's maximum.

    ``thresholds`` and ``costs`` are float64 buffers in the ``state_dict`` (with the
    model's weights, under ``model.``), and ``ensemble`` is saved as extra state, so the
    whole classifier saves with ``torch.save(classifier.state_dict(), path)`` and loads
    with ``torch.load(path, weights_only=True)`` into a fresh classifier built around
    the same architecture with any thresholds of the right length. They stay float64
    when the module's dtype is converted (``.half()``, ``.to(torch.bfloat16)``: the
    model's weights change, the decision rule does not) and follow its device.

    Compilation and export: the batch shrinks by an amount known only at run time.
    ``torch.compile(classifier, dynamic=True)`` gives the eager results. By default the
    selection of the rows that stay (``nonzero``, whose output size depends on the data)
    breaks the graph inside the loop over stages, so the loop runs eagerly and each
    stage call is compiled (SmallCNN: 5 graphs). With
    ``torch._dynamo.config.capture_dynamic_output_shape_ops = True`` the forward of a
    model without batch normalization after its first stage is one graph (SmallCNN);
    an eval-mode ``BatchNorm`` on a sub-batch of data-dependent size still breaks it
    (MSDNet: 6 graphs). Without ``dynamic=True`` every new sub-batch size recompiles the
    stages. ``torch.export.export(classifier, (x,), dynamic_shapes={"x": {0:
    torch.export.Dim("batch")}})`` captures the whole forward with a dynamic batch (the
    per-exit batch sizes become unbacked symbols) for models without batch
    normalization after their first stage (SmallCNN, ``attach_exits`` on convolutions,
    ReLUs and linear layers); it fails for MSDNet and other models with ``BatchNorm``
    past stage 0, whose eval-mode batch norm guards on the data-dependent size (torch
    2.14). The exported program runs every stage, on an empty batch once all samples
    have left (the early stop of the loop is skipped while tracing), and skips the
    stage-output and NaN checks.

    Put the model in eval mode first: in training mode, dropout and batch statistics
    make decisions depend on the batch (a warning says so when a dropout or batch-norm
    layer is in training mode).

    Args:
        model: a staged multi-exit model (:class:`~neokd_losses.models.SmallCNN`, any
            :class:`~neokd_losses.models.MSDNet`, :func:`~neokd_losses.models.attach_exits`
            on an ``nn.Sequential``, or your own; see the concepts page, "Staged
            models").
        thresholds: T, E numbers (e.g. from
            :func:`~neokd_losses.evaluation.budgeted.fit_thresholds`); ±inf allowed,
            the last is ignored.
        costs: cumulative cost of each exit, E non-decreasing non-negative numbers
            (e.g. from :func:`~neokd_losses.evaluation.flops.exit_costs` or
            :func:`stage_costs`); None to report no cost.
        ensemble: decide on the mean softmax of exits 1..k instead of exit k's alone.

    Raises:
        TypeError: if ``model`` has no stages (the message says how to add them), the
            thresholds or costs are not numbers, or ``ensemble`` is not a bool.
        ValueError: if ``thresholds`` or ``costs`` do not have E entries or hold NaN,
            or the costs are negative, infinite or decreasing. At call time: as
            :func:`~neokd_losses.models.staged.run_stages` for stages returning
            batches of the wrong size or states that are not batch first.

    Shape:
        - input: (B, ...), what the model accepts.
        - output: an :class:`EarlyExitOutput` of tensors (B,).

    Example:
        >>> from neokd_losses.models import SmallCNN
        >>> model = SmallCNN().eval()
        >>> classifier = EarlyExitClassifier(model, [0.0, 0.0, 0.0], costs=[1.0, 2.0, 3.0])
        >>> with torch.inference_mode():
        ...     out = classifier(torch.rand(5, 1, 28, 28))
        >>> out.exit_index.tolist(), out.cost.tolist()  # threshold 0: everyone leaves at once
        ([0, 0, 0, 0, 0], [1.0, 1.0, 1.0, 1.0, 1.0])
    """

    thresholds: Tensor
    costs: Tensor

    def __init__(
        self,
        model: nn.Module,
        thresholds: Numbers,
        costs: Numbers | None = None,
        ensemble: bool = False,
    ) -> None:
        super().__init__()
        staged = require_staged(model, "EarlyExitClassifier")
        self.num_exits: int = staged.num_exits
        self.model = model
        self.ensemble = check_bool(ensemble, "ensemble")
        self.register_buffer(
            "thresholds", check_exit_vector(thresholds, self.num_exits, "thresholds", device="cpu")
        )
        self.has_costs = costs is not None
        values = (
            check_costs(costs, self.num_exits, device="cpu")
            if costs is not None
            else torch.full((self.num_exits,), math.nan, dtype=torch.float64)
        )
        self.register_buffer("costs", values)

    def _apply(self, fn: Any, recurse: bool = True) -> EarlyExitClassifier:
        # Module conversions (.half(), .to(dtype), .cuda()) reach the model's parameters;
        # the decision rule keeps its float64 thresholds and costs and only moves: a
        # float16 cost overflows (1e7 multiply-adds is inf) and a rounded threshold
        # changes decisions.
        thresholds, costs = self.thresholds, self.costs
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        self.thresholds = thresholds.to(self.thresholds.device)
        self.costs = costs.to(self.costs.device)
        return self

    def get_extra_state(self) -> dict[str, Any]:
        """The decision rule's settings that are not tensors (saved in the state_dict)."""
        return {"ensemble": self.ensemble, "has_costs": self.has_costs}

    def set_extra_state(self, state: Any) -> None:
        """Restore what :meth:`get_extra_state` saved."""
        if not isinstance(state, dict) or set(state) != {"ensemble", "has_costs"}:
            raise ValueError(
                f"expected the extra state of an EarlyExitClassifier, a dict with keys "
                f"'ensemble' and 'has_costs', got {state!r}."
            )
        self.ensemble = bool(state["ensemble"])
        self.has_costs = bool(state["has_costs"])

    def extra_repr(self) -> str:
        return f"num_exits={self.num_exits}, ensemble={self.ensemble}, costs={self.has_costs}"

    def forward(self, x: Tensor) -> EarlyExitOutput:
        """Predict every sample at its first confident exit; see the class docstring.

        Shape:
            - x: (B, ...).
            - output: an :class:`EarlyExitOutput` of tensors (B,).
        """
        model: StagedModel = self.model  # type: ignore[assignment]
        if not isinstance(x, Tensor) or x.dim() == 0:
            kind = "a 0-d tensor" if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"EarlyExitClassifier expects a Tensor batch (B, ...), got {kind}.")
        if not is_compiling() and _batch_dependent(self.model):
            warnings.warn(
                "EarlyExitClassifier runs a model in training mode: dropout and batch "
                "statistics make the exits depend on the batch; call `.eval()` first.",
                UserWarning,
                stacklevel=2,
            )
        batch, device, last = x.shape[0], x.device, self.num_exits - 1
        order = torch.arange(batch, device=device)  # input positions of the remaining rows
        prediction = torch.zeros(batch, dtype=torch.long, device=device)
        exit_index = torch.full((batch,), last, dtype=torch.long, device=device)
        confidence: Tensor | None = None
        state: StageState = x
        total: Tensor | None = None
        for k in range(self.num_exits):
            state, logits = model.forward_stage(k, state)
            check_stage_output(model, k, state, logits, order.shape[0], last=k == last)
            if not is_compiling() and bool(torch.isnan(logits).any()):
                raise ValueError(
                    f"exit {k} returned NaN logits for "
                    f"{int(torch.isnan(logits).any(-1).sum())} of {logits.shape[0]} samples; "
                    "no confidence can be compared with a threshold. Check the model and "
                    "the inputs for NaN."
                )
            probs = upcast(logits).softmax(dim=-1)
            if self.ensemble:
                total = probs if total is None else total + probs
                probs = total / (k + 1)
            score, label = probs.max(dim=-1)
            if confidence is None:
                confidence = torch.zeros(batch, dtype=score.dtype, device=device)
            if k == last:
                prediction[order] = label
                confidence[order] = score
                break
            leave = score >= self.thresholds[k].to(device=device, dtype=score.dtype)
            gone = order[leave]
            prediction[gone] = label[leave]
            confidence[gone] = score[leave]
            exit_index[gone] = k
            rows = (~leave).nonzero().squeeze(1)  # one nonzero, then gathers
            order = order.index_select(0, rows)
            state = tree_map(partial(_select, rows.to(_state_device(state, device))), state)
            if total is not None:
                total = total.index_select(0, rows)
            if not is_compiling() and order.shape[0] == 0:
                break
        assert confidence is not None
        cost = self.costs.to(device)[exit_index] if self.has_costs else None
        return EarlyExitOutput(prediction, exit_index, confidence, cost)


class _StagesInOrder(nn.Module):
    """A staged model whose forward runs its stages in order (for cost measurement)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> list[Tensor]:
        return run_stages(self.model, x)  # type: ignore[arg-type]


def stage_costs(model: nn.Module, example_input: Tensor) -> list[float]:
    """Cumulative multiply-adds of each exit of a staged model, stage by stage.

    Exact by construction: the cost of exit k is what stages 0..k (each with its exit
    head) execute, measured with :func:`~neokd_losses.evaluation.flops.exit_costs`'s
    counting rules on a forward that runs the stages in order. It equals
    :func:`~neokd_losses.evaluation.flops.exit_costs` on a model whose ``forward`` runs
    the stages (SmallCNN, MSDNet), and stays right for a staged model whose own
    ``forward`` computes the whole trunk before any head (where ``exit_costs`` charges
    the whole trunk to exit 1). It is what a sample leaving at exit k costs in
    :class:`EarlyExitClassifier`.

    Args:
        model: a staged model.
        example_input: one input batch (B, ...); counts are divided by B.

    Returns:
        E floats: the cumulative multiply-adds for one input to reach exits 1..E.

    Raises:
        TypeError: if ``model`` has no stages, or as ``exit_costs``.
        ValueError: as ``exit_costs``.

    Shape:
        - example_input: (B, ...).
        - output: a list of E floats.

    Example:
        >>> from neokd_losses.models import SmallCNN
        >>> stage_costs(SmallCNN(), torch.zeros(1, 1, 28, 28))
        [1039786.0, 8603476.0, 11218574.0]
    """
    from neokd_losses.evaluation.flops import exit_costs

    require_staged(model, "stage_costs")
    return exit_costs(_StagesInOrder(model), example_input)
