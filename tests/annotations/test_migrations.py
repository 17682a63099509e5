"""Migrations on a blank database and on one at the previous schema (after simonw/llm tests/test_migrate.py)."""

import sqlite3

import pytest

from annotations import open_db
from annotations.db import connect
from annotations.migrations import migrations

TABLES = {
    "users", "prompts", "items", "candidates", "leases", "judgements",
    "pairs", "ratings", "rounds", "policies", "settings",
}
PREVIOUS = "m002_create_rounds_and_policies"


def schema(db) -> list[tuple]:
    return db.execute("SELECT type, name, sql FROM sqlite_master ORDER BY type, name").fetchall()


def applied(db) -> list[str]:
    return [m.name for m in migrations.applied(db)]


def test_open_db_creates_all_tables_on_blank_database(tmp_path):
    db = open_db(tmp_path / "blank.db")
    assert TABLES <= set(db.table_names())


def test_open_db_records_every_migration_on_blank_database(tmp_path):
    db = open_db(tmp_path / "blank.db")
    assert migrations.pending(db) == []
    assert applied(db)[:3] == ["m001_create_core", "m002_create_rounds_and_policies", "m003_create_settings"]


def test_open_db_creates_live_base_policy_on_blank_database(tmp_path):
    db = open_db(tmp_path / "blank.db")
    rows = db.execute("SELECT version, kind, method, state, path FROM policies").fetchall()
    assert rows == [("base", "policy", "base", "live", None)]


def test_open_db_uses_wal_journal(tmp_path):
    db = open_db(tmp_path / "blank.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.fixture
def previous_schema_path(tmp_path):
    """A store file at the schema before m002, holding a user, a prompt, an item, a pair."""
    path = tmp_path / "old.db"
    db = connect(path)
    migrations.apply(db, stop_before=PREVIOUS)
    assert "rounds" not in db.table_names() and "policies" not in db.table_names()
    with db.conn:
        db.execute("INSERT INTO users (id, name, role, password_hash) VALUES (1, 'ann', 'annotator', 'x')")
        db.execute("INSERT INTO prompts (id, messages, content_hash) VALUES (1, '[]', 'h1')")
        db.execute("INSERT INTO items (id, prompt_id) VALUES (1, 1)")
        db.execute("INSERT INTO pairs (prompt_id, chosen, rejected, source) VALUES (1, 'good', 'bad', 'import')")
    db.close()
    return path


def test_open_db_keeps_rows_on_previous_schema(previous_schema_path):
    db = open_db(previous_schema_path)
    assert db.execute("SELECT name, role FROM users").fetchall() == [("ann", "annotator")]
    assert db.execute("SELECT prompt_id, status FROM items").fetchall() == [(1, "pending")]
    assert db.execute("SELECT chosen, rejected FROM pairs").fetchall() == [("good", "bad")]


def test_open_db_applies_remaining_migrations_on_previous_schema(previous_schema_path):
    db = open_db(previous_schema_path)
    assert TABLES <= set(db.table_names())
    assert migrations.pending(db) == []
    assert db.execute("SELECT version, state FROM policies").fetchall() == [("base", "live")]


def test_open_db_twice_changes_nothing(tmp_path):
    path = tmp_path / "twice.db"
    first = open_db(path)
    before = (schema(first), applied(first), first.execute("SELECT count(*) FROM policies").fetchone())
    first.close()
    second = open_db(path)
    after = (schema(second), applied(second), second.execute("SELECT count(*) FROM policies").fetchone())
    assert after == before


def test_policies_index_rejects_second_live_policy_of_same_kind(db):
    db.execute("INSERT INTO policies (version, kind, method, state) VALUES ('v1', 'policy', 'dpo', 'candidate')")
    with pytest.raises(sqlite3.IntegrityError):
        db.execute("UPDATE policies SET state = 'live' WHERE version = 'v1'")


def test_policies_index_allows_one_live_per_kind_and_many_not_live(db):
    with db.conn:
        db.execute("INSERT INTO policies (version, kind, method, state) VALUES ('rm1', 'reward', 'reward', 'live')")
        db.execute("INSERT INTO policies (version, kind, method, state) VALUES ('v1', 'policy', 'dpo', 'candidate')")
        db.execute("INSERT INTO policies (version, kind, method, state) VALUES ('v2', 'policy', 'dpo', 'retired')")
        db.execute("INSERT INTO policies (version, kind, method, state) VALUES ('v3', 'policy', 'dpo', 'candidate')")
    live = db.execute("SELECT kind, version FROM policies WHERE state = 'live' ORDER BY kind").fetchall()
    assert live == [("policy", "base"), ("reward", "rm1")]
