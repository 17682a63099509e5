"""The simulated annotators of the closed-loop benchmark: Bradley-Terry agreement worked by hand,
calibration, and the agreement two annotators reach on a fixed seed."""

from __future__ import annotations

import math
import random

import pytest

from bench.annotators import (
    HUMAN_AGREEMENT,
    SimulatedAnnotator,
    calibrate_temperature,
    expected_agreement,
    pairwise_agreement,
    tiers,
)


def test_expected_agreement_worked_by_hand():
    # a gap of ln 3 at T = 1: the gold order with p = 3/4, two annotators agree 9/16 + 1/16
    assert expected_agreement([math.log(3)], 1.0) == pytest.approx(0.625)
    assert expected_agreement([-math.log(3)], 1.0) == pytest.approx(0.625)  # the sign does not matter
    assert expected_agreement([0.0], 0.3) == pytest.approx(0.5)  # a coin toss each
    assert expected_agreement([math.log(3), 0.0], 1.0) == pytest.approx((0.625 + 0.5) / 2)


def test_calibration_finds_the_temperature_worked_by_hand():
    assert calibrate_temperature([math.log(3)], target=0.625) == pytest.approx(1.0, rel=1e-6)
    assert calibrate_temperature([2 * math.log(3)], target=0.625) == pytest.approx(2.0, rel=1e-6)
    with pytest.raises(ValueError, match="between 0.5 and 1"):
        calibrate_temperature([1.0], target=0.4)
    with pytest.raises(ValueError, match="every gold gap is zero"):
        calibrate_temperature([0.0, 0.0])


def gold_items(n: int, k: int = 4, seed: int = 7) -> list[list[float]]:
    rng = random.Random(seed)
    return [[rng.gauss(0, 1) for _ in range(k)] for _ in range(n)]


def gaps(items):
    return [a - b for scores in items for i, a in enumerate(scores) for b in scores[i + 1:]]


def test_two_calibrated_annotators_agree_as_often_as_people_on_a_fixed_seed():
    items = gold_items(1500)
    temperature = calibrate_temperature(gaps(items), HUMAN_AGREEMENT)
    first = SimulatedAnnotator("ann1", temperature, tie_rate=0, skip_rate=0, seed=1)
    second = SimulatedAnnotator("ann2", temperature, tie_rate=0, skip_rate=0, seed=1)
    agreement, pairs = pairwise_agreement([first.judge(s) for s in items], [second.judge(s) for s in items])
    assert pairs == 1500 * 6
    # within three standard errors of the target (about 0.015 here, pairs of one item not independent)
    assert abs(agreement - HUMAN_AGREEMENT) < 0.03, agreement


def test_with_ties_and_skips_agreement_stays_in_the_band_and_the_habits_show():
    items = gold_items(1500, seed=11)
    temperature = calibrate_temperature(gaps(items), HUMAN_AGREEMENT)
    people = [SimulatedAnnotator(f"ann{i}", temperature, seed=3) for i in (1, 2)]
    rankings = [[person.judge(s) for s in items] for person in people]
    agreement, _ = pairwise_agreement(*rankings)
    assert 0.60 <= agreement <= 0.68, agreement  # ties fall on close pairs, which agree least: a little higher
    skipped = sum(r is None for r in rankings[0]) / len(items)
    assert 0.005 <= skipped <= 0.04  # skip_rate 0.02
    tied = sum("=" in r for r in rankings[0] if r)
    assert tied > 0


def test_a_cold_annotator_follows_the_gold_order_and_writes_the_apps_ranking():
    person = SimulatedAnnotator("exact", temperature=1e-3, tie_rate=0, skip_rate=0)
    assert person.judge([0.1, 2.0, -1.0, 0.5]) == "B > D > A > C"
    tying = SimulatedAnnotator("tier", temperature=1e-3, tie_rate=1.0, tie_band=1e6, skip_rate=0)
    assert tiers(tying.judge([0.1, 2.0, -1.0, 0.5])) == [{"A", "B", "C", "D"}]
    with pytest.raises(ValueError, match="temperature must be above 0"):
        SimulatedAnnotator("bad", temperature=0)


def test_the_same_seed_gives_the_same_judgements():
    items = gold_items(50)
    runs = [[SimulatedAnnotator("ann", 0.8, seed=5).judge(s) for s in items] for _ in range(2)]
    assert runs[0] == runs[1]


def test_pairwise_agreement_worked_by_hand():
    # A>B agree, A>C agree, B>C disagree
    assert pairwise_agreement(["A > B > C"], ["A > C > B"]) == pytest.approx((2 / 3, 3))
    # A>B agree, A=C not counted, B>C against C>B disagree; the skipped item counts nothing
    assert pairwise_agreement(["A > B > C", None], ["A = C > B", "A > B"]) == pytest.approx((0.5, 2))
