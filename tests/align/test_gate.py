"""The promotion gate: automatic promotion only with a clear reward-model win over the live
parent, and not against enough human arena votes."""

import pytest

from annotations import arena, registry, store


def add_candidate(db, version="v1", parent="base", win_rate=0.7):
    metrics = {} if win_rate is None else {"win_rate_vs_parent": win_rate}
    return registry.register_version(db, version, "policy", parent, "dpo", None, None, metrics)


@pytest.fixture
def user_id(db):
    db.execute("INSERT INTO users (name, role, password_hash) VALUES ('ann', 'annotator', 'x')")
    db.conn.commit()
    return store.get_user(db, "ann")["id"]


def test_gate_promotes_a_clear_winner_over_the_live_parent(db):
    add_candidate(db, win_rate=0.7)
    result = registry.apply_gate(db, "v1")
    assert result["promoted"] and store.live_version(db) == "v1"


def test_gate_keeps_a_candidate_below_the_threshold(db):
    add_candidate(db, win_rate=0.5)
    result = registry.apply_gate(db, "v1")
    assert not result["promoted"] and "below" in result["reasons"][0]
    assert store.live_version(db) == "base"


def test_gate_needs_a_reward_model_judgement(db):
    add_candidate(db, win_rate=None)
    assert "reward model" in registry.check_gate(db, "v1")["reasons"][0]


def test_gate_refuses_when_the_parent_is_no_longer_live(db):
    add_candidate(db, "v1", win_rate=0.9)
    add_candidate(db, "v2", parent="base", win_rate=0.9)
    registry.promote(db, "v1")
    result = registry.check_gate(db, "v2")
    assert not result["passed"] and "no longer live" in result["reasons"][0]


def test_gate_respects_enough_losing_arena_votes(db, user_id):
    add_candidate(db, win_rate=0.9)
    store.set_setting(db, "promotion_gate", {"min_arena_votes": 3})
    for _ in range(3):
        battle = arena.record_battle(db, user_id, "q", "v1", "base", "new answer", "old answer")
        arena.vote(db, user_id, battle, "B")
    result = registry.check_gate(db, "v1")
    assert not result["passed"] and result["human_win_rate"] == 0.0


def test_gate_passes_but_waits_when_automatic_promotion_is_off(db):
    add_candidate(db, win_rate=0.9)
    store.set_setting(db, "promotion_gate", {"auto_promote": False})
    result = registry.apply_gate(db, "v1")
    assert result["passed"] and not result["promoted"] and store.live_version(db) == "base"


def test_select_pairs_drops_pairs_below_the_agreement_bar(db, user_id):
    # Two annotators disagree on one item: each pair agrees with half the judgements.
    db.execute("INSERT INTO users (name, role, password_hash) VALUES ('bo', 'annotator', 'x')")
    db.conn.commit()
    other = store.get_user(db, "bo")["id"]
    prompt_id, _ = store.add_prompt(db, "q?")
    (item,) = store.queue_items(db, [prompt_id], overlap=2)
    a, b = store.add_candidates(db, item, [{"text": "x", "policy_version": "base"}, {"text": "y", "policy_version": "base"}])
    store.submit_judgement(db, user_id, item, [[a], [b]], shown_order=[a, b])
    store.submit_judgement(db, other, item, [[b], [a]], shown_order=[a, b])
    assert len(registry.select_pairs(db, split=None)) == 2
    assert registry.select_pairs(db, split=None, min_agreement=0.6) == []


def test_reward_model_gate_needs_better_than_chance_and_not_worse_than_live(db):
    registry.register_version(db, "rm1", "reward", None, "rm", None, None, {"heldout_accuracy": 0.62})
    assert registry.apply_gate(db, "rm1")["promoted"]
    registry.register_version(db, "rm2", "reward", None, "rm", None, None, {"heldout_accuracy": 0.58})
    result = registry.apply_gate(db, "rm2")
    assert not result["promoted"] and "below the live" in result["reasons"][0]
    registry.register_version(db, "rm3", "reward", None, "rm", None, None, {"heldout_accuracy": 0.5})
    assert "chance" in registry.check_gate(db, "rm3")["reasons"][0]
