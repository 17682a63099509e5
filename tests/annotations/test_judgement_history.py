"""Changing a judgement within its window (annotations/judgement_history.py): its pairs are
re-derived in one transaction, as new data, and a round that trained on the old pairs keeps a
true record of them."""

from datetime import datetime, timedelta, timezone

import pytest

from annotations import InvalidInput
from annotations.errors import PermissionDenied
from annotations.judgement_history import lineage_pairs, recent_judgements, revise_judgement
from annotations.store import next_item, set_setting, submit_judgement
from annotations.training_data import pair_watermark, select_pairs, snapshot_hash
from tests.annotations.conftest import ANNOTATORS  # noqa: F401
from tests.annotations.test_store import counts, ready_item


def judged(db, user_id, ranking_positions, k=3, **kwargs):
    """An item of k answers shown to the user and judged; returns (judgement id, shown order)."""
    ready_item(db, f"Question {ranking_positions}?", k=k)
    view = next_item(db, user_id)
    shown = view["shown_order"]
    tiers = [[shown[p] for p in tier] for tier in ranking_positions]
    result = submit_judgement(db, user_id, view["id"], tiers, shown_order=shown, **kwargs)
    return result["judgement_id"], shown


def pairs_of(db, judgement_id):
    return sorted(tuple(r) for r in db.execute(
        "SELECT chosen_candidate_id, rejected_candidate_id FROM pairs WHERE judgement_id = ?", [judgement_id]))


def test_a_change_rederives_the_pairs_as_new_rows_and_keeps_what_was_there(db, users):
    ann = users["ann"]
    old_id, (a, b, c) = judged(db, ann, [[0], [1], [2]])  # A > B > C
    old_pair_ids = [r[0] for r in db.execute("SELECT id FROM pairs WHERE judgement_id = ?", [old_id])]
    assert pairs_of(db, old_id) == sorted([(a, b), (a, c), (b, c)])
    watermark = pair_watermark(db)

    result = revise_judgement(db, ann, old_id, [[c], [a, b]])  # C > A = B
    new_id = result["judgement_id"]
    assert new_id > old_id and result == {"judgement_id": new_id, "previous_id": old_id, "pairs": 2}
    assert pairs_of(db, new_id) == sorted([(c, a), (c, b)]) and pairs_of(db, old_id) == []
    assert min(r[0] for r in db.execute("SELECT id FROM pairs WHERE judgement_id = ?", [new_id])) > watermark
    assert counts(db) == {"judgements": 1, "pairs": 2, "ratings": 0}
    [before] = [r[0] for r in db.execute("SELECT before FROM judgement_revisions")]
    import json

    assert [p["id"] for p in json.loads(before)["pairs"]] == old_pair_ids
    [shown] = recent_judgements(db, ann)
    assert shown["judgement_id"] == new_id and shown["ranking"] == "C > A = B" and shown["revisions"] == 1
    assert db.execute("PRAGMA foreign_key_check").fetchall() == []


def test_a_round_that_trained_on_the_old_pairs_keeps_its_snapshot(db, users):
    first, (a, b, c) = judged(db, users["ann"], [[0], [1], [2]])
    judged(db, users["bob"], [[1], [0, 2]])
    watermark = pair_watermark(db)
    trained_on = select_pairs(db, split=None, until_id=watermark)
    recorded = snapshot_hash(trained_on)  # what the round stored

    revise_judgement(db, users["ann"], first, [[c], [b], [a]])
    assert snapshot_hash(select_pairs(db, split=None, until_id=watermark)) != recorded  # the old pairs are gone...
    assert snapshot_hash(lineage_pairs(db, watermark, split=None)) == recorded  # ...and kept for its lineage
    newer = [p["id"] for p in select_pairs(db, split=None) if p["id"] > watermark]
    assert len(newer) == 3  # the next round with data=new takes the changed judgement's pairs


def test_a_written_answer_stays_first_and_thumbs_carry_over_unless_changed(db, users):
    ann = users["ann"]
    ready_item(db, "Write one?", k=2)
    view = next_item(db, ann)
    a, b = view["shown_order"]
    old = submit_judgement(db, ann, view["id"], [[a], [b]], shown_order=[a, b], human_text="My own answer.",
                           ratings={b: -1})["judgement_id"]
    [written] = [r[0] for r in db.execute("SELECT id FROM candidates WHERE author_id = ?", [ann])]
    new = revise_judgement(db, ann, old, [[b], [a]])["judgement_id"]
    assert pairs_of(db, new) == sorted([(written, a), (written, b), (b, a)])
    assert db.execute("SELECT candidate_id, value FROM ratings WHERE judgement_id = ?", [new]).fetchall() == [(b, -1)]
    both_bad = revise_judgement(db, ann, new, [[a, b]], both_bad=True)["judgement_id"]
    assert pairs_of(db, both_bad) == sorted([(written, a), (written, b)])  # still beats both
    assert sorted(db.execute("SELECT candidate_id, value FROM ratings WHERE judgement_id = ?", [both_bad])) == \
        sorted([(a, -1), (b, -1)])
    assert recent_judgements(db, ann)[0]["ranking"] == "both bad (written > A = B)"
    assert db.execute("SELECT new_judgement_id FROM judgement_revisions").fetchall() == [(both_bad,), (both_bad,)]
    assert db.execute("PRAGMA foreign_key_check").fetchall() == []


def test_only_the_author_within_the_window_and_nothing_changes_on_a_refusal(db, users):
    ann = users["ann"]
    old, (a, b, c) = judged(db, ann, [[0], [1], [2]])
    before = counts(db), pairs_of(db, old)
    with pytest.raises(PermissionDenied, match="someone else's"):
        revise_judgement(db, users["bob"], old, [[c], [b], [a]])
    with pytest.raises(InvalidInput, match="must place each of the item's answers exactly once"):
        revise_judgement(db, ann, old, [[c], [b]])
    later = datetime.now(timezone.utc) + timedelta(minutes=31)
    with pytest.raises(InvalidInput, match="older than 30 minutes: it can no longer be changed"):
        revise_judgement(db, ann, old, [[c], [b], [a]], now=later)
    assert recent_judgements(db, ann, now=later)[0]["why_closed"] == "older than 30 minutes"
    set_setting(db, "reopen_window_minutes", 0)
    with pytest.raises(InvalidInput, match="turned off"):
        revise_judgement(db, ann, old, [[c], [b], [a]])
    assert (counts(db), pairs_of(db, old)) == before
    set_setting(db, "reopen_window_minutes", 60)
    assert recent_judgements(db, ann, now=later)[0]["open_until"] is not None


def test_a_promotion_vote_cannot_be_changed(db, users):
    ann = users["ann"]
    old, (a, b, c) = judged(db, ann, [[0], [1], [2]])
    item_id = db.execute("SELECT item_id FROM judgements WHERE id = ?", [old]).fetchone()[0]
    db.execute("UPDATE items SET gate_versions = ? WHERE id = ?", ['["v2", "v1"]', item_id])
    with pytest.raises(InvalidInput, match="promotion pair cannot be changed"):
        revise_judgement(db, ann, old, [[c], [b], [a]])
    assert recent_judgements(db, ann)[0]["open_until"] is None
