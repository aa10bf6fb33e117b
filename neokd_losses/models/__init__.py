"""Reference multi-exit architectures and a wrapper that adds exits to any network.

- :class:`SmallCNN`: the 3-exit Triple Wins MNIST network (836,846 parameters).
- :class:`MSDNet` and the paper-setting factories :func:`msdnet_cifar10`,
  :func:`msdnet_cifar100`, :func:`msdnet_imagenet`, :func:`msdnet_tinyimagenet`.
- :func:`attach_exits`: exit heads on named layers of any ``nn.Module``.
- :func:`run_until`: the logits of exits 0..k, computing nothing deeper (the
  staged-model protocol is in :mod:`neokd_losses.models.staged`).

Every model's forward returns a list of E logits tensors (B, K), earliest exit first.
``SmallCNN``, ``MSDNet`` and ``attach_exits`` on an ``nn.Sequential`` are staged.
"""

from neokd_losses.models.attach import AttachedExits, HeadFactory, attach_exits
from neokd_losses.models.msdnet import (
    MSDNet,
    msdnet_cifar10,
    msdnet_cifar100,
    msdnet_imagenet,
    msdnet_tinyimagenet,
)
from neokd_losses.models.small_cnn import SmallCNN
from neokd_losses.models.staged import (
    StagedModel,
    has_exit_split,
    is_staged,
    run_stages,
    run_until,
)

__all__ = [
    "AttachedExits",
    "HeadFactory",
    "MSDNet",
    "SmallCNN",
    "StagedModel",
    "attach_exits",
    "has_exit_split",
    "is_staged",
    "msdnet_cifar10",
    "msdnet_cifar100",
    "msdnet_imagenet",
    "msdnet_tinyimagenet",
    "run_stages",
    "run_until",
]
