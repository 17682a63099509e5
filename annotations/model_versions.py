"""Model versions: the base and every version a round registered, and which one is live.

A version is registered only after its folder is complete, as a `candidate`; an admin (or
the promotion gate, annotations/gate.py) promotes it to `live`, and the previous live version
of its kind retires; a rollback makes the live version's parent live again. The database
itself allows one live version per kind. Every write runs in one transaction. No torch.
"""

from __future__ import annotations

import json
import re

from annotations.db import write_transaction
from annotations.errors import InvalidInput, NotFound
from annotations.migrations import NOW

# Each training method and the kind of version it produces.
METHODS = {"rm": "reward", "dpo": "policy", "kto": "policy", "ppo": "policy", "sft": "policy"}
KINDS = ("policy", "reward")
VERSION_PREFIX = {"policy": "v", "reward": "rm"}
BASE_VERSION = "base"
AVAILABLE_SETTING = "available_versions"

_VERSION_COLUMNS = (
    "version", "kind", "parent", "method", "round_id", "path", "metrics", "state", "created_at", "promoted_at",
)


def method_kind(method: str) -> str:
    """'reward' for a reward-model method, 'policy' for the others."""
    if method not in METHODS:
        raise InvalidInput(f"method {method!r} is unknown: use one of {', '.join(METHODS)}")
    return METHODS[method]


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise InvalidInput(f"kind {kind!r} is unknown: use one of {', '.join(KINDS)}")
    return kind

def next_version_name(db, kind: str) -> str:
    """The next free name for `kind`: v1, v2, ... for policies, rm1, rm2, ... for reward models.

    Names held by registered versions and names reserved by rounds are both taken, so two
    rounds running side by side never produce the same name.
    """
    prefix = VERSION_PREFIX[check_kind(kind)]
    pattern = re.compile(rf"^{prefix}(\d+)$")
    names = [r[0] for r in db.execute("SELECT version FROM policies").fetchall()]
    names += [r[0] for r in db.execute("SELECT version FROM rounds WHERE version IS NOT NULL").fetchall()]
    numbers = [int(m.group(1)) for m in map(pattern.match, names) if m]
    return f"{prefix}{max(numbers, default=0) + 1}"

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
        params.append(check_kind(kind))
    return [_version_dict(r) for r in db.execute(sql + " ORDER BY rowid", params).fetchall()]


def find_version(db, version: str) -> dict | None:
    """The version's row, or None if no such version is registered."""
    row = db.execute(f"SELECT {', '.join(_VERSION_COLUMNS)} FROM policies WHERE version = ?", [version]).fetchone()
    return _version_dict(row) if row else None




def newest_candidates(db, limit: int, kind: str = "policy") -> list[dict]:
    """The `limit` most recently registered candidates of `kind`, newest first."""
    return [_version_dict(r) for r in db.execute(
        f"SELECT {', '.join(_VERSION_COLUMNS)} FROM policies WHERE kind = ? AND state = 'candidate'"
        " ORDER BY created_at DESC, rowid DESC LIMIT ?", [check_kind(kind), limit]).fetchall()]


def chat_versions(db) -> list[str]:
    """Policy versions people may pick in chat and the arena: the base and every version that
    is not retired, oldest first."""
    return list(dict.fromkeys(r[0] for r in db.execute(
        "SELECT version FROM policies WHERE kind = 'policy' AND (state != 'retired' OR version = ?)"
        " ORDER BY created_at, rowid", [BASE_VERSION])))


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
        f"SELECT {', '.join(_VERSION_COLUMNS)} FROM policies WHERE kind = ? AND state = 'live'", [check_kind(kind)]
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
    check_kind(kind)
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
