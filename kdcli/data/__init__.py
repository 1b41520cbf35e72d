"""Datasets and loaders: `build_data(spec)` -> DataBundle, `make_loader(split, bundle, ...)` -> Batches."""

from kdcli.data.loaders import FolderLoader, TensorLoader, make_loader
from kdcli.data.registry import DataBundle, FolderSplit, InMemorySplit, build_data, list_datasets

__all__ = [
    "DataBundle",
    "FolderLoader",
    "FolderSplit",
    "InMemorySplit",
    "TensorLoader",
    "build_data",
    "list_datasets",
    "make_loader",
]
