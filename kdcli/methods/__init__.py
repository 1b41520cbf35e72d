"""Distillation methods. Importing this package registers every method module in it."""

import importlib
import pkgutil

from kdcli.methods.base import Method, Needs, Shapes, list_methods, method_class, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base",) and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Method", "Needs", "Shapes", "list_methods", "method_class", "register"]
