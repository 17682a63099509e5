"""`python -m annotations backup` and `check`: a consistent copy taken while others write, and
an integrity check that exits non-zero on any problem."""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import sys
import threading

import pytest

from annotations import open_db, store
from annotations.__main__ import main
from annotations.db import backup_db, check_db
from bench.load import add_ready_items
from tests.conftest import REPO


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "annotations", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)


@pytest.fixture
def busy_store(tmp_path):
    """A store with 400 ready items and one annotator."""
    db = open_db(tmp_path / "rankloop.db")
    add_ready_items(db, 400)
    store.add_user(db, "ann", "annotator", "ann-password")
    yield tmp_path / "rankloop.db", db
    db.close()


def judge_until(path, stop: threading.Event, counts: list[int]) -> None:
    """Another connection judging items one transaction at a time, as the app does."""
    from annotations.db import connect

    db = connect(path)
    user = store.get_user(db, "ann")["id"]
    while not stop.is_set():
        item = store.next_item(db, user)
        if item is None:
            break
        first, second = (c["id"] for c in item["candidates"])
        store.submit_judgement(db, user, item["id"], [[first], [second]], shown_order=[first, second])
        counts.append(1)
    db.close()


def test_backup_taken_while_the_store_is_written_is_a_consistent_snapshot(busy_store, tmp_path):
    path, db = busy_store
    stop, counts = threading.Event(), []
    writer = threading.Thread(target=judge_until, args=(path, stop, counts))
    writer.start()
    try:
        while len(counts) < 20:  # the writer is well under way
            threading.Event().wait(0.01)
        before = len(counts)
        result = cli("--db", path, "backup", tmp_path / "copy.db")
        after = len(counts)
    finally:
        stop.set()
        writer.join(60)
    assert result.returncode == 0, result.stderr
    assert "backed up to" in result.stdout
    assert after > before  # the writer kept going while the backup ran

    copy = sqlite3.connect(tmp_path / "copy.db")
    assert check_db(copy) == []
    assert copy.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # one self-contained file
    judged = copy.execute("SELECT count(*) FROM judgements").fetchone()[0]
    assert before <= judged <= after + 1
    # A snapshot between transactions: each judgement with its pair, its item complete, nothing else.
    assert copy.execute("SELECT count(*) FROM pairs").fetchone()[0] == judged
    assert copy.execute("SELECT count(*) FROM items WHERE status = 'complete'").fetchone()[0] == judged
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("copy")) == ["copy.db"]


def test_backup_never_overwrites_an_existing_file(busy_store, tmp_path):
    _, db = busy_store
    target = tmp_path / "exists.db"
    target.write_text("precious")
    result = cli("--db", tmp_path / "rankloop.db", "backup", target)
    assert result.returncode == 2 and "already exists" in result.stderr
    assert target.read_text() == "precious"


def test_backup_of_a_missing_store_is_an_error_not_a_new_store(tmp_path, capsys):
    assert main(["--db", str(tmp_path / "nothing.db"), "backup", str(tmp_path / "copy.db")]) == 2
    assert "there is no store" in capsys.readouterr().err
    assert not (tmp_path / "nothing.db").exists() and not (tmp_path / "copy.db").exists()


def test_backup_copy_opens_as_a_store_with_the_same_rows(busy_store, tmp_path):
    path, db = busy_store
    backup_db(db, tmp_path / "b.db")
    copy = open_db(tmp_path / "b.db")
    for table in ("prompts", "items", "candidates", "users"):
        assert store.count_rows(copy, table) == store.count_rows(db, table)
    copy.close()


def test_check_passes_a_healthy_store(busy_store, capsys):
    path, _ = busy_store
    assert main(["--db", str(path), "check"]) == 0
    assert "ok: integrity_check and foreign_key_check pass" in capsys.readouterr().out


def test_check_reports_a_row_pointing_at_a_missing_row(busy_store, capsys):
    path, _ = busy_store
    raw = sqlite3.connect(path)  # foreign keys off, as in any tool that edits the file by hand
    raw.execute("INSERT INTO pairs (prompt_id, chosen, rejected, source) VALUES (99999, 'a', 'b', 'import')")
    raw.commit()
    raw.close()
    assert main(["--db", str(path), "check"]) == 1
    out = capsys.readouterr().out
    assert "refers to a missing row of prompts" in out and "1 problem(s) found" in out


def test_check_reports_a_corrupted_file_with_a_message_and_exit_status_1(tmp_path):
    db = open_db(tmp_path / "rankloop.db")
    add_ready_items(db, 300)
    db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    data = bytearray((tmp_path / "rankloop.db").read_bytes())
    page = 4096
    rng = random.Random(0)  # the same scribbles every run: random ones made the outcome vary between runs
    for offset in range(3 * page, len(data) - page, 7 * page):  # scribble over some b-tree pages
        data[offset + 100: offset + 400] = rng.randbytes(300)
    (tmp_path / "rankloop.db").write_bytes(bytes(data))
    result = cli("--db", tmp_path / "rankloop.db", "check")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "problem(s) found" in result.stdout
