"""Rounds, versions and training-data snapshots in the store (annotations.round_records,
annotations.model_versions, annotations.training_data): no model involved."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pytest

from annotations import InvalidInput, NotFound, open_db
from annotations.db import connect
from annotations.migrations import migrations
from annotations.model_versions import (
    get_live_version,
    get_version,
    list_versions,
    next_version_name,
    promote,
    register_version,
    rollback,
)
from annotations.round_records import (
    LOG_TAIL_LINES,
    cancel_round,
    claim_next_round,
    create_round,
    fail_stale_rounds,
    finish_round,
    get_round,
    record_step_metrics,
    reserve_version,
    set_round_data,
    step_metrics,
    update_round,
    version_lineage,
)
from annotations.training_data import pair_watermark, select_pairs, select_prompts, snapshot_hash
from annotations.store import add_prompt, add_user, queue_items, submit_judgement
from tests.align.stores import import_pairs
from tests.conftest import REPO


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# ---------------------------------------------------------------- rounds


def test_create_round_queues_with_config(db):
    round_id = create_round(db, "dpo", {"beta": 0.2})
    row = get_round(db, round_id)
    assert (row["method"], row["status"], row["config"], row["progress"]) == ("dpo", "queued", {"beta": 0.2}, 0.0)


def test_create_round_rejects_unknown_method(db):
    with pytest.raises(InvalidInput, match="use one of rm, dpo, kto, ppo, sft"):
        create_round(db, "orpo", {})


def test_claim_next_round_takes_oldest_queued_once(db):
    first, second = create_round(db, "rm"), create_round(db, "dpo")
    claimed = claim_next_round(db, pid=123)
    assert (claimed["id"], claimed["status"], claimed["pid"]) == (first, "running", 123)
    assert claimed["started_at"]
    assert claim_next_round(db, pid=456)["id"] == second
    assert claim_next_round(db, pid=789) is None


def test_claimed_round_is_not_claimed_again_from_another_connection(tmp_path):
    path = tmp_path / "store.db"
    open_db(path)
    a, b = connect(path), connect(path)
    round_id = create_round(a, "rm")
    claims = [claim_next_round(a, pid=1), claim_next_round(b, pid=2)]
    assert [c["id"] if c else None for c in claims] == [round_id, None]


def test_update_round_keeps_last_log_lines_and_merges_metrics(db):
    round_id = create_round(db, "rm")
    for i in range(LOG_TAIL_LINES + 10):
        update_round(db, round_id, log_line=f"line {i}")
    update_round(db, round_id, progress=0.5, metrics={"a": 1.0})
    update_round(db, round_id, metrics={"b": 2.0})
    row = get_round(db, round_id)
    lines = row["log_tail"].splitlines()
    assert len(lines) == LOG_TAIL_LINES and lines[-1] == f"line {LOG_TAIL_LINES + 9}" and lines[0] == "line 10"
    assert row["progress"] == 0.5 and row["metrics"] == {"a": 1.0, "b": 2.0}


def test_step_metrics_keep_numbers_per_step_and_key(db):
    round_id = create_round(db, "dpo")
    assert record_step_metrics(db, round_id, 1, {"loss": 0.7, "note": "text", "nan": float("nan"), "ok": True}) == 1
    record_step_metrics(db, round_id, 2, {"loss": 0.6, "rewards/margins": 0.1})
    record_step_metrics(db, round_id, 2, {"loss": 0.5})
    assert step_metrics(db, round_id) == [
        {"step": 1, "key": "loss", "value": 0.7},
        {"step": 2, "key": "loss", "value": 0.5},
        {"step": 2, "key": "rewards/margins", "value": 0.1},
    ]


def test_finish_round_failed_releases_reserved_version(db):
    round_id = create_round(db, "dpo")
    claim_next_round(db, pid=1)
    assert reserve_version(db, round_id) == "v1"
    finish_round(db, round_id, "failed", error="boom")
    row = get_round(db, round_id)
    assert (row["status"], row["error"], row["version"]) == ("failed", "boom", None)
    assert row["finished_at"]
    assert next_version_name(db, "policy") == "v1"


def test_finish_round_succeeded_sets_full_progress(db):
    round_id = create_round(db, "rm")
    claim_next_round(db, pid=1)
    reserve_version(db, round_id)
    finish_round(db, round_id, "succeeded", metrics={"heldout_accuracy": 0.6})
    row = get_round(db, round_id)
    assert (row["status"], row["progress"], row["version"], row["metrics"]) == (
        "succeeded", 1.0, "rm1", {"heldout_accuracy": 0.6})


def test_fail_stale_rounds_fails_running_round_of_dead_process(db):
    stale, alive = create_round(db, "dpo"), create_round(db, "dpo")
    claim_next_round(db, pid=dead_pid())
    claim_next_round(db, pid=os.getpid())
    assert fail_stale_rounds(db) == [stale]
    assert get_round(db, stale)["status"] == "failed" and "worker died" in get_round(db, stale)["error"]
    assert get_round(db, alive)["status"] == "running"


def test_cancel_round_cancels_queued_round_and_refuses_finished_one(db):
    round_id = create_round(db, "kto")
    assert cancel_round(db, round_id) == "queued"
    assert get_round(db, round_id)["status"] == "cancelled"
    with pytest.raises(InvalidInput, match="already cancelled"):
        cancel_round(db, round_id)
    assert claim_next_round(db, pid=1) is None


# ---------------------------------------------------------------- version names


def test_next_version_name_counts_per_kind(db):
    assert next_version_name(db, "policy") == "v1"
    assert next_version_name(db, "reward") == "rm1"
    register_version(db, "v1", "policy", "base", "dpo", None, "/x/v1")
    register_version(db, "rm1", "reward", None, "rm", None, "/x/rm1")
    assert (next_version_name(db, "policy"), next_version_name(db, "reward")) == ("v2", "rm2")


def test_reserved_names_are_not_handed_out_twice(db):
    first, second = create_round(db, "dpo"), create_round(db, "ppo")
    claim_next_round(db, pid=1)
    claim_next_round(db, pid=2)
    assert [reserve_version(db, first), reserve_version(db, second)] == ["v1", "v2"]
    assert reserve_version(db, first) == "v1"  # idempotent


# ---------------------------------------------------------------- versions: promote, rollback


def register_chain(db):
    register_version(db, "v1", "policy", "base", "dpo", None, "/x/v1", {"kl_to_base": 0.1})
    register_version(db, "v2", "policy", "v1", "dpo", None, "/x/v2")


def test_register_version_is_a_candidate_with_metrics(db):
    row = register_version(db, "v1", "policy", "base", "dpo", None, "/x/v1", {"kl_to_base": 0.1})
    assert (row["state"], row["parent"], row["metrics"]) == ("candidate", "base", {"kl_to_base": 0.1})
    assert get_live_version(db)["version"] == "base"


def test_version_lineage_walks_parents_to_the_base_with_their_rounds(db):
    round_id = create_round(db, "dpo", {"beta": 0.2})
    register_version(db, "v1", "policy", "base", "dpo", None, "/x/v1")
    register_version(db, "v2", "policy", "v1", "dpo", round_id, "/x/v2")
    chain = version_lineage(db, "v2")
    assert [(row["version"], row["parent"]) for row in chain] == [("v2", "v1"), ("v1", "base"), ("base", None)]
    assert chain[0]["round"]["id"] == round_id and chain[0]["round"]["config"] == {"beta": 0.2}
    assert chain[1]["round"] is None and chain[2]["round"] is None
    with pytest.raises(NotFound, match="no version 'v9'"):
        version_lineage(db, "v9")


def test_register_version_refuses_duplicate_and_foreign_parent(db):
    register_version(db, "rm1", "reward", None, "rm", None, "/x/rm1")
    with pytest.raises(InvalidInput, match="already exists"):
        register_version(db, "rm1", "reward", None, "rm", None, "/x/rm1")
    with pytest.raises(InvalidInput, match="not a policy version"):
        register_version(db, "v1", "policy", "rm1", "dpo", None, "/x/v1")
    with pytest.raises(NotFound):
        register_version(db, "v1", "policy", "v9", "dpo", None, "/x/v1")


def test_promote_retires_previous_live_of_same_kind_only(db):
    register_chain(db)
    register_version(db, "rm1", "reward", None, "rm", None, "/x/rm1")
    promote(db, "rm1")
    assert promote(db, "v1") == {"live": "v1", "retired": "base"}
    assert promote(db, "v2") == {"live": "v2", "retired": "v1"}
    states = {v["version"]: v["state"] for v in list_versions(db)}
    assert states == {"base": "retired", "v1": "retired", "v2": "live", "rm1": "live"}
    assert get_version(db, "v2")["promoted_at"]


def test_only_one_version_per_kind_is_ever_live(db):
    register_chain(db)
    promote(db, "v1")
    with pytest.raises(sqlite3.IntegrityError):
        db.execute("UPDATE policies SET state = 'live' WHERE version = 'v2'")


def test_rollback_makes_parent_live_again(db):
    register_chain(db)
    promote(db, "v2")
    assert rollback(db) == {"live": "v1", "retired": "v2"}
    assert rollback(db) == {"live": "base", "retired": "v1"}
    assert get_live_version(db)["version"] == "base"


def test_rollback_refuses_version_without_parent(db):
    with pytest.raises(InvalidInput, match="base has no parent"):
        rollback(db)
    with pytest.raises(InvalidInput, match="no reward version is live"):
        rollback(db, "reward")


def test_promote_unknown_version_names_command_to_list(db):
    with pytest.raises(NotFound, match="python -m align versions"):
        promote(db, "v42")


# ---------------------------------------------------------------- data selection


def test_select_pairs_filters_split_weight_and_snapshot(db, tmp_path):
    import_pairs(db, tmp_path, n=12)
    train = select_pairs(db)
    heldout = select_pairs(db, split="heldout")
    assert train and heldout and len(train) + len(heldout) == 12
    assert {p["split"] for p in train} == {"train"}
    db.execute("UPDATE pairs SET weight = 0.5 WHERE id = ?", [train[0]["id"]])
    assert [p["id"] for p in select_pairs(db, min_weight=1.0)] == [p["id"] for p in train[1:]]
    assert select_pairs(db, until_id=train[0]["id"]) == [{**train[0], "weight": 0.5}]


def test_select_pairs_since_last_round_returns_only_newer_pairs(db, tmp_path):
    import_pairs(db, tmp_path, n=12)
    round_id = create_round(db, "dpo")
    claim_next_round(db, pid=1)
    set_round_data(db, round_id, data_hash="h", n_pairs=12, parent_version="base", code_version="test",
                   data_until_pair_id=pair_watermark(db))
    finish_round(db, round_id, "succeeded")
    assert select_pairs(db, "last", split=None, method="dpo") == []
    assert len(select_pairs(db, "last", split=None, method="rm")) == 12  # no rm round yet
    import_pairs(db, tmp_path, n=6, start=100)
    newer = select_pairs(db, "last", split=None, method="dpo")
    assert len(newer) == 6 and select_pairs(db, round_id, split=None) == newer


def test_snapshot_hash_depends_on_ids_and_texts_only(db, tmp_path):
    import_pairs(db, tmp_path, n=6)
    pairs = select_pairs(db, split=None)
    digest = snapshot_hash(pairs)
    assert len(digest) == 64 and digest == snapshot_hash([dict(p) for p in pairs])
    assert snapshot_hash([{**p, "weight": 7.0, "split": "x"} for p in pairs]) == digest
    assert snapshot_hash(pairs[:-1]) != digest
    assert snapshot_hash(pairs[::-1]) != digest
    assert snapshot_hash([{**pairs[0], "chosen": pairs[0]["chosen"] + "!"}, *pairs[1:]]) != digest


def test_select_prompts_by_split(db, tmp_path):
    import_pairs(db, tmp_path, n=12)
    heldout = select_prompts(db, "heldout")
    assert heldout and all(set(p) == {"id", "messages"} for p in heldout)
    assert len(select_prompts(db, "heldout", limit=1)) == 1
    assert len(select_prompts(db, None)) == 12


# ---------------------------------------------------------------- migration and layering


def test_round_watermark_migration_keeps_rounds_on_previous_schema(tmp_path):
    path = tmp_path / "old.db"
    old = connect(path)
    migrations.apply(old, stop_before="m005_add_round_watermarks")
    with old.conn:
        old.execute("INSERT INTO rounds (method, config, status) VALUES ('rm', '{\"epochs\": 1}', 'succeeded')")
    old.close()
    db = open_db(path)
    row = get_round(db, 1)
    assert (row["method"], row["config"], row["status"], row["data_until_pair_id"]) == ("rm", {"epochs": 1},
                                                                                        "succeeded", None)
    assert migrations.pending(db) == []


def test_the_store_of_rounds_and_versions_imports_no_torch_transformers_or_gradio_in_fresh_process():
    script = (
        "import json, sys\nimport annotations.model_versions, annotations.round_records, annotations.training_data\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'gradio'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60,
                            check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
