"""The promotion gate (annotations/gate.py): the decision from simulated outcomes (no model),
the intervals it rests on, and the checks on stored versions, human votes included."""

import random

import pytest

from annotations import arena, model_versions, store
from annotations.errors import InvalidInput
from annotations.gate import (
    DEFAULT_GATE_PROMPTS,
    apply_gate,
    check_gate,
    clears,
    decide,
    save_gate_settings,
    verdict_line,
)
from annotations.intervals import paired_difference, proportion_interval, regularized_beta

# ---------------------------------------------------------------- the statistics


def binomial_tail(k, n, p):
    """P[Bin(n, p) >= k], summed by hand."""
    from math import comb

    return sum(comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))


@pytest.mark.parametrize("x,n", [(1, 5), (5, 10), (7, 10), (30, 40), (59, 88)])
def test_regularized_beta_equals_binomial_tail_at_whole_numbers(x, n):
    assert regularized_beta(0.37, x, n - x + 1) == pytest.approx(binomial_tail(x, n, 0.37), rel=1e-9)


def test_exact_interval_matches_known_clopper_pearson_values():
    assert proportion_interval(5, 10) == pytest.approx((0.187086, 0.812914), abs=1e-6)
    assert proportion_interval(0, 10) == pytest.approx((0.0, 0.308497), abs=1e-6)
    assert proportion_interval(7, 10, one_sided=True) == pytest.approx((0.393376, 1.0), abs=1e-6)


def test_paired_difference_worked_by_hand():
    # 100 cases: 15 only A gets right, 5 only B, 60 both, 20 neither
    a = [True] * 15 + [False] * 5 + [True] * 60 + [False] * 20
    b = [False] * 15 + [True] * 5 + [True] * 60 + [False] * 20
    figure = paired_difference(a, b)
    # (15 - 5) / 100 = 0.10; se = sqrt(20 - 10^2 / 100) / 100 = sqrt(19) / 100; z = 1.959964
    assert figure["difference"] == pytest.approx(0.10)
    assert figure["se"] == pytest.approx(0.0435890, abs=1e-6)
    assert (figure["low"], figure["high"]) == pytest.approx((0.014567, 0.185433), abs=1e-5)
    assert (figure["a_only"], figure["b_only"], figure["n"], figure["too_few"]) == (15, 5, 100, False)


def test_paired_difference_refuses_sides_scored_on_different_cases():
    with pytest.raises(ValueError, match="3 and 2 cases"):
        paired_difference([True, False, True], [True, False])


def test_interval_of_no_data_is_everything():
    assert proportion_interval(0, 0) == (0.0, 1.0)


def test_interval_of_one_vote_is_wide():
    low, high = proportion_interval(1, 1)
    assert low < 0.03 and high == 1.0


def simulate(p_win, p_tie, rounds, n=DEFAULT_GATE_PROMPTS, seed=0):
    """How many of `rounds` simulated gate runs promote a candidate that wins each paired
    prompt with probability p_win and ties with p_tie."""
    rng = random.Random(seed)
    promoted = 0
    for _ in range(rounds):
        wins = ties = losses = 0
        for _ in range(n):
            r = rng.random()
            if r < p_tie:
                ties += 1
            elif r < p_tie + p_win:
                wins += 1
            else:
                losses += 1
        promoted += clears(wins, ties, losses)
    return promoted / rounds


@pytest.mark.parametrize("p_tie", [0.0, 0.2])
def test_candidate_equal_to_live_is_promoted_at_most_5_percent(p_tie):
    # equal: wins and losses equally likely, whatever the share of ties
    assert simulate((1 - p_tie) / 2, p_tie, 1000) <= 0.05


@pytest.mark.parametrize("p_win,p_tie", [(0.65, 0.0), (0.60, 0.10)])  # win rate (ties half) 0.65 either way
def test_candidate_with_true_win_rate_065_is_promoted_at_least_80_percent(p_win, p_tie):
    assert simulate(p_win, p_tie, 1000, seed=1) >= 0.80


def test_decide_needs_enough_prompts():
    passed, figure, reason = decide(15, 0, 1, min_n=64)
    assert not passed and figure["n"] == 16 and "at least 64" in reason


def test_decide_reports_the_interval_it_refused_on():
    passed, figure, reason = decide(50, 0, 38, min_n=64)  # 0.568: the lower bound is below 0.5
    assert not passed and figure["lower_bound"] < 0.5 < figure["win_rate"]
    assert "n=88" in reason and "lower bound" in reason


def test_decide_agrees_with_clears():
    for wins in range(30, 70, 3):
        for ties in (0, 5):
            assert decide(wins, ties, 88 - wins - ties)[0] == clears(wins, ties, 88 - wins - ties)


# ---------------------------------------------------------------- the gate on stored versions


def comparison(wins, ties=0, losses=None, n=DEFAULT_GATE_PROMPTS, judge="rm1", optimised=False):
    losses = n - wins - ties if losses is None else losses
    return {"gate_comparison": {"opponent": "base", "judge": judge, "judge_optimised": optimised,
                                "wins": wins, "ties": ties, "losses": losses, "n": wins + ties + losses,
                                "seed": 7, "prompt_ids": []}}


def add_candidate(db, version="v1", parent="base", metrics=None, method="dpo"):
    return model_versions.register_version(db, version, "policy", parent, method, None, None, metrics or {})


@pytest.fixture
def user_id(db):
    db.execute("INSERT INTO users (name, role, password_hash) VALUES ('ann', 'annotator', 'x')")
    db.conn.commit()
    return store.get_user(db, "ann")["id"]


def test_gate_promotes_a_clear_winner_over_the_live_parent(db):
    add_candidate(db, metrics=comparison(62))
    result = apply_gate(db, "v1")
    assert result["promoted"] and model_versions.get_live_version(db)["version"] == "v1"
    assert result["reward_model"]["lower_bound"] > 0.5 and result["reward_model"]["n"] == 88
    assert verdict_line(result) == "promoted v1: it is live now"


def test_gate_keeps_a_candidate_whose_interval_does_not_clear(db):
    add_candidate(db, metrics=comparison(50))  # 0.57 looks better, but could be noise
    result = apply_gate(db, "v1")
    assert not result["promoted"] and "lower bound" in result["reasons"][0]
    assert model_versions.get_live_version(db)["version"] == "base"
    assert verdict_line(result).startswith("kept v1 a candidate: reward model rm1: win rate 0.57")


def test_gate_decides_nothing_from_too_few_prompts(db):
    add_candidate(db, metrics=comparison(16, n=16))  # 16 of 16: clear, but 16 prompts are too few
    result = check_gate(db, "v1")
    assert not result["passed"] and "at least 64" in result["reasons"][0]


def test_gate_needs_a_reward_model_judgement(db):
    add_candidate(db)
    assert "reward-model comparison" in check_gate(db, "v1")["reasons"][0]


def test_gate_refuses_a_policy_judged_by_the_reward_model_it_optimised(db):
    add_candidate(db, metrics=comparison(80, optimised=True), method="ppo")
    result = apply_gate(db, "v1")
    assert not result["promoted"] and "never judged by the model it was trained against" in result["reasons"][0]


def test_gate_refuses_when_the_parent_is_no_longer_live(db):
    add_candidate(db, "v1", metrics=comparison(80))
    add_candidate(db, "v2", parent="base", metrics=comparison(80))
    model_versions.promote(db, "v1")
    result = check_gate(db, "v2")
    assert not result["passed"] and "no longer live" in result["reasons"][0]


def test_gate_passes_but_waits_when_automatic_promotion_is_off(db):
    add_candidate(db, metrics=comparison(80))
    save_gate_settings(db, {"auto_promote": False})
    result = apply_gate(db, "v1")
    assert result["passed"] and not result["promoted"] and model_versions.get_live_version(db)["version"] == "base"
    assert "automatic promotion is off" in verdict_line(result)


def test_clearly_losing_human_votes_block_a_reward_model_pass(db, user_id):
    add_candidate(db, metrics=comparison(80))
    save_gate_settings(db, {"min_human_votes": 6})
    for _ in range(6):
        battle = arena.record_battle(db, user_id, "q", "v1", "base", "new answer", "old answer")
        arena.vote(db, user_id, battle, "B")
    result = check_gate(db, "v1")
    assert not result["passed"] and "people prefer base" in result["reasons"][0]
    assert result["human"]["n"] == 6 and result["human"]["win_rate"] == 0.0


def test_gate_settings_reject_bad_values(db):
    for bad in ({"confidence": 1.0}, {"min_prompts": 0}, {"human_share": 0}, {"auto_promote": "yes"},
                {"threshold": 0.5}):
        with pytest.raises(InvalidInput):
            save_gate_settings(db, bad)


def test_reward_model_gate_needs_accuracy_clearly_above_chance_and_not_worse_than_live(db):
    def metrics(correct, n, versus=None):
        out = {"heldout_accuracy_interval": {"accuracy": correct / n, "correct": correct, "n": n,
                                             "low": 0, "high": 1, "too_few": False}}
        return {**out, "versus_live": versus} if versus else out

    model_versions.register_version(db, "rm1", "reward", None, "rm", None, None, metrics(130, 200))
    assert apply_gate(db, "rm1")["promoted"]
    model_versions.register_version(db, "rm2", "reward", None, "rm", None, None, metrics(
        128, 200, {"live": "rm1", "n": 200, "only_candidate_right": 10, "only_live_right": 12}))
    result = apply_gate(db, "rm2")
    assert not result["promoted"] and "fewer right than the live reward model rm1" in result["reasons"][0]
    model_versions.register_version(db, "rm3", "reward", None, "rm", None, None, metrics(108, 200))  # 0.54: noise
    assert "does not clear chance" in check_gate(db, "rm3")["reasons"][0]


# ---------------------------------------------------------------- human votes in the queue


def judge_gate_items(db, user_id, prefer):
    """Judge every ready gate item as `user_id`, preferring the answer of version `prefer`."""
    judged = 0
    while (item := store.next_item(db, user_id)) is not None:
        by_version = {c["policy_version"]: c["id"] for c in item["candidates"]}
        other = next(v for v in by_version if v != prefer)
        store.submit_judgement(db, user_id, item["id"], [[by_version[prefer]], [by_version[other]]],
                               shown_order=item["shown_order"])
        judged += 1
    return judged


def answer_gate_items(db):
    for item in store.pending_items(db, limit=1000):
        store.add_candidates(db, item["id"], [{"text": f"{v} says {item['id']}", "policy_version": v}
                                              for v in item["versions"]])


def test_required_human_votes_queue_gate_pairs_and_promote_when_people_clearly_prefer_it(db, user_id):
    for i in range(40):
        store.add_prompt(db, f"question {i}", heldout_fraction=1.0)
    save_gate_settings(db, {"require_human_votes": True, "min_human_votes": 10, "gate_items": 20, "human_share": 1.0})
    add_candidate(db, metrics=comparison(80))
    result = apply_gate(db, "v1")
    assert not result["promoted"] and result["gate_items"] == 20 and "human votes" in result["reasons"][0]
    answer_gate_items(db)
    judge_gate_items(db, user_id, prefer="v1")
    assert model_versions.get_live_version(db)["version"] == "v1"  # promoted by the vote that cleared the interval
    board = {row["version"]: row for row in arena.leaderboard(db)}
    assert board["v1"]["battles"] >= 10  # the gate's votes count in the arena leaderboard


def test_required_human_votes_keep_a_candidate_people_do_not_prefer(db, user_id):
    for i in range(30):
        store.add_prompt(db, f"question {i}", heldout_fraction=1.0)
    save_gate_settings(db, {"require_human_votes": True, "min_human_votes": 10, "gate_items": 20, "human_share": 1.0})
    add_candidate(db, metrics=comparison(80))
    apply_gate(db, "v1")
    answer_gate_items(db)
    assert judge_gate_items(db, user_id, prefer="base") == 20
    assert model_versions.get_live_version(db)["version"] == "base"
    assert "human votes" in check_gate(db, "v1")["reasons"][0]


def test_available_versions_are_live_parent_candidates_and_the_admins_list(db):
    add_candidate(db, "v1", metrics=comparison(80))
    assert model_versions.available_versions(db) == ["base", "v1"]
    with pytest.raises(InvalidInput, match="no policy version"):
        model_versions.set_available_versions(db, ["v9"])
