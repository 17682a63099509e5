"""Chat and arena handlers on the tiny model and a real store."""

import pytest

from annotations import store
from annotations.errors import InvalidInput, PermissionDenied
from app import chat


@pytest.fixture
def ctx(empty_ctx):
    empty_ctx.db().execute("INSERT INTO users (name, role, password_hash) VALUES ('ann', 'annotator', 'x')")
    empty_ctx.db().conn.commit()
    return empty_ctx


SAMPLING = {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1, "max_new_tokens": 6}


def user(ctx):
    return store.get_user(ctx.db(), "ann")


def test_chat_stream_stores_the_reply_with_its_version(ctx):
    outputs = list(chat.chat_stream(ctx, user(ctx), [], "hello there", conversation="c1", sampling=SAMPLING))
    text, version, reply_id = outputs[-1]
    row = ctx.db().execute("SELECT reply, policy_version, messages FROM chat_replies WHERE id = ?",
                           [reply_id]).fetchone()
    assert row[0] == text.strip() and row[1] == version == "base"
    assert '"hello there"' in row[2]


def test_chat_history_with_content_parts_is_understood(ctx):
    history = [{"role": "user", "content": [{"type": "text", "text": "first"}]},
               {"role": "assistant", "content": [{"type": "text", "text": "answer"}]}]
    *_, last = chat.chat_stream(ctx, user(ctx), history, "second", conversation="c2", sampling=SAMPLING)
    stored = ctx.db().execute("SELECT messages FROM chat_replies WHERE id = ?", [last[2]]).fetchone()[0]
    assert '"first"' in stored and '"answer"' in stored and '"second"' in stored


def test_chat_refuses_an_empty_message_and_anonymous_users(ctx):
    with pytest.raises(InvalidInput):
        list(chat.chat_stream(ctx, user(ctx), [], "   ", conversation="c", sampling=SAMPLING))
    with pytest.raises(PermissionDenied):
        list(chat.chat_stream(ctx, None, [], "hi", conversation="c", sampling=SAMPLING))


def test_thumbs_on_a_reply_are_stored_as_kto_rows(ctx):
    from annotations.chat import rated_replies

    *_, (text, _, reply_id) = chat.chat_stream(ctx, user(ctx), [], "rate me", conversation="c", sampling=SAMPLING)
    chat.rate_reply(ctx, user(ctx), reply_id, False)
    rows = rated_replies(ctx.db())
    assert rows[0]["label"] is False and rows[0]["completion"][0]["content"] == text.strip()


def test_send_to_annotation_queues_the_conversation_up_to_the_last_user_turn(ctx):
    history = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
               {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    item_id = chat.send_to_annotation(ctx, user(ctx), history)
    pending = store.pending_items(ctx.db())
    assert pending[0]["id"] == item_id
    assert [m["content"] for m in pending[0]["messages"]] == ["q1", "a1", "q2"]


def test_arena_needs_two_versions_when_only_the_base_exists(ctx):
    with pytest.raises(InvalidInput):
        chat.start_battle(ctx, user(ctx), "compare", sampling=SAMPLING)


def test_a_rated_chat_reply_becomes_kto_training_data(ctx):
    from annotations.registry import rows_from_ratings

    *_, (text, _, reply_id) = chat.chat_stream(ctx, user(ctx), [], "useful?", conversation="c", sampling=SAMPLING)
    chat.rate_reply(ctx, user(ctx), reply_id, True)
    chat.rate_reply(ctx, user(ctx), reply_id, False)  # a change of mind replaces the rating
    rows = rows_from_ratings(ctx.db(), split=None)
    assert [(r["completion"], r["label"]) for r in rows] == [(text.strip(), False)]
    assert store.count_items(ctx.db(), "ready") == 0  # the closed item is never served
