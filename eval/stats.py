"""Uncertainty for scores on a few dozen items: bootstrap intervals and paired tests.

An exam of 80 items gives an accuracy with a 95% interval about ±0.1 wide, so differences
below that are noise unless a *paired* test (same items, both systems) says otherwise.
numpy is imported inside the functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def bootstrap_ci(values: Sequence[float], *, confidence: float = 0.95, samples: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (per-item scores, 0/1 or in [0, 1])."""
    import numpy as np

    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(samples, data.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return (float(low), float(high))


def _two_sided_p(deltas, samples: int) -> float:
    """Bootstrap p-value of "no difference": twice the smaller tail of the resampled deltas beyond 0."""
    import numpy as np

    below, above = int(np.sum(deltas <= 0)), int(np.sum(deltas >= 0))
    return min(1.0, 2 * (min(below, above) + 1) / (samples + 1))


def paired_bootstrap(first: Sequence[float], second: Sequence[float], *, confidence: float = 0.95,
                     samples: int = 2000, seed: int = 0) -> dict[str, float | list[float]]:
    """Mean of second - first over the same items, its interval, and a two-sided p-value.

    Items are resampled together, so what both systems get right or wrong cancels out.
    """
    import numpy as np

    a, b = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired scores need the same non-zero number of items ({a.size} vs {b.size})")
    diff = b - a
    rng = np.random.default_rng(seed)
    deltas = diff[rng.integers(0, diff.size, size=(samples, diff.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(deltas, [tail, 100 - tail])
    p = 1.0 if not diff.any() else _two_sided_p(deltas, samples)
    return {"delta": float(diff.mean()), "ci": [float(low), float(high)], "p_value": p}


def paired_log_ratio(first: Sequence[tuple[float, int]], second: Sequence[tuple[float, int]], *,
                     confidence: float = 0.95, samples: int = 2000, seed: int = 0) -> dict[str, float | list[float]]:
    """Perplexity compared over the same windows: delta of log perplexity (second - first), interval, p.

    Each window is (summed negative log-likelihood, tokens); log perplexity is the token-weighted
    mean NLL, so windows are resampled together and the ratio recomputed each time.
    """
    import numpy as np

    a, b = np.asarray(first, dtype=float).reshape(-1, 2), np.asarray(second, dtype=float).reshape(-1, 2)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired perplexity needs the same windows ({len(a)} vs {len(b)})")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(samples, len(a)))
    log_ppl = lambda w, i: w[i, 0].sum(axis=-1) / w[i, 1].sum(axis=-1)
    deltas = log_ppl(b, idx) - log_ppl(a, idx)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(deltas, [tail, 100 - tail])
    delta = float(b[:, 0].sum() / b[:, 1].sum() - a[:, 0].sum() / a[:, 1].sum())
    p = 1.0 if delta == 0 else _two_sided_p(deltas, samples)
    return {"delta": delta, "ci": [float(low), float(high)], "p_value": p}


def mcnemar_exact(first: Sequence[bool], second: Sequence[bool]) -> dict[str, float | int]:
    """Exact (binomial) McNemar test on paired right/wrong outcomes: two-sided p-value.

    Only the discordant items count: `first_only` right for the first system alone,
    `second_only` right for the second alone; under "no difference" each is Binomial(n, 1/2).
    """
    if len(first) != len(second):
        raise ValueError(f"paired outcomes need the same items ({len(first)} vs {len(second)})")
    first_only = sum(1 for a, b in zip(first, second) if a and not b)
    second_only = sum(1 for a, b in zip(first, second) if b and not a)
    n = first_only + second_only
    if n == 0:
        return {"p_value": 1.0, "first_only": 0, "second_only": 0}
    tail = sum(math.comb(n, k) for k in range(min(first_only, second_only) + 1)) / 2 ** n
    return {"p_value": min(1.0, 2 * tail), "first_only": first_only, "second_only": second_only}
