"""What a round trains on: snapshots of the store's pairs and prompts, and their hash.

A snapshot is bounded by watermarks (the highest pair, rating and judgement ids a round saw,
stored on the round), so a later round can take only what came after, and its hash names
the exact rows, so the same data gives the same hash on any machine. No torch.
"""

from __future__ import annotations

import hashlib
import json
from typing import Iterable

from annotations.errors import InvalidInput
from annotations.round_records import get_round
from annotations.store import iter_pairs

# What a data snapshot's hash covers: the row ids and every text that training reads.
HASH_KEYS = ("id", "messages", "chosen", "rejected", "completion", "label")


def pair_watermark(db) -> int:
    """The highest pair id in the store (0 if none): the edge of a data snapshot."""
    return db.execute("SELECT coalesce(max(id), 0) FROM pairs").fetchone()[0]


def rating_watermark(db) -> int:
    return db.execute("SELECT coalesce(max(id), 0) FROM ratings").fetchone()[0]


def judgement_watermark(db) -> int:
    return db.execute("SELECT coalesce(max(id), 0) FROM judgements").fetchone()[0]


def since_watermark(db, since_round, method: str | None, column: str) -> int:
    """The watermark (`column`) of the round that `since_round` names: 0 for None."""
    if since_round is None:
        return 0
    if since_round == "last":
        sql = f"SELECT {column} FROM rounds WHERE status = 'succeeded'"
        params = []
        if method:
            sql += " AND method = ?"
            params.append(method)
        row = db.execute(sql + " ORDER BY id DESC LIMIT 1", params).fetchone()
        return (row[0] or 0) if row else 0
    try:
        round_id = int(since_round)
    except (TypeError, ValueError):
        raise InvalidInput(f"since_round {since_round!r} is not a round id, 'last' or None") from None
    value = get_round(db, round_id)[column]
    if value is None:
        raise InvalidInput(f"round {round_id} recorded no data snapshot to continue from")
    return value


def select_pairs(
    db,
    since_round: int | str | None = None,
    split: str | None = "train",
    min_weight: float | None = None,
    *,
    method: str | None = None,
    until_id: int | None = None,
    min_agreement: float | None = None,
    min_annotator_accuracy: float | None = None,
) -> list[dict]:
    """Preference pairs for training or evaluation, oldest first (dicts as `store.iter_pairs`).

    since_round: None for every pair; 'last' for pairs newer than the snapshot of the last
    succeeded round (of `method`, if given); a round id for pairs newer than that round's
    snapshot. `until_id` caps the snapshot (see `pair_watermark`), `min_weight` drops
    lighter pairs, `split` picks the prompts' train or held-out split (None: both).
    `min_agreement` / `min_annotator_accuracy` drop pairs whose item agreement or whose
    annotator's gold accuracy is known and below the bar (see `annotations.quality`).
    """
    since_id = since_watermark(db, since_round, method, "data_until_pair_id")
    keep = None
    if min_agreement is not None or min_annotator_accuracy is not None:
        from annotations.quality import select_pair_ids

        keep = select_pair_ids(db, min_agreement=min_agreement, min_annotator_accuracy=min_annotator_accuracy)
    return [
        pair for pair in iter_pairs(db, split=split)
        if pair["id"] > since_id
        and (until_id is None or pair["id"] <= until_id)
        and (min_weight is None or pair["weight"] >= min_weight)
        and (keep is None or pair["id"] in keep)
    ]


def select_prompts(db, split: str | None = "train", limit: int | None = None) -> list[dict]:
    """Stored prompts ({"id", "messages"}), oldest first, for sampling (PPO, evaluation)."""
    sql = "SELECT id, messages FROM prompts"
    params: list = []
    if split:
        sql += " WHERE split = ?"
        params.append(split)
    sql += " ORDER BY id"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(int(limit))
    return [{"id": r[0], "messages": json.loads(r[1])} for r in db.execute(sql, params).fetchall()]


def snapshot_hash(rows: Iterable[dict]) -> str:
    """sha256 (hex) over the exact rows a round trains on: their ids and texts, in order.

    The same pairs give the same hash on any machine; any added, removed, reordered or edited
    pair changes it. Keys outside `HASH_KEYS` (weights, splits, timestamps) do not count.
    """
    digest = hashlib.sha256()
    for row in rows:
        record = {key: row[key] for key in HASH_KEYS if key in row}
        digest.update(json.dumps(record, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()
