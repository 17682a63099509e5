"""The training worker: `python -m align worker` runs queued rounds one after another.

The app never trains in its own process: it queues a round (a row in the store) and this
worker, a separate process, claims it, runs it (`align.rounds.run_round`) and goes back to
polling; a round that asks for several processes runs under `accelerate launch`, which the
worker starts and waits for (align/launch.py). On start it cleans up after a worker that died
mid-round. SIGTERM or SIGINT stops
it cleanly: a round in training stops at its next step and ends failed ("the worker is
shutting down"), leaving no version behind; an idle worker exits at once. Started by the app
(`--parent-pid`), it stops the same way when the app is gone, even killed outright, so a
restarted app never ends up with two workers.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def run_worker(
    db_path: Path,
    home: Path,
    base_path: Path,
    *,
    poll_seconds: float = 2.0,
    once: bool = False,
    max_idle_seconds: float | None = None,
    stop_event: threading.Event | None = None,
    handle_signals: bool = True,
    parent_pid: int | None = None,
) -> int:
    """Claim and run queued rounds until stopped; returns the number of rounds run.

    once: run at most one round (or none if the queue is empty) and return.
    max_idle_seconds: return after the queue has been empty this long.
    parent_pid: stop, as on SIGTERM, once this process (the app that started the worker) is gone.
    """
    from annotations import open_db
    from annotations.round_records import claim_next_round, get_round

    from align.recovery import recover_interrupted
    from align.launch import run_claimed_round

    stop = stop_event or threading.Event()
    if handle_signals:
        _install_signal_handlers(stop)
    if parent_pid:
        _watch_parent(parent_pid, stop)
    db = open_db(db_path)
    recover_interrupted(db, home)
    logger.info("worker %d: watching %s for queued rounds", os.getpid(), db_path)
    ran = 0
    idle_since = time.monotonic()
    try:
        while not stop.is_set():
            row = claim_next_round(db, os.getpid())
            if row is None:
                if once or (max_idle_seconds is not None and time.monotonic() - idle_since >= max_idle_seconds):
                    break
                stop.wait(poll_seconds)
                continue
            logger.info("worker %d: running round %d (%s)", os.getpid(), row["id"], row["method"])
            try:
                run_claimed_round(db_path, row["id"], home, base_path, stop_event=stop)
            except Exception:  # the round is already marked failed; keep serving the queue
                logger.exception("round %d failed", row["id"])
            finally:
                _ensure_finished(db, row["id"], get_round)
                gc.collect()
            ran += 1
            idle_since = time.monotonic()
            if once:
                break
    finally:
        db.close()
    logger.info("worker %d: stopped after %d round(s)", os.getpid(), ran)
    return ran


def _ensure_finished(db, round_id: int, get_round) -> None:
    """A round this worker ran must not stay 'running' (run_round marks it; this is the net)."""
    from annotations.round_records import finish_round

    try:
        row = get_round(db, round_id)
        if row["status"] == "running" and row["pid"] == os.getpid():
            finish_round(db, round_id, "failed", error="the worker lost track of this round")
    except Exception:
        logger.exception("could not check round %d", round_id)


def _watch_parent(parent_pid: int, stop: threading.Event, interval: float = 1.0) -> None:
    """Set `stop` when this process's parent is no longer `parent_pid` (it died; the orphan
    was handed to init or a subreaper)."""

    def watch():
        while not stop.wait(interval):
            if os.getppid() != parent_pid:
                logger.warning("worker %d: parent process %d is gone, stopping", os.getpid(), parent_pid)
                stop.set()

    threading.Thread(target=watch, name="rankloop-parent-watch", daemon=True).start()


def _install_signal_handlers(stop: threading.Event) -> None:
    if threading.current_thread() is not threading.main_thread():
        return

    def handle(signum, frame):
        logger.warning("worker %d: %s received, stopping", os.getpid(), signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
