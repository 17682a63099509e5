"""Arena battles, votes as pairs, Bradley–Terry scores and the leaderboard."""

import math

import pytest

from annotations import arena, store
from annotations.errors import InvalidInput, PermissionDenied

PROMPT = [{"role": "user", "content": "Which is better?"}]


@pytest.fixture
def users(db):
    db.execute("INSERT INTO users (name, role, password_hash) VALUES ('ann', 'annotator', 'x'), ('bo', 'annotator', 'x')")
    db.conn.commit()
    return [store.get_user(db, "ann")["id"], store.get_user(db, "bo")["id"]]


def test_bradley_terry_ratio_matches_win_ratio_for_two_versions():
    # ML fit for two players: s_A / s_B = wins_A / wins_B = 3 / 1.
    strength = arena.bradley_terry([("v1", "base", "A")] * 3 + [("v1", "base", "B")], prior=0)
    assert strength["v1"] / strength["base"] == pytest.approx(3.0, rel=1e-6)
    scores = arena.elo(strength, anchor="base")
    assert scores["base"] == pytest.approx(1000.0)
    assert scores["v1"] - scores["base"] == pytest.approx(400 * math.log10(3), rel=1e-6)  # 190.85


def test_bradley_terry_counts_a_tie_as_half_a_win_each():
    # wins: v1 = 1 + 0.5, base = 0.5 -> ratio 3.
    strength = arena.bradley_terry([("v1", "base", "A"), ("base", "v1", "tie")], prior=0)
    assert strength["v1"] / strength["base"] == pytest.approx(3.0, rel=1e-6)


def test_bradley_terry_prior_keeps_an_unbeaten_version_finite():
    strength = arena.bradley_terry([("v1", "base", "A")] * 5, prior=1.0)
    assert math.isfinite(strength["v1"]) and strength["v1"] > strength["base"] > 0


def test_vote_for_a_stores_a_pair_with_versions(db, users):
    battle = arena.record_battle(db, users[0], PROMPT, "v2", "v1", "answer two", "answer one")
    result = arena.vote(db, users[0], battle, "A")
    assert (result["version_a"], result["version_b"]) == ("v2", "v1")
    row = db.execute("SELECT chosen, rejected, source, chosen_version, rejected_version FROM pairs WHERE id = ?",
                     [result["pair_id"]]).fetchone()
    assert row == ("answer two", "answer one", "arena", "v2", "v1")


def test_vote_tie_stores_no_pair(db, users):
    battle = arena.record_battle(db, users[0], PROMPT, "v2", "v1", "a", "b")
    assert arena.vote(db, users[0], battle, "tie")["pair_id"] is None
    assert store.count_rows(db, "pairs") == 0


def test_vote_repeated_is_stored_once_and_a_change_is_refused(db, users):
    battle = arena.record_battle(db, users[0], PROMPT, "v2", "v1", "a", "b")
    first = arena.vote(db, users[0], battle, "B")
    assert arena.vote(db, users[0], battle, "B") == first
    with pytest.raises(InvalidInput):
        arena.vote(db, users[0], battle, "A")
    assert store.count_rows(db, "pairs") == 1


def test_vote_by_another_user_is_refused(db, users):
    battle = arena.record_battle(db, users[0], PROMPT, "v2", "v1", "a", "b")
    with pytest.raises(PermissionDenied):
        arena.vote(db, users[1], battle, "A")


def test_leaderboard_orders_versions_and_brackets_scores(db, users):
    for winner in ["A"] * 6 + ["B"] * 2:
        battle = arena.record_battle(db, users[0], PROMPT, "v1", "base", f"x{winner}", "y")
        arena.vote(db, users[0], battle, winner)
    rows = arena.leaderboard(db)
    assert [r["version"] for r in rows] == ["v1", "base"]
    assert all(r["ci_low"] <= r["score"] <= r["ci_high"] for r in rows)
    assert rows[0]["battles"] == 8 and rows[0]["wins"] == 6 and rows[0]["provisional"]
    assert rows[1]["anchor"] and rows[1]["score"] == 1000.0


def test_leaderboard_interval_after_one_battle_is_wide_and_provisional(db, users):
    battle = arena.record_battle(db, users[0], PROMPT, "v1", "v2", "one", "two")
    arena.vote(db, users[0], battle, "A")
    rows = {r["version"]: r for r in arena.leaderboard(db)}
    for row in rows.values():
        assert row["ci_high"] - row["ci_low"] > 300  # one vote says almost nothing
        assert row["provisional"] and not row["anchor"]
    assert rows["v1"]["score"] > rows["v2"]["score"]


def test_leaderboard_interval_narrows_with_more_battles(db, users):
    def width():
        row = next(r for r in arena.leaderboard(db) if r["version"] == "v1")
        return row["ci_high"] - row["ci_low"], row["provisional"]

    for i in range(4):
        arena.vote(db, users[0], arena.record_battle(db, users[0], PROMPT, "v1", "base", f"a{i}", "b"), "AB"[i % 2])
    few, few_provisional = width()
    for i in range(60):
        arena.vote(db, users[0], arena.record_battle(db, users[0], PROMPT, "v1", "base", f"c{i}", "d"), "AB"[i % 2])
    many, many_provisional = width()
    assert many < few / 2 and few_provisional and not many_provisional


def test_win_rate_over_parent_counts_only_battles_against_the_parent(db, users):
    db.execute("INSERT INTO policies (version, kind, parent, method, state) VALUES ('v1', 'policy', 'base', 'dpo', 'candidate')")
    db.conn.commit()
    for a, b, winner in [("v1", "base", "A"), ("base", "v1", "A"), ("v1", "base", "tie")]:
        arena.vote(db, users[0], arena.record_battle(db, users[0], PROMPT, a, b, "p", "q"), winner)
    (row,) = arena.win_rates_over_parent(db)
    assert {k: row[k] for k in ("version", "parent", "battles", "win_rate", "too_few")} == \
        {"version": "v1", "parent": "base", "battles": 3, "win_rate": 0.5, "too_few": True}
    assert row["ci_low"] < 0.1 and row["ci_high"] > 0.9  # three votes: anything is possible
