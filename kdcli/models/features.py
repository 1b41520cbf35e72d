"""What the engine and methods see of a network: `Outputs(logits, features, embedding)`."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Outputs(NamedTuple):
    """One forward pass, in RepDistiller's `is_feat` order.

    features: the stem output followed by every stage output, before pooling
        (RepDistiller `feat[:-1]`; `features[1:]` are the *stage outputs*, `features[-1]` the
        *last-stage map*). Post-ReLU unless the pass asked for pre-activation features.
    embedding: the pooled penultimate vector fed to the classifier (RepDistiller `feat[-1]`).
    """

    logits: Tensor
    features: list[Tensor]
    embedding: Tensor
