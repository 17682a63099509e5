"""Training rounds as the store keeps them: queue, claim, progress, curves, the end.

A round is a row that moves queued → running → succeeded | failed | cancelled. The worker
that runs it (align/rounds.py) records its pid, progress, the last lines of its log, the
exact data it trained on (a hash over the rows, and the highest pair, rating and judgement
ids it saw: annotations/training_data.py) and its metrics. Every write runs in one
transaction. No torch.
"""

from __future__ import annotations

import json
import math
import os

from annotations.db import write_transaction
from annotations.errors import InvalidInput, NotFound
from annotations.migrations import NOW
from annotations.model_versions import get_version, method_kind, next_version_name

ROUND_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATUSES = ("succeeded", "failed", "cancelled")
LOG_TAIL_LINES = 50
MAX_LOG_LINE_CHARS = 2_000

_ROUND_COLUMNS = (
    "id", "method", "config", "data_hash", "n_pairs", "parent_version", "version", "status", "pid",
    "progress", "log_tail", "metrics", "error", "code_version", "created_by", "created_at", "started_at",
    "finished_at", "data_until_pair_id", "data_until_rating_id", "base_path", "staged_path",
    "data_until_judgement_id",
)


def _round_dict(row) -> dict:
    out = dict(zip(_ROUND_COLUMNS, row))
    out["config"] = json.loads(out["config"] or "{}")
    out["metrics"] = json.loads(out["metrics"] or "{}")
    return out


def get_round(db, round_id: int) -> dict:
    row = db.execute(f"SELECT {', '.join(_ROUND_COLUMNS)} FROM rounds WHERE id = ?", [round_id]).fetchone()
    if row is None:
        raise NotFound(f"no round {round_id}")
    return _round_dict(row)


def list_rounds(db, limit: int = 20, status: str | None = None) -> list[dict]:
    """The most recent rounds first."""
    sql = f"SELECT {', '.join(_ROUND_COLUMNS)} FROM rounds"
    params: list = []
    if status:
        sql += " WHERE status = ?"
        params.append(status)
    rows = db.execute(sql + " ORDER BY id DESC LIMIT ?", [*params, limit]).fetchall()
    return [_round_dict(r) for r in rows]


def create_round(db, method: str, config: dict | None = None, created_by: int | None = None) -> int:
    """Queue a training round; returns its id. `config` is stored as JSON, validated by `align`."""
    method_kind(method)
    config = dict(config or {})
    try:
        text = json.dumps(config, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"round config is not JSON-serialisable: {e}") from None
    with write_transaction(db):
        cursor = db.execute(
            "INSERT INTO rounds (method, config, created_by) VALUES (?, ?, ?)", [method, text, created_by]
        )
        return cursor.lastrowid


def claim_round(db, round_id: int, pid: int) -> dict:
    """Mark one queued round running under `pid`; InvalidInput if it is not queued."""
    with write_transaction(db):
        status = get_round(db, round_id)["status"]
        if status != "queued":
            raise InvalidInput(f"round {round_id} is {status}, not queued: it cannot be started again")
        db.execute(
            f"UPDATE rounds SET status = 'running', pid = ?, started_at = {NOW} WHERE id = ?", [pid, round_id]
        )
        return get_round(db, round_id)


def claim_next_round(db, pid: int) -> dict | None:
    """Atomically take the oldest queued round (queued → running under `pid`), or None."""
    with write_transaction(db):
        row = db.execute("SELECT id FROM rounds WHERE status = 'queued' ORDER BY id LIMIT 1").fetchone()
        if row is None:
            return None
        return claim_round(db, row[0], pid)




def reserve_version(db, round_id: int) -> str:
    """Give a running round the name of the version it will produce (stored on the round)."""
    with write_transaction(db):
        row = get_round(db, round_id)
        if row["version"]:
            return row["version"]
        name = next_version_name(db, method_kind(row["method"]))
        db.execute("UPDATE rounds SET version = ? WHERE id = ?", [name, round_id])
        return name


def set_round_data(
    db,
    round_id: int,
    *,
    data_hash: str,
    n_pairs: int,
    parent_version: str | None,
    code_version: str | None,
    base_path: str | None = None,
    data_until_pair_id: int | None = None,
    data_until_rating_id: int | None = None,
    data_until_judgement_id: int | None = None,
) -> None:
    """Record what a round trains on: the data snapshot, its parent version and the code."""
    with write_transaction(db):
        get_round(db, round_id)
        db.execute(
            "UPDATE rounds SET data_hash = ?, n_pairs = ?, parent_version = ?, code_version = ?, base_path = ?,"
            " data_until_pair_id = ?, data_until_rating_id = ?, data_until_judgement_id = ? WHERE id = ?",
            [data_hash, n_pairs, parent_version, code_version, base_path, data_until_pair_id,
             data_until_rating_id, data_until_judgement_id, round_id],
        )


def update_round(
    db,
    round_id: int,
    *,
    progress: float | None = None,
    log_line: str | None = None,
    metrics: dict | None = None,
) -> None:
    """Report on a running round: progress in [0, 1], a log line (the round keeps the last
    `LOG_TAIL_LINES`), and metrics merged into the ones already stored."""
    with write_transaction(db):
        row = get_round(db, round_id)
        sets, params = [], []
        if progress is not None:
            sets.append("progress = ?")
            params.append(min(1.0, max(0.0, float(progress))))
        if log_line:
            lines = row["log_tail"].splitlines() if row["log_tail"] else []
            lines += [line[:MAX_LOG_LINE_CHARS] for line in str(log_line).splitlines() if line.strip()]
            sets.append("log_tail = ?")
            params.append("\n".join(lines[-LOG_TAIL_LINES:]))
        if metrics:
            sets.append("metrics = ?")
            params.append(json.dumps({**row["metrics"], **metrics}, sort_keys=True))
        if sets:
            db.execute(f"UPDATE rounds SET {', '.join(sets)} WHERE id = ?", [*params, round_id])


def record_step_metrics(db, round_id: int, step: int, metrics: dict) -> int:
    """Store a training step's numeric metrics (the curves of a round); returns how many.
    A value logged again for the same step and key replaces the first."""
    rows = [
        (round_id, int(step), str(key), float(value)) for key, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ]
    with write_transaction(db):
        db.conn.executemany(
            "INSERT OR REPLACE INTO round_metrics (round_id, step, key, value) VALUES (?, ?, ?, ?)", rows
        )
    return len(rows)


def step_metrics(db, round_id: int) -> list[dict]:
    """A round's per-step metrics, [{"step", "key", "value"}], in step order."""
    return [
        {"step": r[0], "key": r[1], "value": r[2]}
        for r in db.execute(
            "SELECT step, key, value FROM round_metrics WHERE round_id = ? ORDER BY step, key", [round_id]
        ).fetchall()
    ]


def finish_round(
    db,
    round_id: int,
    status: str,
    error: str | None = None,
    version: str | None = None,
    metrics: dict | None = None,
) -> None:
    """End a round as succeeded, failed or cancelled.

    A round that did not succeed gives up the version name it reserved (it registered nothing).
    """
    if status not in FINAL_STATUSES:
        raise InvalidInput(f"status {status!r} is not final: use one of {', '.join(FINAL_STATUSES)}")
    with write_transaction(db):
        row = get_round(db, round_id)
        merged = {**row["metrics"], **(metrics or {})}
        if status == "succeeded":
            version = version or row["version"]
        db.execute(
            f"UPDATE rounds SET status = ?, error = ?, version = ?, metrics = ?, finished_at = {NOW},"
            " staged_path = NULL, progress = CASE WHEN ? = 'succeeded' THEN 1.0 ELSE progress END WHERE id = ?",
            [status, error, version, json.dumps(merged, sort_keys=True), status, round_id],
        )


def cancel_round(db, round_id: int) -> str:
    """Cancel a queued or running round; returns the status it had. A running round's worker
    notices at its next training step, stops, and registers nothing."""
    with write_transaction(db):
        status = get_round(db, round_id)["status"]
        if status not in ("queued", "running"):
            raise InvalidInput(f"round {round_id} is already {status}")
        db.execute(
            f"UPDATE rounds SET status = 'cancelled', error = 'cancelled', finished_at = {NOW}, staged_path = NULL"
            " WHERE id = ?",
            [round_id],
        )
        return status


def stage_adapter(db, round_id: int, path: str) -> None:
    """Record that running round `round_id` has written its trained policy adapter to the
    staging folder `path`. The app loads it from there (not servable by name until it is
    registered) while the round evaluates; the round ending clears it."""
    with write_transaction(db):
        if get_round(db, round_id)["status"] != "running":
            raise InvalidInput(f"round {round_id} is not running: nothing to stage")
        db.execute("UPDATE rounds SET staged_path = ? WHERE id = ?", [str(path), round_id])


def staged_adapters(db) -> dict[str, tuple[int, str]]:
    """{version: (round id, staging folder)} of the running rounds that have staged an adapter."""
    rows = db.execute("SELECT version, id, staged_path FROM rounds WHERE status = 'running'"
                      " AND staged_path IS NOT NULL AND version IS NOT NULL").fetchall()
    return {version: (round_id, path) for version, round_id, path in rows}


def round_status(db, round_id: int) -> str:
    row = db.execute("SELECT status FROM rounds WHERE id = ?", [round_id]).fetchone()
    if row is None:
        raise NotFound(f"no round {round_id}")
    return row[0]


def pid_alive(pid: int | None) -> bool:
    """Whether a process with this id exists on this machine."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def fail_stale_rounds(db) -> list[int]:
    """Mark running rounds whose worker process is gone as failed ("worker died"); returns their ids."""
    failed = []
    with write_transaction(db):
        for round_id, pid in db.execute("SELECT id, pid FROM rounds WHERE status = 'running'").fetchall():
            if not pid_alive(pid):
                finish_round(db, round_id, "failed", error=f"worker died (pid {pid}) before the round finished")
                failed.append(round_id)
    return failed


def latest_round_id(db) -> int | None:
    return db.execute("SELECT max(id) FROM rounds").fetchone()[0]


def any_round_running(db) -> bool:
    return db.execute("SELECT 1 FROM rounds WHERE status = 'running' LIMIT 1").fetchone() is not None


def running_versions(db) -> set[str]:
    """Version names reserved by rounds that are running now (their folders may be in use)."""
    rows = db.execute("SELECT version FROM rounds WHERE status = 'running' AND version IS NOT NULL").fetchall()
    return {r[0] for r in rows}


def version_lineage(db, version: str) -> list[dict]:
    """`version` and its ancestors, newest first, each version's row with the round that made it
    under "round" (None for the base and for a version registered without a round). NotFound if
    `version` is not registered."""
    chain, name = [], version
    while name is not None and name not in {row["version"] for row in chain}:
        row = get_version(db, name)
        row["round"] = get_round(db, row["round_id"]) if row["round_id"] is not None else None
        chain.append(row)
        name = row["parent"]
    return chain
