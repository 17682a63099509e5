"""Opening the store: one SQLite file, WAL mode, migrations applied on open.

Durability: WAL with `synchronous=FULL`, so a judgement the server acknowledged has been
fsynced to the WAL before the acknowledgement; it survives the app being killed and the
machine losing power. Writers take the lock up front (`BEGIN IMMEDIATE`) so that a
read-then-write transaction (leasing an item) can never fail half-way on a lock upgrade.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

import sqlite_utils

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
