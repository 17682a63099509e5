"""Training rounds and the model versions they register: the store side of `align`.

A round is a row that moves queued → running → succeeded | failed | cancelled. The worker
that runs it records its pid, progress, the last lines of its log, the exact data it trained
on (a hash over the pair ids and texts, and the highest pair and rating ids it saw) and its
metrics. A version is registered only after its folder is complete, as a `candidate`; an
admin promotes it to `live` (the previous live version of that kind retires) or rolls back
to the live version's parent. The database itself allows one live version per kind.

Every write runs in one transaction (`write_transaction`). No torch, no transformers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from typing import Iterable

from annotations.db import write_transaction
from annotations.errors import InvalidInput, NotFound
from annotations.store import iter_pairs

# Each training method and the kind of version it produces.
METHODS = {"rm": "reward", "dpo": "policy", "kto": "policy", "ppo": "policy", "sft": "policy"}
KINDS = ("policy", "reward")
VERSION_PREFIX = {"policy": "v", "reward": "rm"}
ROUND_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATUSES = ("succeeded", "failed", "cancelled")
LOG_TAIL_LINES = 50
MAX_LOG_LINE_CHARS = 2_000
BASE_VERSION = "base"
NOW = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"

# What a data snapshot's hash covers: the row ids and every text that training reads.
HASH_KEYS = ("id", "messages", "chosen", "rejected", "completion", "label")

_ROUND_COLUMNS = (
    "id", "method", "config", "data_hash", "n_pairs", "parent_version", "version", "status", "pid",
    "progress", "log_tail", "metrics", "error", "code_version", "created_by", "created_at", "started_at",
    "finished_at", "data_until_pair_id", "data_until_rating_id", "base_path", "staged_path",
    "data_until_judgement_id",
)
_VERSION_COLUMNS = (
    "version", "kind", "parent", "method", "round_id", "path", "metrics", "state", "created_at", "promoted_at",
)


def method_kind(method: str) -> str:
    """'reward' for a reward-model method, 'policy' for the others."""
    if method not in METHODS:
        raise InvalidInput(f"method {method!r} is unknown: use one of {', '.join(METHODS)}")
    return METHODS[method]


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise InvalidInput(f"kind {kind!r} is unknown: use one of {', '.join(KINDS)}")
    return kind


# ---------------------------------------------------------------- rounds


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


def next_version_name(db, kind: str) -> str:
    """The next free name for `kind`: v1, v2, ... for policies, rm1, rm2, ... for reward models.

    Names held by registered versions and names reserved by rounds are both taken, so two
    rounds running side by side never produce the same name.
    """
    prefix = VERSION_PREFIX[_check_kind(kind)]
    pattern = re.compile(rf"^{prefix}(\d+)$")
    names = [r[0] for r in db.execute("SELECT version FROM policies").fetchall()]
    names += [r[0] for r in db.execute("SELECT version FROM rounds WHERE version IS NOT NULL").fetchall()]
    numbers = [int(m.group(1)) for m in map(pattern.match, names) if m]
    return f"{prefix}{max(numbers, default=0) + 1}"


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


# ---------------------------------------------------------------- versions


def _version_dict(row) -> dict:
    out = dict(zip(_VERSION_COLUMNS, row))
    out["metrics"] = json.loads(out["metrics"] or "{}")
    return out


def get_version(db, version: str) -> dict:
    row = db.execute(f"SELECT {', '.join(_VERSION_COLUMNS)} FROM policies WHERE version = ?", [version]).fetchone()
    if row is None:
        raise NotFound(f"no version {version!r}: `python -m align versions` lists them")
    return _version_dict(row)


def list_versions(db, kind: str | None = None) -> list[dict]:
    """Registered versions, oldest first (the base first)."""
    sql = f"SELECT {', '.join(_VERSION_COLUMNS)} FROM policies"
    params = []
    if kind:
        sql += " WHERE kind = ?"
        params.append(_check_kind(kind))
    return [_version_dict(r) for r in db.execute(sql + " ORDER BY rowid", params).fetchall()]


def find_version(db, version: str) -> dict | None:
    """The version's row, or None if no such version is registered."""
    row = db.execute(f"SELECT {', '.join(_VERSION_COLUMNS)} FROM policies WHERE version = ?", [version]).fetchone()
    return _version_dict(row) if row else None


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


def newest_candidates(db, limit: int, kind: str = "policy") -> list[dict]:
    """The `limit` most recently registered candidates of `kind`, newest first."""
    return [_version_dict(r) for r in db.execute(
        f"SELECT {', '.join(_VERSION_COLUMNS)} FROM policies WHERE kind = ? AND state = 'candidate'"
        " ORDER BY created_at DESC, rowid DESC LIMIT ?", [_check_kind(kind), limit]).fetchall()]


def chat_versions(db) -> list[str]:
    """Policy versions people may pick in chat and the arena: the base and every version that
    is not retired, oldest first."""
    return list(dict.fromkeys(r[0] for r in db.execute(
        "SELECT version FROM policies WHERE kind = 'policy' AND (state != 'retired' OR version = ?)"
        " ORDER BY created_at, rowid", [BASE_VERSION])))


AVAILABLE_SETTING = "available_versions"


def available_versions(db) -> list[str]:
    """Policy versions annotators may pick in chat and the arena: the live one, its parent, the
    candidates under evaluation, and those an admin listed (setting `available_versions`).
    Anything else would make the server load an old adapter for one person, pausing everyone."""
    from annotations.store import get_setting

    live = get_live_version(db, "policy")
    names = [live["version"], live["parent"]] if live else [BASE_VERSION]
    names += [v["version"] for v in newest_candidates(db, 1000)]
    names += [name for name in get_setting(db, AVAILABLE_SETTING, []) or [] if find_version(db, name)]
    return [name for name in dict.fromkeys(names) if name]


def set_available_versions(db, names: list[str]) -> list[str]:
    """Store the versions, besides the live one, its parent and the candidates, that annotators
    may pick in chat and the arena."""
    from annotations.store import set_setting

    names = [str(n).strip() for n in names or [] if str(n).strip()]
    for name in names:
        row = find_version(db, name)
        if row is None or row["kind"] != "policy":
            raise InvalidInput(f"there is no policy version {name!r}")
    set_setting(db, AVAILABLE_SETTING, list(dict.fromkeys(names)))
    return available_versions(db)


def get_live_version(db, kind: str = "policy") -> dict | None:
    """The live version of `kind` as a dict, or None (there is never a live reward model at first)."""
    row = db.execute(
        f"SELECT {', '.join(_VERSION_COLUMNS)} FROM policies WHERE kind = ? AND state = 'live'", [_check_kind(kind)]
    ).fetchone()
    return _version_dict(row) if row else None


def register_version(
    db,
    version: str,
    kind: str,
    parent: str | None,
    method: str,
    round_id: int | None,
    path: str | None,
    metrics: dict | None = None,
) -> dict:
    """Record a finished version folder as a `candidate` of `kind`; returns its row."""
    _check_kind(kind)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", version or ""):
        raise InvalidInput(f"version name {version!r} is not allowed: use letters, digits, '-', '_' or '.'")
    with write_transaction(db):
        if db.execute("SELECT 1 FROM policies WHERE version = ?", [version]).fetchone():
            raise InvalidInput(f"version {version!r} already exists")
        if parent is not None:
            parent_kind = get_version(db, parent)["kind"]
            if parent_kind != kind:
                raise InvalidInput(f"parent {parent!r} is a {parent_kind} version, not a {kind} version")
        db.execute(
            "INSERT INTO policies (version, kind, parent, method, round_id, path, metrics, state)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, 'candidate')",
            [version, kind, parent, method, round_id, None if path is None else str(path),
             json.dumps(metrics or {}, sort_keys=True)],
        )
        return get_version(db, version)


def promote(db, version: str) -> dict:
    """Make `version` live; the previous live version of its kind retires. One transaction.

    Returns {"live": version, "retired": previous live version or None}.
    """
    with write_transaction(db):
        row = get_version(db, version)
        if row["state"] == "live":
            return {"live": version, "retired": None}
        previous = get_live_version(db, row["kind"])
        db.execute("UPDATE policies SET state = 'retired' WHERE kind = ? AND state = 'live'", [row["kind"]])
        db.execute(f"UPDATE policies SET state = 'live', promoted_at = {NOW} WHERE version = ?", [version])
        return {"live": version, "retired": previous["version"] if previous else None}


def rollback(db, kind: str = "policy") -> dict:
    """Make the live version's parent live again (the live one retires). One transaction.

    Returns {"live": parent, "retired": the version that was live}.
    """
    with write_transaction(db):
        current = get_live_version(db, kind)
        if current is None:
            raise InvalidInput(f"no {kind} version is live, so there is nothing to roll back")
        if not current["parent"]:
            raise InvalidInput(f"{current['version']} has no parent version to roll back to")
        parent = get_version(db, current["parent"])
        db.execute("UPDATE policies SET state = 'retired' WHERE version = ?", [current["version"]])
        db.execute(f"UPDATE policies SET state = 'live', promoted_at = {NOW} WHERE version = ?", [parent["version"]])
        return {"live": parent["version"], "retired": current["version"]}


# ---------------------------------------------------------------- training data


def pair_watermark(db) -> int:
    """The highest pair id in the store (0 if none): the edge of a data snapshot."""
    return db.execute("SELECT coalesce(max(id), 0) FROM pairs").fetchone()[0]


def rating_watermark(db) -> int:
    return db.execute("SELECT coalesce(max(id), 0) FROM ratings").fetchone()[0]


def judgement_watermark(db) -> int:
    return db.execute("SELECT coalesce(max(id), 0) FROM judgements").fetchone()[0]


def _since_id(db, since_round, method: str | None, column: str) -> int:
    """The watermark (`column`) of the round that `since_round` names: 0 for None."""
    if since_round is None:
        return 0
    if since_round == "last":
        sql = f"SELECT {column} FROM rounds WHERE status = 'succeeded'"
        params = []
        if method:
            sql += " AND method = ?"
            params.append(method)
        row = db.execute(sql + " ORDER BY id DESC LIMIT 1", params).fetchone()
        return (row[0] or 0) if row else 0
    try:
        round_id = int(since_round)
    except (TypeError, ValueError):
        raise InvalidInput(f"since_round {since_round!r} is not a round id, 'last' or None") from None
    value = get_round(db, round_id)[column]
    if value is None:
        raise InvalidInput(f"round {round_id} recorded no data snapshot to continue from")
    return value


def select_pairs(
    db,
    since_round: int | str | None = None,
    split: str | None = "train",
    min_weight: float | None = None,
    *,
    method: str | None = None,
    until_id: int | None = None,
    min_agreement: float | None = None,
    min_annotator_accuracy: float | None = None,
) -> list[dict]:
    """Preference pairs for training or evaluation, oldest first (dicts as `store.iter_pairs`).

    since_round: None for every pair; 'last' for pairs newer than the snapshot of the last
    succeeded round (of `method`, if given); a round id for pairs newer than that round's
    snapshot. `until_id` caps the snapshot (see `pair_watermark`), `min_weight` drops
    lighter pairs, `split` picks the prompts' train or held-out split (None: both).
    `min_agreement` / `min_annotator_accuracy` drop pairs whose item agreement or whose
    annotator's gold accuracy is known and below the bar (see `annotations.quality`).
    """
    since_id = _since_id(db, since_round, method, "data_until_pair_id")
    keep = None
    if min_agreement is not None or min_annotator_accuracy is not None:
        from annotations.quality import select_pair_ids

        keep = select_pair_ids(db, min_agreement=min_agreement, min_annotator_accuracy=min_annotator_accuracy)
    return [
        pair for pair in iter_pairs(db, split=split)
        if pair["id"] > since_id
        and (until_id is None or pair["id"] <= until_id)
        and (min_weight is None or pair["weight"] >= min_weight)
        and (keep is None or pair["id"] in keep)
    ]


def select_prompts(db, split: str | None = "train", limit: int | None = None) -> list[dict]:
    """Stored prompts ({"id", "messages"}), oldest first, for sampling (PPO, evaluation)."""
    sql = "SELECT id, messages FROM prompts"
    params: list = []
    if split:
        sql += " WHERE split = ?"
        params.append(split)
    sql += " ORDER BY id"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(int(limit))
    return [{"id": r[0], "messages": json.loads(r[1])} for r in db.execute(sql, params).fetchall()]


def snapshot_hash(rows: Iterable[dict]) -> str:
    """sha256 (hex) over the exact rows a round trains on: their ids and texts, in order.

    The same pairs give the same hash on any machine; any added, removed, reordered or edited
    pair changes it. Keys outside `HASH_KEYS` (weights, splits, timestamps) do not count.
    """
    digest = hashlib.sha256()
    for row in rows:
        record = {key: row[key] for key in HASH_KEYS if key in row}
        digest.update(json.dumps(record, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()
