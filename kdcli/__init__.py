"""kdcli: knowledge distillation for PyTorch, from the command line and from Python.

`kdcli.distill(...)`, `kdcli.train(...)` and `kdcli.evaluate(...)` (see kdcli.library) are imported
on first use, so that `kd --help` and `import kdcli` stay fast.
"""

__version__ = "0.1.0"
__all__ = ["distill", "evaluate", "train", "__version__"]


def __getattr__(name: str):
    if name in ("distill", "train", "evaluate"):
        from kdcli import library

        return getattr(library, name)
    raise AttributeError(f"module 'kdcli' has no attribute {name!r}")
