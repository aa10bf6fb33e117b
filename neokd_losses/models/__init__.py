"""Reference multi-exit architectures and a wrapper that adds exits to any network.

- :class:`SmallCNN`: the 3-exit Triple Wins MNIST network (836,846 parameters).
- :class:`MSDNet` and the paper-setting factories :func:`msdnet_cifar10`,
  :func:`msdnet_cifar100`, :func:`msdnet_imagenet`, :func:`msdnet_tinyimagenet`.
- :func:`attach_exits`: exit heads on named layers of any ``nn.Module``.

Every model's forward returns a list of E logits tensors (B, K), earliest exit first.
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

__all__ = [
    "AttachedExits",
    "HeadFactory",
    "MSDNet",
    "SmallCNN",
    "attach_exits",
    "msdnet_cifar10",
    "msdnet_cifar100",
    "msdnet_imagenet",
    "msdnet_tinyimagenet",
]
