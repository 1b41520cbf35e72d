"""The CIFAR zoo: RepDistiller's architectures with its exact state_dict layout.

Importing this package registers every family with `kdcli.models.registry`, in RepDistiller's
`model_dict` order.
"""

from kdcli.models.cifar import resnet, resnetv2, wrn, vgg, mobilenetv2, shufflenetv1, shufflenetv2  # noqa: F401
from kdcli.models.cifar._common import CifarNet

__all__ = ["CifarNet"]
