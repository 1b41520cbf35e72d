"""Distillation methods. Importing this package registers every built-in method."""

from kdcli.methods import kd  # noqa: F401
from kdcli.methods.base import Method, Needs, Shapes, list_methods, method_class, register

__all__ = ["Method", "Needs", "Shapes", "list_methods", "method_class", "register"]
