"""Evaluation of multi-exit models: anytime, budgeted, transferability, sanity checks, plots.

The three ways the NEO-KD paper (Ham et al., NeurIPS 2023) judges a robust multi-exit
network, for any model whose ``forward`` returns a list of E exit logits (B, K):

- :func:`anytime_accuracy`: accuracy of every exit on clean or attacked inputs and their
  mean (the paper's average adversarial test accuracy);
- :func:`budget_curve` / :func:`budgeted_evaluation`: accuracy against expected cost when
  samples leave at the first confident exit (MSDNet's dynamic evaluation), with
  :func:`exit_costs` for the per-exit cost;
- :func:`transferability_matrix`: how far a single attack on one exit fools the others
  (a :class:`TransferResult`: attack success rates and the counts behind them);

plus :func:`sanity_checks` against gradient masking and matplotlib figures
(:func:`plot_budget_curves`, :func:`plot_transferability`, :func:`plot_exit_accuracies`;
matplotlib is imported only when a plot function is called). Loops over a loader show a
tqdm progress bar when tqdm is installed (``progress=False`` turns it off) and move every
batch to the model's device.
"""

from neokd_losses.evaluation.anytime import AnytimeResult, anytime_accuracy, anytime_table
from neokd_losses.evaluation.budgeted import (
    BudgetCurve,
    budget_curve,
    budgeted_accuracy,
    budgeted_evaluation,
    collect_logits,
    exit_assignment,
    exit_proportions,
    fit_thresholds,
)
from neokd_losses.evaluation.flops import exit_costs
from neokd_losses.evaluation.plots import (
    plot_budget_curves,
    plot_exit_accuracies,
    plot_transferability,
)
from neokd_losses.evaluation.robust import (
    DeployedResult,
    RobustResult,
    deployed_evaluation,
    robust_accuracy,
    strong_evaluation,
)
from neokd_losses.evaluation.sanity import (
    GradientMaskingWarning,
    SanityCheck,
    SanityReport,
    exit_sanity_checks,
    sanity_checks,
)
from neokd_losses.evaluation.transfer import (
    TransferCount,
    TransferResult,
    off_diagonal_mean,
    transferability_matrix,
)

__all__ = [
    "AnytimeResult",
    "BudgetCurve",
    "DeployedResult",
    "GradientMaskingWarning",
    "RobustResult",
    "SanityCheck",
    "SanityReport",
    "TransferCount",
    "TransferResult",
    "anytime_accuracy",
    "anytime_table",
    "budget_curve",
    "budgeted_accuracy",
    "budgeted_evaluation",
    "collect_logits",
    "deployed_evaluation",
    "exit_assignment",
    "exit_costs",
    "exit_proportions",
    "exit_sanity_checks",
    "fit_thresholds",
    "off_diagonal_mean",
    "plot_budget_curves",
    "plot_exit_accuracies",
    "plot_transferability",
    "robust_accuracy",
    "sanity_checks",
    "strong_evaluation",
    "transferability_matrix",
]
