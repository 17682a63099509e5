"""API keys in the store: only a key's hash is kept, keys act as their user, revoking is final."""

import hashlib
import sqlite3

import pytest

from annotations import api_keys
from annotations.db import connect
from annotations.errors import InvalidInput, NotFound
from annotations.migrations import migrations


def test_create_key_stores_its_hash_and_never_the_key(db, users):
    key_id, key = api_keys.create_key(db, "ann", "laptop")
    stored = db.execute("SELECT * FROM api_keys WHERE id = ?", [key_id]).fetchone()
    assert key.startswith("rk-") and len(key) > 40
    assert hashlib.sha256(key.encode()).hexdigest() in stored
    assert not any(key in str(value) for value in stored)


def test_create_key_makes_a_different_key_each_time(db, users):
    assert api_keys.create_key(db, "ann")[1] != api_keys.create_key(db, "ann")[1]


def test_create_key_for_an_unknown_user_is_refused(db):
    with pytest.raises(NotFound, match="nobody"):
        api_keys.create_key(db, "nobody")


def test_create_key_with_an_overlong_label_is_refused(db, users):
    with pytest.raises(InvalidInput, match="label"):
        api_keys.create_key(db, "ann", "x" * 65)


def test_user_for_key_returns_its_user_and_notes_the_use(db, users):
    key_id, key = api_keys.create_key(db, "bob")
    assert api_keys.list_keys(db)[0]["last_used_at"] is None
    assert api_keys.user_for_key(db, key) == {"key_id": key_id, "id": users["bob"], "name": "bob", "role": "annotator"}
    assert api_keys.list_keys(db)[0]["last_used_at"] is not None


@pytest.mark.parametrize("key", [None, "", "rk-not-a-key", "sk-something"])
def test_user_for_key_is_none_for_a_missing_or_unknown_key(db, users, key):
    api_keys.create_key(db, "ann")
    assert api_keys.user_for_key(db, key) is None


def test_revoked_key_acts_for_nobody(db, users):
    key_id, key = api_keys.create_key(db, "ann")
    assert api_keys.revoke_key(db, key_id) is True
    assert api_keys.user_for_key(db, key) is None
    assert api_keys.list_keys(db)[0]["revoked_at"] is not None


def test_revoking_a_revoked_key_changes_nothing(db, users):
    key_id, _ = api_keys.create_key(db, "ann")
    api_keys.revoke_key(db, key_id)
    first = api_keys.list_keys(db)[0]["revoked_at"]
    assert api_keys.revoke_key(db, key_id) is False
    assert api_keys.list_keys(db)[0]["revoked_at"] == first


def test_revoking_an_unknown_key_is_refused(db):
    with pytest.raises(NotFound, match="no API key 42"):
        api_keys.revoke_key(db, 42)


def test_list_keys_shows_owner_label_and_prefix_newest_first(db, users):
    _, first = api_keys.create_key(db, "ann", "laptop")
    _, second = api_keys.create_key(db, "cat")
    listed = api_keys.list_keys(db)
    assert [(k["user"], k["label"], k["prefix"]) for k in listed] == [("cat", "", second[:10]), ("ann", "laptop", first[:10])]
    assert all(k["created_at"] for k in listed)


def test_rate_limit_defaults_and_is_set_within_bounds(db):
    assert api_keys.rate_limit(db) == api_keys.DEFAULT_REQUESTS_PER_MINUTE
    assert api_keys.set_rate_limit(db, "5") == 5 and api_keys.rate_limit(db) == 5
    for bad in (0, -1, 10_001, "many"):
        with pytest.raises(InvalidInput, match="requests per minute"):
            api_keys.set_rate_limit(db, bad)


def test_key_migration_keeps_chat_replies_of_the_previous_schema(tmp_path):
    from annotations import open_db

    path = tmp_path / "old.db"
    old = connect(path)
    migrations.apply(old, stop_before="m011_api_keys")
    with old.conn:
        old.execute("INSERT INTO users (id, name, role, password_hash) VALUES (1, 'ann', 'annotator', 'x')")
        old.execute("INSERT INTO chat_replies (user_id, conversation, messages, reply, policy_version)"
                    " VALUES (1, 'c', '[]', 'hello', 'base')")
    old.close()
    db = open_db(path)
    assert db.execute("SELECT reply, api_key_id FROM chat_replies").fetchall() == [("hello", None)]
    key_id, _ = api_keys.create_key(db, "ann")
    with pytest.raises(sqlite3.IntegrityError):  # a reply may only name a key that exists
        db.execute("UPDATE chat_replies SET api_key_id = ?", [key_id + 1])
