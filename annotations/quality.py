"""Annotation quality: how far annotators agree, how well they do on gold items, and the
per-pair weights and filters that export and training derive from that.

The unit of agreement is a *preference unit*: one unordered pair of model answers (never a
human-written one) of a judged item, named (item id, lower candidate id, higher candidate id).
Every judgement of the item gives each of its units one value:

    +1  the lower candidate id is ranked above the higher one
    -1  the lower candidate id is ranked below the higher one
     0  both sit in the same tier (a tie), or the judgement says "both bad"

A judgement's ranking is a list of tiers, best first. A written answer the annotator added sits
in the first tier; it belongs to no unit and is ignored here. Judgements on gold items count
like any other; the gold ranking itself is no annotator and only scores them.

Definitions (each statistic is None where it has nothing to count):
  - pairwise agreement of a unit with n >= 2 judgements: the fraction of its n(n-1)/2
    annotator pairs that gave the same value. The overall rate is the mean over those units,
    each unit counting once, so an item everyone judged (a gold item) does not outweigh the rest.
  - an annotator's agreement: over the units they share with at least one other annotator,
    the fraction of (them, other annotator) pairs that gave the same value.
  - Krippendorff's alpha, nominal level over {-1, 0, +1}: every disagreement costs the same.
    A tie is not "halfway" between two preferences: "both bad" is a tie too and says
    something else than "these two are equally good", so the values are kept as categories
    and alpha asks the same question as the agreement rate (same value or not). Alpha is
    undefined (None) when fewer than two values can be paired or when every value is the same.
  - gold accuracy: over the annotator's units on gold items, the fraction whose value equals
    the gold ranking's value for that unit (a tie in gold must be judged a tie).
  - item agreement of a derived pair: the fraction of its unit's judgements whose value agrees
    with the pair's direction (chosen over rejected); 1.0 when one judgement is all there is.
    A pair with no unit (imported pairs, pairs with a written answer) has no item agreement.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from typing import Sequence

from annotations.errors import InvalidInput

VALUES = (-1, 0, 1)
WEIGHT_BY = ("agreement", "accuracy")

Unit = tuple[int, int, int]  # (item id, lower candidate id, higher candidate id)


def unit_values(
    ranking: Sequence[Sequence[int]], candidate_ids: Sequence[int], *, both_bad: bool = False
) -> dict[tuple[int, int], int]:
    """The value (+1, -1 or 0) a ranking gives each unordered pair of `candidate_ids`, keyed
    (lower id, higher id). Ids in the ranking that are not candidates (a written answer) are
    ignored; a candidate the ranking leaves out gives no value. "Both bad" makes every value 0."""
    tier_of = {}
    for position, tier in enumerate(ranking):
        for candidate_id in tier:
            tier_of[candidate_id] = position
    values = {}
    for low, high in combinations(sorted(set(candidate_ids)), 2):
        if low not in tier_of or high not in tier_of:
            continue
        if both_bad or tier_of[low] == tier_of[high]:
            values[(low, high)] = 0
        else:
            values[(low, high)] = 1 if tier_of[low] < tier_of[high] else -1
    return values


@dataclass
class _Annotator:
    name: str
    judgements: int = 0
    decision_ms: list[int] = field(default_factory=list)


@dataclass
class _Judged:
    """Everything quality is computed from, read from the store in one pass."""

    values: dict[Unit, dict[int, int]]  # unit -> {user id: value}
    gold: dict[Unit, int]  # unit -> gold value, for units of gold items
    annotators: dict[int, _Annotator]  # user id -> name, judgement count, decision times


def _read_judged(db, items: str = "", params: Sequence = ()) -> _Judged:
    """Everything quality needs, for every item, or for those the SQL condition `items` on
    `item_id` selects (e.g. "item_id IN (...)")."""
    scope = f" AND {items}" if items else ""
    model_ids = defaultdict(list)
    for item_id, candidate_id in db.execute(
        "SELECT item_id, id FROM candidates WHERE policy_version IS NOT NULL AND item_id IN"
        " (SELECT item_id FROM judgements UNION SELECT id FROM items WHERE gold IS NOT NULL)" + scope, list(params)
    ).fetchall():
        model_ids[item_id].append(candidate_id)
    values: dict[Unit, dict[int, int]] = defaultdict(dict)
    annotators: dict[int, _Annotator] = {}
    for item_id, user_id, name, ranking, both_bad, decision_ms in db.execute(
        "SELECT j.item_id, j.user_id, users.name, j.ranking, j.both_bad, j.decision_ms"
        " FROM judgements j JOIN users ON users.id = j.user_id WHERE 1" + scope.replace("item_id", "j.item_id")
        + " ORDER BY j.id", list(params)
    ).fetchall():
        annotator = annotators.setdefault(user_id, _Annotator(name))
        annotator.judgements += 1
        if decision_ms is not None:
            annotator.decision_ms.append(decision_ms)
        for (low, high), value in unit_values(json.loads(ranking), model_ids[item_id], both_bad=bool(both_bad)).items():
            values[(item_id, low, high)][user_id] = value
    gold = {}
    for item_id, ranking in db.execute(
        "SELECT id, gold FROM items WHERE gold IS NOT NULL" + scope.replace("item_id", "id"), list(params)
    ).fetchall():
        for (low, high), value in unit_values(json.loads(ranking), model_ids[item_id]).items():
            gold[(item_id, low, high)] = value
    return _Judged(dict(values), gold, annotators)


def _fraction(numerator: int | float, denominator: int | float) -> float | None:
    return numerator / denominator if denominator else None


def _alpha(units: list[dict[int, int]]) -> float | None:
    """Nominal Krippendorff's alpha from the units' values (units with one value drop out)."""
    import krippendorff  # numpy comes with it: loaded only when a report is asked for
    import numpy as np

    counts = [Counter(unit.values()) for unit in units if len(unit) >= 2]
    seen = set().union(*counts) if counts else set()
    if len(seen) < 2:  # nothing to pair, or no variation at all: expected disagreement is 0
        return None
    value_counts = np.array([[c[v] for v in VALUES] for c in counts])
    return float(krippendorff.alpha(value_counts=value_counts, value_domain=list(VALUES),
                                    level_of_measurement="nominal"))


def _gold_accuracy(judged: _Judged) -> dict[int, tuple[int, int]]:
    """user id -> (units on gold items whose value matches gold, units on gold items)."""
    scores = defaultdict(lambda: [0, 0])
    for unit, gold_value in judged.gold.items():
        for user_id, value in judged.values.get(unit, {}).items():
            scores[user_id][0] += value == gold_value
            scores[user_id][1] += 1
    return {user_id: (right, total) for user_id, (right, total) in scores.items()}


def agreement_report(db) -> dict:
    """Inter-annotator agreement and gold accuracy over all judgements (see the module notes).

    Returns {"judgements", "units", "shared_units", "pairwise_agreement", "alpha",
    "annotators": {name: {"user_id", "judgements", "shared_units", "agreement", "gold_units",
    "gold_accuracy", "median_decision_ms"}}}. `units` counts judged units, `shared_units`
    those with at least two judgements; rates are None where there is nothing to count.
    """
    judged = _read_judged(db)
    shared = [unit for unit in judged.values.values() if len(unit) >= 2]
    unit_rates = []
    agreeing = defaultdict(int)  # user id -> (user, other) pairs with the same value
    compared = defaultdict(int)  # user id -> (user, other) pairs
    shared_units = defaultdict(int)
    for unit in shared:
        counts = Counter(unit.values())
        n = len(unit)
        unit_rates.append(sum(c * (c - 1) for c in counts.values()) / (n * (n - 1)))
        for user_id, value in unit.items():
            agreeing[user_id] += counts[value] - 1
            compared[user_id] += n - 1
            shared_units[user_id] += 1
    gold = _gold_accuracy(judged)
    annotators = {}
    for user_id, annotator in sorted(judged.annotators.items(), key=lambda kv: kv[1].name):
        right, total = gold.get(user_id, (0, 0))
        annotators[annotator.name] = {
            "user_id": user_id,
            "judgements": annotator.judgements,
            "shared_units": shared_units[user_id],
            "agreement": _fraction(agreeing[user_id], compared[user_id]),
            "gold_units": total,
            "gold_accuracy": _fraction(right, total),
            "median_decision_ms": statistics.median(annotator.decision_ms) if annotator.decision_ms else None,
        }
    return {
        "judgements": sum(a.judgements for a in judged.annotators.values()),
        "units": len(judged.values),
        "shared_units": len(shared),
        "pairwise_agreement": statistics.fmean(unit_rates) if unit_rates else None,
        "alpha": _alpha(shared),
        "annotators": annotators,
    }


def format_report(report: dict) -> str:
    """The report as plain text: the overall figures, then one table row per annotator."""

    def show(value, fmt="{:.3f}"):
        return "-" if value is None else fmt.format(value)

    lines = [
        f"judgements {report['judgements']}, units {report['units']} "
        f"({report['shared_units']} judged by two or more annotators)",
        f"pairwise agreement {show(report['pairwise_agreement'])}, "
        f"Krippendorff's alpha (nominal) {show(report['alpha'])}",
        "",
        f"{'annotator':16} {'judgements':>10} {'shared':>7} {'agreement':>9} {'gold':>6} "
        f"{'gold acc':>8} {'median ms':>10}",
    ]
    for name, a in report["annotators"].items():
        lines.append(
            f"{name:16} {a['judgements']:>10} {a['shared_units']:>7} {show(a['agreement']):>9} "
            f"{a['gold_units']:>6} {show(a['gold_accuracy']):>8} {show(a['median_decision_ms'], '{:.0f}'):>10}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- per-pair weights and filters


@dataclass(frozen=True)
class PairQuality:
    """What quality knows about one stored pair: its stored weight, its item agreement (None
    without a unit) and its annotator's gold accuracy (None: no annotator, or no gold seen)."""

    weight: float
    agreement: float | None
    annotator_accuracy: float | None


def pair_quality(db) -> dict[int, PairQuality]:
    """PairQuality for every stored pair, by pair id."""
    judged = _read_judged(db)
    accuracy = {user_id: right / total for user_id, (right, total) in _gold_accuracy(judged).items()}
    out = {}
    for pair_id, weight, user_id, chosen, rejected, item_id in db.execute(
        "SELECT pairs.id, pairs.weight, pairs.user_id, pairs.chosen_candidate_id, pairs.rejected_candidate_id,"
        " j.item_id FROM pairs LEFT JOIN judgements j ON j.id = pairs.judgement_id"
    ).fetchall():
        agreement = None
        unit = None
        if item_id is not None and chosen is not None and rejected is not None:
            unit = judged.values.get((item_id, min(chosen, rejected), max(chosen, rejected)))
        if unit:
            direction = 1 if chosen < rejected else -1
            agreement = sum(value == direction for value in unit.values()) / len(unit)
        out[pair_id] = PairQuality(weight, agreement, accuracy.get(user_id))
    return out


def _check_fraction(name: str, value: float | None) -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise InvalidInput(f"{name} must be a fraction between 0 and 1, not {value!r}")


def pair_weights(db, *, by_agreement: bool = False, by_annotator_accuracy: bool = False) -> dict[int, float]:
    """Weight of every pair, by pair id, as `refresh_pair_weights` computes it but with these
    factors instead of the project's settings: its source's weight, times its item agreement
    (`by_agreement`) and/or its annotator's trust (`by_annotator_accuracy`). A factor that is
    unknown (no unit, no annotator, no gold seen) counts as 1.0."""
    settings = {**weighting(db), "agreement": by_agreement, "annotator_accuracy": by_annotator_accuracy}
    rows = db.execute(
        "SELECT pairs.id, pairs.source, pairs.weight, pairs.user_id, pairs.chosen_candidate_id,"
        " pairs.rejected_candidate_id, j.item_id FROM pairs LEFT JOIN judgements j ON j.id = pairs.judgement_id"
    ).fetchall()
    return {row[0]: weight for row, weight in zip(rows, _weigh(db, rows, settings))}


def select_pair_ids(db, *, min_agreement: float | None = None, min_annotator_accuracy: float | None = None) -> set[int]:
    """Ids of the pairs that pass both filters: item agreement >= `min_agreement` and the
    annotator's gold accuracy >= `min_annotator_accuracy`. A pair whose value is unknown
    (an imported pair, a written answer; an annotator who met no gold item) is kept: the
    filters drop what is known to be doubtful, not what is unmeasured. None: no filter."""
    _check_fraction("min_agreement", min_agreement)
    _check_fraction("min_annotator_accuracy", min_annotator_accuracy)
    return {
        pair_id
        for pair_id, quality in pair_quality(db).items()
        if (min_agreement is None or quality.agreement is None or quality.agreement >= min_agreement)
        and (min_annotator_accuracy is None or quality.annotator_accuracy is None
             or quality.annotator_accuracy >= min_annotator_accuracy)
    }


def check_weight_by(weight_by: str | None) -> None:
    if weight_by is not None and weight_by not in WEIGHT_BY:
        raise InvalidInput(f"weight_by {weight_by!r} is unknown: use one of {', '.join(WEIGHT_BY)} (or none)")


# ---------------------------------------------------------------- training weights
#
# Every stored pair carries the weight training gives its loss (`pairs.weight`), computed here
# whenever a pair is derived, its item gets another judgement, its annotator's gold record
# changes, or an admin changes the weighting:
#
#     weight = source weight  x  item agreement (if on)  x  annotator trust (if on)
#
# - source weight: set by an admin per source (annotation, arena, chat, import), 1.0 by default;
# - item agreement: as defined above (1.0 for a unit judged once, or a pair without a unit);
# - annotator trust: the annotator's gold accuracy shrunk towards 1 by `GOLD_PRIOR_UNITS`
#   virtual correct units, (right + 2) / (units + 2): an annotator is trusted until gold
#   items show otherwise, and one wrong gold unit does not zero their work (0 of 1: 0.67,
#   0 of 10: 0.17, 9 of 10: 0.92). Unknown (no gold seen): 1.0.
# Filters (`select_pair_ids`) keep using the raw figures: they are explicit thresholds.

WEIGHT_SOURCES = ("annotation", "arena", "chat", "import")
PAIR_SOURCE = {"judgement": "annotation", "arena": "arena", "import": "import"}
GOLD_PRIOR_UNITS = 2
WEIGHTING_SETTING = "weighting"
DEFAULT_WEIGHTING = {"agreement": True, "annotator_accuracy": True, "sources": {s: 1.0 for s in WEIGHT_SOURCES}}
MAX_SOURCE_WEIGHT = 10.0


def check_weighting(value: dict | None) -> dict:
    """The weighting settings, complete and validated (InvalidInput says what is wrong)."""
    value = dict(value or {})
    unknown = set(value) - set(DEFAULT_WEIGHTING)
    if unknown:
        raise InvalidInput(f"unknown weighting key(s) {', '.join(sorted(unknown))}: use agreement, "
                           "annotator_accuracy, sources")
    out = {**DEFAULT_WEIGHTING, **value}
    for key in ("agreement", "annotator_accuracy"):
        if not isinstance(out[key], bool):
            raise InvalidInput(f"weighting {key} must be true or false")
    sources = {**DEFAULT_WEIGHTING["sources"], **(value.get("sources") or {})}
    for source, weight in sources.items():
        if source not in WEIGHT_SOURCES:
            raise InvalidInput(f"source {source!r} is unknown: use one of {', '.join(WEIGHT_SOURCES)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= MAX_SOURCE_WEIGHT:
            raise InvalidInput(f"the weight of source {source} must be a number from 0 to {MAX_SOURCE_WEIGHT:g}")
        sources[source] = float(weight)
    out["sources"] = sources
    return out


def weighting(db) -> dict:
    """The project's weighting settings (defaults where unset)."""
    from annotations.store import get_setting

    return check_weighting(get_setting(db, WEIGHTING_SETTING, None))


def set_weighting(db, value: dict) -> dict:
    """Store new weighting settings and re-weigh every pair, in one transaction."""
    from annotations.db import write_transaction
    from annotations.store import set_setting

    value = check_weighting(value)
    with write_transaction(db):
        set_setting(db, WEIGHTING_SETTING, value)
        refresh_pair_weights(db)
    return value


def annotator_trust(right: int, units: int) -> float:
    """Gold accuracy shrunk towards 1: (right + GOLD_PRIOR_UNITS) / (units + GOLD_PRIOR_UNITS)."""
    return (right + GOLD_PRIOR_UNITS) / (units + GOLD_PRIOR_UNITS)


def _gold_record(db, user_ids: Sequence[int] | None) -> dict[int, tuple[int, int]]:
    """user id -> (right, units) on gold items, for `user_ids` (None: everyone)."""
    judged = _read_judged(db, "item_id IN (SELECT id FROM items WHERE gold IS NOT NULL)")
    record = _gold_accuracy(judged)
    return record if user_ids is None else {u: record[u] for u in user_ids if u in record}


def refresh_pair_weights(db, *, item_ids: Sequence[int] | None = None, user_ids: Sequence[int] | None = None,
                         pair_ids: Sequence[int] | None = None) -> int:
    """Recompute `pairs.weight` for the pairs of these items' judgements, of these users, and
    these pair ids (all pairs if none is given); returns how many weights changed. Runs in the
    caller's transaction (store functions call it inside theirs)."""
    settings = weighting(db)
    conditions, params = [], []
    for column, ids in (("j.item_id", item_ids), ("pairs.user_id", user_ids), ("pairs.id", pair_ids)):
        if ids is not None:
            conditions.append(f"{column} IN (SELECT value FROM json_each(?))")
            params.append(json.dumps([int(i) for i in ids]))
    if conditions and not any(json.loads(p) for p in params):
        return 0
    rows = db.execute(
        "SELECT pairs.id, pairs.source, pairs.weight, pairs.user_id, pairs.chosen_candidate_id,"
        " pairs.rejected_candidate_id, j.item_id FROM pairs LEFT JOIN judgements j ON j.id = pairs.judgement_id"
        + (" WHERE " + " OR ".join(conditions) if conditions else ""), params
    ).fetchall()
    changed = 0
    for (pair_id, *_), weight, old in zip(rows, _weigh(db, rows, settings), (r[2] for r in rows)):
        if abs(weight - old) > 1e-12:
            db.execute("UPDATE pairs SET weight = ? WHERE id = ?", [weight, pair_id])
            changed += 1
    return changed


def _weigh(db, rows, settings: dict) -> list[float]:
    """The weight of each pair row (id, source, stored weight, user id, chosen candidate,
    rejected candidate, item id) under `settings`."""
    items = sorted({r[6] for r in rows if r[6] is not None})
    values = _read_judged(db, "item_id IN (SELECT value FROM json_each(?))", [json.dumps(items)]).values \
        if settings["agreement"] and items else {}
    gold = _gold_record(db, sorted({r[3] for r in rows if r[3] is not None})) \
        if settings["annotator_accuracy"] else {}
    weights = []
    for _, source, _, user_id, chosen, rejected, item_id in rows:
        weight = settings["sources"][PAIR_SOURCE.get(source, "annotation")]
        if item_id is not None and chosen is not None and rejected is not None:
            unit = values.get((item_id, min(chosen, rejected), max(chosen, rejected)))
            if unit:
                direction = 1 if chosen < rejected else -1
                weight *= sum(value == direction for value in unit.values()) / len(unit)
        if user_id in gold:
            weight *= annotator_trust(*gold[user_id])
        weights.append(weight)
    return weights
