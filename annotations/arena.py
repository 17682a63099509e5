"""Blind arena battles between two policy versions, their votes, and the leaderboard.

A vote for A or B becomes a preference pair (source 'arena') like any judgement; a tie or
"both bad" gives no pair. The leaderboard fits Bradley–Terry strengths to the votes (ties
count half a win each way) and reports them on the Elo scale, with confidence
intervals (never zero-width, and marked provisional for few battles), plus each version's
human win rate against its parent with its interval.
"""

from __future__ import annotations

import json
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
    """(version_a, version_b, winner) for every vote between two versions: arena battles, and
    judgements of promotion-gate pairs (annotations.gate), version_a being the gate's
    candidate. A written answer does not count; a tie or both bad is a tie."""
    votes = [tuple(r) for r in db.execute(
        "SELECT version_a, version_b, winner FROM arena_battles WHERE winner IS NOT NULL ORDER BY id").fetchall()]
    rows = db.execute(
        "SELECT items.id, items.gate_versions, j.ranking, j.both_bad FROM judgements j"
        " JOIN items ON items.id = j.item_id WHERE items.gate_versions IS NOT NULL ORDER BY j.id").fetchall()
    versions = {cid: version for cid, version in db.execute(
        "SELECT id, policy_version FROM candidates WHERE item_id IN"
        " (SELECT id FROM items WHERE gate_versions IS NOT NULL) AND policy_version IS NOT NULL").fetchall()}
    for _, gate_versions, ranking, both_bad in rows:
        a, b = json.loads(gate_versions)
        tier_of = {versions[c]: i for i, tier in enumerate(json.loads(ranking)) for c in tier if c in versions}
        if a not in tier_of or b not in tier_of:
            continue
        winner = "tie" if both_bad or tier_of[a] == tier_of[b] else "A" if tier_of[a] < tier_of[b] else "B"
        votes.append((a, b, winner))
    return votes


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


PROVISIONAL_BATTLES = 20  # fewer battles than this: the row is marked provisional
Z95 = 1.959963984540054


def _covariance(strength: dict[str, float], battles, prior: float) -> tuple[list[str], list[list[float]]]:
    """Covariance of the log-strengths: the inverse of the observed information of the
    penalised Bradley–Terry likelihood (the prior's virtual ties against a fixed reference make
    it invertible, so even one battle gives a finite, wide interval)."""
    import numpy as np

    players = sorted(strength)
    index = {p: i for i, p in enumerate(players)}
    information = np.zeros((len(players), len(players)))
    for a, b, _ in battles:
        p = strength[a] / (strength[a] + strength[b])
        i, j = index[a], index[b]
        information[i, i] += p * (1 - p)
        information[j, j] += p * (1 - p)
        information[i, j] -= p * (1 - p)
        information[j, i] -= p * (1 - p)
    for player, s in strength.items():
        p = s / (s + 1.0)
        information[index[player], index[player]] += prior * p * (1 - p)
    return players, np.linalg.inv(information).tolist()


def leaderboard(db, *, anchor: str = "base", prior: float = 1.0) -> list[dict]:
    """One row per version that has votes: Elo-scale score (the anchor, if it has votes, at
    1000), its 95% interval, battles, wins, ties, and `provisional` when it has fewer than
    `PROVISIONAL_BATTLES` battles; best first.

    The interval is the Laplace approximation of the Bradley–Terry fit with a weak prior (one
    virtual tie against a fixed reference per version): score ± 1.96 standard errors of the
    log-strength difference to the anchor (or to the versions' mean when the anchor has no
    votes), on the Elo scale. Unlike a bootstrap over a handful of votes it is never zero-width:
    one battle leaves a version's score wide open. The anchor's own score is fixed by definition.
    """
    battles = voted_battles(db)
    if not battles:
        return []
    strength = bradley_terry(battles, prior=prior)
    scores = elo(strength, anchor)
    players, cov = _covariance(strength, battles, prior)
    index = {p: i for i, p in enumerate(players)}
    scale = ELO_SCALE / math.log(10)
    counts = defaultdict(lambda: {"battles": 0, "wins": 0, "ties": 0})
    for a, b, winner in battles:
        for side, version in (("A", a), ("B", b)):
            counts[version]["battles"] += 1
            counts[version]["wins"] += winner == side
            counts[version]["ties"] += winner in ("tie", "both_bad")
    rows = []
    for version, score in scores.items():
        i = index[version]
        if anchor in index:
            a = index[anchor]
            variance = cov[i][i] + cov[a][a] - 2 * cov[i][a]
        else:  # against the mean log-strength of all versions
            n = len(players)
            contrast = [(1.0 if j == i else 0.0) - 1.0 / n for j in range(n)]
            variance = sum(contrast[j] * cov[j][k] * contrast[k] for j in range(n) for k in range(n))
        half = Z95 * scale * math.sqrt(max(variance, 0.0))
        rows.append({
            "version": version, "score": round(score, 1), "ci_low": round(score - half, 1),
            "ci_high": round(score + half, 1), **counts[version],
            "provisional": counts[version]["battles"] < PROVISIONAL_BATTLES, "anchor": version == anchor,
        })
    return sorted(rows, key=lambda r: -r["score"])


def win_rates_over_parent(db) -> list[dict]:
    """For each policy version with a parent: people's win rate against that parent (ties and
    both bad count half), from votes between exactly those two versions, with its 95% interval
    and n (`annotations.intervals.win_rate`)."""
    from annotations.gate import human_record
    from annotations.intervals import win_rate

    rows = []
    for version, parent in db.execute(
            "SELECT version, parent FROM policies WHERE kind = 'policy' AND parent IS NOT NULL ORDER BY rowid"):
        figure = win_rate(*human_record(db, version, parent))
        if figure["n"]:
            rows.append({"version": version, "parent": parent, "battles": figure["n"],
                         "win_rate": round(figure["win_rate"], 3), "ci_low": round(figure["low"], 3),
                         "ci_high": round(figure["high"], 3), "too_few": figure["too_few"]})
    return rows
