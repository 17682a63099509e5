"""Active selection, simulated: does serving the items the reward model is least sure about
teach more than serving them at random, at the same number of judgements?

The people are played as in the closed-loop benchmark (bench/loop.py, bench/annotators.py): the
gold reward model scores the answers and simulated annotators rank them (Plackett-Luce at the
temperature that makes two of them agree as often as people do on hh-rlhf).

1. A seed round: `seed_items` hh prompts, K=4 answers each from the base policy, judged and
   stored; a reward model rm0 trained on their pairs (the live reward model of the next round).
2. A pool of `pool_items` more prompts, K=4 base answers each, scored by rm0 as the prefetcher
   scores answers, queued in a random order in two stores that differ only in the project's
   selection policy: `oldest` (first queued first served: with a shuffled queue, random
   selection) and `uncertainty` (smallest rm0 score margin first, annotations/selection.py).
   Each store serves `select_items` items (`store.next_item`, the queue the app serves from)
   and each is ranked. An item gets the same judgement in both arms (each prompt's simulated
   person has its own seeded random stream), so the arms differ only in which items were
   served.
3. Per arm, from the base: a reward model on all its pairs (seed + selected; the reward-model
   round's defaults but one epoch, as in the loop) and a DPO round on the same pairs (its
   defaults). Both at 256 tokens.
4. Verdicts, on prompts neither arm saw:
   - the reward model's gold accuracy: on `eval_prompts` prompts with K=4 base answers, every
     pair of answers the gold model orders (answers differ), whether the arm's reward model
     orders it the same way; exact intervals, and the paired difference between the arms;
   - the policy's gold win rate over the base on `judge_prompts` prompts (the first of the
     loop's judging prompts), with its interval.

The sizes are small (two cores: about 20 s of training per pair for both models of both arms,
and some 500 sampled answers), so the intervals are wide; `FULL` sets them.

Run: `python -m bench --only selection` (over an hour on 2 cores, most of it sampling answers to the long
hh prompts; `--quick` is a smoke run of about 10 minutes).
Seed: SEED. Results: bench/selection.json and docs/selection-results.md.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path

from bench.common import REPO, Result
from bench.loop import K, MAX_LENGTH, SEED, _gold, _hh, _judging_answers, _win_rate

FULL = {"seed_items": 12, "pool_items": 48, "select_items": 24, "eval_prompts": 30, "judge_prompts": 60,
        "gold_pairs": None}
QUICK = {"seed_items": 3, "pool_items": 6, "select_items": 3, "eval_prompts": 3, "judge_prompts": 4,
         "gold_pairs": 24, "max_steps": 2}
ARMS = ("oldest", "uncertainty")
USERS = 3


def _answers(base: Path, prompts: list) -> list[list[str]]:
    """K sampled base answers for each prompt (one generation call, same settings as the loop)."""
    flat = _judging_answers(base, {}, list(prompts) * K, ["base"])["base"]
    return [[flat[j + len(prompts) * r] for r in range(K)] for j in range(len(prompts))]


def _scores(model, tokenizer, prompts: list, answers: list[list[str]]) -> list[list[float]]:
    import torch

    from align.reward import score

    with torch.inference_mode():
        flat = score(model, tokenizer, [p for p in prompts for _ in range(K)], [a for row in answers for a in row],
                     max_length=MAX_LENGTH).tolist()
    return [flat[j * K:(j + 1) * K] for j in range(len(prompts))]


def _person(index: int, temperature: float):
    """The simulated person who judges prompt `index` (the same in both arms)."""
    from bench.annotators import SimulatedAnnotator

    return SimulatedAnnotator(f"prompt{index}", temperature, seed=SEED)


class Arm:
    """One store under one selection policy, fed through the store's own queue."""

    def __init__(self, path: Path, policy: str):
        from annotations import open_db, store
        from annotations.selection import set_selection_policy

        self.db = open_db(path)
        set_selection_policy(self.db, policy)
        for u in range(USERS):
            store.add_user(self.db, f"sim{u}", "annotator", f"sim{u}-password-1")
        self.users = [store.get_user(self.db, f"sim{u}") for u in range(USERS)]
        self.index_of: dict[int, int] = {}  # store prompt id -> index into the bench's prompt list

    def queue(self, indices: list[int], prompts: list, answers: list[list[str]], scores=None) -> None:
        """Queue these prompts as ranking items with their answers (and rm0's scores) ready."""
        from annotations import store

        for index in indices:
            prompt_id, _ = store.add_prompt(self.db, prompts[index], source="hh")
            self.index_of[prompt_id] = index
            (item_id,) = store.queue_items(self.db, [prompt_id], mode="ranking", k=K, overlap=1)
            store.add_candidates(self.db, item_id, [
                {"text": text, "policy_version": "base", "reward_score": scores[index][r] if scores else None,
                 "reward_version": "rm0" if scores else None} for r, text in enumerate(answers[index])])

    def judge(self, count: int | None, gold_scores: dict[int, list[float]], temperature: float) -> list[int]:
        """Serve and judge `count` items (skips do not count; None: until the queue is empty);
        returns the prompt indices judged."""
        from annotations import store
        from bench.annotators import LETTERS, tiers

        served, judged, turn = [], 0, 0
        empty_turns = 0
        while count is None or judged < count:
            user = self.users[turn % USERS]
            turn += 1
            view = store.next_item(self.db, user["id"])
            if view is None:
                empty_turns += 1
                if empty_turns < USERS:
                    continue  # another person may still be dealt what this one skipped
                if count is None:
                    break
                raise RuntimeError(f"the queue ran dry after {judged} of {count} judgements")
            empty_turns = 0
            index = self.index_of[view["prompt_id"]]
            ids = sorted(c["id"] for c in view["candidates"])  # generation order, whatever the order shown
            ranking = _person(index, temperature).judge(gold_scores[index])
            if ranking is None:
                store.skip_item(self.db, user["id"], view["id"], "simulated skip")
                continue
            tiers_of_ids = [[ids[LETTERS.index(letter)] for letter in sorted(tier)] for tier in tiers(ranking)]
            store.submit_judgement(self.db, user["id"], view["id"], tiers_of_ids, shown_order=view["shown_order"])
            served.append(index)
            judged += 1
        return served

    def rows(self) -> list[dict]:
        from align.training import preference_rows
        from annotations.training_data import select_pairs

        return preference_rows(select_pairs(self.db, None, split=None))


def _gold_pairs(prompts: list, answers: list[list[str]], gold_scores: list[list[float]]) -> list[dict]:
    """Every pair of different answers the gold model orders, as preference rows (gold's choice first)."""
    rows = []
    for messages, texts, scores in zip(prompts, answers, gold_scores):
        for a in range(K):
            for b in range(a + 1, K):
                if texts[a] == texts[b] or scores[a] == scores[b]:
                    continue
                hi, lo = (a, b) if scores[a] > scores[b] else (b, a)
                rows.append({"prompt": messages, "chosen": [{"role": "assistant", "content": texts[hi]}],
                             "rejected": [{"role": "assistant", "content": texts[lo]}]})
    return rows


def run(base_path: Path, quick: bool = False) -> list[Result]:
    import torch

    from align.dpo import DPORoundConfig, train_dpo
    from align.evaluate import reward_correct
    from align.reward import RewardConfig, load_reward_model, train_reward_model
    from annotations.intervals import accuracy, describe, paired_difference
    from bench.annotators import calibrate_temperature

    torch.set_num_threads(2)
    sizes = dict(QUICK if quick else FULL)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="rankloop-selection-bench-"))
    train, heldout, prompts = _hh(work)
    gold, tokenizer, gold_figure = _gold(base_path, train[: sizes["gold_pairs"]] if sizes["gold_pairs"] else train,
                                         heldout, 1)
    print(f"gold reward model: held-out accuracy {describe(gold_figure, 'accuracy')}", flush=True)

    # the loop's split: its judging prompts first, then the rest in the same shuffled order
    random.Random(SEED).shuffle(prompts)
    judging, rest = prompts[: sizes["judge_prompts"]], prompts[sizes["judge_prompts"]:]
    n_seed, n_pool, n_eval = sizes["seed_items"], sizes["pool_items"], sizes["eval_prompts"]
    used = rest[: n_seed + n_pool + n_eval]
    seed_idx = list(range(n_seed))
    pool_idx = list(range(n_seed, n_seed + n_pool))
    eval_idx = list(range(n_seed + n_pool, n_seed + n_pool + n_eval))

    stage = time.perf_counter()
    answers = _answers(base_path, used)
    gold_scores = dict(enumerate(_scores(gold, tokenizer, used, answers)))
    generation_s = time.perf_counter() - stage
    print(f"base answers for {len(used)} prompts: {generation_s:.0f} s", flush=True)
    gaps = [s[a] - s[b] for i in seed_idx for s in [gold_scores[i]] for a in range(K) for b in range(a + 1, K)]
    temperature = calibrate_temperature(gaps)

    training = {"max_length": MAX_LENGTH, "threads": 2, "seed": SEED}
    if sizes.get("max_steps"):
        training["max_steps"] = sizes["max_steps"]

    # the seed round, identical for both arms: its reward model is the live one that scores the pool
    arms = {policy: Arm(work / f"{policy}.db", policy) for policy in ARMS}
    for arm in arms.values():
        arm.queue(seed_idx, used, answers)
        seed_judged = len(arm.judge(None, gold_scores, temperature))
    seed_rows = arms["oldest"].rows()
    assert seed_rows == arms["uncertainty"].rows(), "the two arms' seed rounds differ"
    train_reward_model(base_path, seed_rows, RewardConfig(**training, epochs=1), work / "rm0")
    rm0, _ = load_reward_model(base_path, work / "rm0")
    rm0_scores = dict(zip(pool_idx, _scores(rm0, tokenizer, [used[i] for i in pool_idx],
                                           [answers[i] for i in pool_idx])))
    del rm0

    eval_rows = _gold_pairs([used[i] for i in eval_idx], [answers[i] for i in eval_idx],
                            [gold_scores[i] for i in eval_idx])
    judged_base = _judging_answers(base_path, {}, judging, ["base"])["base"]
    report_arms, correct = {}, {}
    for policy, arm in arms.items():
        stage = time.perf_counter()
        order = list(pool_idx)
        random.Random(SEED + 1).shuffle(order)  # the queue's order: the same random order in both arms
        arm.queue(order, used, answers, rm0_scores)
        served = arm.judge(sizes["select_items"], gold_scores, temperature)
        rows = arm.rows()
        train_reward_model(base_path, rows, RewardConfig(**training, epochs=1), work / f"rm-{policy}")
        rm, _ = load_reward_model(base_path, work / f"rm-{policy}")
        with torch.no_grad():
            correct[policy] = reward_correct(rm, tokenizer, eval_rows, 8, MAX_LENGTH)
        del rm
        train_dpo(base_path, rows, DPORoundConfig(**training), work / f"dpo-{policy}")
        answered = _judging_answers(base_path, {policy: work / f"dpo-{policy}"}, judging, [policy])[policy]
        margins = [sorted(abs(a - b) for x, a in enumerate(rm0_scores[i]) for b in rm0_scores[i][x + 1:])[0]
                   for i in served]
        report_arms[policy] = {
            "items_judged": len(served), "judgements": sizes["select_items"] + seed_judged, "pairs": len(rows),
            "mean_rm0_margin_of_served": round(sum(margins) / len(margins), 4),
            "reward_model_gold_accuracy": accuracy(sum(correct[policy]), len(correct[policy])),
            "policy_gold_win_rate_vs_base": _win_rate(gold, tokenizer, judging, answered, judged_base),
            "seconds": round(time.perf_counter() - stage, 1)}
        print(policy, json.dumps(report_arms[policy], default=str), flush=True)

    difference = paired_difference(correct["uncertainty"], correct["oldest"])
    report = {"seed": SEED, "quick": quick, "sizes": sizes, "gold": gold_figure, "temperature": temperature,
              "eval_pairs": len(eval_rows), "seed_pairs": len(seed_rows), "arms": report_arms,
              "accuracy_difference_uncertainty_minus_random": difference,
              "generation_s": round(generation_s, 1), "total_s": round(time.perf_counter() - started, 1)}
    out = REPO / "bench" / ("selection-quick.json" if quick else "selection.json")
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if not quick:
        _write_doc(report)
    ours = report_arms["uncertainty"]["reward_model_gold_accuracy"]
    theirs = report_arms["oldest"]["reward_model_gold_accuracy"]
    return [Result(
        name="selection_uncertainty", metric=f"gold accuracy of the reward model after {report_arms['oldest']['judgements']}"
                                             f" judgements, {len(eval_rows)} unseen answer pairs",
        value=ours["accuracy"], baseline=theirs["accuracy"], baseline_label="random selection (shuffled queue)",
        unit="", higher_is_better=True, target="higher than random within the paired interval",
        details={"difference": {k: round(v, 3) if isinstance(v, float) else v for k, v in difference.items()},
                 "report": str(out.relative_to(REPO))})]


def _write_doc(report: dict) -> None:
    """docs/selection-results.md: the two arms side by side."""
    from annotations.intervals import describe

    names = {"oldest": "random (shuffled queue, oldest first)", "uncertainty": "uncertainty (smallest rm0 margin)"}
    d = report["accuracy_difference_uncertainty_minus_random"]
    sizes = report["sizes"]
    lines = [
        "# Active selection: random against uncertainty (simulated)", "",
        f"Made by `python -m bench --only selection` (bench/selection.py says how), seed {report['seed']}; "
        "how to read it: [loop-benchmark.md](loop-benchmark.md#active-selection).", "",
        f"Seed round: {sizes['seed_items']} items (K={K} base answers), {report['seed_pairs']} pairs, its reward model "
        f"rm0 scores a pool of {sizes['pool_items']} items queued in a random order; each arm then serves "
        f"{sizes['select_items']} items from it. Reward model accuracy: agreement with the gold model on "
        f"{report['eval_pairs']} answer pairs of {sizes['eval_prompts']} unseen prompts. Win rate: the arm's DPO "
        f"policy against the base on {sizes['judge_prompts']} unseen prompts, judged by gold. Gold: held-out accuracy "
        f"{describe(report['gold'], 'accuracy')}. Annotator temperature {report['temperature']:.3f}.", "",
        "| selection | judgements | pairs | mean rm0 margin of the items judged | reward model gold accuracy | "
        "policy gold win rate vs base |",
        "|---|---|---|---|---|---|",
    ]
    for policy, arm in report["arms"].items():
        lines.append(f"| {names[policy]} | {arm['judgements']} | {arm['pairs']} | {arm['mean_rm0_margin_of_served']} | "
                     f"{describe(arm['reward_model_gold_accuracy'], 'accuracy')} | "
                     f"{describe(arm['policy_gold_win_rate_vs_base'])} |")
    lines += ["", f"Paired difference in gold accuracy, uncertainty minus random: {d['difference']:+.3f} "
                  f"[{d['low']:+.3f}, {d['high']:+.3f}], n={d['n']} ({d['a_only']} pairs only uncertainty's model "
                  f"orders as gold does, {d['b_only']} only random's). Total time {report['total_s'] / 60:.0f} min.", ""]
    (REPO / "docs" / "selection-results.md").write_text("\n".join(lines))
