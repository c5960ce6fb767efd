"""Bootstrap confidence intervals over utterances for the evaluation's pooled figures.

Every pooled figure of a suite is a ratio of sums over its rows (utterances),

    figure = transform(Σ_i numerator_i / Σ_i denominator_i)

  - a mean of per-utterance values: numerator_i = value_i, denominator_i = 1 (0 for a row the figure
    leaves out, e.g. a null value);
  - a corpus WER / CER: numerator_i = edits_i, denominator_i = reference words (characters)_i;
  - a pooled perplexity: numerator_i = -Σ log p of row i, denominator_i = its tokens, transform = exp;
  - an accuracy in percent: a mean of 0/1 values with transform = 100·x.

`interval` draws `resamples` bootstrap samples of the rows (n draws with replacement out of n, the same
draws for every figure of a call when the seed is the same), recomputes the whole ratio on each, and
returns the percentile interval (the (1 - level)/2 and (1 + level)/2 quantiles, NumPy's linear
interpolation). A ratio is resampled as a ratio: rows are drawn and both sums recomputed, never a mean
of per-utterance ratios. Resamples whose denominator sums to zero have no value and are dropped; the
interval is NaN when fewer than half of the resamples have one, or when no row has a denominator.

    parts = Ratio(numerators, denominators)            # [n] float each
    parts.value                                        # the figure on all rows
    interval(parts, BootstrapConfig(resamples=1000))   # (low, high)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import numpy as np

DEFAULT_RESAMPLES = 1000  # DEFAULT: bootstrap resamples per figure
DEFAULT_LEVEL = 0.95
TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda x: x,
    "exp": np.exp,  # perplexity from the mean negative log-likelihood per token
    "percent": lambda x: 100.0 * x,
}


@dataclasses.dataclass(frozen=True)
class BootstrapConfig:
    """resamples: bootstrap samples (DEFAULT 1000; 0 disables intervals); seed: their PRNG seed;
    level: the interval's coverage (0.95)."""

    resamples: int = DEFAULT_RESAMPLES
    seed: int = 0
    level: float = DEFAULT_LEVEL

    def __post_init__(self):
        if self.resamples < 0:
            raise ValueError(f"bootstrap resamples must be >= 0, got {self.resamples}")
        if not 0.0 < self.level < 1.0:
            raise ValueError(f"bootstrap level must be in (0, 1), got {self.level}")

    def describe(self) -> dict:
        return {"method": "percentile bootstrap over utterances (rows resampled, each figure recomputed)",
                "resamples": self.resamples, "seed": self.seed, "level": self.level}


@dataclasses.dataclass(frozen=True)
class Ratio:
    """A pooled figure's per-row parts: numerators, denominators [n] float64; transform: a key of
    `TRANSFORMS` applied to the ratio of sums."""

    numerators: np.ndarray
    denominators: np.ndarray
    transform: str = "identity"

    def __post_init__(self):
        num = np.asarray(self.numerators, np.float64).reshape(-1)
        den = np.asarray(self.denominators, np.float64).reshape(-1)
        if num.shape != den.shape:
            raise ValueError(f"{num.size} numerators but {den.size} denominators")
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform!r} (one of {', '.join(TRANSFORMS)})")
        object.__setattr__(self, "numerators", num)
        object.__setattr__(self, "denominators", den)

    @property
    def value(self) -> float:
        """The figure over all rows (NaN when no row has a denominator)."""
        den = float(self.denominators.sum())
        if den == 0.0:
            return float("nan")
        return float(TRANSFORMS[self.transform](np.asarray(self.numerators.sum() / den)))

    @property
    def rows_used(self) -> int:
        return int(np.count_nonzero(self.denominators))


def mean_parts(values: Sequence[Optional[float]], transform: str = "identity") -> Ratio:
    """A mean of per-row values; None / NaN / inf rows are left out (denominator 0)."""
    arr = np.asarray([np.nan if v is None else float(v) for v in values], np.float64)
    used = np.isfinite(arr)
    return Ratio(np.where(used, arr, 0.0), used.astype(np.float64), transform)


def resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n] int64: each row n draws with replacement from range(n)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def resampled_values(parts: Ratio, indices: np.ndarray) -> np.ndarray:
    """[resamples] the figure recomputed on each resample (NaN where its denominator sums to 0)."""
    num = parts.numerators[indices].sum(axis=1)
    den = parts.denominators[indices].sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return TRANSFORMS[parts.transform](ratio)


def percentile_interval(samples: np.ndarray, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """The (1 - level)/2 and (1 + level)/2 quantiles of the finite `samples` (NaN, NaN when fewer
    than half of them are finite)."""
    samples = np.asarray(samples, np.float64)
    finite = samples[np.isfinite(samples)]
    if finite.size == 0 or finite.size * 2 < samples.size:
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [50.0 * (1.0 - level), 50.0 * (1.0 + level)])
    return float(low), float(high)


def interval(parts: Ratio, config: BootstrapConfig = BootstrapConfig()) -> tuple[float, float]:
    """The bootstrap percentile interval of `parts`' figure (module docstring); NaN, NaN when it has
    no row with a denominator or `config.resamples` is 0."""
    n = parts.numerators.size
    if n == 0 or config.resamples == 0 or parts.rows_used == 0:
        return float("nan"), float("nan")
    return percentile_interval(resampled_values(parts, resample_indices(n, config.resamples, config.seed)),
                               config.level)


def intervals(figures: dict[str, Ratio], config: BootstrapConfig = BootstrapConfig()
              ) -> dict[str, Optional[list[float]]]:
    """{figure: [low, high]} for each figure (None where it has none). Figures over the same rows share
    the same resamples (a figure's draws depend on the seed and its number of rows only)."""
    out: dict[str, Optional[list[float]]] = {}
    for key, parts in figures.items():
        low, high = interval(parts, config)
        out[key] = [low, high] if math.isfinite(low) and math.isfinite(high) else None
    return out


def overlap(a: Optional[Sequence[float]], b: Optional[Sequence[float]]) -> Optional[bool]:
    """Whether two [low, high] intervals overlap (None when either is missing)."""
    if not a or not b:
        return None
    return bool(a[0] <= b[1] and b[0] <= a[1])
