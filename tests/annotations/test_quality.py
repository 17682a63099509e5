"""Annotation quality on hand-made stores whose numbers are worked out in the comments:
preference units, pairwise agreement, Krippendorff's alpha, gold accuracy, decision times,
and the per-pair weights and filters that export (library and CLI) applies."""

import json
import os
import subprocess
import sys
from fractions import Fraction

import pytest

from annotations import InvalidInput, open_db
from annotations.formats import export_pairs, import_file, pair_rows
from annotations.quality import (
    agreement_report,
    pair_quality,
    pair_weights,
    select_pair_ids,
    set_weighting,
    unit_values,
)
from annotations.store import add_candidates, add_prompt, add_user, queue_items, set_gold, submit_judgement
from tests.conftest import REPO

from tests.annotations.conftest import ANNOTATORS, PASSWORD  # noqa: F401


# ---------------------------------------------------------------- helpers


def ready_item(db, text, *, k=2, overlap=3):
    """A ready item with k model answers; candidate ids ascend in the order returned."""
    prompt_id, _ = add_prompt(db, text)
    (item_id,) = queue_items(db, [prompt_id], mode="pairwise" if k == 2 else "ranking", k=k, overlap=overlap)
    answers = [{"text": f"answer {i} to {text}", "policy_version": "base"} for i in range(k)]
    return item_id, add_candidates(db, item_id, answers)


# A pairwise item's one unit is (a, b) with a < b; these judgements give it the value named.
def judge_value(db, user_id, item_id, a, b, value, **options):
    ranking = {1: [[a], [b]], -1: [[b], [a]], 0: [[a, b]], "both_bad": [[a, b]]}[value]
    return submit_judgement(db, user_id, item_id, ranking, shown_order=[a, b], both_bad=value == "both_bad",
                            **options)


def approx(fraction):
    return pytest.approx(float(Fraction(fraction)))


# ---------------------------------------------------------------- unit_values


def test_unit_values_orders_pairs_by_candidate_id():
    # 3 is ranked first, 1 and 2 tie below it.
    assert unit_values([[3], [1, 2]], [1, 2, 3]) == {(1, 2): 0, (1, 3): -1, (2, 3): -1}


def test_unit_values_ignores_written_answer_in_first_tier():
    assert unit_values([[99], [1], [2]], [1, 2]) == {(1, 2): 1}


def test_unit_values_both_bad_makes_every_unit_a_tie():
    assert unit_values([[2], [1], [3]], [1, 2, 3], both_bad=True) == {(1, 2): 0, (1, 3): 0, (2, 3): 0}


def test_unit_values_skips_candidate_missing_from_ranking():
    assert unit_values([[1], [2]], [1, 2, 3]) == {(1, 2): 1}


# ---------------------------------------------------------------- agreement and alpha, worked by hand

# Three annotators judge four pairwise items; each item is one unit. Values (+1: the lower
# candidate id wins, -1: it loses, 0: tie or both bad):
#
#            ann   bob   cat
#   unit 1   +1    +1    +1
#   unit 2   +1    +1    -1
#   unit 3    0     0    +1      (bob's 0 is a "both bad")
#   unit 4   -1    -1    -1
#
# Pairwise agreement per unit (3 annotator pairs each): 1, 1/3, 1/3, 1 -> mean 2/3.
# Per annotator, over (annotator, other) pairs: ann agrees on 2+1+1+2 = 6 of 8 -> 3/4,
# bob likewise 3/4, cat on 2+0+0+2 = 4 of 8 -> 1/2.
#
# Krippendorff's alpha, nominal. Coincidence matrix o[c][k]: each unit adds, for every
# ordered pair of values from different annotators, 1/(m_u - 1) = 1/2.
#   unit 1: six (+,+) pairs                      -> o[+][+] += 3
#   unit 2: (+,+)x2, (+,-)x2, (-,+)x2            -> o[+][+] += 1, o[+][-] += 1, o[-][+] += 1
#   unit 3: (0,0)x2, (0,+)x2, (+,0)x2            -> o[0][0] += 1, o[0][+] += 1, o[+][0] += 1
#   unit 4: six (-,-) pairs                      -> o[-][-] += 3
#          -1   0  +1
#   -1  [   3   0   1 ]   n_-1 = 4
#    0  [   0   1   1 ]   n_0  = 2
#   +1  [   1   1   4 ]   n_+1 = 6      n = 12 pairable values
# Observed disagreement D_o = (sum of o off the diagonal) / n = 4/12 = 1/3.
# Expected disagreement D_e = sum_{c != k} n_c n_k / (n (n - 1))
#                           = 2 (4*2 + 4*6 + 2*6) / (12*11) = 88/132 = 2/3.
# alpha = 1 - D_o / D_e = 1 - (1/3) / (2/3) = 1/2.
HAND_VALUES = {
    "ann": (1, 1, 0, -1),
    "bob": (1, 1, "both_bad", -1),
    "cat": (1, -1, 1, -1),
}


@pytest.fixture
def hand_store(db, users):
    items = [ready_item(db, f"unit {u}") for u in range(1, 5)]
    for name, values in HAND_VALUES.items():
        for (item_id, (a, b)), value in zip(items, values):
            judge_value(db, users[name], item_id, a, b, value)
    return db


def test_agreement_report_alpha_matches_hand_computation(hand_store):
    assert agreement_report(hand_store)["alpha"] == approx("1/2")


def test_agreement_report_pairwise_agreement_matches_hand_computation(hand_store):
    report = agreement_report(hand_store)
    assert report["pairwise_agreement"] == approx("2/3")
    assert (report["judgements"], report["units"], report["shared_units"]) == (12, 4, 4)


def test_agreement_report_per_annotator_agreement_matches_hand_computation(hand_store):
    annotators = agreement_report(hand_store)["annotators"]
    assert {name: a["agreement"] for name, a in annotators.items()} == {
        "ann": approx("3/4"), "bob": approx("3/4"), "cat": approx("1/2")}
    assert {name: (a["judgements"], a["shared_units"]) for name, a in annotators.items()} == {
        "ann": (4, 4), "bob": (4, 4), "cat": (4, 4)}


def test_agreement_report_unit_judged_once_changes_no_agreement(hand_store, users):
    item_id, (a, b) = ready_item(hand_store, "judged once")
    judge_value(hand_store, users["cat"], item_id, a, b, -1)
    report = agreement_report(hand_store)
    assert (report["alpha"], report["pairwise_agreement"]) == (approx("1/2"), approx("2/3"))
    assert (report["units"], report["shared_units"]) == (5, 4)
    assert report["annotators"]["cat"]["agreement"] == approx("1/2")


def test_agreement_report_overall_rate_weighs_each_unit_once(db, users):
    # Unit 1: three annotators agree (3 of 3 pairs). Unit 2: two disagree (0 of 1 pair).
    # Mean over units: (1 + 0) / 2 = 1/2 (pooling the pairs would give 3/4).
    (first, (a, b)), (second, (c, d)) = ready_item(db, "first"), ready_item(db, "second")
    for name in ANNOTATORS:
        judge_value(db, users[name], first, a, b, 1)
    judge_value(db, users["ann"], second, c, d, 1)
    judge_value(db, users["bob"], second, c, d, -1)
    assert agreement_report(db)["pairwise_agreement"] == approx("1/2")


def test_agreement_report_ranking_item_ignores_written_answer(db, users):
    # Candidates a < b < c. ann ranks a > b > c: (a,b) +1, (a,c) +1, (b,c) +1.
    # bob ranks b > {a, c} and writes his own answer, stored first: [[h], [b], [a, c]]:
    # (a,b) -1, (a,c) 0, (b,c) +1. They agree on one unit of three.
    item_id, (a, b, c) = ready_item(db, "rank three", k=3, overlap=2)
    submit_judgement(db, users["ann"], item_id, [[a], [b], [c]], shown_order=[a, b, c])
    submit_judgement(db, users["bob"], item_id, [[b], [a, c]], shown_order=[a, b, c], human_text="Mine.")
    report = agreement_report(db)
    assert (report["units"], report["shared_units"]) == (3, 3)
    assert report["annotators"]["ann"]["agreement"] == approx("1/3")
    assert report["annotators"]["bob"]["agreement"] == approx("1/3")
    assert report["pairwise_agreement"] == approx("1/3")


def test_agreement_report_alpha_is_none_without_variation(db, users):
    item_id, (a, b) = ready_item(db, "all agree")
    for name in ANNOTATORS:
        judge_value(db, users[name], item_id, a, b, 1)
    report = agreement_report(db)
    assert (report["alpha"], report["pairwise_agreement"]) == (None, 1.0)


def test_agreement_report_on_empty_store_has_nothing_to_count(db):
    assert agreement_report(db) == {"judgements": 0, "units": 0, "shared_units": 0,
                                    "pairwise_agreement": None, "alpha": None, "annotators": {}}


# ---------------------------------------------------------------- gold accuracy and decision times

# Gold item 1 (a < b < c), gold ranking a > b > c: units (a,b) +1, (a,c) +1, (b,c) +1.
#   ann ranks a > c > b: +1, +1, -1 -> 2 of 3 right;  bob ranks as gold: 3 of 3.
# Gold item 2 (x < y), gold says tie: unit (x,y) 0.
#   ann prefers x: +1, wrong;  bob says both bad: 0, right.
# Gold accuracy: ann 2/4 = 1/2, bob 4/4 = 1; cat judged no gold item: None.
@pytest.fixture
def gold_store(db, users):
    first, (a, b, c) = ready_item(db, "gold ranking", k=3, overlap=1)
    second, (x, y) = ready_item(db, "gold tie", overlap=1)
    plain, (p, q) = ready_item(db, "not gold")
    set_gold(db, first, [[a], [b], [c]])
    set_gold(db, second, [[x, y]])
    submit_judgement(db, users["ann"], first, [[a], [c], [b]], shown_order=[a, b, c], decision_ms=100)
    submit_judgement(db, users["bob"], first, [[a], [b], [c]], shown_order=[a, b, c], decision_ms=200)
    judge_value(db, users["ann"], second, x, y, 1, decision_ms=1000)
    judge_value(db, users["bob"], second, x, y, "both_bad")
    judge_value(db, users["ann"], plain, p, q, 1, decision_ms=300)
    judge_value(db, users["cat"], plain, p, q, -1)
    return db


def test_agreement_report_gold_accuracy_per_annotator(gold_store):
    annotators = agreement_report(gold_store)["annotators"]
    assert {name: (a["gold_units"], a["gold_accuracy"]) for name, a in annotators.items()} == {
        "ann": (4, approx("1/2")), "bob": (4, 1.0), "cat": (0, None)}


def test_agreement_report_median_decision_time_per_annotator(gold_store):
    # ann: 100, 1000, 300 -> 300; bob: 200 (one judgement without a time); cat: none.
    annotators = agreement_report(gold_store)["annotators"]
    assert {name: a["median_decision_ms"] for name, a in annotators.items()} == {"ann": 300, "bob": 200, "cat": None}


# ---------------------------------------------------------------- pair weights and filters

# Item X (a < b), three judgements: ann and bob prefer a, cat prefers b.
#   ann's pair (a,b) and bob's agree with 2 of 3 judgements; cat's (b,a) with 1 of 3.
# Gold item G (g < h), gold g > h: ann prefers g (right), cat prefers h (wrong); bob skips it.
#   ann's and cat's pairs each agree with 1 of 2 judgements.
#   Gold accuracy: ann 1, cat 0, bob None (never met gold).
# One imported pair: no unit, no annotator.
#
#   pair        agreement  annotator accuracy
#   ann_x         2/3        1
#   bob_x         2/3        None
#   cat_x         1/3        0
#   ann_g         1/2        1
#   cat_g         1/2        0
#   imported      None       None
@pytest.fixture
def pairs_store(db, users, tmp_path):
    x, (a, b) = ready_item(db, "item X")
    g, (gold_first, gold_second) = ready_item(db, "item G")
    set_gold(db, g, [[gold_first], [gold_second]])
    judgements = {
        "ann_x": judge_value(db, users["ann"], x, a, b, 1),
        "bob_x": judge_value(db, users["bob"], x, a, b, 1),
        "cat_x": judge_value(db, users["cat"], x, a, b, -1),
        "ann_g": judge_value(db, users["ann"], g, gold_first, gold_second, 1),
        "cat_g": judge_value(db, users["cat"], g, gold_first, gold_second, -1),
    }
    source = tmp_path / "imported.jsonl"
    source.write_text(json.dumps({"prompt": "Imported?", "chosen": "Yes.", "rejected": "No."}) + "\n")
    import_file(db, source, "trl", queue=False)
    ids = {name: db.execute("SELECT id FROM pairs WHERE judgement_id = ?", [j["judgement_id"]]).fetchone()[0]
           for name, j in judgements.items()}
    ids["imported"] = db.execute("SELECT id FROM pairs WHERE source = 'import'").fetchone()[0]
    return ids


def named(ids, values):
    """{pair name: value} from {pair id: value}."""
    by_id = {pair_id: name for name, pair_id in ids.items()}
    return {by_id[pair_id]: value for pair_id, value in values.items()}


def test_pair_quality_agreement_and_accuracy_match_hand_table(db, pairs_store):
    quality = named(pairs_store, pair_quality(db))
    assert {name: (q.agreement, q.annotator_accuracy) for name, q in quality.items()} == {
        "ann_x": (approx("2/3"), 1.0), "bob_x": (approx("2/3"), None), "cat_x": (approx("1/3"), 0.0),
        "ann_g": (0.5, 1.0), "cat_g": (0.5, 0.0), "imported": (None, None)}


def test_pair_weights_by_agreement(db, pairs_store):
    assert named(pairs_store, pair_weights(db, by_agreement=True)) == {
        "ann_x": approx("2/3"), "bob_x": approx("2/3"), "cat_x": approx("1/3"),
        "ann_g": 0.5, "cat_g": 0.5, "imported": 1.0}


def test_pair_weights_by_annotator_accuracy_unknown_accuracy_counts_one(db, pairs_store):
    # trust = (right + 2) / (units + 2): ann 1 of 1 -> 1, cat 0 of 1 -> 2/3, bob no gold -> 1
    assert named(pairs_store, pair_weights(db, by_annotator_accuracy=True)) == {
        "ann_x": 1.0, "bob_x": 1.0, "cat_x": approx("2/3"), "ann_g": 1.0, "cat_g": approx("2/3"), "imported": 1.0}


def test_pair_weights_by_both_multiply(db, pairs_store):
    assert named(pairs_store, pair_weights(db, by_agreement=True, by_annotator_accuracy=True)) == {
        "ann_x": approx("2/3"), "bob_x": approx("2/3"), "cat_x": approx("2/9"), "ann_g": 0.5, "cat_g": approx("1/3"),
        "imported": 1.0}


def test_stored_weights_are_agreement_times_trust_by_default(db, pairs_store):
    stored = dict(db.execute("SELECT id, weight FROM pairs").fetchall())
    assert named(pairs_store, stored) == named(pairs_store, pair_weights(db, by_agreement=True,
                                                                         by_annotator_accuracy=True))


def test_pair_weights_multiply_source_weight(db, pairs_store):
    set_weighting(db, {"sources": {"annotation": 0.5, "import": 2.0}})
    weights = pair_weights(db, by_agreement=True)
    assert weights[pairs_store["ann_x"]] == approx("1/3")
    assert weights[pairs_store["imported"]] == 2.0
    stored = dict(db.execute("SELECT id, weight FROM pairs").fetchall())
    assert stored[pairs_store["cat_x"]] == approx("1/9")  # 0.5 x 1/3 x 2/3, re-weighed when the settings changed
    assert stored[pairs_store["imported"]] == 2.0


def test_set_weighting_factors_off_leaves_source_weight(db, pairs_store):
    set_weighting(db, {"agreement": False, "annotator_accuracy": False})
    assert set(dict(db.execute("SELECT id, weight FROM pairs").fetchall()).values()) == {1.0}


@pytest.mark.parametrize("bad", [{"sources": {"email": 1.0}}, {"sources": {"arena": -1}}, {"agreement": "yes"},
                                 {"votes": True}])
def test_set_weighting_rejects_bad_value(db, bad):
    with pytest.raises(InvalidInput):
        set_weighting(db, bad)


def test_weight_follows_a_later_judgement_of_the_same_item(db, users):
    x, (a, b) = ready_item(db, "item Y")
    first = judge_value(db, users["ann"], x, a, b, 1)
    pair_id = db.execute("SELECT id FROM pairs WHERE judgement_id = ?", [first["judgement_id"]]).fetchone()[0]
    assert db.execute("SELECT weight FROM pairs WHERE id = ?", [pair_id]).fetchone()[0] == 1.0
    judge_value(db, users["bob"], x, a, b, -1)
    assert db.execute("SELECT weight FROM pairs WHERE id = ?", [pair_id]).fetchone()[0] == 0.5


def test_weight_follows_the_annotators_gold_record(db, users):
    x, (a, b) = ready_item(db, "item Z")
    g, (first, second) = ready_item(db, "gold Z")
    mine = judge_value(db, users["cat"], x, a, b, 1)
    judge_value(db, users["cat"], g, first, second, -1)
    pair_id = db.execute("SELECT id FROM pairs WHERE judgement_id = ?", [mine["judgement_id"]]).fetchone()[0]
    assert db.execute("SELECT weight FROM pairs WHERE id = ?", [pair_id]).fetchone()[0] == 1.0
    set_gold(db, g, [[first], [second]])  # cat got the gold item wrong: 0 of 1 -> trust 2/3
    assert db.execute("SELECT weight FROM pairs WHERE id = ?", [pair_id]).fetchone()[0] == approx("2/3")


def test_select_pair_ids_min_agreement_keeps_pairs_without_unit(db, pairs_store):
    assert select_pair_ids(db, min_agreement=0.6) == {pairs_store[n] for n in ("ann_x", "bob_x", "imported")}


def test_select_pair_ids_min_agreement_is_inclusive(db, pairs_store):
    assert select_pair_ids(db, min_agreement=0.5) == set(pairs_store.values()) - {pairs_store["cat_x"]}


def test_select_pair_ids_min_annotator_accuracy_keeps_annotator_without_gold(db, pairs_store):
    assert select_pair_ids(db, min_annotator_accuracy=0.5) == {
        pairs_store[n] for n in ("ann_x", "bob_x", "ann_g", "imported")}


def test_select_pair_ids_without_filters_keeps_every_pair(db, pairs_store):
    assert select_pair_ids(db) == set(pairs_store.values())


@pytest.mark.parametrize("option", ["min_agreement", "min_annotator_accuracy"])
def test_select_pair_ids_rejects_value_outside_zero_one(db, option):
    with pytest.raises(InvalidInput, match=option):
        select_pair_ids(db, **{option: 1.5})


def test_select_pair_ids_written_answer_pairs_have_no_agreement_to_filter(db, users):
    # ann: a > b and her own answer h above both -> (h,a), (h,b), (a,b); bob: b > a -> (b,a).
    # (a,b) and (b,a) each agree with 1 of 2 judgements; (h,a), (h,b) have no unit and stay.
    item_id, (a, b) = ready_item(db, "write", overlap=2)
    judge_value(db, users["ann"], item_id, a, b, 1, human_text="Mine.")
    judge_value(db, users["bob"], item_id, a, b, -1)
    kept = select_pair_ids(db, min_agreement=0.75)
    rows = db.execute("SELECT id, chosen, rejected_candidate_id FROM pairs").fetchall()
    assert {(chosen, rejected) for pair_id, chosen, rejected in rows if pair_id in kept} == {("Mine.", a), ("Mine.", b)}


# ---------------------------------------------------------------- export


def test_pair_rows_filters_apply_without_meta(db, pairs_store):
    rows = pair_rows(db, min_agreement=0.6, min_annotator_accuracy=0.5)
    assert len(rows) == 3 and all(set(row) == {"prompt", "chosen", "rejected"} for row in rows)


def test_pair_rows_weight_by_agreement_fills_weight_column(db, pairs_store):
    rows = pair_rows(db, with_meta=True, weight_by="agreement")
    assert named(pairs_store, {row["id"]: row["weight"] for row in rows}) == {
        "ann_x": approx("2/3"), "bob_x": approx("2/3"), "cat_x": approx("1/3"),
        "ann_g": 0.5, "cat_g": 0.5, "imported": 1.0}


def test_pair_rows_weight_by_accuracy_with_filter(db, pairs_store):
    rows = pair_rows(db, with_meta=True, weight_by="accuracy", min_agreement=0.5)
    assert named(pairs_store, {row["id"]: row["weight"] for row in rows}) == {
        "ann_x": 1.0, "bob_x": 1.0, "ann_g": 1.0, "cat_g": approx("2/3"), "imported": 1.0}


def test_pair_rows_without_weight_by_keeps_stored_weight(db, pairs_store):
    rows = pair_rows(db, with_meta=True)
    stored = dict(db.execute("SELECT id, weight FROM pairs").fetchall())
    assert {row["id"]: row["weight"] for row in rows} == stored


def test_pair_rows_rejects_unknown_weight_by(db, pairs_store):
    with pytest.raises(InvalidInput, match="weight_by"):
        pair_rows(db, weight_by="votes")


def test_export_pairs_says_when_filters_leave_nothing(db, users, tmp_path):
    item_id, (a, b) = ready_item(db, "split vote", overlap=2)
    judge_value(db, users["ann"], item_id, a, b, 1)
    judge_value(db, users["bob"], item_id, a, b, -1)
    with pytest.raises(InvalidInput, match="filters"):
        export_pairs(db, tmp_path / "out.jsonl", min_agreement=0.9)
    assert not (tmp_path / "out.jsonl").exists()


# ---------------------------------------------------------------- CLI


def run_cli(*args, home):
    env = {**os.environ, "RANKLOOP_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "annotations", *map(str, args)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )


def test_cli_export_filters_and_weights_pairs(db, pairs_store, tmp_path):
    out = tmp_path / "out.jsonl"
    result = run_cli("--db", tmp_path / "rankloop.db", "export", "--out", out, "--with-meta",
                     "--min-agreement", "0.6", "--min-annotator-accuracy", "0.5", "--weight-by", "agreement",
                     home=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert named(pairs_store, {row["id"]: row["weight"] for row in rows}) == {
        "ann_x": approx("2/3"), "bob_x": approx("2/3"), "imported": 1.0}


def test_cli_export_rejects_agreement_above_one(db, tmp_path):
    result = run_cli("--db", tmp_path / "rankloop.db", "export", "--out", tmp_path / "o.jsonl",
                     "--min-agreement", "2", home=tmp_path)
    assert result.returncode == 2
    assert "min_agreement" in result.stderr and "Traceback" not in result.stderr


def test_cli_quality_prints_report_table(hand_store, tmp_path):
    result = run_cli("--db", tmp_path / "rankloop.db", "quality", home=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "pairwise agreement 0.667, Krippendorff's alpha (nominal) 0.500" in lines
    cat = next(line for line in lines if line.startswith("cat "))
    assert cat.split() == ["cat", "4", "4", "0.500", "0", "-", "-"]


def test_select_pairs_drops_pairs_below_the_agreement_bar(db, users):
    # Two annotators disagree on one item: each pair agrees with half the judgements.
    from annotations import training_data

    item, (a, b) = ready_item(db, "q?", overlap=2)
    submit_judgement(db, users["ann"], item, [[a], [b]], shown_order=[a, b])
    submit_judgement(db, users["bob"], item, [[b], [a]], shown_order=[a, b])
    assert len(training_data.select_pairs(db, split=None)) == 2
    assert training_data.select_pairs(db, split=None, min_agreement=0.6) == []
