"""Many annotators at once: each of N annotators submits M judgements through the running
app's HTTP API (gradio_client), one after another, as fast as the server answers.

`drive_annotators` is the reusable load driver (tests/app/test_load.py and the kill test in
tests/app/test_app_kill.py use it); `add_ready_items` fills a store with items whose answers
are written directly, so the load measures the judging path, not generation. `run` is the
benchmark: 20 annotators × 50 judgements against one annotator alone (the baseline, measured
in the same run on the same app), in judgements per second.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import Result, median, percentile

ANNOTATORS, SUBMISSIONS = 20, 50
SAVED = re.compile(r"Saved judgement (\d+)")
REQUEST_TIMEOUT_S = 120.0


@dataclass
class LoadReport:
    """What the server acknowledged during a burst, filled in while it runs (thread-safe)."""

    acknowledged: list[int] = field(default_factory=list)  # judgement ids, as "Saved judgement N" said
    latencies: list[float] = field(default_factory=list)  # seconds per submission
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the whole burst
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def acknowledge(self, judgement_id: int, seconds: float) -> None:
        with self._lock:
            self.acknowledged.append(judgement_id)
            self.latencies.append(seconds)

    def fail(self, message: str) -> None:
        with self._lock:
            self.errors.append(message)

    @property
    def throughput(self) -> float:
        """Acknowledged judgements per second of wall time."""
        return len(self.acknowledged) / self.seconds if self.seconds else 0.0


def add_ready_items(db, n: int, *, k: int = 2, overlap: int = 1, label: str = "load") -> list[int]:
    """Queue `n` new prompts as items and attach their answers directly (no model), so they are
    ready at once. One transaction. Returns the item ids."""
    from annotations import store
    from annotations.db import write_transaction

    mode = "pairwise" if k == 2 else "ranking"
    with write_transaction(db):
        prompt_ids = [store.add_prompt(db, f"{label} question {i}: what would you do?", source=label)[0]
                      for i in range(n)]
        item_ids = store.queue_items(db, prompt_ids, mode=mode, k=k, overlap=overlap)
        for item_id in item_ids:
            store.add_candidates(db, item_id, [
                {"text": f"Answer {j} to item {item_id}.", "policy_version": "base", "sampling": {}}
                for j in range(k)
            ])
    return item_ids


def annotate(url: str, user: tuple[str, str], submissions: int, report: LoadReport, *, choice: str = "A",
             stop: threading.Event | None = None) -> None:
    """One annotator: log in, load an item, then submit `choice` `submissions` times (each answer
    brings the next item). Stops at the first error, which goes into the report."""
    from gradio_client import Client

    step = "logging in"
    try:
        client = Client(url, auth=user, verbose=False, httpx_kwargs={"timeout": REQUEST_TIMEOUT_S},
                        download_files=False, analytics_enabled=False)
        step = "loading the first item"
        header = client.submit(api_name="/next_item").result(timeout=REQUEST_TIMEOUT_S)[0]
        if not header.startswith("**Item"):
            raise RuntimeError(f"no item: {header[:120]}")
        for n in range(submissions):
            if stop is not None and stop.is_set():
                return
            step = f"submission {n + 1}"
            start = time.perf_counter()
            header = client.submit("", [], [], api_name=f"/submit_{choice}").result(timeout=REQUEST_TIMEOUT_S)[0]
            saved = SAVED.search(header)
            if saved is None:
                raise RuntimeError(f"unexpected answer: {header[:160]}")
            report.acknowledge(int(saved.group(1)), time.perf_counter() - start)
    except Exception as e:  # the report is the result: a load run never raises for one annotator
        report.fail(f"{user[0]}, {step}: {type(e).__name__}: {e}")


def drive_annotators(url: str, users: list[tuple[str, str]], submissions: int, *, report: LoadReport | None = None,
                     stop: threading.Event | None = None) -> LoadReport:
    """Run every user in `users` at once (a thread each), `submissions` judgements each; returns
    the report (pass `report` to watch it fill while this runs in another thread)."""
    report = report or LoadReport()
    threads = [threading.Thread(target=annotate, args=(url, user, submissions, report), kwargs={"stop": stop},
                                name=f"annotator-{user[0]}") for user in users]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report.seconds = time.perf_counter() - start
    return report


def make_annotators(db, n: int, prefix: str = "load") -> list[tuple[str, str]]:
    from annotations import store

    users = [(f"{prefix}{i:02d}", f"{prefix}-password-{i:02d}") for i in range(n)]
    for name, password in users:
        store.add_user(db, name, "annotator", password)
    return users


def run(base_path: Path, quick: bool = False) -> list[Result]:
    from app.server import create_app, launch, shutdown
    from bench.common import free_port

    annotators, submissions = (5, 10) if quick else (ANNOTATORS, SUBMISSIONS)
    baseline_submissions = submissions
    home = Path(tempfile.mkdtemp(prefix="rankloop-bench-load-"))
    os.environ["RANKLOOP_ADMIN_PASSWORD"] = "bench-admin-password"
    ctx, demo, auth, _ = create_app(home, base_path, threads=2, prefetch=0, demo_prompts=False)
    db = ctx.db()
    # Every annotator holds one more leased item at the end: that many spare items.
    add_ready_items(db, annotators * submissions + baseline_submissions + annotators + 1)
    users = make_annotators(db, annotators + 1)
    port = free_port()
    launch(demo, auth, "127.0.0.1", port, block=False, ctx=ctx)
    url = f"http://127.0.0.1:{port}/"
    try:
        alone = drive_annotators(url, users[-1:], baseline_submissions)
        crowd = drive_annotators(url, users[:-1], submissions)
    finally:
        shutdown(ctx, demo)
    stored = db.execute("SELECT count(*), count(DISTINCT item_id) FROM judgements").fetchone()
    return [Result(
        name="load_annotators", metric=f"judgements/s, {annotators} annotators at once (HTTP)",
        value=crowd.throughput, baseline=alone.throughput, baseline_label="1 annotator alone", unit="/s",
        higher_is_better=True, target=f"{annotators * submissions} stored, 0 errors",
        details={"annotators": annotators, "submissions_each": submissions,
                 "p50_s": round(median(crowd.latencies), 3) if crowd.latencies else None,
                 "p95_s": round(percentile(crowd.latencies, 95), 3) if crowd.latencies else None,
                 "alone_p50_s": round(median(alone.latencies), 3) if alone.latencies else None,
                 "errors": len(alone.errors) + len(crowd.errors), "judgements_stored": stored[0],
                 "distinct_items": stored[1]},
    )]
