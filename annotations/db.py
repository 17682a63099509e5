"""Opening the store: one SQLite file, WAL mode, migrations applied on open; and keeping it
safe: an online backup and an integrity check.

Durability: WAL with `synchronous=FULL`, so a judgement the server acknowledged has been
fsynced to the WAL before the acknowledgement; it survives the app being killed and the
machine losing power. Writers take the lock up front (`BEGIN IMMEDIATE`) so that a
read-then-write transaction (leasing an item) can never fail half-way on a lock upgrade.
See docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import uuid
from pathlib import Path

import sqlite_utils

from annotations.errors import InvalidInput
from annotations.migrations import migrations

BUSY_TIMEOUT_S = 30.0


def default_db_path() -> Path:
    return Path(os.environ.get("RANKLOOP_HOME", "data")).resolve() / "rankloop.db"


def connect(path: str | Path) -> sqlite_utils.Database:
    """A connection to an existing store, usable from any one thread at a time.

    Does not apply migrations: call `open_db` once per process first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
    return sqlite_utils.Database(conn)


def open_db(path: str | Path | None = None) -> sqlite_utils.Database:
    """Open (creating if needed) the store at `path` and apply pending migrations."""
    db = connect(path or default_db_path())
    migrations.apply(db)
    return db


@contextlib.contextmanager
def write_transaction(db: sqlite_utils.Database):
    """One atomic write: `BEGIN IMMEDIATE` ... `COMMIT`, rolled back on any error.

    Nested use becomes a savepoint, so store functions compose.
    """
    if db.conn.in_transaction:
        with db.atomic():
            yield db
        return
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.conn.rollback()
        raise
    else:
        db.conn.execute("COMMIT")


# ---------------------------------------------------------------- backup and check


def backup_db(db: sqlite_utils.Database | sqlite3.Connection, target: str | Path) -> Path:
    """Copy the store to the new file `target` with SQLite's online backup API.

    The copy is taken in one step, inside one read transaction, so it is a consistent snapshot
    even while the app and the worker keep writing (WAL lets them carry on meanwhile). It is
    written under a temporary name, made a self-contained file (rollback journal, no -wal
    beside it), fsynced, and only then renamed to `target`; an existing `target` is never
    overwritten.
    """
    target = Path(target)
    if target.exists():
        raise InvalidInput(f"{target} already exists: back up to a new file name")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    copy = sqlite3.connect(str(partial))
    try:
        getattr(db, "conn", db).backup(copy)  # pages=-1: every page in a single step
        copy.execute("PRAGMA journal_mode=DELETE")
        copy.close()
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, target)
    except BaseException:
        copy.close()
        partial.unlink(missing_ok=True)
        raise
    return target


def check_db(db: sqlite_utils.Database | sqlite3.Connection) -> list[str]:
    """What is wrong with the store, per `PRAGMA integrity_check` (pages, indexes, constraints)
    and `PRAGMA foreign_key_check` (rows pointing at missing rows). An empty list: healthy."""
    conn = getattr(db, "conn", db)
    text_factory = conn.text_factory
    # a damaged page can put bytes that are not UTF-8 into the report itself: shown, not fatal
    conn.text_factory = lambda raw: raw.decode("utf-8", "replace")
    try:
        problems = [row[0] for row in conn.execute("PRAGMA integrity_check").fetchall() if row[0] != "ok"]
        for table, rowid, parent, _ in conn.execute("PRAGMA foreign_key_check").fetchall():
            problems.append(f"{table} row {rowid} refers to a missing row of {parent}")
    except sqlite3.DatabaseError as e:
        problems = [f"the file cannot be read as an SQLite database: {e}"]
    finally:
        conn.text_factory = text_factory
    return problems
