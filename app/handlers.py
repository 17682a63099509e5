"""Plain functions behind the UI: the UI wires them to components, tests call them directly.

Each takes the `AppContext` and the acting user (a store row, or None for anonymous) and
checks the user's role itself: Gradio exposes every event handler as an HTTP endpoint, so a
hidden button protects nothing.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from annotations import store
from annotations.db import connect as connect_db

logger = logging.getLogger(__name__)

PAIRWISE_CHOICES = ("A", "B", "tie", "both_bad")


@dataclass
class AppContext:
    """Everything the handlers share: the store's path, the policy server, the prefetcher."""

    db_path: Path
    server: object = None  # app.serving.PolicyServer
    prefetcher: object = None  # app.prefetch.Prefetcher
    pair_policy: str = "all"
    lease_seconds: float = store.DEFAULT_LEASE_SECONDS
    _local: threading.local = field(default_factory=threading.local, repr=False)

    def db(self):
        """This thread's connection to the store (sqlite connections are not shared)."""
        conn = getattr(self._local, "db", None)
        if conn is None:
            conn = self._local.db = connect_db(self.db_path)
        return conn


# ---------------------------------------------------------------- annotate


def next_item(ctx: AppContext, user: dict | None) -> dict | None:
    """Lease the next item for this annotator and return what the page shows, or None.

    The answers are shown in a random order, which is returned (and later stored) as
    `shown_order`; `key` is the idempotency key the submission of this view carries.
    """
    user = store.require_role(user, "annotator", "admin")
    item = store.next_item(ctx.db(), user["id"], lease_seconds=ctx.lease_seconds)
    if ctx.prefetcher is not None:
        ctx.prefetcher.wake()
    if item is None:
        return None
    candidates = list(item["candidates"])
    random.shuffle(candidates)
    return {
        "item_id": item["id"],
        "mode": item["mode"],
        "messages": item["messages"],
        "answers": [{"id": c["id"], "text": c["text"]} for c in candidates],
        "shown_order": [c["id"] for c in candidates],
        "served_at": time.time(),
        "key": uuid.uuid4().hex,
    }


def submit_pairwise(ctx: AppContext, user: dict | None, view: dict | None, choice: str) -> dict:
    """Store an A/B/tie/both-bad judgement on the item shown in `view`.

    A repeated submission of the same view (double click, retry) is stored once.
    """
    user = store.require_role(user, "annotator", "admin")
    if not view or "item_id" not in view:
        raise store.InvalidInput("there is no item on screen to judge; load the next item")
    if choice not in PAIRWISE_CHOICES:
        raise store.InvalidInput(f"choice {choice!r} is unknown: use one of {', '.join(PAIRWISE_CHOICES)}")
    first, second = view["shown_order"][:2]
    ranking, both_bad = store.pairwise_ranking(choice, first, second)
    decision_ms = int((time.time() - view.get("served_at", time.time())) * 1000)
    result = store.submit_judgement(
        ctx.db(), user["id"], view["item_id"], ranking,
        shown_order=view["shown_order"], both_bad=both_bad, decision_ms=decision_ms,
        idempotency_key=view.get("key"), pair_policy=ctx.pair_policy,
    )
    if ctx.prefetcher is not None:
        ctx.prefetcher.wake()
    return result


def annotator_progress(ctx: AppContext, user: dict | None) -> dict:
    user = store.require_role(user, "annotator", "admin")
    db = ctx.db()
    done = db.execute("SELECT count(*) FROM judgements WHERE user_id = ?", [user["id"]]).fetchone()[0]
    ready = store.count_items(db, "ready")
    pending = store.count_items(db, "pending")
    return {"done": done, "ready": ready, "pending": pending}
