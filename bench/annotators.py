"""Simulated annotators for the closed-loop benchmark: people played by a gold reward model.

As in Gao, Schulman and Hilton, "Scaling Laws for Reward Model Overoptimization" (2022), a gold
reward model stands in for people. An annotator shown K answers with gold scores s_1..s_K ranks
them by sampling from the Plackett-Luce model with utilities s_i / T (Bradley-Terry for K = 2):
the first place goes to answer i with probability exp(s_i / T) / sum_j exp(s_j / T), the next
place likewise among the rest, and so on. Then:

- two neighbours in that order whose gold scores are within `tie_band * T` of each other are
  called a tie with probability `tie_rate` (people tie answers they cannot tell apart);
- the whole item is skipped with probability `skip_rate`.

The temperature T sets how noisy people are. `calibrate_temperature` picks T so that two
annotators judging the same pair agree (same order, neither calls a tie) about as often as
people do: under Bradley-Terry, a pair with gold gap d is ordered the gold way with probability
p = sigmoid(|d| / T), and two independent annotators agree with probability p^2 + (1 - p)^2,
averaged over the gaps of the items actually judged.

HUMAN_AGREEMENT is the figure to aim at: Bai et al., "Training a Helpful and Harmless Assistant
with RLHF" (2022), report that the authors agreed with the crowdworkers who wrote hh-rlhf about
63% of the time on comparisons. Nothing here reads the store: the loop benchmark feeds rankings
in the app's own "B > A = C > D" form through the app's handlers.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

HUMAN_AGREEMENT = 0.63
LETTERS = "ABCDEFGHIJ"


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def expected_agreement(gaps: Sequence[float], temperature: float) -> float:
    """Probability that two Bradley-Terry annotators at `temperature` order a pair the same
    way, averaged over the pairs' gold score gaps."""
    if not gaps:
        raise ValueError("no score gaps to average over")
    total = 0.0
    for gap in gaps:
        p = _sigmoid(abs(gap) / temperature)
        total += p * p + (1 - p) * (1 - p)
    return total / len(gaps)


def calibrate_temperature(gaps: Sequence[float], target: float = HUMAN_AGREEMENT) -> float:
    """The temperature at which `expected_agreement(gaps, T)` equals `target` (bisection on
    log T: agreement falls from 1 towards 1/2 as T grows)."""
    if not 0.5 < target < 1:
        raise ValueError(f"target agreement must be between 0.5 and 1, got {target}")
    if not any(gap != 0 for gap in gaps):
        raise ValueError("every gold gap is zero: no temperature gives any agreement above 1/2")
    low, high = -12.0, 12.0  # log T
    for _ in range(100):
        middle = (low + high) / 2
        if expected_agreement(gaps, math.exp(middle)) > target:
            low = middle
        else:
            high = middle
    return math.exp((low + high) / 2)


@dataclass
class SimulatedAnnotator:
    """One simulated person: a name, a temperature and habits, with its own random stream."""

    name: str
    temperature: float
    tie_rate: float = 0.1
    tie_band: float = 0.25
    skip_rate: float = 0.02
    seed: int = 0

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be above 0, got {self.temperature}")
        self._random = random.Random(f"{self.name}:{self.seed}")

    def order(self, scores: Sequence[float]) -> list[int]:
        """Indices of the answers, best first, sampled from Plackett-Luce on scores / T."""
        left = list(range(len(scores)))
        out = []
        while left:
            top = max(scores[i] for i in left)
            weights = [math.exp((scores[i] - top) / self.temperature) for i in left]
            pick = self._random.choices(left, weights=weights)[0]
            out.append(pick)
            left.remove(pick)
        return out

    def judge(self, scores: Sequence[float]) -> str | None:
        """A ranking of K answers in the app's form ("B > A = C > D"), or None to skip."""
        if len(scores) < 2:
            raise ValueError("a ranking needs at least two answers")
        if self._random.random() < self.skip_rate:
            return None
        order = self.order(scores)
        text = LETTERS[order[0]]
        for before, after in zip(order, order[1:]):
            close = abs(scores[before] - scores[after]) <= self.tie_band * self.temperature
            text += " = " if close and self._random.random() < self.tie_rate else " > "
            text += LETTERS[after]
        return text


def tiers(ranking: str) -> list[set[str]]:
    """'B > A = C > D' -> [{'B'}, {'A', 'C'}, {'D'}]."""
    return [set(part.split("=")) for part in ranking.replace(" ", "").split(">")]


def pairwise_agreement(first: Sequence[str | None], second: Sequence[str | None]) -> tuple[float, int]:
    """How often two annotators' rankings of the same items order a pair of answers the same
    way, over the pairs both ordered (neither tied nor skipped): (agreement, pairs counted)."""
    agree = counted = 0
    for a, b in zip(first, second):
        if a is None or b is None:
            continue
        rank_a = {letter: i for i, tier in enumerate(tiers(a)) for letter in tier}
        rank_b = {letter: i for i, tier in enumerate(tiers(b)) for letter in tier}
        letters = sorted(rank_a)
        for i, x in enumerate(letters):
            for y in letters[i + 1:]:
                da, db = rank_a[x] - rank_a[y], rank_b[x] - rank_b[y]
                if da and db:
                    counted += 1
                    agree += (da > 0) == (db > 0)
    if not counted:
        raise ValueError("no pair was ordered by both annotators")
    return agree / counted, counted
