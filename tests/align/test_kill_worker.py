"""A training worker killed outright (SIGKILL) at each step of a round leaves nothing half done.

For every step the worker runs as its own process (`python -m align worker --once`), stops at
the step through a test hook (tests/align/pausing_worker.py, at `align.round_stages.checkpoint`) and
is killed there. After the next worker start's recovery the live versions are unchanged, no
version is registered or left in versions/, the round is failed with a reason, and running the
same round again succeeds.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from annotations import open_db
from annotations.model_versions import get_live_version, list_versions, promote
from annotations.round_records import create_round, get_round
from annotations.store import set_setting
from align.recovery import recover_interrupted
from align.round_stages import CHECKPOINT_HOOKS, STAGES, checkpoint
from align.rounds import run_round
from align.worker import run_worker
from tests.align.stores import FAST_EVAL, FAST_TRAINING, import_pairs, one_thread  # noqa: F401 (one_thread: autouse)
from tests.app.conftest import wait_until
from tests.conftest import REPO

pytestmark = pytest.mark.slow

DPO = {**FAST_TRAINING, **FAST_EVAL}
PPO = {"steps": 2, "batch_size": 2, "mini_batch_size": 1, "ppo_epochs": 1, "max_new_tokens": 4, "lora_r": 4,
       **FAST_EVAL}
# (step the worker is killed at, method, what it leaves in versions/ for recovery to clean up):
# every step from claiming the round to registering the version it produced.
KILL_POINTS = [
    ("claim", "dpo", None),  # round marked running, nothing else yet
    ("reserve", "dpo", None),  # version name v2 reserved
    ("select_data", "dpo", None),  # training data read, snapshot not yet recorded
    ("stage", "dpo", "staging"),  # empty staging folder
    ("train", "dpo", "staging"),  # in the middle of training
    ("save", "ppo", "staging"),  # adapter written, tokenizer not: a half-written staging folder
    ("evaluate", "dpo", "staging"),  # evaluating on held-out data
    ("commit", "dpo", "staging"),  # evaluated, staging folder complete, not yet renamed into place
    ("register", "dpo", "v2"),  # renamed into versions/v2, not registered
    ("registering", "dpo", "v2"),  # inside the registration transaction: the row is never committed
]


@pytest.fixture(scope="module")
def template(tmp_path_factory, tiny_model_dir):
    """A store with pairs, a live reward model rm1 and a live policy v1 (so a new round has a
    live parent to leave untouched); automatic promotion off, so only a kill can matter."""
    home = tmp_path_factory.mktemp("kill-template")
    db = open_db(home / "rankloop.db")
    import_pairs(db, home)
    set_setting(db, "promotion_gate", {"auto_promote": False})
    for method in ("rm", "dpo"):
        round_id = create_round(db, method, DPO)
        version = run_round(home / "rankloop.db", round_id, home, tiny_model_dir)["version"]
        promote(db, version)
    db.close()
    return home


@pytest.fixture
def store(template, tmp_path):
    """A copy of the template store (its versions stay in the template's folder)."""
    shutil.copy(template / "rankloop.db", tmp_path / "rankloop.db")
    db = open_db(tmp_path / "rankloop.db")
    yield tmp_path, db
    db.close()


def kill_worker_at(stage: str, home, base) -> str:
    """Start a worker that pauses at `stage`, wait until it is there, SIGKILL it; returns its log."""
    marker, log_path = home / "paused-at", home / f"worker-{stage}.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.align.pausing_worker", stage, str(marker), "--",
             "--db", str(home / "rankloop.db"), "worker", "--base", str(base), "--once", "--threads", "1"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: marker.exists() or process.poll() is not None, timeout=120, interval=0.05,
                   message=f"the worker to pause at {stage!r}")
        assert marker.exists(), f"the worker exited before {stage!r}:\n{log_path.read_text()[-3000:]}"
        process.send_signal(signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)  # reaped: a zombie would still look alive to the next worker's pid check
    assert process.returncode == -signal.SIGKILL
    return log_path.read_text()


def snapshot(db, home) -> dict:
    root = home / "versions"
    return {
        "live": (get_live_version(db, "policy")["version"], get_live_version(db, "reward")["version"]),
        "versions": [(v["version"], v["state"]) for v in list_versions(db)],
        "folders": sorted(p.name for p in root.iterdir()) if root.exists() else [],
    }


@pytest.mark.parametrize(("stage", "method", "leftover"), KILL_POINTS, ids=[point[0] for point in KILL_POINTS])
def test_worker_killed_mid_round_leaves_nothing_and_the_round_reruns(store, tiny_model_dir, stage, method, leftover):
    home, db = store
    config = PPO if method == "ppo" else DPO
    before = snapshot(db, home)
    round_id = create_round(db, method, config)

    kill_worker_at(stage, home, tiny_model_dir)
    row = get_round(db, round_id)
    assert (row["status"], row["error"]) == ("running", None)  # killed mid-round: nobody recorded anything
    folders = snapshot(db, home)["folders"]
    if leftover is None:
        assert folders == []
    else:
        (folder,) = folders
        assert folder == leftover if leftover == "v2" else folder.startswith(".v2.tmp-")
    assert snapshot(db, home)["versions"] == before["versions"]

    recovered = recover_interrupted(db, home)  # what the next worker does when it starts
    assert recovered["failed_rounds"] == [round_id]
    row = get_round(db, round_id)
    assert row["status"] == "failed" and "worker died" in row["error"] and row["version"] is None
    assert snapshot(db, home) == before  # live versions unchanged, nothing registered, no folder left

    again = create_round(db, method, config)
    assert run_worker(home / "rankloop.db", home, tiny_model_dir, once=True, handle_signals=False) == 1
    rerun = get_round(db, again)
    assert rerun["status"] == "succeeded", rerun["error"]
    after = snapshot(db, home)
    assert after["live"] == before["live"]  # automatic promotion is off
    assert after["versions"] == before["versions"] + [(rerun["version"], "candidate")]
    assert after["folders"] == [rerun["version"]]


def test_worker_killed_after_registration_keeps_the_registered_candidate(store, tiny_model_dir):
    """Killed between registering and the promotion gate: the round had succeeded, so it stays
    succeeded with its complete version; the gate simply did not run (the live version stays)."""
    home, db = store
    before = snapshot(db, home)
    round_id = create_round(db, "dpo", DPO)
    set_setting(db, "promotion_gate", {"auto_promote": True, "min_win_rate": 0.0, "min_arena_votes": 1000})

    kill_worker_at("gate", home, tiny_model_dir)
    assert recover_interrupted(db, home)["failed_rounds"] == []
    row = get_round(db, round_id)
    assert row["status"] == "succeeded"
    after = snapshot(db, home)
    assert after["live"] == before["live"]
    assert after["versions"] == before["versions"] + [(row["version"], "candidate")]
    assert after["folders"] == [row["version"]]
    assert {p.name for p in (home / "versions" / row["version"]).iterdir()} >= {"adapter_config.json",
                                                                               "adapter_model.safetensors"}


def test_checkpoints_do_nothing_without_a_hook():
    assert CHECKPOINT_HOOKS == []  # production: nothing listens, nothing reads the environment
    start = time.monotonic()
    for stage in STAGES:
        checkpoint(stage)
    assert time.monotonic() - start < 0.1
