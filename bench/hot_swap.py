"""Hot swap: seconds from a promotion in the store (as `python -m align promote` or the gate
does it) to the first answer from the new version, while chat requests keep coming, and how
many of those requests fail. Baseline: what a restart costs, i.e. loading the base model and
the adapter into a fresh server until its first answer.

Two promotions in one run:
- a candidate registered a while before (an admin promoting after looking at it, or a gate
  that waited for arena votes): the app has preloaded its adapter, the swap is a pointer change;
- a candidate registered and promoted in the same instant (the gate right after a round): the
  adapter is loaded after the promotion, once the generation in flight ends.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench.common import Result, make_adapter

ANSWER_TOKENS = 16


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
    adapters = {v: make_adapter(base_path, home / "versions" / v, seed=i) for i, v in enumerate(("v1", "v2"))}
    registry.register_version(db, "v1", "policy", "base", "dpo", None, str(adapters["v1"]), {})
    store.add_user(db, "bench", "annotator", "bench-password")
    user = store.get_user(db, "bench")
    sampling = {"temperature": 0.7, "top_p": 0.95, "repetition_penalty": 1.1, "max_new_tokens": ANSWER_TOKENS}

    stop, records, failures = threading.Event(), [], []

    def load(i):
        while not stop.is_set():
            try:
                *_, (text, version, _) = chat.chat_stream(ctx, user, [], f"Say something nice ({i}).",
                                                          conversation=f"bench{i}", sampling=sampling)
                records.append((time.perf_counter(), version))
            except Exception as e:  # counted: the target is zero
                failures.append(repr(e))

    def promote(version):
        """Promote `version`; seconds until the server has it live, and until its first answer."""
        promoted_at = time.perf_counter()
        registry.promote(db, version)
        deadline, live_at = time.monotonic() + 60, None
        while not any(v == version and t > promoted_at for t, v in list(records)) and time.monotonic() < deadline:
            if live_at is None and ctx.server.live_version == version:
                live_at = time.perf_counter()
            time.sleep(0.005)
        first = min((t for t, v in list(records) if v == version and t > promoted_at), default=float("nan"))
        return (live_at or first) - promoted_at, first - promoted_at

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(3 if quick else 8)  # v1 is preloaded meanwhile
    preloaded = "v1" in ctx.server.versions()
    warm_live, warm_first = promote("v1")
    time.sleep(2 if quick else 4)
    registry.register_version(db, "v2", "policy", "v1", "dpo", None, str(adapters["v2"]), {})
    cold_live, cold_first = promote("v2")  # registered and promoted at once
    time.sleep(2 if quick else 4)
    stop.set()
    for t in threads:
        t.join(60)
    shutdown(ctx, demo)

    times = sorted(t for t, _ in records)
    answer_s = statistics.median(b - a for a, b in zip(times, times[1:]))  # 3 clients queued: one answer

    start = time.perf_counter()
    fresh = PolicyServer(base_path)
    fresh.load_adapter("v1", adapters["v1"])
    fresh.generate([{"role": "user", "content": "hi"}], sampling=SamplingParams(max_new_tokens=ANSWER_TOKENS),
                   version="v1")
    restart = time.perf_counter() - start
    common = {"requests": len(records), "failed_requests": len(failures), "failures": failures[:3],
              "versions_seen": sorted({v for _, v in records}), "answer_tokens": ANSWER_TOKENS,
              "one_answer_s_median": round(answer_s, 3), "chat_clients": len(threads)}
    return [
        Result(name="hot_swap", metric="s from promotion to first new answer (preloaded candidate)",
               value=warm_first, baseline=restart, baseline_label="fresh load of base + adapter, first answer",
               unit="s", target="≤ 1 s, 0 failures",
               details={"live_in_server_s": round(warm_live, 3), "adapter_preloaded": preloaded, **common}),
        Result(name="hot_swap_gate", metric="s from promotion to first new answer (registered + promoted at once)",
               value=cold_first, baseline=restart, baseline_label="fresh load of base + adapter, first answer",
               unit="s", target="≤ 1 s, 0 failures",
               details={"live_in_server_s": round(cold_live, 3), **common}),
    ]
