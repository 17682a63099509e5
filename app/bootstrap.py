"""First-run setup of a store: the first admin account and the demo prompts."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from annotations import store
from annotations.formats import import_file

logger = logging.getLogger(__name__)

DEMO_PROMPTS = Path(__file__).with_name("demo_prompts.jsonl")


def ensure_admin(db) -> tuple[str, str] | None:
    """Create the first admin if the store has no admin yet. Returns (name, password) when it
    created one, so the caller can show the password once; None otherwise.

    Name and password come from RANKLOOP_ADMIN_USER / RANKLOOP_ADMIN_PASSWORD, else
    `admin` and a random password.
    """
    if store.has_admin(db):
        return None
    name = os.environ.get("RANKLOOP_ADMIN_USER", "admin")
    password = os.environ.get("RANKLOOP_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
    if store.user_exists(db, name):
        logger.warning("no admin account exists and the name %r is taken by an annotator: create an admin with "
                       "`python -m annotations add-user NAME --role admin`", name)
        return None
    store.add_user(db, name, "admin", password)
    return name, password


def seed_demo_prompts(db, *, mode: str = "pairwise", k: int = 2) -> int:
    """Queue the bundled demo prompts if the store holds no prompts at all. Returns how many."""
    if store.count_rows(db, "prompts") > 0:
        return 0
    report = import_file(db, DEMO_PROMPTS, "prompts", source="demo", mode=mode, k=k)
    return report.items_queued
