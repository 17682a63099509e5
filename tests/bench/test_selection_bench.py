"""The selection benchmark's fairness (bench/selection.py), on a real store and without a model:
both arms queue the same items in the same order, the uncertainty arm serves the smallest
reward-model margins first, and an item gets the same judgement whichever arm serves it."""

from __future__ import annotations

from bench.selection import Arm, _gold_pairs

PROMPTS = [[{"role": "user", "content": f"question number {i}"}] for i in range(6)]
ANSWERS = [[f"answer {i}.{r}" for r in range(4)] for i in range(6)]
GOLD = {i: [0.1 * i, 1.0, -1.0, 0.5] for i in range(6)}
# rm0's scores: prompt 4's answers are the closest together, then prompt 2's
RM0 = {i: [0.0, 3.0, 6.0, 9.0] for i in range(6)}
RM0[4] = [0.0, 0.01, 6.0, 9.0]
RM0[2] = [0.0, 0.5, 6.0, 9.0]


def arms(tmp_path):
    out = {policy: Arm(tmp_path / f"{policy}.db", policy) for policy in ("oldest", "uncertainty")}
    for arm in out.values():
        arm.queue([0, 1, 2, 3, 4, 5], PROMPTS, ANSWERS, RM0)
    return out


def test_uncertainty_serves_the_smallest_margins_first_and_oldest_the_queue_order(tmp_path):
    both = arms(tmp_path)
    assert both["uncertainty"].judge(2, GOLD, temperature=0.05) == [4, 2]
    assert both["oldest"].judge(2, GOLD, temperature=0.05) == [0, 1]


def test_an_item_gets_the_same_judgement_in_both_arms(tmp_path):
    both = arms(tmp_path)
    for arm in both.values():
        assert sorted(arm.judge(None, GOLD, temperature=0.5)) == [0, 1, 2, 3, 4, 5]
    key = lambda row: (str(row["prompt"]), row["chosen"][0]["content"], row["rejected"][0]["content"])  # noqa: E731
    oldest, uncertainty = both["oldest"].rows(), both["uncertainty"].rows()
    assert oldest and sorted(map(key, oldest)) == sorted(map(key, uncertainty))


def test_a_cold_person_ranks_as_gold_and_the_pairs_follow(tmp_path):
    arm = arms(tmp_path)["oldest"]
    arm.judge(1, GOLD, temperature=1e-4)  # prompt 0: gold 0.0, 1.0, -1.0, 0.5 -> 1 > 3 > 0 > 2
    pairs = {(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in arm.rows()}
    assert pairs == {("answer 0.1", "answer 0.3"), ("answer 0.1", "answer 0.0"), ("answer 0.1", "answer 0.2"),
                     ("answer 0.3", "answer 0.0"), ("answer 0.3", "answer 0.2"), ("answer 0.0", "answer 0.2")}


def test_gold_pairs_put_gold_choice_first_and_leave_out_ties_and_equal_answers():
    rows = _gold_pairs([PROMPTS[0]], [["a", "b", "b", "c"]], [[0.0, 2.0, 1.0, 0.0]])
    pairs = [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows]
    # a-b, a-b(2), b-c, b(2)-c; a and c tie on gold, the two b's are the same answer
    assert pairs == [("b", "a"), ("b", "a"), ("b", "c"), ("b", "c")]
