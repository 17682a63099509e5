"""An annotator's recent judgements, and changing one of them within a window.

A change (`revise_judgement`) is one transaction: the judgement gets its new ranking and moves
to a new id (above every id a round's snapshot has seen, so a `data=new` round takes it as new
data, and KTO's labels with it); its old pairs and ratings are replaced by those the new
ranking implies, each with a new id too. What it was before — the row, its pairs exactly as
training read them (ids, prompt, texts), its ratings — is kept in `judgement_revisions`, so a
round that already trained on the old pairs keeps a true record of what it saw: its stored
hash covers the old rows, and `lineage_pairs` gives them back (`tests/annotations/
test_judgement_history.py` recomputes a round's hash after a change).

The window (`reopen_window_minutes`, 30 by default, 0: never) runs from the first submission.
Votes on a promotion gate's blind pair cannot be changed: they may already have promoted a
version. No torch.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from annotations.db import write_transaction
from annotations.errors import InvalidInput, NotFound, PermissionDenied

DEFAULT_REOPEN_MINUTES = 30
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def reopen_minutes(db) -> float:
    from annotations.store import get_setting

    return float(get_setting(db, "reopen_window_minutes", DEFAULT_REOPEN_MINUTES))


def _parse_time(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def _now(now: datetime | None) -> datetime:
    return now or datetime.now(timezone.utc)


def recent_judgements(db, user_id: int, limit: int = 10, *, now: datetime | None = None) -> list[dict]:
    """This person's last judgements, newest first: what they said, in the letters they saw,
    and until when they may change it ({"judgement_id", "item_id", "prompt", "mode", "ranking"
    (e.g. "B > A = C", "both bad", "written answer first"), "submitted_at", "revisions",
    "open_until" (None: cannot be changed), "why_closed"})."""
    window = reopen_minutes(db)
    rows = db.execute(
        "SELECT j.id, j.item_id, j.mode, j.ranking, j.both_bad, j.shown_order, j.created_at, j.revisions,"
        " prompts.messages, items.gate_versions FROM judgements j JOIN items ON items.id = j.item_id"
        " JOIN prompts ON prompts.id = items.prompt_id WHERE j.user_id = ? ORDER BY j.created_at DESC, j.id DESC"
        " LIMIT ?", [user_id, int(limit)]).fetchall()
    out = []
    for (judgement_id, item_id, mode, ranking, both_bad, shown, created, revisions, messages, gate) in rows:
        deadline = _parse_time(created) + timedelta(minutes=window)
        why = None
        if gate:
            why = "a promotion vote: it may already have decided a promotion"
        elif window <= 0:
            why = "changing judgements is turned off"
        elif _now(now) > deadline:
            why = f"older than {window:g} minutes"
        user_turns = [m["content"] for m in json.loads(messages) if m["role"] == "user"]
        out.append({
            "judgement_id": judgement_id, "item_id": item_id, "mode": mode,
            "prompt": user_turns[-1] if user_turns else "",
            "ranking": describe_ranking(json.loads(ranking), json.loads(shown), bool(both_bad)),
            "submitted_at": created, "revisions": revisions,
            "open_until": None if why else deadline.strftime("%Y-%m-%dT%H:%M:%SZ"), "why_closed": why,
        })
    return out


def describe_ranking(tiers: list[list[int]], shown_order: list[int], both_bad: bool) -> str:
    """A stored ranking in the letters the annotator saw: `B > A = C`; a written answer is
    "written"; "both bad" says so."""
    def name(candidate_id):
        return LETTERS[shown_order.index(candidate_id)] if candidate_id in shown_order else "written"

    text = " > ".join(" = ".join(name(c) for c in tier) for tier in tiers)
    return f"both bad ({text})" if both_bad else text


def judgement_for_reopening(db, user_id: int, judgement_id: int, *, now: datetime | None = None) -> dict:
    """The judgement to change, checked ({"judgement_id", "item_id", "shown_order", "ranking",
    "both_bad", "written_id"}): theirs, within the window, not a gate vote."""
    row = db.execute("SELECT user_id, item_id, ranking, both_bad, shown_order, created_at FROM judgements"
                     " WHERE id = ?", [judgement_id]).fetchone()
    if row is None:
        raise NotFound(f"no judgement {judgement_id}: it may have been changed since (it then has a new number)")
    owner, item_id, ranking, both_bad, shown, created = row
    if owner != user_id:
        raise PermissionDenied("this judgement is someone else's")
    window = reopen_minutes(db)
    if db.execute("SELECT gate_versions FROM items WHERE id = ?", [item_id]).fetchone()[0]:
        raise InvalidInput("a vote on a promotion pair cannot be changed: it may already have promoted a version")
    if window <= 0:
        raise InvalidInput("changing judgements is turned off for this project")
    if _now(now) > _parse_time(created) + timedelta(minutes=window):
        raise InvalidInput(f"judgement {judgement_id} is older than {window:g} minutes: it can no longer be changed")
    tiers = json.loads(ranking)
    shown_order = json.loads(shown)
    written = [c for c in tiers[0] if c not in shown_order] if tiers else []
    return {"judgement_id": judgement_id, "item_id": item_id, "shown_order": shown_order, "ranking": tiers,
            "both_bad": bool(both_bad), "written_id": written[0] if written else None}


def revise_judgement(db, user_id: int, judgement_id: int, ranking, *, both_bad: bool = False,
                     ratings: dict[int, int] | None = None, pair_policy: str = "all",
                     now: datetime | None = None) -> dict:
    """Replace judgement `judgement_id`'s ranking (tiers of the item's model answers, best
    first; a written answer stays first) in one transaction. `ratings` (thumbs) default to the
    ones given before. Returns {"judgement_id" (its new id), "previous_id", "pairs"}."""
    from annotations.quality import refresh_pair_weights
    from annotations.store import _validate_ranking, insert_judgement_pairs, insert_judgement_ratings

    with write_transaction(db):
        old = judgement_for_reopening(db, user_id, judgement_id, now=now)
        item_id = old["item_id"]
        prompt_id, gold = db.execute("SELECT prompt_id, gold FROM items WHERE id = ?", [item_id]).fetchone()
        candidates = {r[0]: {"text": r[1], "version": r[2]} for r in db.execute(
            "SELECT id, text, policy_version FROM candidates WHERE item_id = ?", [item_id])}
        model_ids = set(old["shown_order"])
        tiers = _validate_ranking(ranking, model_ids)
        if ratings is None:
            ratings = {r[0]: r[1] for r in db.execute(
                "SELECT candidate_id, value FROM ratings WHERE judgement_id = ? AND source = 'thumbs'",
                [judgement_id])}
        for candidate_id, value in ratings.items():
            if candidate_id not in model_ids or value not in (1, -1):
                raise InvalidInput(f"rating {value!r} for answer {candidate_id} is invalid")
        if old["written_id"] is not None:
            tiers = [[old["written_id"]], *tiers]
        before = {
            "judgement": dict(zip(("id", "ranking", "both_bad", "shown_order", "decision_ms", "created_at",
                                   "revised_at", "revisions"), db.execute(
                "SELECT id, ranking, both_bad, shown_order, decision_ms, created_at, revised_at, revisions"
                " FROM judgements WHERE id = ?", [judgement_id]).fetchone())),
            "pairs": _pairs_as_read(db, judgement_id),
            "ratings": [dict(zip(("id", "candidate_id", "value", "source", "created_at"), r)) for r in db.execute(
                "SELECT id, candidate_id, value, source, created_at FROM ratings WHERE judgement_id = ?"
                " ORDER BY id", [judgement_id])],
        }
        # Every id above those a round's snapshot may have seen: the judgement moves, its pairs
        # and ratings are new rows. Foreign keys are checked at commit, when all points home.
        db.execute("PRAGMA defer_foreign_keys = ON")
        new_id = db.execute("SELECT max(id) + 1 FROM judgements").fetchone()[0]
        db.execute(
            "UPDATE judgements SET id = ?, ranking = ?, both_bad = ?, revised_at = strftime('%Y-%m-%dT%H:%M:%fZ',"
            " 'now'), revisions = revisions + 1 WHERE id = ?",
            [new_id, json.dumps(tiers), int(both_bad), judgement_id])
        pairs = insert_judgement_pairs(db, new_id, prompt_id, user_id, tiers, candidates, both_bad=both_bad,
                                       human_id=old["written_id"], pair_policy=pair_policy)
        insert_judgement_ratings(db, new_id, user_id, ratings, model_ids, both_bad)
        db.execute("DELETE FROM pairs WHERE judgement_id = ?", [judgement_id])
        db.execute("DELETE FROM ratings WHERE judgement_id = ?", [judgement_id])
        db.execute("UPDATE judgement_revisions SET new_judgement_id = ? WHERE new_judgement_id = ?",
                   [new_id, judgement_id])
        db.execute("INSERT INTO judgement_revisions (judgement_id, new_judgement_id, user_id, item_id, before)"
                   " VALUES (?, ?, ?, ?, ?)", [judgement_id, new_id, user_id, item_id, json.dumps(before)])
        refresh_pair_weights(db, item_ids=[item_id], user_ids=[user_id] if gold else None)
        return {"judgement_id": new_id, "previous_id": judgement_id, "pairs": len(pairs)}


def _pairs_as_read(db, judgement_id: int) -> list[dict]:
    """A judgement's pairs as `store.iter_pairs` gives them to training (the keys a snapshot's
    hash covers among them), with their prompt's split."""
    from annotations.store import iter_pairs

    return list(iter_pairs(db, judgement_id=judgement_id))


def lineage_pairs(db, until_id: int, split: str | None = "train") -> list[dict]:
    """Every pair a snapshot bounded by `until_id` saw, oldest first: the pairs still in the
    store and those a change of judgement has since replaced (kept in judgement_revisions)."""
    from annotations.store import iter_pairs

    kept = {pair["id"]: pair for pair in iter_pairs(db, split=split) if pair["id"] <= until_id}
    for (before,) in db.execute("SELECT before FROM judgement_revisions"):
        for pair in json.loads(before)["pairs"]:
            if pair["id"] <= until_id and (split is None or pair["split"] == split):
                kept.setdefault(pair["id"], pair)
    return [kept[i] for i in sorted(kept)]
