"""The annotation workflow's store operations: written answers and thumbs ratings in a
judgement, skipping and flagging items, gold items, requeueing items of a stale policy
version, and items that ask for particular versions and decoding settings."""

import json

import pytest

from annotations import InvalidInput, NotFound, open_db
from annotations.store import (
    GOLD_OVERLAP,
    add_candidates,
    add_prompt,
    add_user,
    count_rows,
    flag_item,
    next_item,
    pending_items,
    queue_items,
    retire_stale_items,
    set_gold,
    skip_item,
    submit_judgement,
)

from tests.annotations.conftest import ANNOTATORS, PASSWORD  # noqa: F401


# ---------------------------------------------------------------- helpers


def ready_item(db, text="Which is better?", *, k=2, overlap=1, version="base", **queue_options):
    """Queue a prompt as an item and give it k candidates from `version`. Returns (item id, candidate ids)."""
    prompt_id, _ = add_prompt(db, text)
    mode = "pairwise" if k == 2 else "ranking"
    (item_id,) = queue_items(db, [prompt_id], mode=mode, k=k, overlap=overlap, **queue_options)
    answers = [{"text": f"answer {i} to {text}", "policy_version": version} for i in range(k)]
    return item_id, add_candidates(db, item_id, answers)


def counts(db):
    return {table: count_rows(db, table) for table in ("candidates", "judgements", "pairs", "ratings")}


def stored_pairs(db):
    return sorted(db.execute("SELECT chosen_candidate_id, rejected_candidate_id FROM pairs").fetchall())


def written_answers(db):
    return db.execute(
        "SELECT id, item_id, text, author_id FROM candidates WHERE policy_version IS NULL ORDER BY id"
    ).fetchall()


def item_row(db, item_id):
    status, overlap, gold = db.execute("SELECT status, overlap, gold FROM items WHERE id = ?", [item_id]).fetchone()
    return {"status": status, "overlap": overlap, "gold": json.loads(gold) if gold else None}


# ---------------------------------------------------------------- written answers


def test_submit_judgement_stores_written_answer_as_candidate_by_its_author(db, users):
    item_id, (a, b) = ready_item(db)
    submit_judgement(db, users["ann"], item_id, [[a], [b]], shown_order=[a, b], human_text="  My own answer.\n")
    [(_, answer_item, text, author)] = written_answers(db)
    assert (answer_item, text, author) == (item_id, "My own answer.", users["ann"])


def test_submit_judgement_written_answer_ranks_above_all_model_answers(db, users):
    item_id, (a, b) = ready_item(db)
    result = submit_judgement(db, users["ann"], item_id, [[a], [b]], shown_order=[a, b], human_text="Mine.")
    [(h, *_)] = written_answers(db)
    assert result["pairs"] == 3
    assert stored_pairs(db) == sorted([(h, a), (h, b), (a, b)])
    (ranking,) = db.execute("SELECT ranking FROM judgements").fetchone()
    assert json.loads(ranking) == [[h], [a], [b]]


def test_pairs_say_which_chosen_answers_were_written_by_an_annotator(db, users):
    from annotations.store import iter_pairs

    item_id, (a, b) = ready_item(db)
    submit_judgement(db, users["ann"], item_id, [[a], [b]], shown_order=[a, b], human_text="Mine.")
    flags = sorted((pair["chosen"], pair["chosen_written"]) for pair in iter_pairs(db))
    assert flags == [("Mine.", True), ("Mine.", True), (f"answer 0 to Which is better?", False)]


def test_submit_judgement_written_answer_pairs_carry_no_policy_version(db, users):
    item_id, (a, b) = ready_item(db)
    submit_judgement(db, users["ann"], item_id, [[a], [b]], shown_order=[a, b], human_text="Mine.")
    rows = db.execute("SELECT chosen, chosen_version, rejected_version FROM pairs WHERE rejected_candidate_id = ?",
                      [b]).fetchall()
    assert sorted(rows, key=str) == sorted([("Mine.", None, "base"), ("answer 0 to Which is better?", "base", "base")],
                                           key=str)


def test_submit_judgement_unchanged_copy_of_model_answer_adds_no_candidate(db, users):
    item_id, (a, b) = ready_item(db, "Say hi")
    result = submit_judgement(db, users["ann"], item_id, [[a], [b]], shown_order=[a, b],
                              human_text="  answer 0 to Say hi \n")
    assert result["pairs"] == 1
    assert written_answers(db) == []
    assert stored_pairs(db) == [(a, b)]


@pytest.mark.parametrize("text", [pytest.param("", id="empty"), pytest.param("  \n\t", id="blank")])
def test_submit_judgement_rejects_empty_written_answer_and_stores_nothing(db, users, text):
    item_id, (a, b) = ready_item(db)
    before = counts(db)
    with pytest.raises(InvalidInput, match="empty"):
        submit_judgement(db, users["ann"], item_id, [[a], [b]], shown_order=[a, b], human_text=text)
    assert counts(db) == before == {"candidates": 2, "judgements": 0, "pairs": 0, "ratings": 0}


def test_submit_judgement_rejects_oversized_written_answer_and_stores_nothing(db, users):
    item_id, (a, b) = ready_item(db)
    with pytest.raises(InvalidInput, match="limit"):
        submit_judgement(db, users["ann"], item_id, [[a], [b]], shown_order=[a, b], human_text="x" * 16_001)
    assert counts(db) == {"candidates": 2, "judgements": 0, "pairs": 0, "ratings": 0}


def test_submit_judgement_both_bad_with_written_answer_prefers_it_over_each(db, users):
    item_id, (a, b) = ready_item(db)
    result = submit_judgement(db, users["ann"], item_id, [[a, b]], shown_order=[a, b], both_bad=True,
                              human_text="A good answer.")
    [(h, *_)] = written_answers(db)
    assert result["pairs"] == 2
    assert stored_pairs(db) == sorted([(h, a), (h, b)])
    ratings = db.execute("SELECT candidate_id, value, source FROM ratings ORDER BY candidate_id").fetchall()
    assert ratings == [(a, -1, "both_bad"), (b, -1, "both_bad")]


def test_next_item_does_not_show_other_annotators_written_answer(db, users):
    item_id, (a, b) = ready_item(db, overlap=2)
    submit_judgement(db, users["ann"], item_id, [[a], [b]], shown_order=[a, b], human_text="Mine.")
    item = next_item(db, users["bob"])
    assert item["id"] == item_id
    assert sorted(c["id"] for c in item["candidates"]) == [a, b]


# ---------------------------------------------------------------- thumbs ratings


def test_submit_judgement_stores_thumbs_ratings(db, users):
    item_id, (a, b) = ready_item(db)
    result = submit_judgement(db, users["ann"], item_id, [[a], [b]], shown_order=[a, b], ratings={a: 1, b: -1})
    rows = db.execute("SELECT candidate_id, user_id, value, source, judgement_id FROM ratings ORDER BY candidate_id")
    j = result["judgement_id"]
    assert rows.fetchall() == [(a, users["ann"], 1, "thumbs", j), (b, users["ann"], -1, "thumbs", j)]


def test_submit_judgement_both_bad_keeps_explicit_thumbs_up(db, users):
    item_id, (a, b) = ready_item(db)
    submit_judgement(db, users["ann"], item_id, [[a, b]], shown_order=[a, b], both_bad=True, ratings={a: 1})
    rows = db.execute("SELECT candidate_id, value, source FROM ratings ORDER BY candidate_id").fetchall()
    assert rows == [(a, 1, "thumbs"), (b, -1, "both_bad")]


@pytest.mark.parametrize(
    "rating",
    [
        pytest.param({"first": 2}, id="value-out-of-range"),
        pytest.param({"first": 0}, id="zero"),
        pytest.param({"other-item": 1}, id="answer-of-another-item"),
    ],
)
def test_submit_judgement_rejects_invalid_rating_and_stores_nothing(db, users, rating):
    item_id, (a, b) = ready_item(db, "first")
    _, (other, _) = ready_item(db, "second")
    ratings = {a if key == "first" else other: value for key, value in rating.items()}
    before = counts(db)
    with pytest.raises(InvalidInput, match="rating"):
        submit_judgement(db, users["ann"], item_id, [[a], [b]], shown_order=[a, b], ratings=ratings)
    assert counts(db) == before


# ---------------------------------------------------------------- skip_item


def test_skip_item_is_never_offered_to_that_user_again(db, users):
    item_id, _ = ready_item(db, "first", overlap=2)
    assert next_item(db, users["ann"])["id"] == item_id
    skip_item(db, users["ann"], item_id, "unclear prompt")
    assert next_item(db, users["ann"]) is None
    other_id, _ = ready_item(db, "second", overlap=2)
    assert next_item(db, users["ann"])["id"] == other_id


def test_skip_item_stores_reason(db, users):
    item_id, _ = ready_item(db)
    skip_item(db, users["ann"], item_id, "  cannot judge (expertise) ")
    assert db.execute("SELECT item_id, user_id, reason FROM skips").fetchall() == [
        (item_id, users["ann"], "cannot judge (expertise)")
    ]


@pytest.mark.parametrize("reason", ["", "   ", None])
def test_skip_item_requires_reason(db, users, reason):
    item_id, _ = ready_item(db)
    next_item(db, users["ann"])
    with pytest.raises(InvalidInput, match="why"):
        skip_item(db, users["ann"], item_id, reason)
    assert db.execute("SELECT count(*) FROM skips").fetchone()[0] == 0
    assert next_item(db, users["ann"])["id"] == item_id  # still holds the item


def test_skip_item_releases_lease_so_another_user_gets_item(db, users):
    item_id, _ = ready_item(db, overlap=1)
    next_item(db, users["ann"])
    assert next_item(db, users["bob"]) is None
    skip_item(db, users["ann"], item_id, "broken answers")
    assert db.execute("SELECT count(*) FROM leases WHERE user_id = ?", [users["ann"]]).fetchone()[0] == 0
    assert next_item(db, users["bob"])["id"] == item_id


def test_skip_item_twice_keeps_one_skip(db, users):
    item_id, _ = ready_item(db)
    skip_item(db, users["ann"], item_id, "other")
    skip_item(db, users["ann"], item_id, "other")
    assert db.execute("SELECT count(*) FROM skips").fetchone()[0] == 1


def test_skip_item_unknown_item_raises_not_found(db, users):
    with pytest.raises(NotFound):
        skip_item(db, users["ann"], 999, "other")


# ---------------------------------------------------------------- flag_item


def flags(db):
    return db.execute("SELECT item_id, candidate_id, user_id, reason FROM flags ORDER BY id").fetchall()


def test_flag_item_without_answers_flags_the_prompt(db, users):
    item_id, _ = ready_item(db)
    assert flag_item(db, users["ann"], item_id, "unsafe prompt") == 1
    assert flags(db) == [(item_id, None, users["ann"], "unsafe prompt")]


def test_flag_item_flags_each_given_answer(db, users):
    item_id, (a, b, c) = ready_item(db, k=3)
    assert flag_item(db, users["ann"], item_id, "broken", [a, c]) == 2
    assert flags(db) == [(item_id, a, users["ann"], "broken"), (item_id, c, users["ann"], "broken")]


def test_flag_item_blank_reason_means_unsafe(db, users):
    item_id, _ = ready_item(db)
    flag_item(db, users["ann"], item_id, "  ")
    assert flags(db) == [(item_id, None, users["ann"], "unsafe")]


def test_flag_item_rejects_answer_of_another_item_and_stores_nothing(db, users):
    item_id, (a, _) = ready_item(db, "first")
    _, (other, _) = ready_item(db, "second")
    with pytest.raises(InvalidInput, match="does not belong"):
        flag_item(db, users["ann"], item_id, "broken", [a, other])
    assert flags(db) == []


def test_flag_item_unknown_item_raises_not_found(db, users):
    with pytest.raises(NotFound):
        flag_item(db, users["ann"], 999, "unsafe")


def test_flag_item_leaves_item_in_queue(db, users):
    item_id, _ = ready_item(db)
    flag_item(db, users["ann"], item_id, "unsafe")
    assert next_item(db, users["bob"])["id"] == item_id


# ---------------------------------------------------------------- set_gold


def test_set_gold_stores_known_ranking(db, users):
    item_id, (a, b, c) = ready_item(db, k=3)
    set_gold(db, item_id, [[b], [a, c]])
    assert item_row(db, item_id)["gold"] == [[b], [a, c]]


def test_set_gold_lets_every_annotator_judge_item(db, users):
    item_id, (a, b) = ready_item(db, overlap=1)
    set_gold(db, item_id, [[a], [b]])
    assert item_row(db, item_id)["overlap"] == GOLD_OVERLAP
    for name in ANNOTATORS:
        assert next_item(db, users[name])["id"] == item_id
    for name in ANNOTATORS:
        submit_judgement(db, users[name], item_id, [[a], [b]], shown_order=[a, b])
    assert item_row(db, item_id)["status"] == "ready"


def test_set_gold_reopens_completed_item(db, users):
    item_id, (a, b) = ready_item(db, overlap=1)
    submit_judgement(db, users["ann"], item_id, [[a], [b]], shown_order=[a, b])
    assert item_row(db, item_id)["status"] == "complete"
    set_gold(db, item_id, [[a], [b]])
    assert item_row(db, item_id)["status"] == "ready"
    assert next_item(db, users["bob"])["id"] == item_id
    assert next_item(db, users["ann"]) is None  # already judged it


@pytest.mark.parametrize(
    "ranking",
    [
        pytest.param("missing", id="answer-missing"),
        pytest.param("twice", id="answer-twice"),
        pytest.param("foreign", id="answer-of-another-item"),
        pytest.param("empty", id="empty"),
    ],
)
def test_set_gold_rejects_invalid_ranking(db, users, ranking):
    item_id, (a, b) = ready_item(db, "first")
    _, (other, _) = ready_item(db, "second")
    ranking = {"missing": [[a]], "twice": [[a], [b], [a]], "foreign": [[a], [other]], "empty": []}[ranking]
    with pytest.raises(InvalidInput):
        set_gold(db, item_id, ranking)
    assert item_row(db, item_id) == {"status": "ready", "overlap": 1, "gold": None}


def test_set_gold_rejects_written_answer_in_ranking(db, users):
    item_id, (a, b) = ready_item(db, overlap=2)
    submit_judgement(db, users["ann"], item_id, [[a], [b]], shown_order=[a, b], human_text="Mine.")
    [(h, *_)] = written_answers(db)
    with pytest.raises(InvalidInput, match="exactly once"):
        set_gold(db, item_id, [[h], [a], [b]])
    set_gold(db, item_id, [[a], [b]])
    assert item_row(db, item_id)["gold"] == [[a], [b]]


def test_set_gold_item_without_answers_raises_not_found(db, users):
    prompt_id, _ = add_prompt(db, "not generated yet")
    (item_id,) = queue_items(db, [prompt_id])
    with pytest.raises(NotFound, match="no answers"):
        set_gold(db, item_id, [[1], [2]])


# ---------------------------------------------------------------- retire_stale_items


def test_retire_stale_items_requeues_unjudged_item_of_old_version(db, users):
    item_id, _ = ready_item(db, "Tell me a joke", k=3, overlap=2, version="base")
    assert retire_stale_items(db, "v1") == 1
    assert item_row(db, item_id)["status"] == "retired"
    (requeued,) = pending_items(db)
    assert requeued["id"] != item_id
    assert requeued["messages"] == [{"role": "user", "content": "Tell me a joke"}]
    mode, k, overlap = db.execute("SELECT mode, k, overlap FROM items WHERE id = ?", [requeued["id"]]).fetchone()
    assert (mode, k, overlap) == ("ranking", 3, 2)


def test_retire_stale_items_leaves_item_someone_holds(db, users):
    item_id, _ = ready_item(db, version="base")
    next_item(db, users["ann"])
    assert retire_stale_items(db, "v1") == 0
    assert item_row(db, item_id)["status"] == "ready"
    assert next_item(db, users["ann"])["id"] == item_id


def test_retire_stale_items_retires_item_whose_lease_expired(db, users):
    item_id, _ = ready_item(db, version="base")
    next_item(db, users["ann"], lease_seconds=10, now=1000.0)
    assert retire_stale_items(db, "v1", now=1011.0) == 1
    assert item_row(db, item_id)["status"] == "retired"


def test_submit_judgement_on_item_retired_while_shown_is_stored(db, users):
    item_id, (a, b) = ready_item(db, version="base")
    shown = next_item(db, users["ann"], lease_seconds=10, now=1000.0)
    retire_stale_items(db, "v1", now=2000.0)  # the lease ran out while the page stayed open
    result = submit_judgement(db, users["ann"], item_id, [[a], [b]], shown_order=shown["shown_order"])
    assert result["pairs"] == 1
    versions = db.execute("SELECT chosen_version, rejected_version FROM pairs").fetchone()
    assert tuple(versions) == ("base", "base")
    assert item_row(db, item_id)["status"] == "retired"


def test_submit_judgement_on_retired_item_never_shown_is_refused(db, users):
    item_id, (a, b) = ready_item(db, version="base")
    retire_stale_items(db, "v1")
    with pytest.raises(InvalidInput, match="retired"):
        submit_judgement(db, users["ann"], item_id, [[a], [b]], shown_order=[a, b])


def test_submit_judgement_after_others_filled_the_item_is_stored(db, users):
    item_id, (a, b) = ready_item(db, overlap=1)
    next_item(db, users["ann"], lease_seconds=10, now=1000.0)
    assert next_item(db, users["bob"], now=1020.0)["id"] == item_id  # ann's lease expired
    submit_judgement(db, users["bob"], item_id, [[a], [b]], shown_order=[a, b])
    assert item_row(db, item_id)["status"] == "complete"
    submit_judgement(db, users["ann"], item_id, [[b], [a]], shown_order=[b, a])
    assert db.execute("SELECT count(*) FROM judgements WHERE item_id = ?", [item_id]).fetchone()[0] == 2


def test_next_item_shown_again_keeps_letters_served_time_and_key(db, users):
    ready_item(db, k=4, overlap=1)
    first = next_item(db, users["ann"], now=1000.0)
    again = next_item(db, users["ann"], now=1100.0)
    assert (again["shown_order"], again["served_at"], again["view_key"]) == \
        (first["shown_order"], 1000.0, first["view_key"])
    assert [c["id"] for c in again["candidates"]] == first["shown_order"]


def test_next_item_orders_answers_at_random_per_user(db, users):
    orders = set()
    for i in range(12):
        ready_item(db, f"prompt {i}", k=4, overlap=1)
        shown = next_item(db, users["ann"])
        orders.add(tuple(sorted(shown["shown_order"]).index(c) for c in shown["shown_order"]))
        skip_item(db, users["ann"], shown["id"], "other")
    assert len(orders) > 1


def test_skipped_prompt_never_returns_after_a_promotion_requeues_it(db, users):
    item_id, _ = ready_item(db, "Skip me", version="base")
    next_item(db, users["ann"])
    skip_item(db, users["ann"], item_id, "unclear prompt")
    assert retire_stale_items(db, "v1") == 1
    (requeued,) = pending_items(db)
    add_candidates(db, requeued["id"], [{"text": "one", "policy_version": "v1"}, {"text": "two", "policy_version": "v1"}])
    assert next_item(db, users["ann"]) is None
    assert next_item(db, users["bob"])["id"] == requeued["id"]


def test_retire_stale_items_keeps_requested_sampling(db, users):
    item_id, _ = ready_item(db, version="base", sampling={"temperature": 1.2})
    retire_stale_items(db, "v1")
    (requeued,) = pending_items(db)
    assert requeued["sampling"] == {"temperature": 1.2}


def test_retire_stale_items_leaves_judged_item(db, users):
    item_id, (a, b) = ready_item(db, overlap=2, version="base")
    submit_judgement(db, users["ann"], item_id, [[a], [b]], shown_order=[a, b])
    assert retire_stale_items(db, "v1") == 0
    assert item_row(db, item_id)["status"] == "ready"
    assert pending_items(db) == []


def test_retire_stale_items_leaves_item_with_requested_versions(db, users):
    item_id, _ = ready_item(db, version="base", versions=["base"])
    assert retire_stale_items(db, "v1") == 0
    assert item_row(db, item_id)["status"] == "ready"


def test_retire_stale_items_leaves_gold_item(db, users):
    item_id, (a, b) = ready_item(db, version="base")
    set_gold(db, item_id, [[a], [b]])
    assert retire_stale_items(db, "v1") == 0
    assert item_row(db, item_id)["status"] == "ready"


def test_retire_stale_items_leaves_item_of_live_version(db, users):
    item_id, _ = ready_item(db, version="v1")
    assert retire_stale_items(db, "v1") == 0
    assert item_row(db, item_id)["status"] == "ready"


def test_retire_stale_items_leaves_pending_item(db, users):
    prompt_id, _ = add_prompt(db, "not generated yet")
    (item_id,) = queue_items(db, [prompt_id])
    assert retire_stale_items(db, "v1") == 0
    assert [item["id"] for item in pending_items(db)] == [item_id]


# ---------------------------------------------------------------- queue_items with versions and sampling


def test_queue_items_versions_and_sampling_show_in_pending_items(db):
    prompt_id, _ = add_prompt(db, "Compare two versions")
    (item_id,) = queue_items(db, [prompt_id], mode="ranking", k=4, versions=["base", "v1"],
                             sampling={"temperature": 0.7, "top_p": 0.9})
    assert pending_items(db) == [{
        "id": item_id, "k": 4, "messages": [{"role": "user", "content": "Compare two versions"}],
        "versions": ["base", "v1"], "sampling": {"temperature": 0.7, "top_p": 0.9},
    }]


def test_queue_items_without_versions_asks_for_live_one(db):
    prompt_id, _ = add_prompt(db, "Plain item")
    queue_items(db, [prompt_id])
    (item,) = pending_items(db)
    assert (item["versions"], item["sampling"]) == (None, None)


@pytest.mark.parametrize("versions", [pytest.param([], id="none"), pytest.param(["a", "b", "c"], id="more-than-k")])
def test_queue_items_rejects_versions_that_do_not_fit_k(db, versions):
    prompt_id, _ = add_prompt(db, "Compare")
    with pytest.raises(InvalidInput, match="versions"):
        queue_items(db, [prompt_id], k=2, versions=versions)
    assert count_rows(db, "items") == 0


# ---------------------------------------------------------------- leases across annotators


def test_next_item_expired_lease_passes_item_to_other_annotator_for_good(db, users):
    item_id, (a, b) = ready_item(db, overlap=1)
    next_item(db, users["ann"], lease_seconds=60, now=1000.0)
    assert next_item(db, users["bob"], lease_seconds=60, now=1061.0)["id"] == item_id
    # ann comes back after her lease expired: bob now holds the only slot.
    assert next_item(db, users["ann"], lease_seconds=60, now=1062.0) is None
    submit_judgement(db, users["bob"], item_id, [[a], [b]], shown_order=[a, b])
    assert item_row(db, item_id)["status"] == "complete"
    assert next_item(db, users["ann"], now=1063.0) is None
