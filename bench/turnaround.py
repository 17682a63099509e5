"""Round turnaround: 200 fresh real pairs → a DPO round with the product defaults (`python -m
align round --method dpo`, a separate process as the worker runs it: load, train, evaluate,
register) → promoted → the first answer from the app's policy server, which watches the store
all along as the app does (it loads and merges the round's staged adapter while the round
evaluates). Wall time against the 5-minute target; the round's own stage times come from its
log.

There is no same-run baseline here: the previous defaults (unpacked, fp32, all layers) need
about 20 minutes for this round, too long for `make bench`; the DPO-throughput figure
(`bench/dpo.py`) compares the training itself with TRL's defaults in the same run.
"""

from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import REPO, Result

TARGET_S = 300.0
FRESH_PAIRS = 200


def run(base_path: Path, quick: bool = False) -> list[Result]:
    from annotations import model_versions, open_db, round_records, training_data
    from annotations.formats import import_file
    from app.handlers import AppContext
    from app.live import LiveWatcher
    from app.serving import PolicyServer, SamplingParams

    home = Path(tempfile.mkdtemp(prefix="rankloop-turnaround-"))
    db_path = home / "rankloop.db"
    db = open_db(db_path)
    source = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-dev.jsonl.gz"
    lines = gzip.open(source, "rt").read().splitlines()
    wanted = 40 if quick else FRESH_PAIRS
    subset, train = [], 0
    for line in lines:  # enough rows that the store's train split holds `wanted` pairs
        subset.append(line)
        train = len(subset) * 9 // 10
        if train >= wanted + 8:
            break
    (home / "pairs.jsonl").write_text("\n".join(subset) + "\n")
    import_file(db, home / "pairs.jsonl", "hh")
    pairs = training_data.select_pairs(db, None, "train")
    heldout = training_data.select_pairs(db, None, "heldout")
    db.close()

    # The app's side, running before the round as it would: a server and its live watcher.
    ctx = AppContext(db_path=db_path, server=PolicyServer(base_path))
    ctx.live = LiveWatcher(ctx, poll_seconds=0.1).start()
    hello = [{"role": "user", "content": "Hello!"}]
    list(ctx.server.stream(hello, SamplingParams(max_new_tokens=16)))  # a running app has answered before
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    command = [sys.executable, "-m", "align", "--db", str(db_path), "round", "--method", "dpo", "--base",
               str(base_path), "--set", "threads=2"]
    provisional, merged_provisional, watching = set(), set(), threading.Event()

    def watch():  # what the app holds of the round's adapter before the round registers it
        while not watching.wait(0.2):
            staged = ctx.server.provisional_versions()
            provisional.update(staged)
            merged_provisional.update(set(staged) & set(ctx.server.merged_versions()))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    log = [(time.perf_counter() - start, line.rstrip()) for line in process.stdout]
    process.wait()
    round_s = time.perf_counter() - start
    watching.set()
    watcher.join()
    if process.returncode != 0:
        ctx.live.stop()
        raise RuntimeError("the round failed:\n" + "\n".join(line for _, line in log[-40:]))
    db = open_db(db_path)
    version = model_versions.list_versions(db, "policy")[-1]["version"]
    auto = (model_versions.get_live_version(db) or {}).get("version") == version
    if not auto:
        model_versions.promote(db, version)
    rounds = round_records.list_rounds(db, limit=1)
    db.close()

    swap_start = time.perf_counter()  # the round has registered and the gate promoted by now
    deadline = time.monotonic() + 60
    while ctx.server.live_version != version and time.monotonic() < deadline:
        time.sleep(0.005)
    answer = list(ctx.server.stream(hello, SamplingParams(max_new_tokens=16)))
    swap_s = time.perf_counter() - swap_start
    ctx.live.stop()
    if answer[-1][1] != version:
        raise RuntimeError(f"the app answered with {answer[-1][1]}, not the new version {version}")

    total = round_s + swap_s
    details = {"train_pairs": len(pairs), "heldout_pairs": len(heldout), "round_process_s": round(round_s, 1),
               "swap_and_first_answer_s": round(swap_s, 2), "promoted_by_gate": auto,
               "loaded_while_evaluating": version in provisional, "merged_while_evaluating": version in merged_provisional,
               "stages_s": _stage_times(log)}
    if rounds:
        metrics = rounds[0].get("metrics") or {}
        details.update({k: metrics[k] for k in ("heldout_implicit_accuracy", "kl_to_base", "train_runtime")
                        if k in metrics})
    return [Result(
        name="round_turnaround", metric=f"s from {len(pairs)} fresh pairs to a live DPO version",
        value=total, baseline=TARGET_S, baseline_label="the 5-minute target (no same-run baseline, see bench/turnaround.py)",
        unit="s", target="≤ 300 s", details=details,
    )]


def _stage_times(log: list[tuple[float, str]]) -> dict:
    """Where the round process spent its time, from when its log lines arrived: start-up and
    model loading, training (first tokenising line to the last step line), evaluation and
    registration (to the 'registered' line)."""
    def first(pattern, default=None):
        return next((t for t, line in log if re.search(pattern, line)), default)

    def last(pattern, default=None):
        return next((t for t, line in reversed(log) if re.search(pattern, line)), default)

    train_start, train_end, registered = first(r"Tokenizing train"), last(r"step \d+/\d+"), first(r"registered v")
    if None in (train_start, train_end, registered):
        return {}
    return {"startup": round(train_start, 1), "train": round(train_end - train_start, 1),
            "evaluate_and_register": round(registered - train_end, 1)}
