"""Confidence intervals for eval: percentile bootstrap, and the length-controlled win rate.

Eval sets are small (tens to a few hundred held-out prompts), so every number the report shows comes
with a 95% interval from resampling prompts with replacement.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def bootstrap_ci(
    values: Sequence[float],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    stat: Callable[[np.ndarray], float] = np.mean,
) -> dict[str, float | int | None]:
    """Point estimate and percentile-bootstrap (1 - alpha) interval of ``stat`` over ``values``.

    NaNs are dropped first (a metric that does not apply to an answer). Returns
    ``{"mean", "lo", "hi", "n"}``; all None when no value is left.
    """
    x = np.asarray([v for v in values if v is not None], dtype=float)
    x = x[~np.isnan(x)]
    n = len(x)
    if n == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    point = float(stat(x))
    if n == 1:
        return {"mean": point, "lo": point, "hi": point, "n": 1}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    if stat is np.mean:  # vectorised fast path for the common case
        boots = x[idx].mean(axis=1)
    else:
        boots = np.array([stat(x[i]) for i in idx])
    lo, hi = np.percentile(boots, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return {"mean": point, "lo": float(lo), "hi": float(hi), "n": n}


def _fit_logistic(x: np.ndarray, y: np.ndarray, w: np.ndarray, ridge: float = 1e-2, iters: int = 50) -> np.ndarray:
    """Weighted logistic regression y ~ sigmoid(b0 + b1 x) by Newton's method.

    A small ridge penalty keeps the fit finite when the data are separable (e.g. the longer answer
    always wins), which is common with a handful of prompts.
    """
    X = np.column_stack([np.ones_like(x), x])
    beta = np.zeros(2)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(X @ beta)))
        grad = X.T @ (w * (y - p)) - ridge * beta
        hess = -(X.T * (w * p * (1 - p))) @ X - ridge * np.eye(2)
        step = np.linalg.solve(hess, grad)
        beta = beta - step
        if np.max(np.abs(step)) < 1e-8:
            break
    return beta


def length_controlled_win_rate(outcomes: Sequence[float], len_a: Sequence[float], len_b: Sequence[float]) -> float:
    """Win rate of A over B at equal length.

    Judges (people and models alike) prefer longer answers, so a raw win rate mixes quality with
    length. We fit a logistic regression of A's outcome on the log length ratio
    ``x = log((1 + len_a) / (1 + len_b))`` and read the fitted win probability at ``x = 0`` (both
    answers equally long): ``sigmoid(b0)``. A tie (outcome 0.5) enters as half a win and half a loss.
    The log ratio makes the adjustment scale-free (characters or tokens give the same x).
    """
    o = np.asarray(outcomes, dtype=float)
    x = np.log1p(np.asarray(len_a, dtype=float)) - np.log1p(np.asarray(len_b, dtype=float))
    if len(o) == 0:
        return float("nan")
    # Each pair becomes a win row weighted by o and a loss row weighted by 1 - o.
    xs = np.concatenate([x, x])
    ys = np.concatenate([np.ones_like(o), np.zeros_like(o)])
    ws = np.concatenate([o, 1 - o])
    b0, _ = _fit_logistic(xs, ys, ws)
    return float(1.0 / (1.0 + np.exp(-b0)))


def length_controlled_ci(
    outcomes: Sequence[float],
    len_a: Sequence[float],
    len_b: Sequence[float],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, float | int | None]:
    """``length_controlled_win_rate`` with a bootstrap interval over pairs."""
    o, a, b = (np.asarray(v, dtype=float) for v in (outcomes, len_a, len_b))
    n = len(o)
    if n == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    point = length_controlled_win_rate(o, a, b)
    if n == 1:
        return {"mean": point, "lo": point, "hi": point, "n": 1}
    rng = np.random.default_rng(seed)
    boots = [length_controlled_win_rate(o[i], a[i], b[i]) for i in rng.integers(0, n, size=(n_boot, n))]
    lo, hi = np.percentile(boots, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return {"mean": point, "lo": float(lo), "hi": float(hi), "n": n}
