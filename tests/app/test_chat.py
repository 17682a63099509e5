"""Chat and arena handlers on the tiny model and a real store."""

import json

import pytest

from annotations import store
from annotations.errors import InvalidInput, PermissionDenied
from app import chat_and_arena as chat


@pytest.fixture
def ctx(empty_ctx):
    empty_ctx.db().execute("INSERT INTO users (name, role, password_hash) VALUES ('ann', 'annotator', 'x')")
    empty_ctx.db().conn.commit()
    return empty_ctx


SAMPLING = {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1, "max_new_tokens": 6}


def user(ctx):
    return store.get_user(ctx.db(), "ann")


def test_chat_stream_stores_the_reply_with_its_version(ctx):
    outputs = list(chat.chat_stream(ctx, user(ctx), "hello there", conversation="c1", sampling=SAMPLING))
    text, version, reply_id = outputs[-1]
    row = ctx.db().execute("SELECT reply, policy_version, messages FROM chat_replies WHERE id = ?",
                           [reply_id]).fetchone()
    assert row[0] == text.strip() and row[1] == version == "base"
    assert '"hello there"' in row[2]


def test_chat_continues_the_conversation_the_server_stored(ctx):
    *_, first = chat.chat_stream(ctx, user(ctx), "first", conversation="c2", sampling=SAMPLING)
    *_, last = chat.chat_stream(ctx, user(ctx), "second", conversation="c2", sampling=SAMPLING)
    stored = ctx.db().execute("SELECT messages FROM chat_replies WHERE id = ?", [last[2]]).fetchone()[0]
    assert json.loads(stored) == [{"role": "user", "content": "first"},
                                  {"role": "assistant", "content": first[0].strip()},
                                  {"role": "user", "content": "second"}]


def test_chat_conversations_of_other_users_are_not_continued(ctx):
    ctx.db().execute("INSERT INTO users (name, role, password_hash) VALUES ('eve', 'annotator', 'x')")
    ctx.db().conn.commit()
    list(chat.chat_stream(ctx, user(ctx), "secret plan", conversation="shared-id", sampling=SAMPLING))
    *_, last = chat.chat_stream(ctx, store.get_user(ctx.db(), "eve"), "what did they say?",
                                conversation="shared-id", sampling=SAMPLING)
    stored = ctx.db().execute("SELECT messages FROM chat_replies WHERE id = ?", [last[2]]).fetchone()[0]
    assert "secret plan" not in stored


def test_rating_the_reply_on_screen_checks_it_is_the_stored_one(ctx):
    *_, (text, _, reply_id) = chat.chat_stream(ctx, user(ctx), "rate me", conversation="c3", sampling=SAMPLING)
    assert chat.rate_shown_reply(ctx, user(ctx), "c3", 0, [{"type": "text", "text": text}], True) == reply_id
    assert ctx.db().execute("SELECT rating FROM chat_replies WHERE id = ?", [reply_id]).fetchone()[0] == 1
    with pytest.raises(InvalidInput, match="not one of your stored replies"):
        chat.rate_shown_reply(ctx, user(ctx), "c3", 0, "a different text", True)
    with pytest.raises(InvalidInput, match="still being written"):
        chat.rate_shown_reply(ctx, user(ctx), "c3", 1, "half a rep", True)
    ctx.db().execute("INSERT INTO users (name, role, password_hash) VALUES ('eve', 'annotator', 'x')")
    ctx.db().conn.commit()
    with pytest.raises(InvalidInput):  # eve's conversation "c3" holds no reply of ann's
        chat.rate_shown_reply(ctx, store.get_user(ctx.db(), "eve"), "c3", 0, text, True)
    assert ctx.db().execute("SELECT rating FROM chat_replies WHERE id = ?", [reply_id]).fetchone()[0] == 1


def test_a_reply_the_chat_reshapes_can_still_be_rated(ctx):
    """Gradio's Chatbot shows a text message through inspect.cleandoc (tabs expanded, the common
    indentation of later lines removed) and a thumb sends that form back: it is the same reply."""
    import inspect

    *_, (_, _, reply_id) = chat.chat_stream(ctx, user(ctx), "indent", conversation="c4", sampling=SAMPLING)
    stored = "Here:\n    first\tstep\n    second step"  # as a model might write it
    ctx.db().execute("UPDATE chat_replies SET reply = ? WHERE id = ?", [stored, reply_id])
    ctx.db().conn.commit()
    shown = inspect.cleandoc(stored)
    assert shown != stored  # "Here:\nfirst   step\nsecond step"
    assert chat.rate_shown_reply(ctx, user(ctx), "c4", 0, shown, False) == reply_id
    assert ctx.db().execute("SELECT rating FROM chat_replies WHERE id = ?", [reply_id]).fetchone()[0] == -1
    with pytest.raises(InvalidInput, match="not one of your stored replies"):
        chat.rate_shown_reply(ctx, user(ctx), "c4", 0, "Here:\nfirst step", False)


def test_chat_refuses_an_empty_message_and_anonymous_users(ctx):
    with pytest.raises(InvalidInput):
        list(chat.chat_stream(ctx, user(ctx), "   ", conversation="c", sampling=SAMPLING))
    with pytest.raises(PermissionDenied):
        list(chat.chat_stream(ctx, None, "hi", conversation="c", sampling=SAMPLING))


def test_thumbs_on_a_reply_are_stored_as_kto_rows(ctx):
    from annotations.chat_replies import rated_replies

    *_, (text, _, reply_id) = chat.chat_stream(ctx, user(ctx), "rate me", conversation="c", sampling=SAMPLING)
    chat.rate_reply(ctx, user(ctx), reply_id, False)
    rows = rated_replies(ctx.db())
    assert rows[0]["label"] is False and rows[0]["completion"][0]["content"] == text.strip()


def test_send_to_annotation_queues_the_stored_conversation_up_to_the_last_user_turn(ctx):
    *_, first = chat.chat_stream(ctx, user(ctx), "q1", conversation="c4", sampling=SAMPLING)
    list(chat.chat_stream(ctx, user(ctx), "q2", conversation="c4", sampling=SAMPLING))
    item_id = chat.send_to_annotation(ctx, user(ctx), "c4")
    pending = store.pending_items(ctx.db())
    assert pending[0]["id"] == item_id
    assert [m["content"] for m in pending[0]["messages"]] == ["q1", first[0].strip(), "q2"]


def test_send_to_annotation_without_a_conversation_says_so(ctx):
    with pytest.raises(InvalidInput, match="send a message first"):
        chat.send_to_annotation(ctx, user(ctx), None)


def test_arena_needs_two_versions_when_only_the_base_exists(ctx):
    with pytest.raises(InvalidInput):
        chat.start_battle(ctx, user(ctx), "compare", sampling=SAMPLING)


def test_a_rated_chat_reply_becomes_kto_training_data(ctx):
    from annotations.answer_labels import kto_examples

    *_, (text, _, reply_id) = chat.chat_stream(ctx, user(ctx), "useful?", conversation="c", sampling=SAMPLING)
    chat.rate_reply(ctx, user(ctx), reply_id, True)
    chat.rate_reply(ctx, user(ctx), reply_id, False)  # a change of mind replaces the rating
    rows = kto_examples(ctx.db(), split=None)
    assert [(r["completion"], r["label"]) for r in rows] == [(text.strip(), False)]
    assert store.count_items(ctx.db(), "ready") == 0  # the closed item is never served


def test_an_annotator_may_chat_only_with_versions_an_admin_made_available(ctx):
    from annotations import model_versions

    db = ctx.db()
    model_versions.register_version(db, "v1", "policy", "base", "dpo", None, "/nowhere/v1", {})
    model_versions.promote(db, "v1")
    model_versions.register_version(db, "v2", "policy", "v1", "dpo", None, "/nowhere/v2", {})
    model_versions.promote(db, "v2")  # v1 is the live version's parent; base is retired and not its parent
    assert model_versions.available_versions(db) == ["v2", "v1"]
    with pytest.raises(PermissionDenied, match="not available"):
        list(chat.chat_stream(ctx, user(ctx), "hi", conversation="c", version="base", sampling=SAMPLING))
    assert "base" not in chat.policy_versions(ctx, user(ctx))
    model_versions.set_available_versions(db, ["base"])
    assert model_versions.available_versions(db) == ["v2", "v1", "base"]
    assert "base" in chat.policy_versions(ctx, user(ctx))


def test_the_arena_says_what_it_is_for_until_there_is_a_second_version_and_then_meets_the_newest(ctx):
    from annotations import model_versions

    assert chat.arena_notice(ctx, user(ctx)) == chat.ARENA_WAITS
    model_versions.register_version(ctx.db(), "v1", "policy", "base", "dpo", None, "/nowhere/v1", {})
    model_versions.register_version(ctx.db(), "v2", "policy", "base", "dpo", None, "/nowhere/v2", {})
    assert chat.arena_notice(ctx, user(ctx)) is None
    assert chat.default_opponents(ctx) == ("base", "v2")  # the base has no parent: the newest candidate
