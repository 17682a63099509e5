"""Blind arena battles between two policy versions, their votes, and the leaderboard.

A vote for A or B becomes a preference pair (source 'arena') like any judgement; a tie or
"both bad" gives no pair. The leaderboard fits Bradley–Terry strengths to the votes (ties
count half a win each way) and reports them on the Elo scale, with bootstrap confidence
intervals, plus each version's human win rate against its parent.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict

from annotations.db import write_transaction
from annotations.errors import InvalidInput, NotFound, PermissionDenied
from annotations.quality import refresh_pair_weights
from annotations.store import MAX_ANSWER_CHARS, add_prompt

WINNERS = ("A", "B", "tie", "both_bad")
ELO_BASE = 1000.0
ELO_SCALE = 400.0


def record_battle(db, user_id: int, messages, version_a: str, version_b: str, answer_a: str, answer_b: str) -> int:
    """Store a battle shown to `user_id` (before the vote); returns its id."""
    if version_a == version_b:
        raise InvalidInput("an arena battle needs two different versions")
    with write_transaction(db):
        prompt_id, _ = add_prompt(db, messages, source="arena")
        cursor = db.execute(
            "INSERT INTO arena_battles (user_id, prompt_id, version_a, version_b, answer_a, answer_b)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [user_id, prompt_id, version_a, version_b, answer_a[:MAX_ANSWER_CHARS], answer_b[:MAX_ANSWER_CHARS]],
        )
        return cursor.lastrowid


def vote(db, user_id: int, battle_id: int, winner: str) -> dict:
    """Record the vote on a battle (once; a repeated identical vote is a no-op). Returns
    {"battle_id", "winner", "pair_id", "version_a", "version_b"} — the versions are revealed
    only now."""
    if winner not in WINNERS:
        raise InvalidInput(f"vote {winner!r} is unknown: use one of {', '.join(WINNERS)}")
    with write_transaction(db):
        row = db.execute(
            "SELECT user_id, prompt_id, version_a, version_b, answer_a, answer_b, winner, pair_id"
            " FROM arena_battles WHERE id = ?", [battle_id]).fetchone()
        if row is None:
            raise NotFound(f"no arena battle {battle_id}")
        owner, prompt_id, version_a, version_b, answer_a, answer_b, previous, pair_id = row
        if owner != user_id:
            raise PermissionDenied("only the person shown this battle can vote on it")
        result = {"battle_id": battle_id, "winner": winner, "version_a": version_a, "version_b": version_b}
        if previous is not None:
            if previous != winner:
                raise InvalidInput(f"battle {battle_id} already has a vote ({previous})")
            return {**result, "pair_id": pair_id}
        if winner in ("A", "B") and answer_a.strip() != answer_b.strip():
            chosen, rejected = ((answer_a, version_a), (answer_b, version_b))[:: 1 if winner == "A" else -1]
            cursor = db.execute(
                "INSERT INTO pairs (prompt_id, chosen, rejected, source, user_id, chosen_version, rejected_version)"
                " VALUES (?, ?, ?, 'arena', ?, ?, ?)",
                [prompt_id, chosen[0], rejected[0], user_id, chosen[1], rejected[1]],
            )
            pair_id = cursor.lastrowid
            refresh_pair_weights(db, pair_ids=[pair_id])
        db.execute(
            "UPDATE arena_battles SET winner = ?, pair_id = ?, voted_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
            " WHERE id = ?", [winner, pair_id, battle_id])
        return {**result, "pair_id": pair_id}


def voted_battles(db) -> list[tuple[str, str, str]]:
    """(version_a, version_b, winner) for every battle with a vote."""
    return [tuple(r) for r in db.execute(
        "SELECT version_a, version_b, winner FROM arena_battles WHERE winner IS NOT NULL ORDER BY id").fetchall()]


def bradley_terry(battles, *, prior: float = 1.0, iterations: int = 200, tolerance: float = 1e-9) -> dict[str, float]:
    """Bradley–Terry strengths (geometric mean 1) from (a, b, winner) battles, by Hunter's MM
    algorithm. Ties and "both bad" count half a win to each side. `prior` adds that many
    virtual ties between every version and a fixed reference of strength 1, which keeps a
    version with no wins (or no losses) finite; use 0 for the plain maximum-likelihood fit."""
    wins: dict[str, float] = defaultdict(float)
    games: dict[tuple[str, str], float] = defaultdict(float)
    players = set()
    for a, b, winner in battles:
        players.update((a, b))
        games[(a, b)] += 1
        games[(b, a)] += 1
        if winner == "A":
            wins[a] += 1
        elif winner == "B":
            wins[b] += 1
        else:
            wins[a] += 0.5
            wins[b] += 0.5
    if not players:
        return {}
    strength = {p: 1.0 for p in players}
    for _ in range(iterations):
        updated = {}
        for p in players:
            denominator = sum(n / (strength[p] + strength[q]) for (x, q), n in games.items() if x == p)
            denominator += prior / (strength[p] + 1.0)
            updated[p] = (wins[p] + prior / 2) / denominator if denominator else strength[p]
        scale = math.exp(sum(math.log(max(v, 1e-300)) for v in updated.values()) / len(updated))
        updated = {p: v / scale for p, v in updated.items()}
        change = max(abs(updated[p] - strength[p]) for p in players)
        strength = updated
        if change < tolerance:
            break
    return strength


def elo(strength: dict[str, float], anchor: str | None = None) -> dict[str, float]:
    """Strengths on the Elo scale: 400·log10(s / s_anchor) + 1000 (anchor: the base, if present)."""
    if not strength:
        return {}
    reference = strength.get(anchor, None) if anchor else None
    reference = reference or math.exp(sum(math.log(s) for s in strength.values()) / len(strength))
    return {p: ELO_BASE + ELO_SCALE * math.log10(s / reference) for p, s in strength.items()}


def leaderboard(db, *, bootstrap: int = 200, seed: int = 0, anchor: str = "base") -> list[dict]:
    """One row per version that has votes: Elo-scale score, 95% bootstrap interval, battles,
    wins, ties; best first."""
    battles = voted_battles(db)
    if not battles:
        return []
    scores = elo(bradley_terry(battles), anchor)
    rng = random.Random(seed)
    samples = defaultdict(list)
    for _ in range(bootstrap):
        resample = [battles[rng.randrange(len(battles))] for _ in battles]
        for version, score in elo(bradley_terry(resample), anchor).items():
            samples[version].append(score)
    counts = defaultdict(lambda: {"battles": 0, "wins": 0, "ties": 0})
    for a, b, winner in battles:
        for side, version in (("A", a), ("B", b)):
            counts[version]["battles"] += 1
            counts[version]["wins"] += winner == side
            counts[version]["ties"] += winner in ("tie", "both_bad")
    rows = []
    for version, score in scores.items():
        s = sorted(samples[version]) or [score]
        rows.append({
            "version": version, "score": round(score, 1),
            "ci_low": round(s[int(0.025 * (len(s) - 1))], 1), "ci_high": round(s[int(0.975 * (len(s) - 1))], 1),
            **counts[version],
        })
    return sorted(rows, key=lambda r: -r["score"])


def win_rates_over_parent(db) -> list[dict]:
    """For each policy version with a parent: human arena win rate against that parent
    (ties count half), from battles between exactly those two versions."""
    parents = dict(db.execute("SELECT version, parent FROM policies WHERE kind = 'policy' AND parent IS NOT NULL"))
    tally = defaultdict(lambda: [0.0, 0])
    for a, b, winner in voted_battles(db):
        for child, side in ((a, "A"), (b, "B")):
            other = b if child == a else a
            if parents.get(child) == other:
                tally[child][1] += 1
                tally[child][0] += 1.0 if winner == side else 0.5 if winner in ("tie", "both_bad") else 0.0
    return [{"version": v, "parent": parents[v], "battles": n, "win_rate": round(w / n, 3)}
            for v, (w, n) in sorted(tally.items())]

