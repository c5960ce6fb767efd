"""A pooled figure's per-row parts: what each row (utterance) adds to it, or why it adds nothing.

Each row contributes a `(numerator, denominator)` pair to a figure that is a ratio of sums
(`intervals.Ratio`), or a reason string when the figure leaves the row out ("not scored", "not finite
(null)", "no text separator", "empty ASR transcript (no tokens scored)", ...). The reasons are what
metrics.json's `excluded` counts; the pairs are what the bootstrap resamples.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from spectron_jax.evaluation import intervals, text_metrics

Part = Any  # tuple[float, float] (numerator, denominator) or str (the reason the row is left out)
NOT_SCORED = "not scored"
NOT_FINITE = "not finite (null)"
_ABSENT = object()  # `field` of a row without the key


def value_part(value: Any, missing: str = NOT_SCORED) -> Part:
    """A row's value in a mean: (value, 1); `missing` when absent, NOT_FINITE when null / NaN / inf."""
    if value is _ABSENT:
        return missing
    if value is None or not np.isfinite(float(value)):
        return NOT_FINITE
    return (float(value), 1.0)


def field(row: Mapping, key: str, sub: Optional[str] = None) -> Any:
    """row[key] (or row[key][sub]); `_ABSENT` when the row has no `key`."""
    if key not in row:
        return _ABSENT
    value = row[key]
    return (value or {}).get(sub) if sub is not None else value


def mean_of(rows: Sequence[Mapping], key: str, sub: Optional[str] = None) -> list[Part]:
    return [value_part(field(r, key, sub)) for r in rows]


def flag_of(rows: Sequence[Mapping], test: Callable[[Mapping], Any]) -> list[Part]:
    """A share (mean of 0/1) over every row."""
    return [(float(bool(test(r))), 1.0) for r in rows]


def lm_part(score: Optional[Mapping], empty: str) -> Part:
    """A text-LM score {log_likelihood, num_tokens} as (-Σ log p, tokens); `empty` when no token was scored."""
    if score is None:
        return NOT_SCORED
    if int(score["num_tokens"]) == 0:
        return empty
    return (-float(score["log_likelihood"]), float(score["num_tokens"]))


def error_parts(rows: Sequence[Mapping], ref: Callable[[Mapping], Optional[str]],
                hyp: Callable[[Mapping], Optional[str]], empty_reference: str, unit: str = "word",
                skip: Callable[[Mapping], Optional[str]] = lambda row: None) -> list[Part]:
    """(edits, reference length) per row (`text_metrics.error_counts`); `skip(row)` returns a reason to
    leave a row out; a reference that normalises to nothing gives `empty_reference`."""
    reasons = [skip(r) for r in rows]
    todo = [r for r, why in zip(rows, reasons) if why is None]
    counted = iter(text_metrics.error_counts([ref(r) or "" for r in todo], [hyp(r) or "" for r in todo], unit))
    out: list[Part] = []
    for why in reasons:
        if why is not None:
            out.append(why)
            continue
        edits = next(counted)
        out.append(empty_reference if edits is None else (float(edits[0]), float(edits[1])))
    return out


def ratio(per_row: Sequence[Part], transform: str = "identity") -> intervals.Ratio:
    """The `intervals.Ratio` of per-row parts (a reason contributes nothing)."""
    num = [p[0] if isinstance(p, tuple) else 0.0 for p in per_row]
    den = [p[1] if isinstance(p, tuple) else 0.0 for p in per_row]
    return intervals.Ratio(np.asarray(num, np.float64), np.asarray(den, np.float64), transform)


def exclusions(per_row: Sequence[Part]) -> dict:
    """{"rows_used": n, "rows_excluded": {reason: count}} of one figure."""
    reasons = collections.Counter(p for p in per_row if isinstance(p, str))
    return {"rows_used": sum(isinstance(p, tuple) for p in per_row), "rows_excluded": dict(sorted(reasons.items()))}
