"""Failures in plain sight: what the app's background parts are doing, and what went wrong.

Background threads (the prefetcher, the live watcher) and the training worker fail where no
person is looking. They report here instead (`ErrorLog.record`): each distinct error once,
with its count and first and last time, not a traceback every 0.1 s. `health_report` gathers
that with the state of every part — the worker and its round, the prefetch queue and the items
it parked, the loaded and merged versions and their memory, the live version served against
the one the store names, disk space — for the admin's Health tab, `GET /health` (admins) and
`python -m app health`.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections import OrderedDict

logger = logging.getLogger(__name__)

MAX_ERRORS = 50
LOW_DISK_BYTES = 2 * 1024 ** 3


class ErrorLog:
    """The distinct errors of the app's background parts, newest last, bounded."""

    def __init__(self, limit: int = MAX_ERRORS):
        self._errors: OrderedDict[tuple[str, str], dict] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def record(self, where: str, message: str, *, now: float | None = None) -> bool:
        """Note an error of `where` (a part: prefetch, live, worker...). Returns True the first
        time this message is seen (the caller logs it then, and only then)."""
        now = time.time() if now is None else now
        key = (where, message)
        with self._lock:
            entry = self._errors.pop(key, None)
            first = entry is None
            entry = entry or {"where": where, "message": message, "count": 0, "first": now}
            entry.update(count=entry["count"] + 1, last=now)
            self._errors[key] = entry
            while len(self._errors) > self._limit:
                self._errors.popitem(last=False)
        return first

    def clear(self, where: str) -> None:
        """Forget `where`'s errors (it recovered)."""
        with self._lock:
            for key in [k for k in self._errors if k[0] == where]:
                del self._errors[key]

    def entries(self) -> list[dict]:
        with self._lock:
            return [dict(e) for e in reversed(self._errors.values())]


def health_report(ctx) -> dict:
    """Every part's state and the errors, with `status` 'ok' or 'degraded' and the reasons."""
    from annotations import model_versions, round_records, store

    db = ctx.db()
    problems = []
    worker = ctx.worker
    running = round_records.list_rounds(db, limit=1, status="running")
    worker_state = {
        "managed_by_app": worker is not None,
        "alive": bool(worker and worker.process and worker.process.poll() is None),
        "pid": worker.process.pid if worker and worker.process else None,
        "restarts": max(worker.restarts, 0) if worker else None,
        "round": ({k: running[0][k] for k in ("id", "method", "version", "progress")} if running else None),
    }
    if worker is not None and not worker_state["alive"]:
        problems.append("the training worker is not running")
    prefetcher = ctx.prefetcher
    prefetch_state = {
        "running": bool(prefetcher and prefetcher.alive()),
        "pending": store.count_items(db, "pending"), "ready": store.count_items(db, "ready"),
        "unclaimed_ready": store.count_unclaimed_ready(db),
        "generated": getattr(prefetcher, "generated", 0), "parked": store.parked_items(db),
    }
    if prefetcher is not None and not prefetch_state["running"]:
        problems.append("the prefetcher has stopped")
    server = ctx.server
    in_store = model_versions.get_live_version(db, "policy")
    live_in_store = in_store["version"] if in_store else None
    serving = {
        "live_served": server.live_version if server else None, "live_in_store": live_in_store,
        "loaded": server.adapter_sizes() if server else {}, "merged": server.merged_sizes() if server else {},
        # where answers are computed: "cpu bfloat16", "cuda float32", or the external server's URL
        "engine": server.describe() if server else None,
    }
    if server is not None and live_in_store and server.live_version != live_in_store:
        problems.append(f"the store's live version is {live_in_store} but {server.live_version} is serving")
    disk = shutil.disk_usage(ctx.db_path.parent)
    disk_state = {"free_bytes": disk.free, "total_bytes": disk.total}
    if disk.free < LOW_DISK_BYTES:
        problems.append(f"only {disk.free / 1024 ** 3:.1f} GiB free under {ctx.db_path.parent}")
    errors = ctx.errors.entries() if getattr(ctx, "errors", None) else []
    if prefetch_state["parked"]:
        problems.append(f"{len(prefetch_state['parked'])} item(s) parked by the prefetcher")
    return {"status": "degraded" if problems or errors else "ok", "problems": problems, "worker": worker_state,
            "prefetch": prefetch_state, "serving": serving, "disk": disk_state, "errors": errors,
            "checked_at": time.time()}


def format_report(report: dict) -> str:
    """The report as markdown for a person (the admin's Health tab)."""
    def when(t):
        return time.strftime("%H:%M:%S", time.localtime(t))

    lines = [f"**Status: {'✅ ok' if report['status'] == 'ok' else '⚠️ degraded'}**"]
    lines += [f"- ⚠️ {p}" for p in report["problems"]]
    w = report["worker"]
    if w["managed_by_app"]:
        worker = f"running (pid {w['pid']}, restarted {w['restarts']}×)" if w["alive"] else "**not running**"
    else:
        worker = "not started by the app (`python -m align worker` runs it)"
    rnd = w["round"]
    lines += ["", "| part | state |", "|---|---|", f"| training worker | {worker} |",
              "| round | " + (f"{rnd['id']} ({rnd['method']} → {rnd['version'] or '…'}), {100 * (rnd['progress'] or 0):.0f}%"
                              if rnd else "none running") + " |"]
    p = report["prefetch"]
    lines.append(f"| prefetcher | {'running' if p['running'] else '**stopped**'}: {p['pending']} waiting for answers, "
                 f"{p['ready']} ready ({p['unclaimed_ready']} not yet dealt), {p['generated']} generated |")
    s = report["serving"]
    live = s["live_served"] if s["live_served"] == s["live_in_store"] else \
        f"**{s['live_served']}** (the store says {s['live_in_store']})"
    lines.append(f"| live version served | {live} |")
    lines.append("| loaded versions | " + (", ".join(f"{v} ({b / 1024 ** 2:.0f} MiB)" for v, b in s["loaded"].items())
                                           or "the base only") + " |")
    lines.append("| merged serving copies | " + (", ".join(f"{v} ({b / 1024 ** 2:.0f} MiB)"
                                                         for v, b in s["merged"].items()) or "none") + " |")
    d = report["disk"]
    lines.append(f"| disk free | {d['free_bytes'] / 1024 ** 3:.1f} GiB of {d['total_bytes'] / 1024 ** 3:.0f} GiB |")
    if p["parked"]:
        lines += ["", "**Parked items** (the prefetcher gave up on them; the queue moved on)", "",
                  "| item | reason |", "|---|---|"]
        lines += [f"| {i['id']} | {i['reason']} |" for i in p["parked"]]
    if report["errors"]:
        lines += ["", "**Errors**", "", "| part | error | times | first | last |", "|---|---|---|---|---|"]
        lines += [f"| {e['where']} | {e['message'].replace('|', '/')} | {e['count']} | {when(e['first'])} | "
                  f"{when(e['last'])} |" for e in report["errors"]]
    return "\n".join(lines)
