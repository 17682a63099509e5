"""Handlers of the chat and arena tabs (plain functions, role-checked like `app.handlers`)."""

from __future__ import annotations

import random
import threading
import time
import uuid

from annotations import arena, chat_replies, model_versions, store
from annotations.errors import InvalidInput, PermissionDenied
from app.handlers import AppContext, _annotator
from app.serving import BASE_VERSION, SamplingParams, ensure_loaded

LIVE = "live"


def message_text(content) -> str:
    """Plain text of a Gradio chat message's content (a string or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return "" if content is None else str(content)


def policy_versions(ctx: AppContext, user: dict | None = None) -> list[str]:
    """Versions this person may chat with or battle: "live" first, then those an admin made
    available (`annotations.model_versions.available_versions`; an admin sees every non-retired one)."""
    db = ctx.db()
    if user is not None and user["role"] == "admin":
        return [LIVE, *model_versions.chat_versions(db)]
    return [LIVE, *model_versions.available_versions(db)]


def _resolve(ctx: AppContext, version: str | None, user: dict | None = None) -> str:
    """The version to answer with; an annotator may name only an available version (naming
    another would make the server load it, pausing everyone's answers)."""
    if not version or version == LIVE:
        return ctx.server.live_version
    if user is not None and user["role"] != "admin" and version not in model_versions.available_versions(ctx.db()):
        raise PermissionDenied(f"version {version} is not available for chat or the arena: ask an admin to make it "
                               "available")
    return ensure_loaded(ctx.server, ctx.db(), version)


def _sampling(values: dict | None) -> SamplingParams:
    try:
        return SamplingParams(**(values or {}))
    except (TypeError, ValueError) as e:
        raise InvalidInput(str(e)) from None


def chat_stream(ctx: AppContext, user: dict | None, message: str, *, conversation: str,
                version: str | None = None, sampling: dict | None = None):
    """Stream the reply to `message` in `conversation` (the server's stored conversation: what
    the user said and what the model answered, never a history the client sends). Yields
    (reply so far, version); the last item also carries the stored reply id:
    (reply, version, reply_id)."""
    user = _annotator(user)
    earlier = chat_replies.conversation_messages(ctx.db(), user["id"], conversation)
    messages = store.canonical_messages(earlier + [{"role": "user", "content": message or ""}])
    params = _sampling(sampling)
    # "live" is resolved by the server when this request's turn comes, so a request queued
    # behind a promotion is answered by the new version
    version = None if not version or version == LIVE else _resolve(ctx, version, user)
    start = time.perf_counter()
    text, produced_by = "", version
    for text, produced_by in ctx.server.stream(messages, params, version):
        yield text, produced_by
    reply_id = chat_replies.add_reply(ctx.db(), user["id"], conversation, messages, text.strip(), produced_by,
                              sampling=params.as_dict(), seconds=time.perf_counter() - start)
    yield text, produced_by, reply_id


def rate_shown_reply(ctx: AppContext, user: dict | None, conversation: str | None, position: int, shown_text,
                     liked: bool | None) -> int:
    """Rate the `position`-th assistant message (0-based) of the conversation on screen, after
    checking that it is the stored reply with exactly the text the person sees. Returns the
    reply id. A reply still being written has no stored row yet, and says so."""
    user = _annotator(user)
    replies = chat_replies.conversation_replies(ctx.db(), user["id"], conversation) if conversation else []
    if not 0 <= position < len(replies) or _as_shown(replies[position]["reply"]) != _as_shown(message_text(shown_text)):
        if position == len(replies):
            raise InvalidInput("this reply is still being written: rate it once it is complete")
        raise InvalidInput("that message is not one of your stored replies in this conversation")
    reply_id = replies[position]["id"]
    chat_replies.rate_reply(ctx.db(), user["id"], reply_id, None if liked is None else (1 if liked else -1))
    return reply_id


def _as_shown(text: str) -> str:
    """A reply as the chat shows it: Gradio's Chatbot passes every text message through
    `inspect.cleandoc` (tabs expanded, the common indentation of later lines removed), and the
    page sends back that form with a thumb; the stored reply is the model's own text."""
    import inspect

    return inspect.cleandoc(text).strip()


def rate_reply(ctx: AppContext, user: dict | None, reply_id: int, liked: bool | None) -> None:
    user = _annotator(user)
    chat_replies.rate_reply(ctx.db(), user["id"], int(reply_id), None if liked is None else (1 if liked else -1))


MAX_QUEUED_PER_HOUR = 20  # conversations one person may send to annotation in an hour
_queued: dict[int, list[float]] = {}
_queued_lock = threading.Lock()


def _spend_queue_allowance(user_id: int, now: float | None = None) -> None:
    """Refuse a 21st conversation sent to annotation within an hour by the same person: each
    one becomes an item others spend time on."""
    now = time.time() if now is None else now
    with _queued_lock:
        recent = [t for t in _queued.get(user_id, []) if now - t < 3600]
        if len(recent) >= MAX_QUEUED_PER_HOUR:
            wait = 3600 - (now - recent[0])
            raise InvalidInput(f"you have sent {MAX_QUEUED_PER_HOUR} conversations to annotation in the last hour: "
                               f"try again in {wait / 60:.0f} min")
        _queued[user_id] = [*recent, now]


def send_to_annotation(ctx: AppContext, user: dict | None, conversation: str | None) -> int:
    """Queue the conversation on screen (as the server stored it) for annotation, at most
    `MAX_QUEUED_PER_HOUR` an hour per person."""
    user = _annotator(user)
    messages = chat_replies.conversation_messages(ctx.db(), user["id"], conversation) if conversation else []
    if not messages:
        raise InvalidInput("send a message first: there is no conversation to annotate")
    _spend_queue_allowance(user["id"])
    item_id = chat_replies.send_to_annotation(
        ctx.db(), messages, mode=ctx.setting("mode"), k=int(ctx.setting("k")),
        overlap=int(ctx.setting("overlap")), source=f"chat:{user['name']}")
    ctx.wake_prefetcher()
    return item_id


def new_conversation() -> str:
    return uuid.uuid4().hex


# ---------------------------------------------------------------- arena


ARENA_WAITS = (
    "**The arena compares two versions of the model, blind.** Both answer the same prompt, you vote, and "
    "only then see which was which; your votes rank the versions on the leaderboard and become preference "
    "data. So far there is only one version to talk to: the arena opens when a training round registers a "
    "second one (or an admin makes one available).")


def arena_notice(ctx: AppContext, user: dict | None) -> str | None:
    """None when this person can fight a battle; else what the arena is for and what it waits for."""
    _annotator(user)
    return None if len({v for v in policy_versions(ctx, user) if v != LIVE}) >= 2 else ARENA_WAITS


def default_opponents(ctx: AppContext) -> tuple[str, str]:
    """The live version against its parent; a live version without one (the base) meets the
    newest candidate."""
    db = ctx.db()
    live = ctx.server.live_version
    row = model_versions.find_version(db, live)
    parent = (row or {}).get("parent") or BASE_VERSION
    if parent != live:
        return live, parent
    others = [v for v in model_versions.available_versions(db) if v != live]
    if not others:
        raise InvalidInput("there is only one version so far: the arena opens when a round registers a second")
    return live, others[0]


def random_prompt(ctx: AppContext, user: dict | None) -> str:
    """A held-out single-turn prompt to battle on (falls back to any prompt)."""
    _annotator(user)
    messages = store.random_prompt(ctx.db(), "heldout")
    if messages is None:
        raise InvalidInput("the store holds no prompts yet: type one")
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


def start_battle(ctx: AppContext, user: dict | None, prompt: str, version_a: str | None = None,
                 version_b: str | None = None, sampling: dict | None = None) -> dict:
    """Answer `prompt` with two versions (live vs parent unless given), shown blind in random
    order. Returns {"battle_id", "answers": [text A, text B]} — versions stay hidden."""
    user = _annotator(user)
    messages = store.canonical_messages(prompt or "")
    if version_a in (None, "", LIVE) and version_b in (None, "", LIVE):
        first, second = default_opponents(ctx)
    else:
        first, second = _resolve(ctx, version_a, user), _resolve(ctx, version_b, user)
    if first == second:
        raise InvalidInput("pick two different versions")
    params = _sampling(sampling)
    answers = {}
    for version in (first, second):
        ensure_loaded(ctx.server, ctx.db(), version)
        answers[version] = ctx.server.generate(messages, n=1, sampling=params, version=version,
                                               interactive=True)[0].text
    a, b = random.sample([first, second], 2)
    battle_id = arena.record_battle(ctx.db(), user["id"], messages, a, b, answers[a], answers[b])
    return {"battle_id": battle_id, "answers": [answers[a], answers[b]]}


def vote(ctx: AppContext, user: dict | None, battle_id: int | None, winner: str) -> dict:
    user = _annotator(user)
    if not battle_id:
        raise InvalidInput("start a battle first")
    return arena.vote(ctx.db(), user["id"], int(battle_id), winner)


def leaderboard(ctx: AppContext, user: dict | None) -> tuple[list[dict], list[dict]]:
    _annotator(user)
    return arena.leaderboard(ctx.db()), arena.win_rates_over_parent(ctx.db())
