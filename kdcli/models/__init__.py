"""Models: the CIFAR zoo, timm and torchvision backbones, and the `Outputs` adapters."""

from kdcli.models.registry import create_model, default_lr, list_models, register_model
from kdcli.models.features import Outputs, classifier_of, forward_outputs

__all__ = [
    "Outputs",
    "classifier_of",
    "create_model",
    "default_lr",
    "forward_outputs",
    "list_models",
    "register_model",
]
