"""Hot swap: seconds from a promotion in the store (as `python -m align promote` or the gate
does it) to the first answer from the new version, while chat requests keep coming, and how
many of those requests fail. Baseline: what a restart costs, i.e. loading the base model and
the adapter into a fresh server until its first answer.

Three kinds of promotion, each taken several times in one run (figures are medians, with the
worst case beside them):
- a candidate registered a while before (an admin promoting after looking at it, or a gate
  that waited for arena votes): the app has preloaded and merged its adapter, the swap is a
  pointer change;
- the gate right after a round: the round stages its adapter before evaluating it, the app
  loads and merges it meanwhile, and the round registers it and the gate promotes it in the
  same instant (the adapter is shaped as a DPO round's at its defaults: top 8 layers);
- a version the app has not loaded (a rollback to an old version, say), registered and
  promoted at once: the adapter is loaded after the promotion, between two decoding steps.

Three chat clients keep the server busy, each sending its next question as soon as its answer
is complete, so at a promotion their answers are in flight on the old version (they finish on
it, as specified). As soon as the server has the new version live, a fourth asker sends a
question: it joins the running chat batch at the next decoding step. For each promotion: when
the server has the version live, when the new version's first token and complete answer reach
that asker (the complete answer is the figure against the target), and when the first of the
three busy clients gets a complete answer from it (that adds the time until one of them is
done with its answer in flight and asks again; before chat answers were batched, that was the
figure reported).
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

    from align.models import VersionDir
    from annotations import model_versions, round_records, store
    from app import chat_and_arena as chat
    from app.server import create_app, shutdown
    from app.serving import PolicyServer, SamplingParams

    torch.set_num_threads(2)
    rounds = 2 if quick else 5
    home = Path(tempfile.mkdtemp(prefix="rankloop-swap-"))
    os.environ["RANKLOOP_ADMIN_PASSWORD"] = "bench-admin-password"
    ctx, demo, _, _ = create_app(home, base_path, threads=2, prefetch=0, demo_prompts=False)
    db = ctx.db()
    versions = VersionDir(home / "versions")
    warm = ("v1", "v2")  # preloaded, promoted in turn
    adapters = {v: make_adapter(base_path, versions.path(v), seed=i) for i, v in enumerate(warm)}
    staged = [make_adapter(base_path, home / "made" / f"round{i}", seed=10 + i, like_dpo_round=True)
              for i in range(rounds)]  # what each gated round writes to its staging folder
    cold = [f"g{i}" for i in range(rounds)]  # not loaded before: registered and promoted at once
    adapters.update({v: make_adapter(base_path, versions.path(v), seed=20 + i) for i, v in enumerate(cold)})
    for version in warm:
        model_versions.register_version(db, version, "policy", "base", "dpo", None, str(adapters[version]), {})
    store.add_user(db, "bench", "annotator", "bench-password")
    user = store.get_user(db, "bench")
    sampling = {"temperature": 0.7, "top_p": 0.95, "repetition_penalty": 1.1, "max_new_tokens": ANSWER_TOKENS}

    stop, records, failures = threading.Event(), [], []  # records: (asked, first token, complete, version)

    def load(i):
        while not stop.is_set():
            try:
                asked, first = time.perf_counter(), None
                for out in chat.chat_stream(ctx, user, f"Say something nice ({i}).", conversation=f"bench{i}",
                                            sampling=sampling):
                    if first is None and out[0]:
                        first = time.perf_counter()
                records.append((asked, first or time.perf_counter(), time.perf_counter(), out[1]))
            except Exception as e:  # counted: the target is zero
                failures.append(repr(e))

    def promote(version):
        """Promote `version` while the clients keep chatting; as soon as the server has it live,
        a fourth asker sends a question (an admin checking their promotion). Seconds from the
        promotion until the server has it live, until the new version's first token and its
        complete answer reach that asker, and until the first of the busy clients gets a
        complete answer from it (a client mid-answer at the promotion asks again only when that
        answer is complete)."""
        promoted_at = time.perf_counter()
        model_versions.promote(db, version)
        deadline = time.monotonic() + 60
        while ctx.server.live_version != version and time.monotonic() < deadline:
            time.sleep(0.002)
        live_at, first_token = time.perf_counter(), None
        for text, answered_by, *_ in chat.chat_stream(ctx, user, "Are you the new version?",
                                                      conversation="probe", sampling=sampling):
            if first_token is None and text:
                first_token = time.perf_counter()
        complete = time.perf_counter()
        if answered_by != version:
            failures.append(f"asked after {version} went live, answered by {answered_by}")
        while time.monotonic() < deadline and not any(v == version and done > promoted_at
                                                      for _, _, done, v in list(records)):
            time.sleep(0.005)
        any_client = min((done for _, _, done, v in list(records) if v == version and done > promoted_at),
                         default=float("nan"))
        return {"live": live_at - promoted_at, "first_token": (first_token or complete) - promoted_at,
                "complete": complete - promoted_at, "any_client_complete": any_client - promoted_at}

    def settle(versions, timeout=120):
        """Wait until `versions` are loaded and merged into serving copies (what the app does in
        the background after a registration or a promotion)."""
        deadline = time.monotonic() + timeout
        while not set(versions) <= set(ctx.server.merged_versions()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return set(versions) <= set(ctx.server.merged_versions())

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    preloaded = settle(warm)  # registered a while ago: the app has loaded and merged them meanwhile
    time.sleep(1)
    warm_swaps, gate_swaps, cold_swaps, staged_ready = [], [], [], []
    for i in range(rounds):
        warm_swaps.append(promote(warm[i % 2]))
        time.sleep(0.5 + 0.37 * i)  # promotions land at different points of the answers in flight
    for i, folder in enumerate(staged):
        # A DPO round up to its evaluation: claimed, its name reserved, its adapter staged.
        round_id = round_records.create_round(db, "dpo")
        round_records.claim_round(db, round_id, os.getpid())
        version = round_records.reserve_version(db, round_id)
        staging = versions.staging(version)
        os.replace(folder, staging)
        round_records.stage_adapter(db, round_id, str(staging))
        staged_ready.append(settle([version]))  # the app loads and merges it while the round evaluates
        final = versions.commit(staging, version)  # the round registers it, the gate promotes it
        model_versions.register_version(db, version, "policy", ctx.server.live_version, "dpo", round_id, str(final), {})
        round_records.finish_round(db, round_id, "succeeded", version=version)
        gate_swaps.append(promote(version))
        time.sleep(0.5 + 0.37 * i)
    for i, version in enumerate(cold):
        model_versions.register_version(db, version, "policy", "v1", "dpo", None, str(adapters[version]), {})
        cold_swaps.append(promote(version))
        settle([version])
        time.sleep(0.5 + 0.37 * i)
    stop.set()
    for t in threads:
        t.join(60)
    peak_rows = ctx.server._batcher.peak_rows
    shutdown(ctx, demo)

    answer_s = statistics.median(done - asked for asked, _, done, _ in records)

    start = time.perf_counter()
    fresh = PolicyServer(base_path)
    fresh.load_adapter("v1", adapters["v1"])
    fresh.generate([{"role": "user", "content": "hi"}], sampling=SamplingParams(max_new_tokens=ANSWER_TOKENS),
                   version="v1")
    restart = time.perf_counter() - start
    common = {"requests": len(records), "failed_requests": len(failures), "failures": failures[:3],
              "versions_seen": sorted({v for *_, v in records}), "answer_tokens": ANSWER_TOKENS,
              "answer_s_median": round(answer_s, 3), "chat_clients": len(threads),
              "chat_rows_decoded_together_max": peak_rows}

    def summary(swaps):
        out = {"promotions": len(swaps)}
        for key in ("live", "first_token", "complete", "any_client_complete"):
            values = [s[key] for s in swaps]
            out[f"{key}_s_median"] = round(statistics.median(values), 3)
            out[f"{key}_s_max"] = round(max(values), 3)
        return out

    return [
        Result(name="hot_swap", metric="s from promotion to a complete answer from it (preloaded, median)",
               value=statistics.median(s["complete"] for s in warm_swaps), baseline=restart,
               baseline_label="fresh load of base + adapter, first answer", unit="s", target="≤ 1 s, 0 failures",
               details={"preloaded_and_merged": preloaded, "adapters": "all 30 layers, r16", **summary(warm_swaps),
                        **common}),
        Result(name="hot_swap_gate",
               metric="s from promotion to a complete answer from it (the gate right after a round, adapter "
                      "staged during evaluation, median)",
               value=statistics.median(s["complete"] for s in gate_swaps), baseline=restart,
               baseline_label="fresh load of base + adapter, first answer", unit="s", target="≤ 1 s, 0 failures",
               details={"adapters": "top 8 layers, r16 (DPO/SFT round defaults)",
                        "staged_loaded_and_merged": all(staged_ready), **summary(gate_swaps), **common}),
        Result(name="hot_swap_cold",
               metric="s from promotion to a complete answer from it (a version not loaded before, "
                      "registered + promoted at once, median)",
               value=statistics.median(s["complete"] for s in cold_swaps), baseline=restart,
               baseline_label="fresh load of base + adapter, first answer", unit="s", target="≤ 1 s, 0 failures",
               details={"adapters": "all 30 layers, r16", **summary(cold_swaps), **common}),
    ]
