"""KTO labels: one label per answer, on hand-worked rankings with conflicting thumbs
(annotations/answer_labels.py)."""

import json

import pytest

from annotations.answer_labels import kto_examples
from annotations.arena import record_battle, vote
from annotations.formats import import_file
from annotations.quality import set_weighting
from annotations.store import add_candidates, add_prompt, queue_items, submit_judgement

from tests.annotations.conftest import ANNOTATORS, PASSWORD  # noqa: F401


def four_answer_item(db, text="Rank these", overlap=3):
    """A ready ranking item with answers 'a'..'d' (heldout-proof: the split is forced to train)."""
    prompt_id, _ = add_prompt(db, text)
    db.execute("UPDATE prompts SET split = 'train' WHERE id = ?", [prompt_id])
    (item_id,) = queue_items(db, [prompt_id], mode="ranking", k=4, overlap=overlap)
    ids = add_candidates(db, item_id, [{"text": t, "policy_version": "base"} for t in "abcd"])
    return item_id, dict(zip("abcd", ids))


def judge(db, user, item_id, c, ranking, **options):
    tiers = [[c[name] for name in tier] for tier in ranking]
    return submit_judgement(db, user, item_id, tiers, shown_order=list(c.values()), **options)


def labels(db, **options):
    return {row["completion"]: (row["label"], row["weight"]) for row in kto_examples(db, **options)}


def test_ranking_labels_top_and_bottom_tiers_and_leaves_the_middle_out(db, users):
    item_id, c = four_answer_item(db)
    judge(db, users["ann"], item_id, c, ["a", "b", "cd"])
    assert labels(db) == {"a": (True, 1.0), "c": (False, 1.0), "d": (False, 1.0)}


def test_all_tied_ranking_gives_no_label(db, users):
    item_id, c = four_answer_item(db)
    judge(db, users["ann"], item_id, c, ["abcd"])
    assert labels(db) == {}


def test_both_bad_labels_every_answer_undesirable(db, users):
    item_id, c = four_answer_item(db)
    judge(db, users["ann"], item_id, c, ["abcd"], both_bad=True)
    assert labels(db) == {name: (False, 1.0) for name in "abcd"}


def test_conflicting_rankings_and_thumbs_give_one_label_per_answer(db, users):
    # ann: a > b > c = d, and a thumbs-down on a.   derived: a +1, c -1, d -1; explicit: a -1
    # bob: b > a > c > d, thumbs up on c.           derived: b +1, d -1;        explicit: c +1
    # cat: d > c > b > a, thumbs down on c.         derived: d +1, a -1;        explicit: c -1
    item_id, c = four_answer_item(db)
    judge(db, users["ann"], item_id, c, ["a", "b", "cd"], ratings={c["a"]: -1})
    judge(db, users["bob"], item_id, c, ["b", "a", "c", "d"], ratings={c["c"]: 1})
    judge(db, users["cat"], item_id, c, ["d", "c", "b", "a"], ratings={c["c"]: -1})
    assert labels(db) == {
        "a": (False, 1.0),  # the explicit thumb overrides the derived +1 -1 (which would leave it out)
        "b": (True, 1.0),  # one derived vote
        # c: explicit +1 and -1 cancel: no label (the derived -1 does not decide once a thumb exists)
        "d": (False, pytest.approx(2 / 3)),  # derived -1 -1 +1: the 2-of-3 majority, weight 2/3
    }


def test_each_answer_appears_once_with_the_all_pairs_policy(db, users):
    item_id, c = four_answer_item(db)
    judge(db, users["ann"], item_id, c, ["a", "b", "c", "d"], pair_policy="all")
    rows = kto_examples(db)
    assert sorted(row["completion"] for row in rows) == ["a", "d"]  # b and c sit in the middle


def test_written_answer_is_desirable(db, users):
    item_id, c = four_answer_item(db)
    judge(db, users["ann"], item_id, c, ["abcd"], both_bad=True, human_text="My own answer.")
    assert labels(db)["My own answer."] == (True, 1.0)


def test_imported_and_arena_pairs_vote_with_their_stored_weight(db, users, tmp_path):
    source = tmp_path / "pairs.jsonl"
    source.write_text(json.dumps({"prompt": "Q?", "chosen": "Good.", "rejected": "Bad."}) + "\n")
    import_file(db, source, "trl", queue=False, heldout_fraction=0.0)
    set_weighting(db, {"sources": {"import": 0.5}})
    battle = record_battle(db, users["ann"], "Arena Q?", "base", "v1", "Left.", "Right.")
    db.execute("UPDATE prompts SET split = 'train'")
    db.conn.commit()
    vote(db, users["ann"], battle, "B")
    assert labels(db) == {"Good.": (True, 0.5), "Bad.": (False, 0.5), "Right.": (True, 1.0), "Left.": (False, 1.0)}


def test_sources_ratings_uses_thumbs_only(db, users):
    item_id, c = four_answer_item(db)
    judge(db, users["ann"], item_id, c, ["a", "b", "cd"], ratings={c["b"]: 1})
    assert labels(db, sources="ratings") == {"b": (True, 1.0)}
    assert labels(db, sources="pairs") == {"a": (True, 1.0), "c": (False, 1.0), "d": (False, 1.0)}


def test_snapshot_edges_bound_the_judgements_read(db, users):
    item_id, c = four_answer_item(db)
    first = judge(db, users["ann"], item_id, c, ["a", "bcd"])
    judge(db, users["bob"], item_id, c, ["d", "abc"])
    assert set(labels(db, until={"judgement": first["judgement_id"]})) == {"a", "b", "c", "d"}
    assert labels(db, since={"judgement": first["judgement_id"]}) == {
        "d": (True, 1.0), "a": (False, 1.0), "b": (False, 1.0), "c": (False, 1.0)}
