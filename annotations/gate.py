"""The promotion gate: a new version goes live by itself only when the evidence says it is
better than the live one, and every verdict says how sure it is.

A policy candidate is compared with the version it descends from (which must still be live)
on paired answers to a fresh, seeded random sample of held-out prompts that its round records
(`align.round_eval`): both versions answer each prompt with the same sampling seed and a reward
model judges each pair; ties count half. The candidate passes when the one-sided lower bound
of that win rate at the gate's confidence (95% by default) is above 0.5 — an exact
(Clopper–Pearson) bound, so a candidate no better than the live one is promoted at most 5% of
the time whatever n is (`annotations.intervals`). Fewer than `min_prompts` compared prompts
decide nothing.

A policy is never judged by a reward model that its own round optimised (PPO maximises the
very score that would judge it: reward hacking looks like improvement to it). Such a candidate
is not promoted automatically; people can still decide.

Human votes. With `require_human_votes`, the decision rests on people: candidate-vs-live
pairs are served to annotators as blind pairwise items in the normal queue (`human_share` of
the items dealt, `gate_items` prompts), each judgement is a vote (both bad and ties count
half), and the candidate is promoted as soon as the lower bound of the human win rate clears
0.5 with at least `min_human_votes` votes. Arena battles between the two versions count too,
and these votes count in the arena leaderboard. Without the setting, human votes can still
block: once there are `min_human_votes` votes and their upper bound is below 0.5, people
prefer the live version and the candidate stays a candidate.

A reward model passes when the lower bound of its held-out accuracy is above 0.5 and, on the
same held-out pairs, it gets at least as many right as the live reward model.
"""

from __future__ import annotations

import json
import random

from annotations.errors import InvalidInput
from annotations.intervals import DEFAULT_CONFIDENCE, describe, proportion_interval, regularized_beta, win_rate

GATE_SETTING = "promotion_gate"
GATE_DEFAULTS = {
    "auto_promote": True,
    "confidence": DEFAULT_CONFIDENCE,
    "min_prompts": 64,
    "require_human_votes": False,
    "human_share": 0.25,
    "min_human_votes": 30,
    "gate_items": 60,
}
# Held-out prompts a round compares the candidate and its parent on (align.round_eval): the
# smallest sample at which the exact one-sided 95% test promotes an equal candidate at most
# 3.5% of the time (binomial discreteness) and a candidate with a true win rate of 0.65 at
# least 85% of the time (tests/annotations/test_gate.py simulates both).
DEFAULT_GATE_PROMPTS = 88


def check_settings(values: dict | None) -> dict:
    """Complete, validated gate settings (InvalidInput names the bad one)."""
    values = dict(values or {})
    values.pop("min_win_rate", None)  # older settings: a point-estimate threshold, no longer used
    values.pop("min_arena_votes", None)
    unknown = set(values) - set(GATE_DEFAULTS)
    if unknown:
        raise InvalidInput(f"unknown gate setting(s) {', '.join(sorted(unknown))}: use {', '.join(GATE_DEFAULTS)}")
    out = {**GATE_DEFAULTS, **values}
    for key in ("auto_promote", "require_human_votes"):
        if not isinstance(out[key], bool):
            raise InvalidInput(f"{key} must be true or false")
    if not 0.5 <= float(out["confidence"]) < 1:
        raise InvalidInput("confidence must be at least 0.5 and below 1 (0.95 is usual)")
    if not 0 < float(out["human_share"]) <= 1:
        raise InvalidInput("human_share is the fraction of items dealt that are gate pairs: above 0, at most 1")
    for key, low in (("min_prompts", 1), ("min_human_votes", 1), ("gate_items", 1)):
        if isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < low:
            raise InvalidInput(f"{key} must be a whole number of at least {low}")
    out["confidence"], out["human_share"] = float(out["confidence"]), float(out["human_share"])
    return out


def gate_settings(db) -> dict:
    from annotations.store import get_setting

    try:
        return check_settings(get_setting(db, GATE_SETTING, {}))
    except InvalidInput:  # a hand-edited setting: the defaults, not a crash
        return dict(GATE_DEFAULTS)


def save_gate_settings(db, values: dict) -> dict:
    from annotations.store import set_setting

    values = check_settings(values)
    set_setting(db, GATE_SETTING, values)
    return values


# ---------------------------------------------------------------- the decision


def clears(wins: int, ties: int, losses: int, *, confidence: float = DEFAULT_CONFIDENCE,
           min_n: int = GATE_DEFAULTS["min_prompts"]) -> bool:
    """The gate's test alone: n >= `min_n` and the one-sided exact lower bound of the win rate
    (ties half) above 0.5, i.e. I_0.5(x, n - x + 1) < 1 - confidence with x = wins + ties / 2."""
    n = wins + ties + losses
    x = wins + 0.5 * ties
    return n >= min_n and x > 0 and regularized_beta(0.5, x, n - x + 1) < 1.0 - confidence


def decide(wins: int, ties: int, losses: int, *, confidence: float = DEFAULT_CONFIDENCE,
           min_n: int = GATE_DEFAULTS["min_prompts"]) -> tuple[bool, dict, str | None]:
    """Whether a paired comparison shows the candidate better: (passed, figure, reason it did not).

    Passes when n >= `min_n` and the one-sided lower bound of the win rate (ties half) at
    `confidence` is above 0.5.
    """
    figure = win_rate(wins, ties, losses, confidence)
    if figure["n"] < min_n:
        return False, figure, f"only {figure['n']} compared prompts; the gate needs at least {min_n}"
    if figure["lower_bound"] <= 0.5:
        return False, figure, (f"win rate {describe(figure)}: its one-sided {confidence:.0%} lower bound "
                               f"{figure['lower_bound']:.3f} does not clear 0.5, so it may be no better")
    return True, figure, None


def human_record(db, version: str, opponent: str) -> tuple[int, int, int]:
    """(wins, ties, losses) of `version` against `opponent` in people's votes: arena battles and
    judgements of gate pairs between exactly those two (both bad and ties count as ties)."""
    from annotations.arena import voted_battles

    wins = ties = losses = 0
    for a, b, winner in voted_battles(db):
        if {a, b} != {version, opponent}:
            continue
        side = "A" if a == version else "B"
        if winner == side:
            wins += 1
        elif winner in ("A", "B"):
            losses += 1
        else:
            ties += 1
    return wins, ties, losses


def check_gate(db, version: str, settings: dict | None = None) -> dict:
    """Whether candidate `version` may be promoted automatically, and why (not)."""
    from annotations.model_versions import get_live_version, get_version

    settings = check_settings(settings) if settings is not None else gate_settings(db)
    row = get_version(db, version)
    live = get_live_version(db, row["kind"])
    if row["kind"] == "reward":
        return _check_reward_model(row, live, settings)
    reasons = []
    if row["state"] != "candidate":
        reasons.append(f"{version} is {row['state']}, not a candidate")
    if live is not None and row["parent"] != live["version"]:
        reasons.append(f"its parent {row['parent']} is no longer live ({live['version']} is): compare it with "
                       f"{live['version']} in the arena, or promote it by hand")
    comparison = row["metrics"].get("gate_comparison")
    model_figure = None
    if not comparison:
        model_verdict = "no reward-model comparison with its parent (train and promote a reward model first)"
    elif comparison.get("judge_optimised"):
        model_verdict = (f"its round optimised the judging reward model {comparison.get('judge')}: a policy is "
                         "never judged by the model it was trained against (reward hacking would look like "
                         "improvement); people must decide (require human votes, or promote by hand)")
    else:
        passed, model_figure, why = decide(comparison["wins"], comparison["ties"], comparison["losses"],
                                           confidence=settings["confidence"], min_n=settings["min_prompts"])
        model_verdict = None if passed else f"reward model {comparison.get('judge')}: {why}"
    human_figure, human_verdict = None, None
    if live is not None:
        wins, ties, losses = human_record(db, version, live["version"])
        human_figure = win_rate(wins, ties, losses, settings["confidence"])
        if settings["require_human_votes"]:
            passed, human_figure, why = decide(wins, ties, losses, confidence=settings["confidence"],
                                               min_n=settings["min_human_votes"])
            human_verdict = None if passed else f"human votes: {why}"
        elif human_figure["n"] >= settings["min_human_votes"] and human_figure["high"] < 0.5:
            human_verdict = f"people prefer {live['version']}: human win rate {describe(human_figure)}"
    if settings["require_human_votes"]:
        reasons += [human_verdict] if human_verdict else []
    else:
        reasons += [v for v in (model_verdict, human_verdict) if v]
    return {"version": version, "kind": "policy", "passed": not reasons, "reasons": reasons,
            "auto_promote": settings["auto_promote"], "require_human_votes": settings["require_human_votes"],
            "reward_model": model_figure, "judge": (comparison or {}).get("judge"), "human": human_figure,
            "opponent": live["version"] if live else None}


def _check_reward_model(row: dict, live: dict | None, settings: dict) -> dict:
    reasons = []
    metrics = row["metrics"]
    figure = metrics.get("heldout_accuracy_interval")
    if row["state"] != "candidate":
        reasons.append(f"{row['version']} is {row['state']}, not a candidate")
    if not figure or not figure.get("n"):
        reasons.append("no held-out accuracy (the store has no held-out pairs yet)")
    else:
        lower, _ = proportion_interval(figure["correct"], figure["n"], settings["confidence"], one_sided=True)
        if lower <= 0.5:
            reasons.append(f"held-out accuracy {describe(figure, 'accuracy')}: its one-sided lower bound "
                           f"{lower:.3f} does not clear chance (0.5)")
        versus = metrics.get("versus_live")
        if live is not None and versus and versus.get("live") == live["version"] \
                and versus["only_candidate_right"] < versus["only_live_right"]:
            reasons.append(f"on the same {figure['n']} held-out pairs it gets fewer right than the live reward "
                           f"model {live['version']} ({versus['only_candidate_right']} pairs only it gets right, "
                           f"{versus['only_live_right']} only {live['version']} gets right)")
    return {"version": row["version"], "kind": "reward", "passed": not reasons, "reasons": reasons,
            "auto_promote": settings["auto_promote"], "accuracy": figure}


def apply_gate(db, version: str) -> dict:
    """Promote `version` if automatic promotion is on and the gate passes; with human votes
    required, queue its candidate-vs-live pairs for annotators first. Returns the check with
    `promoted` (and `gate_items` queued) set."""
    from annotations.model_versions import promote

    result = check_gate(db, version)
    result["promoted"], result["gate_items"] = False, 0
    if result["passed"] and result["auto_promote"]:
        promote(db, version)
        result["promoted"] = True
    elif result["kind"] == "policy" and result["require_human_votes"] and result["opponent"]:
        result["gate_items"] = queue_gate_items(db, version, result["opponent"])
    return result


def verdict_line(result: dict) -> str:
    """What the gate did, in words, for logs and the command line."""
    if result.get("promoted"):
        return f"promoted {result['version']}: it is live now"
    if result["passed"]:
        return f"{result['version']} passed the gate; automatic promotion is off, so it stays a candidate"
    text = f"kept {result['version']} a candidate: " + "; ".join(result["reasons"])
    if result.get("gate_items"):
        text += f" (queued {result['gate_items']} blind pairs against {result['opponent']} for annotators)"
    return text


# ---------------------------------------------------------------- human votes in the queue


def queue_gate_items(db, version: str, opponent: str, *, seed: int | None = None) -> int:
    """Queue blind pairwise items answering held-out prompts (else any prompts) once by
    `version` and once by `opponent`, for annotators to judge; returns how many. Items already
    queued for the same pair of versions count towards `gate_items`."""
    from annotations.db import write_transaction
    from annotations.store import queue_items

    settings = gate_settings(db)
    pair = json.dumps([version, opponent])
    with write_transaction(db):
        queued = db.execute("SELECT count(*) FROM items WHERE gate_versions = ?", [pair]).fetchone()[0]
        wanted = settings["gate_items"] - queued
        if wanted <= 0:
            return 0
        prompt_ids = [r[0] for r in db.execute("SELECT id FROM prompts WHERE split = 'heldout' ORDER BY id")] or \
            [r[0] for r in db.execute("SELECT id FROM prompts ORDER BY id")]
        rng = random.Random(seed if seed is not None else f"gate:{version}:{opponent}")
        chosen = rng.sample(prompt_ids, min(wanted, len(prompt_ids)))
        ids = queue_items(db, chosen, mode="pairwise", k=2, overlap=1, versions=[version, opponent])
        for item_id in ids:
            db.execute("UPDATE items SET gate_versions = ? WHERE id = ?", [pair, item_id])
        return len(ids)


def after_gate_vote(db, item_id: int) -> dict | None:
    """Called when a gate item gets a judgement: re-run the gate for its candidate (which may
    promote it). None for other items."""
    row = db.execute("SELECT gate_versions FROM items WHERE id = ?", [item_id]).fetchone()
    if row is None or row[0] is None:
        return None
    version = json.loads(row[0])[0]
    from annotations.model_versions import get_version

    if get_version(db, version)["state"] != "candidate":
        return None
    return apply_gate(db, version)
