"""Keeping the app in step with the store: hot-loading the live version, sharing the two
cores with training, and supervising the training worker process.

The store is the only channel between the app and the worker. The worker registers and
(through the promotion gate or an admin) promotes versions; `LiveWatcher` notices a new live
policy within `poll_seconds` (its adapter usually preloaded when it was registered as a
candidate), loads it if needed, and makes it the default for new generations — generations
already running finish on their version. In the background it also merges the live version's
adapter (then a running round's staged adapter, then the newest candidates') into a serving
copy of the base, which runs as fast as the base itself.

A round writes its adapter before it evaluates it (a minute or more), and records the staging
folder on the round: the watcher loads and merges it from there as a provisional version that
nobody can ask for by name. When the round registers it (and the gate promotes it) the swap is
a pointer change; when the round fails or is cancelled, the watcher unloads it.

Thread budget (2 cores): while a round runs, the worker trains with 1 torch thread and the
app serves with 1; when no round runs, the app takes both. Two processes each asking for 2
threads on 2 cores slow each other down by far more than 2x (torch's spinning threads fight
for the cores), so the split is explicit.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path


from annotations import model_versions, round_records, store
from app.serving import BASE_VERSION, ensure_loaded

logger = logging.getLogger(__name__)

WORKER_THREADS = 1
PRELOAD_CANDIDATES = 2  # newest candidate adapters kept loaded, ready to go live
RETIRED_IDLE_S = 60.0  # a retired version's adapter is unloaded once unused this long
LIVE_RETRY_S = 30.0  # a live version whose adapter failed to load is tried again this often


class LiveWatcher:
    """Polls the store for the live policy and for running rounds."""

    def __init__(self, ctx, *, poll_seconds: float = 0.5, serve_threads: int = 2):
        self.ctx = ctx
        self.poll_seconds = poll_seconds
        self.serve_threads = serve_threads
        self.swaps = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._unloadable: set[str] = set()
        self._merging: threading.Thread | None = None
        self._threads: int | None = None
        self._merge_tried: set[str] = set()  # versions not to try again until the next swap
        self._stage_failed: set[tuple[str, int]] = set()  # (version, round) staged adapters that did not load
        self._load_failed: dict[str, float] = {}  # live version -> when loading it last failed

    def start(self) -> "LiveWatcher":
        self.check()
        self._thread = threading.Thread(target=self._run, name="rankloop-live", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)
        if self._merging:
            self._merging.join(30)

    def check(self) -> None:
        """One look at the store: hot-load a new live version, set the thread budget.

        Called by the watcher thread and, right after a promotion, by the admin handler."""
        with self._lock:
            self._check()

    def _check(self) -> None:
        db = self.ctx.db()
        server = self.ctx.server
        staged = self._sync_staged(db)
        live = (model_versions.get_live_version(db, "policy") or {}).get("version") or BASE_VERSION
        if live != server.live_version and not self._load_live(db, live):
            live = server.live_version  # the previous version keeps serving; the Health tab says why
        if live != server.live_version:
            self._load_failed.pop(live, None)
            if self._errors() is not None:
                self._errors().clear("live")
            previous = server.live_version
            row = model_versions.find_version(db, live)
            # with its path, the owner loads it again in the same step if it was unloaded meanwhile
            server.set_live(live, Path(row["path"]) if row and row["path"] else None)
            self.swaps += 1
            requeued = store.retire_stale_items(db, live)
            logger.info("live policy %s -> %s (%d unjudged items requeued)", previous, live, requeued)
            self.ctx.wake_prefetcher()
            self._merge_tried.clear()
        self._preload(db, staged)
        self._unload_retired(db)
        self._merge_next(db, staged)
        training = round_records.any_round_running(db)
        threads = max(1, self.serve_threads - WORKER_THREADS) if training else self.serve_threads
        if self._threads != threads:
            server.configure_threads(threads)  # on the model thread: torch's thread count is per thread
            self._threads = threads
            logger.info("serving threads: %d (%s)", threads, "a round is training" if training else "idle worker")

    def _load_live(self, db, version: str) -> bool:
        """Load the store's new live version; False if it cannot load (reported once, tried
        again every `LIVE_RETRY_S`), so the version serving now goes on serving."""
        failed = self._load_failed.get(version)
        if failed is not None and time.monotonic() - failed < LIVE_RETRY_S:
            return False
        server = self.ctx.server
        try:
            ensure_loaded(server, db, version)
        except Exception as e:
            self._load_failed[version] = time.monotonic()
            message = (f"live version {version} cannot be loaded ({type(e).__name__}: {e}); "
                       f"{server.live_version} keeps serving; retrying every {LIVE_RETRY_S:.0f} s")
            if self._errors() is None or self._errors().record("live", message):
                logger.error("%s", message)
            return False
        return True

    def _errors(self):
        return getattr(self.ctx, "errors", None)

    def _sync_staged(self, db) -> dict[str, tuple[int, str]]:
        """Settle the provisional adapters: confirm those their round registered, unload those
        whose round ended without registering them. Returns the running rounds' staged
        adapters ({version: (round id, folder)})."""
        from annotations.round_records import staged_adapters

        server = self.ctx.server
        staged = staged_adapters(db)
        for version, round_id in server.provisional_versions().items():
            if staged.get(version, (None,))[0] == round_id:
                continue
            row = model_versions.find_version(db, version)
            if row is not None and row["round_id"] == round_id:
                server.confirm(version, Path(row["path"]))
            else:
                server.unload_adapter(version)
                self._merge_tried.discard(version)
                logger.info("unloaded %s: round %d ended without registering it", version, round_id)
        return staged

    def _preload(self, db, staged: dict[str, tuple[int, str]]) -> None:
        """Load, one per check, the adapters a promotion or rollback would need next: a running
        round's staged adapter (the gate may promote it the moment the round registers it), the
        newest candidates and the live version's parent. Promoting a loaded version is a
        pointer change that waits for nothing; the arena needs them loaded anyway."""
        server = self.ctx.server
        for version, (round_id, path) in staged.items():
            if version in server.versions() or (version, round_id) in self._stage_failed:
                continue
            try:
                server.load_adapter(version, Path(path), provisional_round=round_id)
                logger.info("preloaded %s, staged by round %d", version, round_id)
            except Exception as e:  # renamed or removed under us: loaded from the registry when it is promoted
                self._stage_failed.add((version, round_id))
                logger.info("cannot preload %s from round %d's staging folder: %s", version, round_id, e)
            return
        live = model_versions.get_live_version(db, "policy")
        parent = model_versions.find_version(db, live["parent"]) if live and live["parent"] else None
        wanted = sorted([*model_versions.newest_candidates(db, PRELOAD_CANDIDATES), *([parent] if parent else [])],
                        key=lambda v: v["created_at"], reverse=True)
        for version, path in ((v["version"], v["path"]) for v in wanted if v["path"]):
            if version in server.versions() or version in self._unloadable:
                continue
            try:
                server.load_adapter(version, Path(path))
                logger.info("preloaded adapter %s", version)
            except Exception as e:  # a broken candidate must not stop the watcher; promoting it will say why
                self._unloadable.add(version)
                logger.warning("cannot preload %s from %s: %s", version, path, e)
            return

    def _unload_retired(self, db) -> None:
        """Unload, one per check, the adapter of a retired version that nobody has used for
        `RETIRED_IDLE_S` (the live version's parent stays: rollbacks and the arena need it).
        Without this every version ever live stays loaded: ~20 MB each for an adapter on all
        layers, and PEFT's adapter loads get slower with every adapter loaded."""
        server = self.ctx.server
        loaded = set(server.versions()) - {BASE_VERSION, server.live_version} - set(server.provisional_versions())
        if not loaded:
            return
        parent = (model_versions.find_version(db, server.live_version) or {}).get("parent")
        retired = {v["version"] for v in model_versions.list_versions(db, "policy") if v["state"] == "retired"}
        for version in sorted(loaded & retired - {parent}):
            # a look without the lock first: taking it (at SWAP) would pause the chat batch for nothing
            if server.idle_seconds(version) >= RETIRED_IDLE_S and server.unload_adapter(version,
                                                                                       idle_for=RETIRED_IDLE_S):
                self._merge_tried.discard(version)
                logger.info("unloaded retired version %s (unused for %.0f s)", version, RETIRED_IDLE_S)
                return

    def _merge_next(self, db, staged: dict[str, tuple[int, str]]) -> None:
        """Merge, in a thread of its own, the live version's adapter into a serving copy of the
        base, or else a staged adapter's or the newest candidates' (as many as fit), so that a
        promotion finds it merged. The watcher goes on polling meanwhile (a merge takes about a
        second of CPU on SmolLM2)."""
        if self._merging is not None and self._merging.is_alive():
            return
        server = self.ctx.server
        wanted = [server.live_version, *staged] + [v["version"] for v in
                                                   model_versions.newest_candidates(db, PRELOAD_CANDIDATES)]
        for version in wanted:
            if version == BASE_VERSION or version in self._merge_tried or version in server.merged_versions() \
                    or version not in server.versions():
                continue
            self._merge_tried.add(version)
            self._merging = threading.Thread(target=self._merge, args=(version,), name="rankloop-merge", daemon=True)
            self._merging.start()
            return

    def _merge(self, version: str) -> None:
        try:
            self.ctx.server.merge(version)
        except Exception:  # served unmerged, as before
            logger.exception("merging %s", version)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.check()
                self.last_error = None
            except Exception as e:  # keep watching; the Health tab shows the error
                self.last_error = f"{type(e).__name__}: {e}"
                if self._errors() is None or self._errors().record("live", self.last_error):
                    logger.exception("live watcher")


class WorkerProcess:
    """The training worker (`python -m align worker`) as a child of the app, restarted if it
    dies. Rounds it was running are marked failed by the next worker's recovery."""

    def __init__(self, db_path: Path, base_path: Path, *, log_path: Path, poll_seconds: float = 2.0):
        self.command = [sys.executable, "-m", "align", "--db", str(db_path), "worker", "--base", str(base_path),
                        "--threads", str(WORKER_THREADS), "--poll", str(poll_seconds),
                        "--parent-pid", str(os.getpid())]  # the worker stops if the app dies
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.restarts = -1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "WorkerProcess":
        self._spawn()
        self._thread = threading.Thread(target=self._supervise, name="rankloop-worker", daemon=True)
        self._thread.start()
        return self

    def _spawn(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(WORKER_THREADS), "HF_HUB_OFFLINE": "1"}
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        self.restarts += 1
        logger.info("training worker started (pid %d), log: %s", self.process.pid, self.log_path)

    def _supervise(self) -> None:
        while not self._stop.wait(2.0):
            if self.process and self.process.poll() is not None:
                logger.warning("training worker exited with %s; restarting", self.process.returncode)
                self._spawn()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
