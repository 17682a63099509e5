"""Which ready item is served next under each selection policy (annotations/selection.py),
with hand-worked priorities."""

import pytest

from annotations import InvalidInput
from annotations.selection import (
    disagreement_priority, diversity_priority, model_disagreement_priority, set_selection_policy, text_vector,
    uncertainty_priority,
)
from annotations.store import add_candidates, add_prompt, next_item, queue_items, submit_judgement
from tests.annotations.conftest import ANNOTATORS  # noqa: F401


def test_uncertainty_is_the_smallest_score_gap_and_needs_every_score():
    assert uncertainty_priority([0.9, 0.1, 0.5]) == pytest.approx(-0.4)  # |0.9-0.5| = 0.4 is the smallest gap
    assert uncertainty_priority([0.30, 0.31]) == pytest.approx(-0.01)
    assert uncertainty_priority([0.3, None]) is None and uncertainty_priority([0.3]) is None


def test_disagreement_is_the_share_of_pairs_ordered_differently():
    a, b, c = 1, 2, 3
    assert disagreement_priority([[[a], [b], [c]]]) is None  # one judgement: nothing to disagree with
    assert disagreement_priority([[[a], [b], [c]], [[a], [b], [c]]]) == 0.0
    # a>b, a>c, b>c against b>a, b>c, a>c... pairs (a,b) disputed, (a,c) agreed, (b,c) agreed: 1/3
    assert disagreement_priority([[[a], [b], [c]], [[b], [a], [c]]]) == pytest.approx(1 / 3)
    assert disagreement_priority([[[a], [b]], [[a, b]]]) == 1.0  # a tie against a preference is a dispute


def test_model_disagreement_is_the_share_of_pairs_reward_model_and_policy_order_differently():
    scores = [3.0, 2.0, 1.0]  # the reward model: a > b > c
    assert model_disagreement_priority(scores, [0.3, 0.2, 0.1]) == 0.0  # the policy agrees on every pair
    assert model_disagreement_priority(scores, [0.1, 0.2, 0.3]) == 1.0  # on none
    # policy: b > a > c. (a,b) disputed, (a,c) and (b,c) agreed: 1/3
    assert model_disagreement_priority(scores, [0.2, 0.3, 0.1]) == pytest.approx(1 / 3)
    assert model_disagreement_priority(scores, [0.2, 0.2, 0.1]) == pytest.approx(1 / 3)  # a tie against a preference
    assert model_disagreement_priority(scores, [0.0, 0.0, 0.0]) is None  # the base live: no view of its own
    assert model_disagreement_priority(scores, [0.3, None, 0.1]) is None
    assert model_disagreement_priority([3.0, None, 1.0], [0.3, 0.2, 0.1]) is None


def test_items_where_reward_model_and_policy_disagree_come_first(db, users):
    def scored(text, scores, implicit):
        prompt_id, _ = add_prompt(db, text)
        (item_id,) = queue_items(db, [prompt_id], mode="ranking", k=3, overlap=1)
        add_candidates(db, item_id, [{"text": f"{text} {i}", "policy_version": "v1", "reward_score": s,
                                      "reward_version": "rm1", "implicit_reward": r}
                                     for i, (s, r) in enumerate(zip(scores, implicit))])
        return item_id

    agreed = scored("Agreed?", [3, 2, 1], [0.3, 0.2, 0.1])
    split = scored("Split?", [3, 2, 1], [0.2, 0.3, 0.1])
    opposed = scored("Opposed?", [3, 2, 1], [0.1, 0.2, 0.3])
    unknown = scored("No implicit rewards?", [3, 2, 1], [None, None, None])
    set_selection_policy(db, "model_disagreement")
    assert dict(db.execute("SELECT id, priority FROM items").fetchall()) == pytest.approx(
        {agreed: 0.0, split: 1 / 3, opposed: 1.0, unknown: None})
    assert [next_item(db, users[name])["id"] for name in ("ann", "bob", "cat")] == [opposed, split, agreed]
    assert db.execute("SELECT implicit_reward FROM candidates WHERE item_id = ? ORDER BY id", [opposed]).fetchall() \
        == [(0.1,), (0.2,), (0.3,)]  # as given, stored


def test_diversity_is_one_minus_the_closest_judged_prompt():
    tea = text_vector("how do I brew green tea")
    assert diversity_priority(tea, []) == 1.0
    assert diversity_priority(tea, [text_vector("how do I brew green tea")]) == pytest.approx(0.0)
    assert diversity_priority(tea, [text_vector("name three rivers in france")]) == pytest.approx(1.0)
    near = diversity_priority(tea, [text_vector("how do I brew black tea")])
    assert 0.0 < near < 0.5


def ready(db, text, scores=None, k=2, overlap=2):
    prompt_id, _ = add_prompt(db, text)
    (item_id,) = queue_items(db, [prompt_id], mode="pairwise" if k == 2 else "ranking", k=k, overlap=overlap)
    answers = [{"text": f"{text} answer {i}", "policy_version": "base",
                "reward_score": None if scores is None else scores[i], "reward_version": "rm1"} for i in range(k)]
    return item_id, add_candidates(db, item_id, answers)


def test_the_queue_serves_the_highest_priority_first_and_records_the_policy(db, users):
    clear = ready(db, "Clear cut?", [2.0, -1.0], overlap=1)[0]
    close = ready(db, "Close call?", [0.50, 0.45], overlap=1)[0]
    unscored = ready(db, "Never scored?", overlap=1)[0]
    other = ready(db, "Far apart?", [5.0, -5.0], overlap=1)[0]
    assert next_item(db, users["ann"])["id"] == clear  # oldest first, by default
    set_selection_policy(db, "uncertainty")
    rows = dict(db.execute("SELECT id, selection FROM items").fetchall())
    assert set(rows.values()) == {"uncertainty"}
    assert next_item(db, users["bob"])["id"] == close  # the reward model can hardly tell these apart
    assert next_item(db, users["cat"])["id"] == other  # then the next smallest gap (clear is taken); unscored last
    assert db.execute("SELECT priority FROM items WHERE id = ?", [unscored]).fetchone()[0] is None
    with pytest.raises(InvalidInput, match="unknown: use one of oldest, uncertainty, disagreement, diversity"):
        set_selection_policy(db, "random")


def test_disputed_items_come_first_under_disagreement(db, users):
    agreed, (a1, a2) = ready(db, "Agreed?", overlap=3)
    disputed, (d1, d2) = ready(db, "Disputed?", overlap=3)
    fresh = ready(db, "Fresh?", overlap=3)[0]
    for item_id, first, second in ((agreed, [[a1], [a2]], [[a1], [a2]]), (disputed, [[d1], [d2]], [[d2], [d1]])):
        submit_judgement(db, users["ann"], item_id, first, shown_order=first[0] + first[1])
        submit_judgement(db, users["bob"], item_id, second, shown_order=second[0] + second[1])
    set_selection_policy(db, "disagreement")
    assert next_item(db, users["cat"])["id"] == disputed
    assert dict(db.execute("SELECT id, priority FROM items").fetchall()) == {agreed: 0.0, disputed: 1.0, fresh: None}


def test_prompts_unlike_those_judged_come_first_under_diversity(db, users):
    judged, (j1, j2) = ready(db, "How do I brew green tea at home?")
    submit_judgement(db, users["ann"], judged, [[j1], [j2]], shown_order=[j1, j2])
    similar = ready(db, "How do I brew black tea at home?")[0]
    different = ready(db, "Name three rivers in France.")[0]
    set_selection_policy(db, "diversity")
    assert next_item(db, users["bob"])["id"] == different
    assert next_item(db, users["cat"])["id"] == different  # overlap 2: a second person gets it too
    assert next_item(db, users["ann"])["id"] == similar
