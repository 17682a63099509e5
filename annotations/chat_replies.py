"""Chat replies: stored with the version that produced them, rated by thumbs, and turned into
annotation items on request."""

from __future__ import annotations

import json

from annotations.db import write_transaction
from annotations.errors import InvalidInput, NotFound, PermissionDenied
from annotations.store import MAX_ANSWER_CHARS, add_prompt, canonical_messages, queue_items


def add_reply(db, user_id: int, conversation: str, messages, reply: str, version: str, *,
              sampling: dict | None = None, seconds: float | None = None, api_key_id: int | None = None) -> int:
    """Store one assistant reply to `messages` (the conversation so far, ending with the user);
    `api_key_id`: the key that asked for it through the OpenAI-compatible API."""
    messages = canonical_messages(messages)
    with write_transaction(db):
        cursor = db.execute(
            "INSERT INTO chat_replies (user_id, conversation, messages, reply, policy_version, sampling, gen_seconds,"
            " api_key_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [user_id, conversation[:64], json.dumps(messages, ensure_ascii=False), reply[:MAX_ANSWER_CHARS], version,
             json.dumps(sampling or {}), seconds, api_key_id],
        )
        return cursor.lastrowid


def conversation_messages(db, user_id: int, conversation: str) -> list[dict]:
    """The conversation so far as the server stored it: the messages the user's latest reply
    in `conversation` answered, followed by that reply ([] for a new conversation). Chat uses
    this, never a history the client sends, so nobody can put words in the model's mouth."""
    row = db.execute(
        "SELECT messages, reply FROM chat_replies WHERE user_id = ? AND conversation = ? ORDER BY id DESC LIMIT 1",
        [user_id, conversation[:64]]).fetchone()
    if row is None:
        return []
    return json.loads(row[0]) + [{"role": "assistant", "content": row[1]}]


def conversation_replies(db, user_id: int, conversation: str) -> list[dict]:
    """The user's stored replies in `conversation`, oldest first: [{"id", "reply", "rating"}]."""
    return [{"id": r[0], "reply": r[1], "rating": r[2]} for r in db.execute(
        "SELECT id, reply, rating FROM chat_replies WHERE user_id = ? AND conversation = ? ORDER BY id",
        [user_id, conversation[:64]]).fetchall()]


def rate_reply(db, user_id: int, reply_id: int, value: int | None) -> None:
    """Thumbs up (+1), down (-1) or clear (None) on one's own chat reply.

    The first rating turns the reply into a candidate of a closed item (never shown for
    annotation), so the rating lands in the `ratings` table like any other thumbs: KTO rounds
    train on it, with the prompt's train/held-out split and the rounds' data watermarks.
    """
    if value not in (1, -1, None):
        raise InvalidInput("a rating is +1, -1 or none")
    with write_transaction(db):
        row = db.execute(
            "SELECT user_id, messages, reply, policy_version, candidate_id FROM chat_replies WHERE id = ?",
            [reply_id]).fetchone()
        if row is None:
            raise NotFound(f"no chat reply {reply_id}")
        owner, messages, reply, version, candidate_id = row
        if owner != user_id:
            raise PermissionDenied("you can rate only replies in your own chats")
        db.execute("UPDATE chat_replies SET rating = ? WHERE id = ?", [value, reply_id])
        if candidate_id is None and value is not None:
            prompt_id, _ = add_prompt(db, json.loads(messages), source="chat")
            cursor = db.execute("INSERT INTO items (prompt_id, status) VALUES (?, 'complete')", [prompt_id])
            cursor = db.execute(
                "INSERT INTO candidates (item_id, text, policy_version) VALUES (?, ?, ?)",
                [cursor.lastrowid, reply, version])
            candidate_id = cursor.lastrowid
            db.execute("UPDATE chat_replies SET candidate_id = ? WHERE id = ?", [candidate_id, reply_id])
        if candidate_id is not None:
            db.execute("DELETE FROM ratings WHERE candidate_id = ? AND source = 'chat'", [candidate_id])
            if value is not None:
                db.execute("INSERT INTO ratings (candidate_id, user_id, value, source) VALUES (?, ?, ?, 'chat')",
                           [candidate_id, user_id, value])


def send_to_annotation(db, messages, *, mode: str = "pairwise", k: int = 2, overlap: int = 1,
                       source: str = "chat") -> int:
    """Queue a conversation for annotation: the prompt is everything up to its last user turn,
    answered afresh by the live policy. Returns the item id."""
    if not isinstance(messages, list):
        raise InvalidInput("a conversation is a list of messages")
    last_user = max((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"),
                    default=None)
    if last_user is None:
        raise InvalidInput("the conversation has no user message to annotate")
    with write_transaction(db):
        prompt_id, _ = add_prompt(db, messages[: last_user + 1], source=source)
        (item_id,) = queue_items(db, [prompt_id], mode=mode, k=k, overlap=overlap)
        return item_id


def rated_replies(db) -> list[dict]:
    """Chat replies with a thumbs rating, as KTO rows: prompt messages, completion, label."""
    return [
        {"prompt": json.loads(r[0]), "completion": [{"role": "assistant", "content": r[1]}], "label": r[2] > 0,
         "version": r[3]}
        for r in db.execute(
            "SELECT messages, reply, rating, policy_version FROM chat_replies WHERE rating IS NOT NULL ORDER BY id")
    ]
