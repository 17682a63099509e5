"""Honest uncertainty for the figures the app shows and decides on: proportions (win rates,
accuracies) with confidence intervals, means with standard errors, and when n is too small.

- `proportion_interval`: the exact (Clopper–Pearson) interval of a proportion. Its one-sided
  lower bound is what the promotion gate decides on: a candidate passes only when the lower
  bound of its win rate clears 0.5, and the exact interval keeps the chance of promoting a
  version that is no better at or below the stated level (1 - confidence) for every n, which
  the Wilson interval does not (at n = 64 its nominal 5% test promotes 5.2% of the time).
  Ties count half a win: `successes` may be a half-integer, and the interval is the Beta
  quantile at that real value (conservative, since ties make the outcome less variable).
- `mean_interval`: the mean of per-item values and its standard error (normal interval).
- `paired_difference`: the difference of two accuracies measured on the same cases, with the
  standard error of a paired comparison (only the cases the two disagree on carry information).
- `MIN_TRUSTWORTHY_N`: below it every figure is shown flagged as too few to trust.

Pure Python (no numpy, no scipy): the regularised incomplete beta function by its continued
fraction (Numerical Recipes, section 6.4), inverted by bisection.
"""

from __future__ import annotations

import math
import statistics
from typing import Sequence

MIN_TRUSTWORTHY_N = 30
DEFAULT_CONFIDENCE = 0.95


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 3e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                          -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the CDF at x of a Beta(a, b) variable (a, b > 0)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def _beta_quantile(q: float, a: float, b: float) -> float:
    low, high = 0.0, 1.0
    for _ in range(100):
        middle = (low + high) / 2
        if regularized_beta(middle, a, b) < q:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def proportion_interval(successes: float, n: int, confidence: float = DEFAULT_CONFIDENCE, *,
                        one_sided: bool = False) -> tuple[float, float]:
    """Exact (Clopper–Pearson) interval of a proportion: two-sided by default; `one_sided`
    gives (lower bound at `confidence`, 1). `successes` may be fractional (ties as halves).
    With n = 0 the interval is (0, 1): nothing is known."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, {n}], got {successes}")
    alpha = 1.0 - confidence
    tail = alpha if one_sided else alpha / 2
    low = 0.0 if successes == 0 else _beta_quantile(tail, successes, n - successes + 1)
    if one_sided:
        return low, 1.0
    high = 1.0 if successes == n else _beta_quantile(1.0 - tail, successes + 1, n - successes)
    return low, high


def win_rate(wins: int, ties: int, losses: int, confidence: float = DEFAULT_CONFIDENCE) -> dict:
    """A paired comparison's win rate (ties half) with its two-sided interval, its one-sided
    lower bound, n and whether n is too small to trust."""
    n = wins + ties + losses
    successes = wins + 0.5 * ties
    low, high = proportion_interval(successes, n, confidence)
    lower_bound, _ = proportion_interval(successes, n, confidence, one_sided=True)
    return {"win_rate": successes / n if n else None, "low": low, "high": high, "lower_bound": lower_bound,
            "confidence": confidence, "n": n, "wins": wins, "ties": ties, "losses": losses,
            "too_few": n < MIN_TRUSTWORTHY_N}


def accuracy(correct: int, n: int, confidence: float = DEFAULT_CONFIDENCE) -> dict:
    """A held-out accuracy with its interval and n."""
    low, high = proportion_interval(correct, n, confidence)
    return {"accuracy": correct / n if n else None, "low": low, "high": high, "n": n,
            "too_few": n < MIN_TRUSTWORTHY_N}


def mean_interval(values: Sequence[float], confidence: float = DEFAULT_CONFIDENCE) -> dict:
    """Mean of per-item values with its standard error and a normal interval."""
    n = len(values)
    if n == 0:
        return {"mean": None, "se": None, "low": None, "high": None, "n": 0, "too_few": True}
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(n) if n > 1 else float("inf")
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    return {"mean": mean, "se": se, "low": mean - z * se, "high": mean + z * se, "n": n,
            "too_few": n < MIN_TRUSTWORTHY_N}


def paired_difference(a_correct: Sequence[bool], b_correct: Sequence[bool],
                      confidence: float = DEFAULT_CONFIDENCE) -> dict:
    """Accuracy of A minus accuracy of B on the same n cases, with its standard error and normal
    interval. With b cases only A gets right and c only B gets right, the difference is
    (b - c) / n and its standard error sqrt(b + c - (b - c)^2 / n) / n: the paired (McNemar)
    estimate, much tighter than two independent intervals when the two mostly agree."""
    if len(a_correct) != len(b_correct):
        raise ValueError(f"the two sides were scored on {len(a_correct)} and {len(b_correct)} cases")
    n = len(a_correct)
    if n == 0:
        return {"difference": None, "se": None, "low": None, "high": None, "n": 0, "a_only": 0, "b_only": 0,
                "too_few": True}
    a_only = sum(1 for a, b in zip(a_correct, b_correct) if a and not b)
    b_only = sum(1 for a, b in zip(a_correct, b_correct) if b and not a)
    difference = (a_only - b_only) / n
    se = math.sqrt(max(0.0, a_only + b_only - (a_only - b_only) ** 2 / n)) / n
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    return {"difference": difference, "se": se, "low": difference - z * se, "high": difference + z * se, "n": n,
            "a_only": a_only, "b_only": b_only, "too_few": n < MIN_TRUSTWORTHY_N}


def describe(figure: dict, what: str = "win_rate", digits: int = 2) -> str:
    """One line for a person: '0.62 [0.51, 0.72], n=88', flagged when n is too small."""
    value = figure.get(what, figure.get("mean"))
    if value is None or not figure.get("n"):
        return "no data (n=0)"
    text = f"{value:.{digits}f} [{figure['low']:.{digits}f}, {figure['high']:.{digits}f}], n={figure['n']}"
    if figure.get("too_few"):
        text += f" (too few to trust: under {MIN_TRUSTWORTHY_N})"
    return text
