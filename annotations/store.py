"""Operations on the store: users, prompts, the item queue, judgements and derived pairs.

Every function that writes does so in one transaction (`write_transaction`), so a failure
leaves the database as it was. Functions take a sqlite-utils `Database` as first argument.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
import uuid
from itertools import combinations
from typing import Iterable, Sequence

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from annotations.db import write_transaction
from annotations.errors import InvalidInput, NotFound, PermissionDenied

ROLES = ("annotator", "admin")
MESSAGE_ROLES = ("system", "user", "assistant")
MAX_PROMPT_CHARS = 16_000
MAX_ANSWER_CHARS = 16_000
MAX_NAME_CHARS = 64
PAIR_POLICIES = ("all", "best_vs_rest", "adjacent")
DEFAULT_HELDOUT_FRACTION = 0.1
DEFAULT_LEASE_SECONDS = 15 * 60

_hasher = PasswordHasher()


# ---------------------------------------------------------------- users


def add_user(db, name: str, role: str, password: str) -> int:
    """Create an account; the password is stored as an Argon2id hash."""
    name = (name or "").strip()
    if not name or len(name) > MAX_NAME_CHARS or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise InvalidInput(
            f"user name {name!r} is not allowed: use 1-{MAX_NAME_CHARS} letters, digits, '-', '_' or '.'"
        )
    if role not in ROLES:
        raise InvalidInput(f"role {role!r} is unknown: use one of {', '.join(ROLES)}")
    if not password or len(password) < 8:
        raise InvalidInput("password must be at least 8 characters long")
    with write_transaction(db):
        if db.execute("SELECT 1 FROM users WHERE name = ?", [name]).fetchone():
            raise InvalidInput(f"user {name!r} already exists")
        cursor = db.execute(
            "INSERT INTO users (name, role, password_hash) VALUES (?, ?, ?)",
            [name, role, _hasher.hash(password)],
        )
        return cursor.lastrowid


def authenticate(db, name: str, password: str) -> dict | None:
    """The user's row (without the hash) if name and password match, else None."""
    row = db.execute(
        "SELECT id, name, role, password_hash FROM users WHERE name = ?", [name or ""]
    ).fetchone()
    if row is None:
        # Spend the same time as a real check, so names cannot be probed by timing.
        try:
            _hasher.verify(_DUMMY_HASH, password or "")
        except (VerificationError, InvalidHashError):
            pass
        return None
    try:
        _hasher.verify(row[3], password or "")
    except (VerificationError, InvalidHashError):
        return None
    return {"id": row[0], "name": row[1], "role": row[2]}


_DUMMY_HASH = _hasher.hash("rankloop-dummy-password")


def get_user(db, name: str) -> dict:
    row = db.execute("SELECT id, name, role FROM users WHERE name = ?", [name or ""]).fetchone()
    if row is None:
        raise NotFound(f"no user named {name!r}")
    return {"id": row[0], "name": row[1], "role": row[2]}


def require_role(user: dict | None, *roles: str) -> dict:
    """Raise PermissionDenied unless `user` holds one of `roles` (any role if none given)."""
    if user is None:
        raise PermissionDenied("log in first")
    if roles and user["role"] not in roles:
        raise PermissionDenied(f"this needs the {' or '.join(roles)} role; {user['name']} is {user['role']}")
    return user


def count_users(db) -> int:
    return db.execute("SELECT count(*) FROM users").fetchone()[0]


def has_admin(db) -> bool:
    return db.execute("SELECT 1 FROM users WHERE role = 'admin'").fetchone() is not None


def user_exists(db, name: str) -> bool:
    return db.execute("SELECT 1 FROM users WHERE name = ?", [name or ""]).fetchone() is not None


def list_accounts(db) -> list[dict]:
    """Every account, oldest first: {"name", "role", "judgements", "created_at"}."""
    return [{"name": r[0], "role": r[1], "judgements": r[2], "created_at": r[3]} for r in db.execute(
        "SELECT users.name, users.role, (SELECT count(*) FROM judgements WHERE user_id = users.id), users.created_at"
        " FROM users ORDER BY users.id").fetchall()]


def judgement_counts(db, user_id: int) -> dict:
    """How many judgements a user has given: {"done" (all time), "today" (since midnight UTC)}."""
    done, today = db.execute(
        "SELECT count(*), coalesce(sum(created_at >= date('now')), 0) FROM judgements WHERE user_id = ?",
        [user_id]).fetchone()
    return {"done": done, "today": today}


def annotator_throughput(db, limit: int = 100) -> list[dict]:
    """Judgements per annotator per day, newest first: {"name", "day", "judgements", "mean_decision_ms"}."""
    return [{"name": r[0], "day": r[1], "judgements": r[2], "mean_decision_ms": r[3]} for r in db.execute(
        "SELECT users.name, date(judgements.created_at) AS day, count(*),"
        " CAST(avg(judgements.decision_ms) AS INTEGER) FROM judgements JOIN users ON users.id = judgements.user_id"
        " GROUP BY users.name, day ORDER BY day DESC, users.name LIMIT ?", [limit]).fetchall()]


# ---------------------------------------------------------------- prompts


def canonical_messages(messages) -> list[dict]:
    """Validate a chat prompt and return it as a plain list of {role, content} dicts.

    A prompt is either a non-empty string (one user turn) or a list of turns ending with
    the user's, with roles from system/user/assistant and non-empty text content.
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, list) or not messages:
        raise InvalidInput("a prompt must be a non-empty string or a non-empty list of messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidInput(f"message {i} is not an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in MESSAGE_ROLES:
            raise InvalidInput(f"message {i} has role {role!r}; use one of {', '.join(MESSAGE_ROLES)}")
        if not isinstance(content, str):
            raise InvalidInput(f"message {i} content must be text, not {type(content).__name__}")
        if not content.strip():
            raise InvalidInput(f"message {i} ({role}) is empty")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise InvalidInput("the last message of a prompt must be the user's")
    total = sum(len(m["content"]) for m in out)
    if total > MAX_PROMPT_CHARS:
        raise InvalidInput(f"prompt is {total} characters long; the limit is {MAX_PROMPT_CHARS}")
    return out


def content_hash(messages: list[dict]) -> str:
    canonical = json.dumps(messages, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def split_for(hash_hex: str, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> str:
    """Deterministic train/held-out split from the prompt's content hash: the same prompt
    always lands in the same split, on every machine and every import."""
    bucket = int(hash_hex[:8], 16) / 0xFFFFFFFF
    return "heldout" if bucket < heldout_fraction else "train"


def add_prompt(
    db,
    messages,
    *,
    source: str = "",
    tags: Sequence[str] = (),
    external_id: str | None = None,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
) -> tuple[int, bool]:
    """Store a prompt (deduplicated by content). Returns (prompt id, created)."""
    messages = canonical_messages(messages)
    digest = content_hash(messages)
    with write_transaction(db):
        row = db.execute("SELECT id FROM prompts WHERE content_hash = ?", [digest]).fetchone()
        if row:
            return row[0], False
        cursor = db.execute(
            "INSERT INTO prompts (messages, content_hash, source, external_id, tags, split)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [
                json.dumps(messages, ensure_ascii=False),
                digest,
                source,
                external_id,
                json.dumps(list(tags)),
                split_for(digest, heldout_fraction),
            ],
        )
        return cursor.lastrowid, True


def random_prompt(db, split: str | None = "heldout") -> list[dict] | None:
    """The messages of a prompt drawn at random from `split` (any prompt if that split has none),
    or None when the store holds no prompts."""
    row = None
    if split:
        row = db.execute("SELECT messages FROM prompts WHERE split = ? ORDER BY random() LIMIT 1", [split]).fetchone()
    row = row or db.execute("SELECT messages FROM prompts ORDER BY random() LIMIT 1").fetchone()
    return json.loads(row[0]) if row else None


def get_prompt(db, prompt_id: int) -> dict:
    row = db.execute("SELECT id, messages, split, source FROM prompts WHERE id = ?", [prompt_id]).fetchone()
    if row is None:
        raise NotFound(f"no prompt {prompt_id}")
    return {"id": row[0], "messages": json.loads(row[1]), "split": row[2], "source": row[3]}


# ---------------------------------------------------------------- items and candidates


def queue_items(
    db,
    prompt_ids: Iterable[int],
    *,
    mode: str = "pairwise",
    k: int = 2,
    overlap: int = 1,
    versions: Sequence[str] | None = None,
    sampling: dict | None = None,
) -> list[int]:
    """Queue prompts for annotation; their candidates are generated later (status pending).

    `versions` asks for answers from these policy versions (split evenly over the K answers,
    for contrast) instead of the live one; `sampling` overrides the decoding settings.
    """
    if mode not in ("pairwise", "ranking"):
        raise InvalidInput(f"mode {mode!r} is unknown: use pairwise or ranking")
    if mode == "pairwise":
        k = 2
    if not 2 <= k <= 6:
        raise InvalidInput(f"K={k} is out of range: an item shows 2 to 6 answers")
    if overlap < 1:
        raise InvalidInput("overlap must be at least 1")
    if versions is not None and not (1 <= len(versions) <= k):
        raise InvalidInput(f"an item can contrast 1 to {k} versions, not {len(versions)}")
    ids = []
    with write_transaction(db):
        for prompt_id in prompt_ids:
            if db.execute("SELECT 1 FROM prompts WHERE id = ?", [prompt_id]).fetchone() is None:
                raise NotFound(f"no prompt {prompt_id}")
            cursor = db.execute(
                "INSERT INTO items (prompt_id, mode, k, overlap, versions, sampling) VALUES (?, ?, ?, ?, ?, ?)",
                [prompt_id, mode, k, overlap, json.dumps(list(versions)) if versions else None,
                 json.dumps(sampling) if sampling else None],
            )
            ids.append(cursor.lastrowid)
    return ids


def pending_items(db, limit: int = 10) -> list[dict]:
    """Items still waiting for their candidates, oldest first."""
    rows = db.execute(
        "SELECT items.id, items.k, prompts.messages, items.versions, items.sampling FROM items"
        " JOIN prompts ON prompts.id = items.prompt_id"
        " WHERE items.status = 'pending' ORDER BY items.id LIMIT ?",
        [limit],
    ).fetchall()
    return [
        {"id": r[0], "k": r[1], "messages": json.loads(r[2]), "versions": json.loads(r[3]) if r[3] else None,
         "sampling": json.loads(r[4]) if r[4] else None}
        for r in rows
    ]


def count_items(db, status: str) -> int:
    return db.execute("SELECT count(*) FROM items WHERE status = ?", [status]).fetchone()[0]


MAX_PARKED_SHOWN = 50


def park_item(db, item_id: int, reason: str) -> None:
    """Set aside a pending item whose answers cannot be generated (its version's adapter does
    not load, say): it is retired with the reason, so it never blocks the queue, and the
    Health tab lists it."""
    with write_transaction(db):
        db.execute("UPDATE items SET status = 'retired', park_reason = ? WHERE id = ? AND status = 'pending'",
                   [reason[:MAX_REASON_CHARS], item_id])


def parked_items(db, limit: int = MAX_PARKED_SHOWN) -> list[dict]:
    """Items the prefetcher parked, newest first: [{"id", "reason"}]."""
    return [{"id": r[0], "reason": r[1]} for r in db.execute(
        "SELECT id, park_reason FROM items WHERE park_reason IS NOT NULL ORDER BY id DESC LIMIT ?", [limit])]


def count_unclaimed_ready(db) -> int:
    """Ready items nobody has leased or judged yet: the prefetch buffer that hides generation time."""
    return db.execute(
        "SELECT count(*) FROM items WHERE status = 'ready'"
        " AND NOT EXISTS (SELECT 1 FROM leases WHERE leases.item_id = items.id)"
        " AND NOT EXISTS (SELECT 1 FROM judgements WHERE judgements.item_id = items.id)"
    ).fetchone()[0]


def add_candidates(db, item_id: int, candidates: Sequence[dict]) -> list[int]:
    """Attach generated answers to a pending item and mark it ready.

    Each candidate is {text, policy_version, sampling (dict), gen_seconds, truncated,
    reward_score, reward_version, implicit_reward}: `truncated` True when the answer reached the
    token budget before its end-of-turn (None: not known); the score the live reward model
    (`reward_version`) gave it, if one did; its implicit reward under the policy that generated
    it (log pi - log pi_base), if it was computed. The item's priority under the project's selection policy is set in the
    same transaction (annotations/selection.py).
    """
    with write_transaction(db):
        row = db.execute("SELECT status, k FROM items WHERE id = ?", [item_id]).fetchone()
        if row is None:
            raise NotFound(f"no item {item_id}")
        status, k = row
        if status != "pending":
            raise InvalidInput(f"item {item_id} is {status}, not pending")
        if len(candidates) != k:
            raise InvalidInput(f"item {item_id} needs {k} candidates, got {len(candidates)}")
        ids = []
        for c in candidates:
            text = c["text"][:MAX_ANSWER_CHARS]
            truncated = c.get("truncated")
            cursor = db.execute(
                "INSERT INTO candidates (item_id, text, policy_version, sampling, gen_seconds, truncated,"
                " reward_score, reward_version, implicit_reward) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [item_id, text, c.get("policy_version"), json.dumps(c.get("sampling", {})), c.get("gen_seconds"),
                 None if truncated is None else int(bool(truncated)), c.get("reward_score"),
                 c.get("reward_version") if c.get("reward_score") is not None else None, c.get("implicit_reward")],
            )
            ids.append(cursor.lastrowid)
        db.execute("UPDATE items SET status = 'ready' WHERE id = ?", [item_id])
        from annotations.selection import refresh_priorities

        refresh_priorities(db, item_ids=[item_id])
        return ids


def _item_payload(db, item_id: int) -> dict:
    item = db.execute(
        "SELECT items.id, items.mode, items.k, items.prompt_id, prompts.messages FROM items"
        " JOIN prompts ON prompts.id = items.prompt_id WHERE items.id = ?",
        [item_id],
    ).fetchone()
    if item is None:
        raise NotFound(f"no item {item_id}")
    candidates = [
        {"id": r[0], "text": r[1], "policy_version": r[2], "truncated": None if r[3] is None else bool(r[3]),
         "reward_score": r[4], "reward_version": r[5]}
        for r in db.execute(
            "SELECT id, text, policy_version, truncated, reward_score, reward_version FROM candidates"
            " WHERE item_id = ? AND policy_version IS NOT NULL ORDER BY id",
            [item_id],
        ).fetchall()
    ]
    return {
        "id": item[0],
        "mode": item[1],
        "k": item[2],
        "prompt_id": item[3],
        "messages": json.loads(item[4]),
        "candidates": candidates,
    }


def _view(db, item_id: int, user_id: int, now: float) -> dict:
    """The item as this user sees it: the answers in the order first shown to them, when that
    was, and the idempotency key of their submission. Created (shuffled) on the first showing."""
    row = db.execute(
        "SELECT shown_order, served_at, view_key, suggestion FROM item_views WHERE item_id = ? AND user_id = ?",
        [item_id, user_id],
    ).fetchone()
    payload = _item_payload(db, item_id)
    if row is None:
        from annotations.suggestions import show_suggestions, suggestion_for

        order = [c["id"] for c in payload["candidates"]]
        random.shuffle(order)
        # the reward model's suggestion, if the project shows them: fixed at the first showing,
        # so the judgement records what the person saw (annotations/suggestions.py)
        suggested = suggestion_for(payload["candidates"]) if show_suggestions(db) else None
        row = (json.dumps(order), now, uuid.uuid4().hex, json.dumps(suggested) if suggested else None)
        db.execute(
            "INSERT INTO item_views (item_id, user_id, shown_order, served_at, view_key, suggestion)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [item_id, user_id, *row],
        )
    by_id = {c["id"]: c for c in payload["candidates"]}
    order = [cid for cid in json.loads(row[0]) if cid in by_id]
    payload.update(candidates=[by_id[cid] for cid in order], shown_order=order, served_at=row[1], view_key=row[2],
                   suggestion=json.loads(row[3]) if row[3] else None)
    return payload


def next_item(db, user_id: int, *, lease_seconds: float = DEFAULT_LEASE_SECONDS, now: float | None = None) -> dict | None:
    """Lease the next item this user should judge and return it as they see it, or None.

    Call it when the item is actually shown to the person. An item is handed to a user at
    most once, and only while its judgements plus the unexpired leases of other users stay
    below its overlap, so two annotators never fill the same slot. A user who asks again
    before judging gets the item they already hold, with the same letters, served time and
    submission key (a reloaded page shows the same thing); an abandoned lease expires and
    frees the slot. Items of a prompt the user skipped are never dealt to them again.

    The payload's `candidates` are in the order shown (A, B, ...), also as `shown_order`;
    `served_at` is when this user first saw the item, `view_key` its submission's key.
    """
    now = time.time() if now is None else now
    from annotations.gate import gate_settings

    gate = gate_settings(db)
    gate_share = gate["human_share"] if gate["require_human_votes"] else None
    with write_transaction(db):
        db.execute("DELETE FROM leases WHERE expires_at <= ?", [now])
        held = db.execute(
            "SELECT leases.item_id FROM leases JOIN items ON items.id = leases.item_id"
            " WHERE leases.user_id = ? AND items.status = 'ready'"
            " AND NOT EXISTS (SELECT 1 FROM judgements j WHERE j.item_id = items.id AND j.user_id = leases.user_id)"
            " ORDER BY leases.expires_at LIMIT 1",
            [user_id],
        ).fetchone()
        if held:
            item_id = held[0]
        else:
            # Promotion-gate pairs (annotations.gate) take their share of the items dealt.
            gate_first = gate_share is not None and random.random() < gate_share
            row = db.execute(
                f"""SELECT items.id FROM items
                   WHERE items.status = 'ready'
                     AND NOT EXISTS (SELECT 1 FROM judgements j WHERE j.item_id = items.id AND j.user_id = :user)
                     AND NOT EXISTS (SELECT 1 FROM skips s JOIN items skipped ON skipped.id = s.item_id
                                     WHERE s.user_id = :user AND skipped.prompt_id = items.prompt_id)
                     AND (SELECT count(*) FROM judgements j WHERE j.item_id = items.id)
                       + (SELECT count(*) FROM leases l WHERE l.item_id = items.id) < items.overlap
                   ORDER BY (items.gate_versions IS {'NULL' if gate_first else 'NOT NULL'}),
                            items.priority IS NULL, items.priority DESC, items.id LIMIT 1""",
                {"user": user_id},
            ).fetchone()
            if row is None:
                return None
            item_id = row[0]
        db.execute(
            "INSERT OR REPLACE INTO leases (item_id, user_id, expires_at) VALUES (?, ?, ?)",
            [item_id, user_id, now + lease_seconds],
        )
        return _view(db, item_id, user_id, now)


def candidate_texts(db, item_id: int) -> dict[int, str]:
    """{candidate id: text} of an item's answers, written ones included."""
    return {r[0]: r[1] for r in db.execute("SELECT id, text FROM candidates WHERE item_id = ?", [item_id])}


def item_prompt_id(db, item_id: int) -> int:
    row = db.execute("SELECT prompt_id FROM items WHERE id = ?", [item_id]).fetchone()
    if row is None:
        raise NotFound(f"no item {item_id}")
    return row[0]


def release_lease(db, user_id: int, item_id: int) -> None:
    with write_transaction(db):
        db.execute("DELETE FROM leases WHERE user_id = ? AND item_id = ?", [user_id, item_id])


# ---------------------------------------------------------------- judgements and pairs


def derive_pairs(ranking: Sequence[Sequence[int]], policy: str = "all") -> list[tuple[int, int]]:
    """Turn a ranking into (chosen, rejected) pairs of candidate ids.

    `ranking` is a list of tiers, best first; answers within a tier are tied and give no
    pair between them. Policies:
      - all: every answer beats every answer in every lower tier;
      - best_vs_rest: the top tier beats every other answer;
      - adjacent: each tier beats the tier just below it.
    """
    if policy not in PAIR_POLICIES:
        raise InvalidInput(f"pair policy {policy!r} is unknown: use one of {', '.join(PAIR_POLICIES)}")
    tiers = [list(t) for t in ranking if len(t)]
    pairs = []
    for i, j in combinations(range(len(tiers)), 2):
        if policy == "best_vs_rest" and i != 0:
            continue
        if policy == "adjacent" and j != i + 1:
            continue
        pairs.extend((a, b) for a in tiers[i] for b in tiers[j])
    return pairs


def _validate_ranking(ranking, candidate_ids: set[int]) -> list[list[int]]:
    if not isinstance(ranking, (list, tuple)) or not ranking:
        raise InvalidInput("ranking must be a non-empty list of tiers (lists of candidate ids)")
    tiers = []
    seen = []
    for tier in ranking:
        if isinstance(tier, int):
            tier = [tier]
        if not isinstance(tier, (list, tuple)) or not tier:
            raise InvalidInput("each tier of a ranking must be a non-empty list of candidate ids")
        try:
            ids = [int(c) for c in tier]
        except (TypeError, ValueError):
            raise InvalidInput(f"tier {tier!r} holds something that is not a candidate id") from None
        tiers.append(ids)
        seen.extend(ids)
    if sorted(seen) != sorted(candidate_ids) or len(seen) != len(set(seen)):
        raise InvalidInput(
            f"the ranking must place each of the item's answers exactly once: got {sorted(seen)}, "
            f"expected {sorted(candidate_ids)}"
        )
    return tiers


def submit_judgement(
    db,
    user_id: int,
    item_id: int,
    ranking: Sequence[Sequence[int]],
    *,
    shown_order: Sequence[int],
    both_bad: bool = False,
    decision_ms: int | None = None,
    idempotency_key: str | None = None,
    pair_policy: str = "all",
    human_text: str | None = None,
    ratings: dict[int, int] | None = None,
) -> dict:
    """Store one judgement and the pairs it implies, atomically.

    Returns {"judgement_id", "pairs", "duplicate"}. A retried submission with the same
    idempotency key returns the first one's result and stores nothing new. "Both bad"
    stores no pair but a thumbs-down rating for every answer. `human_text`, an answer the
    annotator wrote (or rewrote), is stored as a human-written candidate ranked above every
    model answer. `ratings` maps candidate ids to +1 / -1 (thumbs, usable for KTO).
    """
    with write_transaction(db):
        if idempotency_key:
            row = db.execute(
                "SELECT id, user_id FROM judgements WHERE idempotency_key = ?", [idempotency_key]
            ).fetchone()
            if row:
                if row[1] != user_id:
                    raise InvalidInput("this idempotency key belongs to another user's submission")
                n = db.execute("SELECT count(*) FROM pairs WHERE judgement_id = ?", [row[0]]).fetchone()[0]
                return {"judgement_id": row[0], "pairs": n, "duplicate": True}
        item = db.execute("SELECT status, mode, prompt_id, overlap, gold FROM items WHERE id = ?",
                          [item_id]).fetchone()
        if item is None:
            raise NotFound(f"no item {item_id}")
        status, mode, prompt_id, overlap, gold = item
        shown = db.execute(
            "SELECT 1 FROM item_views WHERE item_id = ? AND user_id = ?", [item_id, user_id]).fetchone()
        # An item someone was shown stays answerable whatever happened to it since (a promotion
        # retired it, other annotators filled its overlap): what they judged is kept.
        if status not in ("ready", "complete", "retired") or (status != "ready" and not shown):
            raise InvalidInput(f"item {item_id} is {status}; it takes no more judgements")
        if db.execute("SELECT 1 FROM judgements WHERE item_id = ? AND user_id = ?", [item_id, user_id]).fetchone():
            raise InvalidInput(f"you have already judged item {item_id}")
        candidates = {
            r[0]: {"text": r[1], "version": r[2]}
            for r in db.execute(
                "SELECT id, text, policy_version FROM candidates WHERE item_id = ?", [item_id]
            ).fetchall()
        }
        model_ids = {cid for cid, c in candidates.items() if c["version"] is not None}
        candidates = {cid: c for cid, c in candidates.items() if cid in model_ids}
        tiers = _validate_ranking(ranking, model_ids)
        if sorted(shown_order) != sorted(model_ids):
            raise InvalidInput("shown_order must list each of the item's answers once")
        ratings = dict(ratings or {})
        for candidate_id, value in ratings.items():
            if candidate_id not in model_ids or value not in (1, -1):
                raise InvalidInput(f"rating {value!r} for answer {candidate_id} is invalid: rate the item's answers +1 or -1")
        if human_text is not None:
            human_text = human_text.strip()
            if not human_text:
                raise InvalidInput("the written answer is empty")
            if len(human_text) > MAX_ANSWER_CHARS:
                raise InvalidInput(f"the written answer is {len(human_text)} characters; the limit is {MAX_ANSWER_CHARS}")
            if any(human_text == c["text"].strip() for c in candidates.values()):
                human_text = None  # unchanged copy of a model answer: nothing new to prefer
        if human_text is not None:
            cursor = db.execute(
                "INSERT INTO candidates (item_id, text, policy_version, author_id) VALUES (?, ?, NULL, ?)",
                [item_id, human_text, user_id],
            )
            human_id = cursor.lastrowid
            candidates[human_id] = {"text": human_text, "version": None}
            # A human-written answer beats every model answer, even in a "both bad" judgement.
            tiers = [[human_id], *tiers]
        suggestion = db.execute("SELECT suggestion FROM item_views WHERE item_id = ? AND user_id = ?",
                                [item_id, user_id]).fetchone()
        cursor = db.execute(
            "INSERT INTO judgements (item_id, user_id, mode, ranking, both_bad, shown_order, decision_ms,"
            " idempotency_key, suggestion) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [item_id, user_id, mode, json.dumps(tiers), int(both_bad), json.dumps(list(shown_order)),
             decision_ms, idempotency_key, suggestion[0] if suggestion else None],
        )
        judgement_id = cursor.lastrowid
        pairs = insert_judgement_pairs(db, judgement_id, prompt_id, user_id, tiers, candidates, both_bad=both_bad,
                                       human_id=human_id if human_text is not None else None,
                                       pair_policy=pair_policy)
        # Weights: this item's agreement changed; on a gold item, so did this annotator's trust.
        from annotations.quality import refresh_pair_weights

        refresh_pair_weights(db, item_ids=[item_id], user_ids=[user_id] if gold else None)
        insert_judgement_ratings(db, judgement_id, user_id, ratings, model_ids, both_bad)
        db.execute("DELETE FROM leases WHERE item_id = ? AND user_id = ?", [item_id, user_id])
        done = db.execute("SELECT count(*) FROM judgements WHERE item_id = ?", [item_id]).fetchone()[0]
        if done >= overlap and status == "ready":
            db.execute("UPDATE items SET status = 'complete' WHERE id = ?", [item_id])
        from annotations.gate import after_gate_vote

        after_gate_vote(db, item_id)  # a vote on a promotion-gate pair may promote its candidate
        return {"judgement_id": judgement_id, "pairs": len(pairs), "duplicate": False}


def insert_judgement_pairs(db, judgement_id: int, prompt_id: int, user_id: int, tiers: list[list[int]],
                           candidates: dict[int, dict], *, both_bad: bool, human_id: int | None,
                           pair_policy: str) -> list[tuple[int, int]]:
    """(Inside a judgement's transaction.) Store the pairs a judgement's tiers imply; returns
    them. The pair policy applies to the model answers; a written answer (`human_id`, the top
    tier) beats each of them whatever the policy. "Both bad" prefers no model answer to another."""
    model_tiers = tiers[1:] if human_id is not None else tiers
    pairs = [] if both_bad else derive_pairs(model_tiers, pair_policy)
    if human_id is not None:
        pairs = [(human_id, c) for tier in model_tiers for c in tier] + pairs
    for chosen, rejected in pairs:
        db.execute(
            "INSERT INTO pairs (prompt_id, chosen, rejected, source, judgement_id, chosen_candidate_id,"
            " rejected_candidate_id, user_id, chosen_version, rejected_version)"
            " VALUES (?, ?, ?, 'judgement', ?, ?, ?, ?, ?, ?)",
            [prompt_id, candidates[chosen]["text"], candidates[rejected]["text"], judgement_id,
             chosen, rejected, user_id, candidates[chosen]["version"], candidates[rejected]["version"]],
        )
    return pairs


def insert_judgement_ratings(db, judgement_id: int, user_id: int, ratings: dict[int, int], model_ids,
                             both_bad: bool) -> None:
    """(Inside a judgement's transaction.) Its thumbs; "both bad" thumbs down every model
    answer the annotator did not rate."""
    ratings = dict(ratings)
    if both_bad:
        ratings.update({candidate_id: -1 for candidate_id in model_ids if candidate_id not in ratings})
    for candidate_id, value in ratings.items():
        db.execute(
            "INSERT INTO ratings (candidate_id, user_id, value, source, judgement_id) VALUES (?, ?, ?, ?, ?)",
            [candidate_id, user_id, value, "both_bad" if both_bad and value == -1 else "thumbs", judgement_id],
        )


SKIP_REASONS = ("unclear prompt", "cannot judge (expertise)", "unsafe content", "broken answers", "other")
MAX_REASON_CHARS = 500


def skip_item(db, user_id: int, item_id: int, reason: str) -> None:
    """The user passes on this item: it is released and never offered to them again."""
    reason = (reason or "").strip()
    if not reason:
        raise InvalidInput(f"say why you skip: e.g. {', '.join(SKIP_REASONS)}")
    with write_transaction(db):
        if db.execute("SELECT 1 FROM items WHERE id = ?", [item_id]).fetchone() is None:
            raise NotFound(f"no item {item_id}")
        db.execute(
            "INSERT OR IGNORE INTO skips (item_id, user_id, reason) VALUES (?, ?, ?)",
            [item_id, user_id, reason[:MAX_REASON_CHARS]],
        )
        db.execute("DELETE FROM leases WHERE item_id = ? AND user_id = ?", [item_id, user_id])


def flag_item(db, user_id: int, item_id: int, reason: str, candidate_ids: Sequence[int] = ()) -> int:
    """Flag the prompt (no candidate ids) or some of its answers as unsafe or broken."""
    reason = (reason or "").strip() or "unsafe"
    with write_transaction(db):
        known = {r[0] for r in db.execute("SELECT id FROM candidates WHERE item_id = ?", [item_id]).fetchall()}
        if not known and db.execute("SELECT 1 FROM items WHERE id = ?", [item_id]).fetchone() is None:
            raise NotFound(f"no item {item_id}")
        for candidate_id in candidate_ids:
            if candidate_id not in known:
                raise InvalidInput(f"answer {candidate_id} does not belong to item {item_id}")
        for candidate_id in list(dict.fromkeys(candidate_ids)) or [None]:
            db.execute(
                "INSERT INTO flags (item_id, candidate_id, user_id, reason) VALUES (?, ?, ?, ?)",
                [item_id, candidate_id, user_id, reason[:MAX_REASON_CHARS]],
            )
        return len(set(candidate_ids)) or 1


GOLD_OVERLAP = 1_000_000


def set_gold(db, item_id: int, ranking: Sequence[Sequence[int]]) -> None:
    """Make an item gold: its known ranking scores annotators, and every annotator meets it."""
    with write_transaction(db):
        ids = {r[0] for r in db.execute(
            "SELECT id FROM candidates WHERE item_id = ? AND policy_version IS NOT NULL", [item_id]).fetchall()}
        if not ids:
            raise NotFound(f"item {item_id} has no answers yet")
        tiers = _validate_ranking(ranking, ids)
        status = db.execute("SELECT status FROM items WHERE id = ?", [item_id]).fetchone()[0]
        if status == "retired":
            raise InvalidInput(f"item {item_id} is retired; make a current item gold")
        db.execute(
            "UPDATE items SET gold = ?, overlap = ?, status = CASE WHEN status = 'complete' THEN 'ready' ELSE status END"
            " WHERE id = ?",
            [json.dumps(tiers), GOLD_OVERLAP, item_id],
        )
        from annotations.quality import refresh_pair_weights

        judged_by = [r[0] for r in db.execute("SELECT user_id FROM judgements WHERE item_id = ?", [item_id])]
        refresh_pair_weights(db, user_ids=judged_by)  # their gold record, hence their trust, changed


def retire_stale_items(db, live_version: str, *, now: float | None = None) -> int:
    """Unjudged items whose answers came from a version other than the live one (and that
    did not ask for specific versions) are retired and their prompts queued afresh, so the
    next annotation round judges the current policy. Items someone holds (an unexpired lease:
    open in their browser) are left alone; an item shown to someone stays answerable by them
    even once retired (`submit_judgement`). Returns how many were requeued."""
    now = time.time() if now is None else now
    with write_transaction(db):
        rows = db.execute(
            """SELECT items.id, items.prompt_id, items.mode, items.k, items.overlap, items.sampling FROM items
               WHERE items.status IN ('ready') AND items.versions IS NULL AND items.gold IS NULL
                 AND NOT EXISTS (SELECT 1 FROM judgements j WHERE j.item_id = items.id)
                 AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.item_id = items.id AND l.expires_at > :now)
                 AND EXISTS (SELECT 1 FROM candidates c WHERE c.item_id = items.id
                             AND c.policy_version IS NOT NULL AND c.policy_version != :live)""",
            {"live": live_version, "now": now},
        ).fetchall()
        for item_id, prompt_id, mode, k, overlap, sampling in rows:
            db.execute("UPDATE items SET status = 'retired' WHERE id = ?", [item_id])
            db.execute("DELETE FROM leases WHERE item_id = ?", [item_id])  # expired ones only, by the query
            # The fresh item keeps the decoding settings the admin asked for.
            queue_items(db, [prompt_id], mode=mode, k=k, overlap=overlap,
                        sampling=json.loads(sampling) if sampling else None)
        return len(rows)


_UNJUDGED_PLAIN = """items.status IN ('pending', 'ready') AND items.versions IS NULL AND items.gold IS NULL
                      AND items.gate_versions IS NULL
                      AND NOT EXISTS (SELECT 1 FROM judgements j WHERE j.item_id = items.id)
                      AND (items.mode != :mode OR items.k != :k OR items.overlap != :overlap)"""


def queued_unlike(db, mode: str, k: int, overlap: int) -> int:
    """Queued items nobody has judged yet whose mode, K or overlap differ from these (items asking
    for specific versions, gold items and promotion-gate pairs are not counted: they are set apart)."""
    k = 2 if mode == "pairwise" else k
    return db.execute(f"SELECT count(*) FROM items WHERE {_UNJUDGED_PLAIN}",
                      {"mode": mode, "k": k, "overlap": overlap}).fetchone()[0]


def requeue_unlike(db, mode: str, k: int, overlap: int, *, now: float | None = None) -> tuple[int, int]:
    """Queue the prompts of `queued_unlike` items afresh with this mode, K and overlap, retiring
    the old items (their answers were sampled for another K, or are not generated yet). Items
    someone holds (a live lease) are left alone. Returns (requeued, left because held)."""
    now = time.time() if now is None else now
    k = 2 if mode == "pairwise" else k
    with write_transaction(db):
        rows = db.execute(
            f"SELECT items.id, items.prompt_id, items.sampling, EXISTS (SELECT 1 FROM leases l WHERE l.item_id ="
            f" items.id AND l.expires_at > :now) FROM items WHERE {_UNJUDGED_PLAIN} ORDER BY items.id",
            {"mode": mode, "k": k, "overlap": overlap, "now": now}).fetchall()
        requeued = 0
        for item_id, prompt_id, sampling, held in rows:
            if held:
                continue
            db.execute("UPDATE items SET status = 'retired', park_reason = 'requeued with new settings'"
                       " WHERE id = ?", [item_id])
            db.execute("DELETE FROM leases WHERE item_id = ?", [item_id])
            queue_items(db, [prompt_id], mode=mode, k=k, overlap=overlap,
                        sampling=json.loads(sampling) if sampling else None)
            requeued += 1
        return requeued, len(rows) - requeued


def pairwise_ranking(choice: str, first: int, second: int) -> tuple[list[list[int]], bool]:
    """Map a quick pairwise choice on answers shown as A=`first`, B=`second` to (ranking, both_bad)."""
    if choice == "A":
        return [[first], [second]], False
    if choice == "B":
        return [[second], [first]], False
    if choice == "tie":
        return [[first, second]], False
    if choice == "both_bad":
        return [[first, second]], True
    raise InvalidInput(f"choice {choice!r} is unknown: use A, B, tie or both_bad")


def count_rows(db, table: str) -> int:
    if table not in ("users", "prompts", "items", "candidates", "judgements", "pairs", "ratings", "rounds", "policies"):
        raise InvalidInput(f"unknown table {table!r}")
    return db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def iter_pairs(db, split: str | None = None, *, judgement_id: int | None = None) -> Iterable[dict]:
    """Every preference pair with its prompt messages, oldest first; `split` filters by the
    prompt's train/held-out split, `judgement_id` to one judgement's pairs. `chosen_written`:
    the chosen answer was written by an annotator (in the editor), not sampled from a model or
    imported."""
    sql = (
        "SELECT pairs.id, prompts.messages, pairs.chosen, pairs.rejected, pairs.weight, prompts.split,"
        " pairs.source, candidates.author_id IS NOT NULL FROM pairs JOIN prompts ON prompts.id = pairs.prompt_id"
        " LEFT JOIN candidates ON candidates.id = pairs.chosen_candidate_id"
    )
    params = []
    if split:
        sql += " WHERE prompts.split = ?"
        params.append(split)
    if judgement_id is not None:
        sql += (" AND" if split else " WHERE") + " pairs.judgement_id = ?"
        params.append(judgement_id)
    for row in db.execute(sql + " ORDER BY pairs.id", params).fetchall():
        yield {
            "id": row[0],
            "messages": json.loads(row[1]),
            "chosen": row[2],
            "rejected": row[3],
            "weight": row[4],
            "split": row[5],
            "source": row[6],
            "chosen_written": bool(row[7]),
        }


# ---------------------------------------------------------------- settings


def get_setting(db, key: str, default=None):
    row = db.execute("SELECT value FROM settings WHERE key = ?", [key]).fetchone()
    return json.loads(row[0]) if row else default


def set_setting(db, key: str, value) -> None:
    with write_transaction(db):
        db.execute(
            "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value,"
            " updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
            [key, json.dumps(value)],
        )

