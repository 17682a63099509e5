"""API keys: per-user bearer tokens for the OpenAI-compatible API (`app.openai_api`).

An admin makes a key for a person; the key is shown once, at creation, and the store keeps only
its sha256. A key is a long random token, not a password someone chose, so a fast hash is
enough: nobody can guess 256 random bits, and a stolen table of hashes yields no key. A key
acts as its person, with their role as it is now (a key made for an annotator who later becomes
an admin acts as an admin), until it is revoked; revoking is final. Each use updates the key's
`last_used_at`, so an admin can see which keys are in use before revoking old ones.

Each key may make `rate_limit(db)` requests a minute (the setting `api_requests_per_minute`,
the same for every key); the app counts them (`app.openai_api.KeyRateLimiter`).
"""

from __future__ import annotations

import hashlib
import secrets

from annotations.db import write_transaction
from annotations.errors import InvalidInput, NotFound
from annotations.migrations import NOW
from annotations.store import get_setting, get_user, set_setting

KEY_PREFIX = "rk-"  # says where a key belongs when it turns up in a config file or a log
TOKEN_BYTES = 32
SHOWN_PREFIX_CHARS = 10  # "rk-" and the first 7 random characters: enough to tell keys apart in a list
MAX_LABEL_CHARS = 64
RATE_SETTING = "api_requests_per_minute"
DEFAULT_REQUESTS_PER_MINUTE = 60
MAX_REQUESTS_PER_MINUTE = 10_000


def key_hash(key: str) -> str:
    """The sha256 (hex) under which `key` is stored."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_key(db, user_name: str, label: str = "") -> tuple[int, str]:
    """Make a key for the user `user_name`. Returns (key id, key): the key itself is not stored,
    so this is the one time anyone sees it."""
    label = (label or "").strip()
    if len(label) > MAX_LABEL_CHARS:
        raise InvalidInput(f"a key's label is at most {MAX_LABEL_CHARS} characters")
    user = get_user(db, user_name)
    key = KEY_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
    with write_transaction(db):
        cursor = db.execute(
            "INSERT INTO api_keys (user_id, label, key_hash, key_prefix) VALUES (?, ?, ?, ?)",
            [user["id"], label, key_hash(key), key[:SHOWN_PREFIX_CHARS]])
        return cursor.lastrowid, key


def user_for_key(db, key: str | None) -> dict | None:
    """The user a key acts for, {"id", "name", "role", "key_id"}, and note the use; None for a
    missing, unknown or revoked key."""
    if not key or not key.startswith(KEY_PREFIX):
        return None
    row = db.execute(
        "SELECT api_keys.id, users.id, users.name, users.role FROM api_keys JOIN users ON users.id = api_keys.user_id"
        " WHERE api_keys.key_hash = ? AND api_keys.revoked_at IS NULL", [key_hash(key)]).fetchone()
    if row is None:
        return None
    with write_transaction(db):
        db.execute(f"UPDATE api_keys SET last_used_at = {NOW} WHERE id = ?", [row[0]])
    return {"key_id": row[0], "id": row[1], "name": row[2], "role": row[3]}


def list_keys(db) -> list[dict]:
    """Every key, newest first: {"id", "user", "label", "prefix", "created_at", "last_used_at",
    "revoked_at"} (never the key, which the store does not have)."""
    return [
        {"id": r[0], "user": r[1], "label": r[2], "prefix": r[3], "created_at": r[4], "last_used_at": r[5],
         "revoked_at": r[6]}
        for r in db.execute(
            "SELECT api_keys.id, users.name, label, key_prefix, api_keys.created_at, last_used_at, revoked_at"
            " FROM api_keys JOIN users ON users.id = api_keys.user_id ORDER BY api_keys.id DESC")
    ]


def revoke_key(db, key_id: int) -> bool:
    """Revoke a key for good. Returns False when it was revoked already."""
    with write_transaction(db):
        row = db.execute("SELECT revoked_at FROM api_keys WHERE id = ?", [int(key_id)]).fetchone()
        if row is None:
            raise NotFound(f"no API key {key_id}: `python -m app api-key list` shows the keys")
        if row[0] is not None:
            return False
        db.execute(f"UPDATE api_keys SET revoked_at = {NOW} WHERE id = ?", [int(key_id)])
        return True


def rate_limit(db) -> int:
    """How many requests each key may make per minute."""
    return int(get_setting(db, RATE_SETTING, DEFAULT_REQUESTS_PER_MINUTE))


def set_rate_limit(db, per_minute) -> int:
    """Set how many requests each key may make per minute (1 to 10,000, the same for every key)."""
    try:
        per_minute = int(per_minute)
    except (TypeError, ValueError):
        raise InvalidInput("the API rate limit is a whole number of requests per minute") from None
    if not 1 <= per_minute <= MAX_REQUESTS_PER_MINUTE:
        raise InvalidInput(f"the API rate limit must be between 1 and {MAX_REQUESTS_PER_MINUTE:,} requests per minute")
    set_setting(db, RATE_SETTING, per_minute)
    return per_minute
