"""Whole rounds on a tiny store: select → train → evaluate → register, and every way to fail."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
from safetensors.torch import load_file

from annotations import open_db
from annotations.model_versions import get_live_version, get_version, list_versions, promote
from annotations.round_records import (
    cancel_round,
    claim_next_round,
    create_round,
    get_round,
    reserve_version,
    step_metrics,
)
from annotations.training_data import select_pairs, select_prompts, snapshot_hash
from align.models import load_policy
from align.recovery import recover_interrupted
from align.round_progress import RoundReporter
from align.round_stages import RoundError
from align.rounds import run_round
from tests.align.stores import FAST_EVAL, FAST_TRAINING, import_pairs, one_thread  # noqa: F401 (one_thread: autouse)


@pytest.fixture
def store(tmp_path):
    """A store with 24 imported pairs (train and held-out) in a data folder of its own."""
    db = open_db(tmp_path / "rankloop.db")
    import_pairs(db, tmp_path)
    yield tmp_path / "rankloop.db", tmp_path, db
    db.close()


def version_dirs(home) -> list[str]:
    root = home / "versions"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def run(store, base, method: str, **config):
    db_path, home, db = store
    round_id = create_round(db, method, {**FAST_TRAINING, **FAST_EVAL, **config})
    return round_id, run_round(db_path, round_id, home, base)


def test_reward_round_registers_candidate_with_metrics_and_data_hash(store, tiny_model_dir):
    db_path, home, db = store
    round_id, result = run(store, tiny_model_dir, "rm")
    assert result["version"] == "rm1" and result["status"] == "succeeded"
    version = get_version(db, "rm1")
    # Four held-out pairs cannot show that a reward model beats chance: the gate keeps it a candidate.
    assert (version["kind"], version["state"], version["method"], version["round_id"]) == (
        "reward", "candidate", "rm", round_id)
    assert version["metrics"]["heldout_accuracy_interval"]["n"] == 4 and not result["gate"]["promoted"]
    assert version["path"] == str(home / "versions" / "rm1") and version_dirs(home) == ["rm1"]
    assert 0.0 <= version["metrics"]["heldout_accuracy"] <= 1.0 and version["metrics"]["heldout_pairs"] == 4
    row = get_round(db, round_id)
    train_pairs = select_pairs(db)
    assert (row["status"], row["progress"], row["n_pairs"]) == ("succeeded", 1.0, len(train_pairs))
    assert row["data_hash"] == snapshot_hash(train_pairs)
    assert row["code_version"] and row["base_path"] == str(tiny_model_dir) and row["parent_version"] is None
    assert "registered rm1" in row["log_tail"] and "step 2/2" in row["log_tail"]
    curves = {(m["step"], m["key"]) for m in step_metrics(db, round_id)}
    assert {(1, "loss"), (2, "loss"), (2, "accuracy")} <= curves
    assert "promotion gate: kept rm1 a candidate: held-out accuracy" in get_round(db, round_id)["log_tail"]


def test_dpo_round_with_live_reward_model_records_parent_win_rate_and_samples(store, tiny_model_dir):
    _, home, db = store
    run(store, tiny_model_dir, "rm")
    promote(db, "rm1")
    round_id, result = run(store, tiny_model_dir, "dpo")
    metrics = get_version(db, "v1")["metrics"]
    assert get_version(db, "v1")["parent"] == "base" and get_round(db, round_id)["parent_version"] == "base"
    for key in ("heldout_implicit_accuracy", "heldout_implicit_margin", "kl_to_base", "win_rate_vs_parent"):
        assert isinstance(metrics[key], float), key
    comparison = metrics["gate_comparison"]
    heldout = [p["id"] for p in select_prompts(db, "heldout")]
    assert comparison["judge"] == "rm1" and comparison["opponent"] == "base" and not comparison["judge_optimised"]
    assert comparison["seed"] == round_id  # a fresh draw each round, recorded
    assert set(comparison["prompt_ids"]) <= set(heldout) and len(comparison["prompt_ids"]) == min(4, len(heldout))
    assert comparison["n"] == len(comparison["prompt_ids"]) == comparison["wins"] + comparison["ties"] + \
        comparison["losses"]
    assert comparison["low"] <= comparison["win_rate"] <= comparison["high"]
    assert metrics["kl_to_base"] >= 0 and metrics["kl_to_base_interval"]["n"] == 2
    assert len(metrics["samples"]) == 1 and set(metrics["samples"][0]["answers"]) == {"base", "v1"}
    assert version_dirs(home) == ["rm1", "v1"]


def test_a_policy_rounds_adapter_is_staged_for_the_app_while_it_evaluates(store, tiny_model_dir, monkeypatch):
    """The round records its written adapter's staging folder before evaluating (the app loads
    it meanwhile); the round's end clears the record, whether it succeeded or not."""
    import align.rounds as rounds

    _, home, db = store
    seen, evaluate = [], rounds.evaluate_round

    def look_then_evaluate(db_, plan, *args):
        staged = get_round(db_, plan["round_id"])["staged_path"]
        seen.append((plan["kind"], staged, sorted(os.listdir(staged)) if staged else None))
        if len(seen) == 3:
            raise RuntimeError("evaluation broke")
        return evaluate(db_, plan, *args)

    monkeypatch.setattr(rounds, "evaluate_round", look_then_evaluate)
    run(store, tiny_model_dir, "rm")
    run(store, tiny_model_dir, "dpo")
    assert seen[0] == ("reward", None, None)  # reward models are not served: nothing to stage
    kind, staged, files = seen[1]
    assert kind == "policy" and staged == str(home / "versions" / staged.rsplit("/", 1)[1])
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    assert get_round(db, 2)["staged_path"] is None and get_version(db, "v1")["round_id"] == 2
    with pytest.raises(RuntimeError, match="evaluation broke"):
        run(store, tiny_model_dir, "dpo")
    failed = get_round(db, 3)
    assert failed["status"] == "failed" and failed["staged_path"] is None and not os.path.exists(seen[2][1])


def test_round_failing_mid_training_leaves_no_trace(store, tiny_model_dir, monkeypatch):
    from align import round_stages

    _, home, db = store
    run(store, tiny_model_dir, "dpo")
    promote(db, "v1")

    def fail_at_first_step(stage):
        if stage == "train":
            raise RuntimeError("injected failure after 1 training steps")

    monkeypatch.setattr(round_stages, "CHECKPOINT_HOOKS", [fail_at_first_step])
    with pytest.raises(RuntimeError, match="injected failure after 1 training steps"):
        run(store, tiny_model_dir, "dpo")
    failed = get_round(db, 2)
    assert failed["status"] == "failed" and "injected failure" in failed["error"]
    assert failed["version"] is None and "RuntimeError: injected failure" in failed["log_tail"]
    assert version_dirs(home) == ["v1"]  # no staging folder, no half version
    assert [v["version"] for v in list_versions(db)] == ["base", "v1"]
    assert get_live_version(db)["version"] == "v1"


def test_cancelled_round_stops_at_next_step_and_registers_nothing(store, tiny_model_dir, monkeypatch):
    _, home, db = store
    original = RoundReporter.__call__

    def cancel_then_report(self, step, total, logs):
        if get_round(self.db, self.round_id)["status"] == "running":
            cancel_round(self.db, self.round_id)
        return original(self, step, total, logs)

    monkeypatch.setattr(RoundReporter, "__call__", cancel_then_report)
    with pytest.raises(RoundError, match="cancelled at step 1"):
        run(store, tiny_model_dir, "rm")
    assert get_round(db, 1)["status"] == "cancelled"
    assert version_dirs(home) == [] and [v["version"] for v in list_versions(db)] == ["base"]


def test_stopping_worker_interrupts_round(store, tiny_model_dir):
    db_path, home, db = store
    round_id = create_round(db, "kto", {**FAST_TRAINING, **FAST_EVAL})
    stop = threading.Event()
    stop.set()
    with pytest.raises(RoundError, match="the worker is shutting down"):
        run_round(db_path, round_id, home, tiny_model_dir, stop_event=stop)
    assert get_round(db, round_id)["status"] == "failed" and version_dirs(home) == []


def test_round_with_no_new_data_fails_with_hint(store, tiny_model_dir):
    _, home, db = store
    run(store, tiny_model_dir, "rm", data="new")
    with pytest.raises(RoundError, match="no training pairs since the last round"):
        run(store, tiny_model_dir, "rm", data="new")
    assert get_round(db, 2)["status"] == "failed" and version_dirs(home) == ["rm1"]


def test_new_data_round_trains_only_on_pairs_since_last_round(store, tiny_model_dir):
    _, home, db = store
    run(store, tiny_model_dir, "rm", data="new", eval_pairs=0)
    import_pairs(db, home, n=8, start=100)
    round_id, _ = run(store, tiny_model_dir, "rm", data="new", eval_pairs=0)
    newer = [p for p in select_pairs(db) if p["id"] > 24]
    assert get_round(db, round_id)["n_pairs"] == len(newer) > 0
    assert get_round(db, round_id)["data_hash"] == snapshot_hash(newer)


def test_sft_round_then_a_dpo_round_that_continues_from_it(store, tiny_model_dir):
    _, home, db = store
    with pytest.raises(RoundError, match="no written answers to train SFT on.*sft_data=chosen"):
        run(store, tiny_model_dir, "sft")  # imported pairs: nothing written in the editor
    round_id, result = run(store, tiny_model_dir, "sft", sft_data="chosen", parent="base")
    assert result["status"] == "succeeded" and result["version"] == "v1"
    assert get_version(db, "v1")["method"] == "sft"
    distinct = {(repr(p["messages"]), p["chosen"]) for p in select_pairs(db)}
    assert f"{len(distinct)} answers (chosen)" in get_round(db, round_id)["log_tail"]
    assert "kl_to_base" in get_version(db, "v1")["metrics"]
    round_id, _ = run(store, tiny_model_dir, "dpo", parent="v1")
    assert get_round(db, round_id)["parent_version"] == "v1" and get_version(db, "v2")["parent"] == "v1"


PPO_FAST = {"steps": 2, "batch_size": 2, "mini_batch_size": 1, "ppo_epochs": 1, "max_new_tokens": 4, "lora_r": 4}


def test_ppo_round_needs_a_reward_model(store, tiny_model_dir):
    _, home, db = store
    round_id = create_round(db, "ppo", PPO_FAST)
    with pytest.raises(RoundError, match="PPO needs a reward model"):
        run_round(store[0], round_id, home, tiny_model_dir)
    assert get_round(db, 1)["status"] == "failed" and version_dirs(home) == []


def test_ppo_round_trains_against_live_reward_model(store, tiny_model_dir):
    _, _, db = store
    run(store, tiny_model_dir, "rm")
    promote(db, "rm1")
    round_id = create_round(db, "ppo", {**PPO_FAST, **FAST_EVAL})
    result = run_round(store[0], round_id, store[1], tiny_model_dir)
    assert result["version"] == "v1" and "train_score" in result["metrics"]
    version = get_version(db, "v1")
    assert version["method"] == "ppo" and version["parent"] == "base"
    weights = load_file(f"{version['path']}/adapter_model.safetensors")
    assert any(w.abs().sum() > 0 for name, w in weights.items() if "lora_B" in name)
    assert "v1" in load_policy(tiny_model_dir, {"v1": version["path"]}).peft_config


def test_round_config_error_fails_round_before_training(store, tiny_model_dir):
    _, home, db = store
    round_id = create_round(db, "dpo", {"betta": 1})
    with pytest.raises(RoundError, match="unknown key 'betta'"):
        run_round(store[0], round_id, home, tiny_model_dir)
    assert get_round(db, round_id)["status"] == "failed" and version_dirs(home) == []


def test_round_already_finished_is_not_run_again(store, tiny_model_dir):
    round_id, _ = run(store, tiny_model_dir, "rm", eval_pairs=0)
    with pytest.raises(RoundError, match="is succeeded: only a queued round"):
        run_round(store[0], round_id, store[1], tiny_model_dir)
    assert get_round(store[2], round_id)["status"] == "succeeded"


def test_recover_interrupted_cleans_up_after_dead_worker(store):
    _, home, db = store
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, alive = create_round(db, "dpo"), create_round(db, "dpo")
    claim_next_round(db, pid=dead.pid)
    claim_next_round(db, pid=os.getpid())
    stale_version, alive_version = reserve_version(db, stale), reserve_version(db, alive)
    root = home / "versions"
    for name in (f".{stale_version}.tmp-dead", f".{alive_version}.tmp-live", "v7", "notes"):
        (root / name).mkdir(parents=True)
    result = recover_interrupted(db, home)
    assert result["failed_rounds"] == [stale] and get_round(db, stale)["status"] == "failed"
    assert version_dirs(home) == [f".{alive_version}.tmp-live", "notes"]


def test_the_progress_bar_moves_through_evaluation_instead_of_stopping_where_training_ends(store, tiny_model_dir,
                                                                                          monkeypatch):
    from align import round_stages
    from align.round_progress import TRAIN_PROGRESS_SHARE

    _, home, db = store
    run(store, tiny_model_dir, "rm")
    promote(db, "rm1")  # a reward model to judge the gate's comparison
    seen = []

    def look(stage):
        if stage in ("evaluate", "commit"):
            seen.append((stage, get_round(db, 2)["progress"]))

    monkeypatch.setattr(round_stages, "CHECKPOINT_HOOKS", [look])
    run(store, tiny_model_dir, "dpo", eval_samples=1)
    (_, at_start), (_, at_end) = seen
    assert at_start == pytest.approx(TRAIN_PROGRESS_SHARE)
    assert at_end >= TRAIN_PROGRESS_SHARE + 0.9 * (1 - TRAIN_PROGRESS_SHARE)
    log = get_round(db, 2)["log_tail"]
    assert "evaluated: implicit accuracy" in log and "evaluated: the gate's comparison" in log
