"""The worker process: runs queued rounds, recovers after a crash, stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time

from annotations import open_db
from annotations.model_versions import list_versions
from annotations.round_records import claim_next_round, create_round, get_round
from align.worker import run_worker
from tests.align.stores import FAST_EVAL, FAST_TRAINING, import_pairs, one_thread  # noqa: F401 (one_thread: autouse)
from tests.conftest import REPO


def test_worker_runs_queued_rounds_in_order(tmp_path, tiny_model_dir):
    db = open_db(tmp_path / "rankloop.db")
    import_pairs(db, tmp_path)
    first = create_round(db, "rm", {**FAST_TRAINING, **FAST_EVAL})
    second = create_round(db, "dpo", {"betta": 1})  # fails: unknown key
    assert run_worker(tmp_path / "rankloop.db", tmp_path, tiny_model_dir, max_idle_seconds=0,
                      handle_signals=False) == 2
    assert get_round(db, first)["status"] == "succeeded" and get_round(db, second)["status"] == "failed"
    assert [v["version"] for v in list_versions(db)] == ["base", "rm1"]


def test_worker_start_fails_rounds_of_dead_worker(tmp_path, tiny_model_dir):
    db = open_db(tmp_path / "rankloop.db")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    round_id = create_round(db, "rm")
    claim_next_round(db, pid=dead.pid)
    (tmp_path / "versions" / ".rm1.tmp-1234").mkdir(parents=True)
    assert run_worker(tmp_path / "rankloop.db", tmp_path, tiny_model_dir, once=True, handle_signals=False) == 0
    assert get_round(db, round_id)["status"] == "failed"
    assert list((tmp_path / "versions").iterdir()) == []


def wait_for_line(process, text: str, deadline_s: float) -> str:
    """Read the process's stderr until a line contains `text` (or the deadline passes)."""
    selector = selectors.DefaultSelector()
    selector.register(process.stderr, selectors.EVENT_READ)
    seen, end = [], time.monotonic() + deadline_s
    while time.monotonic() < end:
        if selector.select(timeout=max(0.0, end - time.monotonic())):
            line = process.stderr.readline()
            if not line:
                break
            seen.append(line)
            if text in line:
                return line
    raise AssertionError(f"{text!r} not seen within {deadline_s}s; got: {''.join(seen)[-2000:]}")


def test_worker_exits_cleanly_on_sigterm(tmp_path, tiny_model_dir):
    open_db(tmp_path / "rankloop.db").close()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", "align", "--db", str(tmp_path / "rankloop.db"), "worker", "--base",
         str(tiny_model_dir), "--poll", "30"],
        cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )
    try:
        wait_for_line(process, "watching", deadline_s=60)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0  # does not sit out its 30 s poll
        assert "SIGTERM received, stopping" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()


def test_worker_started_with_parent_pid_stops_when_its_parent_is_killed(tmp_path, tiny_model_dir):
    """The app starts its worker with --parent-pid: an app killed outright must not leave an
    orphaned worker behind (a restarted app would run a second one beside it)."""
    open_db(tmp_path / "rankloop.db").close()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    worker_command = [sys.executable, "-m", "align", "--db", str(tmp_path / "rankloop.db"), "worker",
                      "--base", str(tiny_model_dir), "--poll", "30"]
    # A stand-in for the app: starts the worker with its own pid, prints the worker's pid, waits.
    log = tmp_path / "w.log"
    parent_code = (
        "import os, subprocess, time\n"
        f"command = {worker_command!r} + ['--parent-pid', str(os.getpid())]\n"
        f"p = subprocess.Popen(command, stderr=open({str(log)!r}, 'w'))\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              text=True)
    worker_pid = int(parent.stdout.readline())
    try:
        deadline = time.monotonic() + 60
        while "watching" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 30
        while _alive(worker_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker_pid)
        assert "parent process" in log.read_text()
    finally:
        if _alive(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped by init, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
