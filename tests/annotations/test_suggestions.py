"""The reward model's suggested ranking: what a person was shown is recorded with their view
and their judgement, and agreement with it is counted per reward model and annotator, with
hand-worked figures (annotations/suggestions.py)."""

import json

import pytest

from annotations.store import add_candidates, add_prompt, next_item, queue_items, set_setting, submit_judgement
from annotations.suggestions import suggestion_agreement, suggestion_for
from tests.annotations.conftest import ANNOTATORS  # noqa: F401


def test_the_suggestion_ranks_by_score_ties_equal_scores_and_needs_every_score():
    c = lambda i, s, v="rm1": {"id": i, "reward_score": s, "reward_version": v}  # noqa: E731
    assert suggestion_for([c(1, 0.2), c(2, 1.5), c(3, 0.2)]) == {
        "ranking": [[2], [1, 3]], "scores": {"1": 0.2, "2": 1.5, "3": 0.2}, "version": "rm1"}
    assert suggestion_for([c(1, 0.2), c(2, None)]) is None
    assert suggestion_for([c(1, 0.2), c(2, 0.1, "rm2")]) is None  # two reward models: no one suggestion


def scored_item(db, text, scores, overlap=2):
    prompt_id, _ = add_prompt(db, text)
    (item_id,) = queue_items(db, [prompt_id], mode="ranking", k=len(scores), overlap=overlap)
    ids = add_candidates(db, item_id, [{"text": f"{text} {i}", "policy_version": "base", "reward_score": s,
                                        "reward_version": "rm1"} for i, s in enumerate(scores)])
    return item_id, ids


def test_what_was_suggested_is_recorded_with_the_view_and_the_judgement(db, users):
    item_id, (a, b, c) = scored_item(db, "Which?", [2.0, 1.0, 3.0])
    view = next_item(db, users["ann"])
    assert view["suggestion"]["ranking"] == [[c], [a], [b]] and view["suggestion"]["version"] == "rm1"
    set_setting(db, "suggestions", False)  # turned off later: the view already shown keeps what it showed
    assert next_item(db, users["ann"])["suggestion"]["ranking"] == [[c], [a], [b]]
    assert next_item(db, users["bob"])["suggestion"] is None  # a blind study from now on
    submit_judgement(db, users["ann"], item_id, [[a], [b], [c]], shown_order=view["shown_order"])
    stored = json.loads(db.execute("SELECT suggestion FROM judgements WHERE user_id = ?", [users["ann"]]).fetchone()[0])
    assert stored["ranking"] == [[c], [a], [b]]


def test_agreement_is_the_share_of_ordered_pairs_the_suggestion_orders_alike(db, users):
    item_id, (a, b, c) = scored_item(db, "Which?", [2.0, 1.0, 3.0])
    for name in ("ann", "bob"):
        view = next_item(db, users[name])
        ranking = [[a], [b], [c]] if name == "ann" else [[c], [a], [b]]  # bob accepts the suggestion as it was
        submit_judgement(db, users[name], item_id, ranking, shown_order=view["shown_order"])
    report = suggestion_agreement(db)
    # ann: A>B agrees (2 > 1), A>C and B>C do not (3 is highest): 1 of 3; bob: 3 of 3
    [version] = report["by_version"]
    assert (version["version"], version["pairs"], version["judgements"], version["accepted_unchanged"]) == \
        ("rm1", 6, 2, 1)
    assert version["agreement"]["accuracy"] == pytest.approx(4 / 6) and version["too_few"]
    by_name = {row["annotator"]: row for row in report["by_annotator"]}
    assert by_name["ann"]["agreement"]["accuracy"] == pytest.approx(1 / 3)
    assert by_name["bob"]["agreement"]["accuracy"] == 1.0 and by_name["bob"]["accepted_unchanged"] == 1
    low, high = version["agreement"]["low"], version["agreement"]["high"]
    assert 0.2 < low < 4 / 6 < high < 1.0  # exact interval of 4 of 6


def test_ties_in_the_judgement_give_no_pair_to_count(db, users):
    item_id, (a, b) = scored_item(db, "Tie?", [1.0, 0.0], overlap=1)
    view = next_item(db, users["ann"])
    submit_judgement(db, users["ann"], item_id, [[a, b]], shown_order=view["shown_order"])
    [version] = suggestion_agreement(db)["by_version"]
    assert version["pairs"] == 0 and version["agreement"]["accuracy"] is None and version["judgements"] == 1
