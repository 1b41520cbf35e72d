"""Statistics over seeds: mean, sample std, and a paired 95% t-interval for the difference of two methods.

Runs with the same seed start from the same student initialisation and see the same batches (the
engine seeds the student before anything else is drawn), so two methods are compared seed by seed:
the interval is over the per-seed differences, which removes the seed-to-seed spread both share.
"""

from __future__ import annotations

import math
import statistics
from typing import Any


def mean(values) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def std(values: list[float]) -> float:
    """Sample standard deviation (n - 1); 0 for one value (the tables then show the mean alone)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def t_cdf(t: float, df: int) -> float:
    """Student's t distribution function for an integer df (Abramowitz & Stegun 26.7.3-26.7.4, exact)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # odd: 1/2 + (theta + sin cos (1 + 2/3 cos^2 + ... )) / pi
        total, term = 0.0, 1.0
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        return 0.5 + (theta + (s * math.cos(theta) * total if df > 1 else 0.0)) / math.pi
    total, term = 0.0, 1.0  # even: 1/2 + sin (1 + 1/2 cos^2 + 1.3/(2.4) cos^4 + ...) / 2
    for k in range(1, df // 2 + 1):
        total += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return 0.5 + s * total / 2


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (0.5 < p < 1) of Student's t with df degrees of freedom, by bisection of t_cdf."""
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def paired_interval(a: dict[int, float], b: dict[int, float], level: float = 0.95) -> dict[str, Any] | None:
    """Mean of a[seed] - b[seed] over the seeds both have, with its two-sided t-interval.

    None with fewer than two common seeds (no spread to estimate). `excludes_zero` marks a
    difference the seeds support at this level.
    """
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    centre = statistics.fmean(diffs)
    half = t_quantile(0.5 + level / 2, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"mean": centre, "low": centre - half, "high": centre + half, "n": len(seeds), "seeds": seeds,
            "level": level, "excludes_zero": centre - half > 0 or centre + half < 0}
