"""Hot swap: seconds from a promotion in the store (as `python -m align promote` or the gate
does it) to the first answer from the new version, while chat requests keep coming, and how
many of those requests fail. Baseline: what a restart costs, i.e. loading the base model and
the adapter into a fresh server until its first answer."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

from bench.common import Result, make_adapter


def run(base_path: Path, quick: bool = False) -> list[Result]:
    import torch

    from annotations import registry, store
    from app import chat
    from app.server import create_app, shutdown
    from app.serving import PolicyServer, SamplingParams

    torch.set_num_threads(2)
    home = Path(tempfile.mkdtemp(prefix="rankloop-swap-"))
    os.environ["RANKLOOP_ADMIN_PASSWORD"] = "bench-admin-password"
    ctx, demo, _, _ = create_app(home, base_path, threads=2, prefetch=0, demo_prompts=False)
    db = ctx.db()
    adapter = make_adapter(base_path, home / "versions" / "v1")
    registry.register_version(db, "v1", "policy", "base", "dpo", None, str(adapter), {})
    store.add_user(db, "bench", "annotator", "bench-password")
    user = store.get_user(db, "bench")
    sampling = {"temperature": 0.7, "top_p": 0.95, "repetition_penalty": 1.1, "max_new_tokens": 16}

    stop, records, failures = threading.Event(), [], []

    def load(i):
        while not stop.is_set():
            try:
                *_, (text, version, _) = chat.chat_stream(ctx, user, [], f"Say something nice ({i}).",
                                                          conversation=f"bench{i}", sampling=sampling)
                records.append((time.perf_counter(), version))
            except Exception as e:  # counted: the target is zero
                failures.append(repr(e))

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(3 if quick else 8)
    promoted_at = time.perf_counter()
    registry.promote(db, "v1")
    deadline = time.monotonic() + 60
    while not any(v == "v1" and t > promoted_at for t, v in records) and time.monotonic() < deadline:
        time.sleep(0.02)
    first_new = min((t for t, v in records if v == "v1" and t > promoted_at), default=float("nan"))
    time.sleep(2 if quick else 5)
    stop.set()
    for t in threads:
        t.join(60)
    shutdown(ctx, demo)

    start = time.perf_counter()
    fresh = PolicyServer(base_path)
    fresh.load_adapter("v1", adapter)
    fresh.generate([{"role": "user", "content": "hi"}], sampling=SamplingParams(max_new_tokens=16), version="v1")
    restart = time.perf_counter() - start
    return [Result(
        name="hot_swap", metric="s from promotion to first new answer", value=first_new - promoted_at,
        baseline=restart, baseline_label="fresh load of base + adapter, first answer", unit="s",
        target="≤ 1 s, 0 failures",
        details={"requests": len(records), "failed_requests": len(failures),
                 "versions_seen": sorted({v for _, v in records}), "answer_tokens": sampling["max_new_tokens"]},
    )]
