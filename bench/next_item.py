"""Time to the next item: submit a judgement and receive the next item, through the running
app (gradio_client, HTTP), with the prefetcher warm and still generating in the background.
Baseline: what an annotator would wait without prefetch, i.e. generating the item's answers
on demand with the same serving path."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from bench.common import Result, median, percentile

ROUNDS = 30


def run(base_path: Path, quick: bool = False) -> list[Result]:
    from gradio_client import Client

    from annotations import store
    from app.server import create_app, launch, shutdown
    from app.serving import SamplingParams
    from bench.common import free_port

    rounds = 10 if quick else ROUNDS
    home = Path(tempfile.mkdtemp(prefix="rankloop-bench-"))
    os.environ["RANKLOOP_ADMIN_PASSWORD"] = "bench-admin-password"
    ctx, demo, auth, _ = create_app(home, base_path, threads=2, prefetch=rounds + 2, demo_prompts=False)
    db = ctx.db()
    sampling = SamplingParams(max_new_tokens=96)
    ids = [store.add_prompt(db, f"Give me tip number {i} for writing clear documentation.")[0]
           for i in range(rounds * 2 + 4)]
    store.queue_items(db, ids, mode="pairwise", k=2)
    store.add_user(db, "bench", "annotator", "bench-password")

    # Baseline: the on-demand path, the same server generating one item's answers.
    messages = [{"role": "user", "content": "Give me a tip for writing clear documentation."}]
    cold = []
    for _ in range(2 if quick else 3):
        start = time.perf_counter()
        ctx.server.generate(messages, n=2, sampling=sampling)
        cold.append(time.perf_counter() - start)

    deadline = time.monotonic() + 1800
    while store.count_items(db, "ready") < rounds + 1 and time.monotonic() < deadline:
        time.sleep(1)
    port = free_port()
    launch(demo, auth, "127.0.0.1", port, block=False, ctx=ctx)
    client = Client(f"http://127.0.0.1:{port}/", auth=("bench", "bench-password"), verbose=False)
    client.predict(api_name="/next_item")
    warm = []
    for _ in range(rounds):
        start = time.perf_counter()
        out = client.predict("", [], [], api_name="/submit_A")
        warm.append(time.perf_counter() - start)
        assert "Saved judgement" in out[0], out[0]
    shutdown(ctx, demo)
    return [Result(
        name="time_to_next_item", metric="p95 submit → next item (HTTP)", value=percentile(warm, 95),
        baseline=median(cold), baseline_label="on-demand generation, median", unit="s", target="p95 ≤ 0.3 s",
        details={"p50_s": round(median(warm), 3), "p95_s": round(percentile(warm, 95), 3), "rounds": rounds,
                 "prefetcher": "generating in the background during the measurement",
                 "on_demand_s": [round(c, 2) for c in cold]},
    )]
