"""Changing the default mode, K or overlap: how many unjudged queued items keep the old ones,
and queuing them again with the new (annotations/store.py: queued_unlike, requeue_unlike)."""

from annotations.store import (
    add_candidates, add_prompt, next_item, queue_items, queued_unlike, requeue_unlike, set_gold, submit_judgement,
)
from tests.annotations.conftest import ANNOTATORS  # noqa: F401


def test_unjudged_items_are_requeued_with_the_new_settings_and_nothing_else_is_touched(db, users):
    prompts = [add_prompt(db, f"Prompt {i}?")[0] for i in range(6)]
    plain = queue_items(db, prompts[:3], mode="pairwise")  # pending, no answers yet
    held, judged, gold = queue_items(db, prompts[3:], mode="pairwise")
    for item_id in (held, judged, gold):
        add_candidates(db, item_id, [{"text": f"{item_id} a", "policy_version": "base"},
                                     {"text": f"{item_id} b", "policy_version": "base"}])
    view = next_item(db, users["ann"])  # the oldest ready item: someone has it open
    assert view["id"] == held
    other = next_item(db, users["bob"])
    submit_judgement(db, users["bob"], other["id"], [[other["shown_order"][0]], [other["shown_order"][1]]],
                     shown_order=other["shown_order"])
    set_gold(db, gold, [[r[0]] for r in db.execute("SELECT id FROM candidates WHERE item_id = ? ORDER BY id",
                                                   [gold])])
    contrast = queue_items(db, [prompts[0]], mode="ranking", k=3, versions=["base"])[0]

    assert queued_unlike(db, "pairwise", 2, 1) == 0  # nothing differs
    assert queued_unlike(db, "ranking", 4, 1) == 4  # 3 pending + the held one; not the judged, gold or contrast
    assert requeue_unlike(db, "ranking", 4, 1) == (3, 1)  # the held one stays as it is
    statuses = dict(db.execute("SELECT id, status FROM items").fetchall())
    assert [statuses[i] for i in plain] == ["retired"] * 3 and statuses[held] == "ready"
    assert statuses[contrast] == "pending"
    fresh = db.execute("SELECT prompt_id, mode, k FROM items WHERE id > ? ORDER BY id", [contrast]).fetchall()
    assert fresh == [(p, "ranking", 4) for p in prompts[:3]]
    assert queued_unlike(db, "ranking", 4, 1) == 1  # only the held one still differs
