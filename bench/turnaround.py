"""Round turnaround: 200 fresh real pairs → a DPO round with the product defaults (`python -m
align round --method dpo`, a separate process as the worker runs it: load, train, evaluate,
register) → promoted → the first answer from a policy server that hot-loads it. Wall time
against the 5-minute target; the round's own stage times come from its log.

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
import time
from pathlib import Path

from bench.common import REPO, Result

TARGET_S = 300.0
FRESH_PAIRS = 200


def run(base_path: Path, quick: bool = False) -> list[Result]:
    from annotations import open_db, registry
    from annotations.formats import import_file
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
    pairs = registry.select_pairs(db, None, "train")
    heldout = registry.select_pairs(db, None, "heldout")
    db.close()

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    command = [sys.executable, "-m", "align", "--db", str(db_path), "round", "--method", "dpo", "--base",
               str(base_path), "--set", "threads=2"]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    log = [(time.perf_counter() - start, line.rstrip()) for line in process.stdout]
    process.wait()
    round_s = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError("the round failed:\n" + "\n".join(line for _, line in log[-40:]))
    db = open_db(db_path)
    version = registry.list_versions(db, "policy")[-1]["version"]
    auto = (registry.get_live_version(db) or {}).get("version") == version
    if not auto:
        registry.promote(db, version)
    path = registry.get_version(db, version)["path"]
    rounds = registry.list_rounds(db, limit=1)
    db.close()

    server = PolicyServer(base_path)  # the app's server, already running before the round
    swap_start = time.perf_counter()
    server.set_live(version, Path(path))
    server.generate([{"role": "user", "content": "Hello!"}], sampling=SamplingParams(max_new_tokens=16))
    swap_s = time.perf_counter() - swap_start

    total = round_s + swap_s
    details = {"train_pairs": len(pairs), "heldout_pairs": len(heldout), "round_process_s": round(round_s, 1),
               "swap_and_first_answer_s": round(swap_s, 2), "promoted_by_gate": auto,
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
