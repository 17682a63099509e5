"""Admin handlers for the OpenAI-compatible API's keys and its rate limit (plain functions
the admin page can wire up, like `app.round_admin`). Admin only, checked in every function.
`python -m app api-key` does the same from the command line, as the operator."""

from __future__ import annotations

from annotations import api_keys
from app.handlers import AppContext, _admin


def create_api_key(ctx: AppContext, user: dict | None, owner: str, label: str = "") -> dict:
    """Make a key for the account `owner`. Returns {"id", "key", "user", "label"}: show the key
    to the admin now, it cannot be shown again."""
    _admin(user)
    key_id, key = api_keys.create_key(ctx.db(), owner, label)
    return {"id": key_id, "key": key, "user": owner, "label": (label or "").strip()}


def list_api_keys(ctx: AppContext, user: dict | None) -> list[dict]:
    """Every key (newest first) with its owner, label, first characters, and created, last
    used and revoked times; never the key itself."""
    _admin(user)
    return api_keys.list_keys(ctx.db())


def revoke_api_key(ctx: AppContext, user: dict | None, key_id: int) -> bool:
    """Revoke a key for good (its next request gets 401). False if it was revoked already."""
    _admin(user)
    return api_keys.revoke_key(ctx.db(), int(key_id))


def api_rate_limit(ctx: AppContext, user: dict | None) -> int:
    """How many requests each key may make per minute."""
    _admin(user)
    return api_keys.rate_limit(ctx.db())


def save_api_rate_limit(ctx: AppContext, user: dict | None, per_minute: int) -> int:
    """Set how many requests each key may make per minute (all keys alike)."""
    _admin(user)
    return api_keys.set_rate_limit(ctx.db(), per_minute)
