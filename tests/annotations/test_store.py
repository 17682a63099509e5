"""Store operations through the public API, on real SQLite files: users, prompts, the item
queue and its leases, judgements and the pairs derived from them."""

import pytest

from annotations import InvalidInput, open_db
from annotations.store import (
    add_candidates,
    add_prompt,
    add_user,
    authenticate,
    count_rows,
    derive_pairs,
    get_prompt,
    iter_pairs,
    next_item,
    queue_items,
    submit_judgement,
)

from tests.annotations.conftest import ANNOTATORS, PASSWORD  # noqa: F401


# ---------------------------------------------------------------- helpers


def ready_item(db, text="Which is better?", *, k=2, overlap=1, mode=None):
    """Queue a prompt as an item and give it k candidates. Returns (item id, candidate ids)."""
    prompt_id, _ = add_prompt(db, text)
    mode = mode or ("pairwise" if k == 2 else "ranking")
    (item_id,) = queue_items(db, [prompt_id], mode=mode, k=k, overlap=overlap)
    answers = [{"text": f"answer {i} to {text}", "policy_version": "base"} for i in range(k)]
    return item_id, add_candidates(db, item_id, answers)


def counts(db):
    return {table: count_rows(db, table) for table in ("judgements", "pairs", "ratings")}


# ---------------------------------------------------------------- users


def test_add_user_stores_argon2_hash_not_password(db):
    add_user(db, "alice", "admin", PASSWORD)
    (stored,) = db.execute("SELECT password_hash FROM users WHERE name = 'alice'").fetchone()
    assert stored.startswith("$argon2id$")
    assert PASSWORD not in stored


def test_authenticate_returns_user_with_right_password(db, users):
    assert authenticate(db, "ann", PASSWORD) == {"id": users["ann"], "name": "ann", "role": "annotator"}


def test_authenticate_returns_none_with_wrong_password(db, users):
    assert authenticate(db, "ann", PASSWORD + "!") is None


def test_authenticate_returns_none_for_unknown_user(db):
    assert authenticate(db, "nobody", PASSWORD) is None


def test_add_user_rejects_unknown_role(db):
    with pytest.raises(InvalidInput, match="role"):
        add_user(db, "alice", "superuser", PASSWORD)
    assert count_rows(db, "users") == 0


def test_add_user_rejects_short_password(db):
    with pytest.raises(InvalidInput, match="8 characters"):
        add_user(db, "alice", "annotator", "short")
    assert count_rows(db, "users") == 0


def test_add_user_rejects_duplicate_name(db):
    add_user(db, "alice", "annotator", PASSWORD)
    with pytest.raises(InvalidInput, match="already exists"):
        add_user(db, "alice", "admin", "another password")
    assert count_rows(db, "users") == 1


# ---------------------------------------------------------------- prompts


def test_add_prompt_stores_string_as_one_user_message(db):
    prompt_id, created = add_prompt(db, "Hello there")
    assert created
    assert get_prompt(db, prompt_id)["messages"] == [{"role": "user", "content": "Hello there"}]


def test_add_prompt_stores_message_list_as_given(db):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2+2?"},
    ]
    prompt_id, _ = add_prompt(db, messages)
    assert get_prompt(db, prompt_id)["messages"] == messages


def test_add_prompt_deduplicates_same_content(db):
    first, created_first = add_prompt(db, "Hello there")
    second, created_second = add_prompt(db, [{"role": "user", "content": "Hello there"}], source="other")
    assert (second, created_first, created_second) == (first, True, False)
    assert count_rows(db, "prompts") == 1


@pytest.mark.parametrize(
    "messages",
    [
        pytest.param("", id="empty-string"),
        pytest.param("   \n", id="blank-string"),
        pytest.param([], id="no-messages"),
        pytest.param([{"role": "user", "content": ""}], id="empty-message"),
    ],
)
def test_add_prompt_rejects_empty_prompt(db, messages):
    with pytest.raises(InvalidInput):
        add_prompt(db, messages)
    assert count_rows(db, "prompts") == 0


def test_add_prompt_rejects_oversized_prompt(db):
    with pytest.raises(InvalidInput, match="limit"):
        add_prompt(db, "x" * 16_001)
    assert count_rows(db, "prompts") == 0


def test_add_prompt_rejects_last_message_not_from_user(db):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    with pytest.raises(InvalidInput, match="last message"):
        add_prompt(db, messages)
    assert count_rows(db, "prompts") == 0


def test_add_prompt_split_is_deterministic_across_stores_and_order(tmp_path):
    texts = [f"prompt number {i}" for i in range(60)]
    splits = []
    for name, order in (("a.db", texts), ("b.db", texts[::-1])):
        store = open_db(tmp_path / name)
        ids = {text: add_prompt(store, text, heldout_fraction=0.5)[0] for text in order}
        splits.append({text: get_prompt(store, ids[text])["split"] for text in texts})
        store.close()
    assert splits[0] == splits[1]
    assert set(splits[0].values()) == {"train", "heldout"}


# ---------------------------------------------------------------- derive_pairs (hand-worked)

# Four answers ranked 1 > {2, 3} > 4 (2 and 3 tied).
RANKING = [[1], [2, 3], [4]]


# The order of the returned pairs is not promised: compare them sorted.


def test_derive_pairs_all_pairs_every_higher_tier_with_every_lower():
    assert sorted(derive_pairs(RANKING, "all")) == [(1, 2), (1, 3), (1, 4), (2, 4), (3, 4)]


def test_derive_pairs_best_vs_rest_pairs_top_tier_with_all_others():
    assert sorted(derive_pairs(RANKING, "best_vs_rest")) == [(1, 2), (1, 3), (1, 4)]


def test_derive_pairs_adjacent_pairs_only_neighbouring_tiers():
    assert sorted(derive_pairs(RANKING, "adjacent")) == [(1, 2), (1, 3), (2, 4), (3, 4)]


def test_derive_pairs_all_uses_ids_not_positions_for_strict_ranking():
    assert sorted(derive_pairs([[7], [5], [6]], "all")) == [(5, 6), (7, 5), (7, 6)]


def test_derive_pairs_best_vs_rest_with_tied_top_tier():
    assert sorted(derive_pairs([[1, 2], [3], [4]], "best_vs_rest")) == [(1, 3), (1, 4), (2, 3), (2, 4)]


def test_derive_pairs_adjacent_skips_empty_tier():
    assert sorted(derive_pairs([[1], [], [2]], "adjacent")) == [(1, 2)]


@pytest.mark.parametrize("policy", ["all", "best_vs_rest", "adjacent"])
def test_derive_pairs_gives_no_pair_when_all_tied(policy):
    assert derive_pairs([[1, 2, 3]], policy) == []


def test_derive_pairs_rejects_unknown_policy():
    with pytest.raises(InvalidInput, match="policy"):
        derive_pairs(RANKING, "random")


# ---------------------------------------------------------------- submit_judgement


def test_submit_judgement_stores_judgement_and_derived_pairs(db, users):
    item_id, (a, b, c, d) = ready_item(db, k=4)
    result = submit_judgement(db, users["ann"], item_id, [[c], [a, d], [b]], shown_order=[a, b, c, d])
    assert result["pairs"] == 5 and not result["duplicate"]
    stored = db.execute("SELECT chosen_candidate_id, rejected_candidate_id, judgement_id, source FROM pairs")
    j = result["judgement_id"]
    assert sorted(stored) == sorted([(c, a, j, "judgement"), (c, d, j, "judgement"), (c, b, j, "judgement"),
                                     (a, b, j, "judgement"), (d, b, j, "judgement")])


def test_submit_judgement_pairs_carry_candidate_texts(db, users):
    item_id, (a, b) = ready_item(db, "Say hi")
    submit_judgement(db, users["ann"], item_id, [[b], [a]], shown_order=[a, b])
    (pair,) = list(iter_pairs(db))
    assert (pair["chosen"], pair["rejected"]) == ("answer 1 to Say hi", "answer 0 to Say hi")
    assert pair["messages"] == [{"role": "user", "content": "Say hi"}]


def test_submit_judgement_uses_requested_pair_policy(db, users):
    item_id, (a, b, c, d) = ready_item(db, k=4)
    result = submit_judgement(db, users["ann"], item_id, [[a], [b], [c], [d]], shown_order=[a, b, c, d],
                              pair_policy="adjacent")
    assert result["pairs"] == 3
    stored = db.execute("SELECT chosen_candidate_id, rejected_candidate_id FROM pairs").fetchall()
    assert sorted(stored) == sorted([(a, b), (b, c), (c, d)])


def test_submit_judgement_tie_stores_judgement_without_pairs(db, users):
    item_id, (a, b) = ready_item(db)
    submit_judgement(db, users["ann"], item_id, [[a, b]], shown_order=[a, b])
    assert counts(db) == {"judgements": 1, "pairs": 0, "ratings": 0}


def test_submit_judgement_both_bad_stores_no_pair_but_negative_ratings(db, users):
    item_id, (a, b) = ready_item(db)
    result = submit_judgement(db, users["ann"], item_id, [[a, b]], shown_order=[a, b], both_bad=True)
    assert result["pairs"] == 0
    assert count_rows(db, "pairs") == 0
    ratings = db.execute("SELECT candidate_id, value, judgement_id FROM ratings ORDER BY candidate_id").fetchall()
    assert ratings == [(a, -1, result["judgement_id"]), (b, -1, result["judgement_id"])]


def test_submit_judgement_same_idempotency_key_returns_first_result(db, users):
    item_id, (a, b) = ready_item(db)
    first = submit_judgement(db, users["ann"], item_id, [[a], [b]], shown_order=[a, b], idempotency_key="k1")
    again = submit_judgement(db, users["ann"], item_id, [[a], [b]], shown_order=[a, b], idempotency_key="k1")
    assert again == {**first, "duplicate": True}


def test_submit_judgement_same_idempotency_key_stores_nothing_new(db, users):
    item_id, (a, b) = ready_item(db)
    submit_judgement(db, users["ann"], item_id, [[a], [b]], shown_order=[a, b], idempotency_key="k1")
    before = counts(db)
    submit_judgement(db, users["ann"], item_id, [[b], [a]], shown_order=[b, a], idempotency_key="k1")
    assert counts(db) == before == {"judgements": 1, "pairs": 1, "ratings": 0}


def test_submit_judgement_rejects_ranking_missing_a_candidate(db, users):
    item_id, (a, b, c) = ready_item(db, k=3)
    with pytest.raises(InvalidInput, match="exactly once"):
        submit_judgement(db, users["ann"], item_id, [[a], [b]], shown_order=[a, b, c])
    assert counts(db) == {"judgements": 0, "pairs": 0, "ratings": 0}


def test_submit_judgement_rejects_candidate_ranked_twice(db, users):
    item_id, (a, b) = ready_item(db)
    with pytest.raises(InvalidInput, match="exactly once"):
        submit_judgement(db, users["ann"], item_id, [[a], [b], [a]], shown_order=[a, b])
    assert counts(db) == {"judgements": 0, "pairs": 0, "ratings": 0}


def test_submit_judgement_failure_after_insert_rolls_back_judgement(db, users):
    # The pair policy is checked only after the judgement row is written: the whole
    # submission must still roll back, leaving no judgement without its pairs.
    item_id, (a, b) = ready_item(db)
    with pytest.raises(InvalidInput, match="policy"):
        submit_judgement(db, users["ann"], item_id, [[a], [b]], shown_order=[a, b], pair_policy="bogus")
    assert counts(db) == {"judgements": 0, "pairs": 0, "ratings": 0}
    assert next_item(db, users["ann"])["id"] == item_id


def test_submit_judgement_rejects_second_judgement_by_same_user(db, users):
    item_id, (a, b) = ready_item(db, overlap=2)
    submit_judgement(db, users["ann"], item_id, [[a], [b]], shown_order=[a, b])
    with pytest.raises(InvalidInput, match="already judged"):
        submit_judgement(db, users["ann"], item_id, [[b], [a]], shown_order=[a, b])
    assert counts(db) == {"judgements": 1, "pairs": 1, "ratings": 0}


def test_submit_judgement_rejects_item_that_reached_its_overlap(db, users):
    item_id, (a, b) = ready_item(db, overlap=1)
    submit_judgement(db, users["ann"], item_id, [[a], [b]], shown_order=[a, b])
    with pytest.raises(InvalidInput, match="complete"):
        submit_judgement(db, users["bob"], item_id, [[a], [b]], shown_order=[a, b])


# ---------------------------------------------------------------- next_item and leases


def test_next_item_returns_none_when_nothing_ready(db, users):
    prompt_id, _ = add_prompt(db, "no candidates yet")
    queue_items(db, [prompt_id])
    assert next_item(db, users["ann"]) is None


def test_next_item_returns_prompt_and_candidates(db, users):
    item_id, candidate_ids = ready_item(db, "Say hi")
    item = next_item(db, users["ann"])
    assert item["id"] == item_id
    assert item["messages"] == [{"role": "user", "content": "Say hi"}]
    assert sorted(c["id"] for c in item["candidates"]) == candidate_ids
    assert [c["id"] for c in item["candidates"]] == item["shown_order"]


def test_next_item_returns_same_item_while_lease_held(db, users):
    ready_item(db, "first")
    ready_item(db, "second")
    first = next_item(db, users["ann"], now=1000.0)
    assert next_item(db, users["ann"], now=1010.0)["id"] == first["id"]


def test_next_item_overlap_one_gives_second_annotator_none_for_only_item(db, users):
    ready_item(db, overlap=1)
    assert next_item(db, users["ann"]) is not None
    assert next_item(db, users["bob"]) is None


def test_next_item_overlap_one_gives_second_annotator_different_item(db, users):
    ready_item(db, "first", overlap=1)
    ready_item(db, "second", overlap=1)
    assert next_item(db, users["ann"])["id"] != next_item(db, users["bob"])["id"]


def test_next_item_overlap_two_gives_second_annotator_same_item(db, users):
    item_id, _ = ready_item(db, overlap=2)
    assert next_item(db, users["ann"])["id"] == item_id
    assert next_item(db, users["bob"])["id"] == item_id


def test_next_item_overlap_two_gives_third_annotator_none_while_both_leased(db, users):
    ready_item(db, overlap=2)
    next_item(db, users["ann"])
    next_item(db, users["bob"])
    assert next_item(db, users["cat"]) is None


def test_next_item_overlap_two_counts_judgement_and_lease(db, users):
    item_id, (a, b) = ready_item(db, overlap=2)
    next_item(db, users["ann"])
    submit_judgement(db, users["ann"], item_id, [[a], [b]], shown_order=[a, b])
    assert next_item(db, users["bob"])["id"] == item_id
    assert next_item(db, users["cat"]) is None


def test_next_item_expired_lease_frees_slot(db, users):
    item_id, _ = ready_item(db, overlap=1)
    next_item(db, users["ann"], lease_seconds=60, now=1000.0)
    assert next_item(db, users["bob"], now=1059.0) is None
    assert next_item(db, users["bob"], now=1061.0)["id"] == item_id


def test_next_item_never_returns_item_already_judged_by_user(db, users):
    item_id, (a, b) = ready_item(db, "first", overlap=3)
    next_item(db, users["ann"])
    submit_judgement(db, users["ann"], item_id, [[a], [b]], shown_order=[a, b])
    assert next_item(db, users["ann"]) is None
    other_id, _ = ready_item(db, "second", overlap=3)
    assert next_item(db, users["ann"])["id"] == other_id


def test_next_item_skips_completed_item(db, users):
    item_id, (a, b) = ready_item(db, overlap=1)
    next_item(db, users["ann"])
    submit_judgement(db, users["ann"], item_id, [[a], [b]], shown_order=[a, b])
    assert next_item(db, users["bob"]) is None

