"""Memory: peak RSS of the app serving the live version with its parent loaded (the arena's
pair), both merged into serving copies (adapters on all layers: the largest copies), and
prefetching 4 items (K=4, ~500-token prompts), and of the worker during a DPO round, on the
default model. Baseline: a process that only loads the base model and answers once.

Then the worker during a round of every method at its documented recipe (docs/training.md:
`RECIPES`), on a store holding only the longest real pairs, so that every batch is as long as
the recipe lets one be: the peak a full round reaches when its longest batch comes (a
reward-model round of the recipe reached 13.3 GB at step 165 of 224 before the activation
budget). Each round runs 2 steps, then its evaluation and registration as usual (the
evaluation's own peak is part of the figure); the PPO round trains against the reward model
the rm round made, promoted for it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO, Result, make_adapter, peak_rss_mib

# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child of
# a large process (make bench runs every benchmark in one) would report its parent's peak.
PEAK = """
def PEAK():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""

APP_SCRIPT = PEAK + """
import json, os, sys
from pathlib import Path
from annotations import model_versions, store
from app import chat_and_arena as chat
from app.server import create_app, shutdown
home, base, adapters = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
ctx, demo, _, _ = create_app(home, base, threads=2, prefetch=0, demo_prompts=False)
db = ctx.db()
parent = "base"
for name, path in adapters.items():
    model_versions.register_version(db, name, "policy", parent, "dpo", None, path, {})
    parent = name
model_versions.promote(db, "v2")
ctx.live.check()
import time
deadline = time.monotonic() + 120
while not {"v1", "v2"} <= set(ctx.server.merged_versions()) and time.monotonic() < deadline:
    time.sleep(0.1)  # the watcher merges the live version and the other candidate into serving copies
merged = ctx.server.merged_versions()
store.add_user(db, "bench", "annotator", "bench-password")
user = store.get_user(db, "bench")
sampling = {"temperature": 0.7, "top_p": 0.95, "repetition_penalty": 1.1, "max_new_tokens": 32}
for version in ("v2", "v1"):
    list(chat.chat_stream(ctx, user, "Tell me about the sea.", conversation="m", version=version, sampling=sampling))
# what the prefetcher does: the answers of queued items, batched within its token budget
from app.prefetch import Prefetcher
from app.serving import SamplingParams
prompt_ids = [store.add_prompt(db, f"Question {i}: " + "tell me about the sea and the sky, " * 60)[0] for i in range(4)]
store.queue_items(db, prompt_ids, k=4, mode="ranking")
filler = Prefetcher(ctx.db, ctx.server, target_ready=4, sampling=SamplingParams(max_new_tokens=96))
while filler.fill_once(db):
    pass
shutdown(ctx, demo)
print(json.dumps({"peak_mib": PEAK(), "merged": merged}))
"""

BASELINE_SCRIPT = PEAK + """
import json, sys
from app.serving import PolicyServer, SamplingParams
server = PolicyServer(sys.argv[1])
server.generate([{"role": "user", "content": "Tell me about the sea."}], sampling=SamplingParams(max_new_tokens=32))
print(json.dumps({"peak_mib": PEAK()}))
"""


def _python(script: str, *args) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RANKLOOP_ADMIN_PASSWORD": "bench-admin-password"}
    out = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _worker_peak(home: Path, base_path: Path, quick: bool) -> float:
    """Peak RSS of `python -m align round --method dpo` on imported real pairs (or synthetic ones)."""
    from annotations import open_db
    from annotations.formats import import_file

    db = open_db(home / "rankloop.db")
    data = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-dev.jsonl.gz"
    if data.exists():
        import_file(db, data, "hh")
    else:
        rows = [{"prompt": f"question {i}?", "chosen": f"a helpful answer {i}", "rejected": f"no {i}"} for i in range(64)]
        (home / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        import_file(db, home / "pairs.jsonl", "trl")
    db.close()
    steps = 4 if quick else 12
    command = [sys.executable, "-m", "align", "--db", str(home / "rankloop.db"), "round", "--method", "dpo",
               "--base", str(base_path), "--set", f"max_steps={steps}", "--set", "eval_pairs=16",
               "--set", "eval_prompts=4", "--set", "threads=2"]  # otherwise the product's DPO defaults
    return _peak_of(command, home / "round.log", "the DPO round")


def _peak_of(command: list[str], log_path: Path, what: str) -> float:
    """Run `command` (its output to `log_path`) and return its peak RSS in MiB."""
    log = open(log_path, "w+b")
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=log,
                               stderr=subprocess.STDOUT)
    peak = 0.0
    while process.poll() is None:  # VmHWM only grows: the last reading is the peak (to within 0.1 s)
        try:
            peak = max(peak, peak_rss_mib(process.pid))
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.1)
    if process.wait() != 0:
        log.seek(0)
        raise RuntimeError(f"{what} failed: {log.read().decode(errors='replace')[-2000:]}")
    return peak


# docs/training.md, "The pipeline that works" (rm, sft, dpo) and the methods' defaults (kto, ppo)
RECIPES = {
    "rm": ["epochs=2", "max_length=384", "threads=2"],
    "sft": ["sft_data=chosen", "parent=base", "max_length=256", "eval_prompts=48", "threads=2"],
    "dpo": ["max_length=256", "learning_rate=2e-4", "eval_prompts=48", "threads=2"],
    "kto": ["threads=2"],
    "ppo": [],
}
LONGEST_PAIRS = 96


def _longest_store(home: Path) -> Path:
    """A store of the LONGEST_PAIRS longest real pairs (their own hash split: about a tenth held out)."""
    import gzip

    from annotations import open_db
    from annotations.formats import import_file

    data = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-dev.jsonl.gz"
    lines = sorted(gzip.open(data, "rt").read().splitlines(), key=len, reverse=True)[:LONGEST_PAIRS]
    (home / "longest.jsonl").write_text("\n".join(lines) + "\n")
    db = open_db(home / "rankloop.db")
    import_file(db, home / "longest.jsonl", "hh")
    db.close()
    return home / "rankloop.db"


def _round_peak(db_path: Path, base_path: Path, method: str, settings: list[str]) -> dict:
    """Peak RSS (MiB) of `python -m align round --method METHOD` with `settings`, and its seconds."""
    command = [sys.executable, "-m", "align", "--db", str(db_path), "round", "--method", method, "--base",
               str(base_path)] + [part for kv in settings for part in ("--set", kv)]
    started = time.perf_counter()
    peak = _peak_of(command, db_path.parent / f"{method}.log", f"the {method} round")
    return {"peak_mib": round(peak), "seconds": round(time.perf_counter() - started, 1)}


def method_peaks(base_path: Path, quick: bool = False) -> dict[str, dict]:
    """Each method's worker peak at its recipe, 2 steps on the longest pairs."""
    from annotations import model_versions, open_db

    db_path = _longest_store(Path(tempfile.mkdtemp(prefix="rankloop-memory-methods-")))
    peaks = {}
    for method, recipe in RECIPES.items():
        steps = ["steps=2"] if method == "ppo" else ["max_steps=2"]
        peaks[method] = {**_round_peak(db_path, base_path, method, recipe + steps), "recipe": recipe}
        if method == "rm":  # the PPO round trains against it, and the gates judge with it
            db = open_db(db_path)
            if model_versions.get_live_version(db, "reward") is None:
                model_versions.promote(db, model_versions.list_versions(db, "reward")[0]["version"])
            db.close()
        if quick:
            break
    return peaks


def run(base_path: Path, quick: bool = False) -> list[Result]:
    home = Path(tempfile.mkdtemp(prefix="rankloop-memory-"))
    adapters = {name: str(make_adapter(base_path, home / "versions" / name, seed=i))
                for i, name in enumerate(("v1", "v2"))}
    baseline = _python(BASELINE_SCRIPT, base_path)["peak_mib"]
    app = _python(APP_SCRIPT, home, base_path, json.dumps(adapters))
    started = time.perf_counter()
    worker_home = Path(tempfile.mkdtemp(prefix="rankloop-memory-worker-"))
    worker_peak = _worker_peak(worker_home, base_path, quick)
    methods = method_peaks(base_path, quick)
    return [
        Result(name="memory_app", metric="peak RSS, app (live + parent loaded)", value=app["peak_mib"],
               baseline=baseline, baseline_label="base model alone, one answer", unit="MiB", target="≤ 2.5 GiB",
               details={"merged_serving_copies": app["merged"], "adapters": "all 30 layers, r16",
                        "note": "ratio < 1 means the app needs more than the bare model"}),
        Result(name="memory_worker", metric="peak RSS, worker during a DPO round", value=worker_peak,
               baseline=baseline, baseline_label="base model alone, one answer", unit="MiB", target="≤ 6 GiB",
               details={"dpo_round_seconds": round(time.perf_counter() - started, 1)}),
        Result(name="memory_methods", metric=f"peak RSS, worker, the worst method at its documented recipe "
                                             f"({LONGEST_PAIRS} longest real pairs, 2 steps + evaluation)",
               value=max(m["peak_mib"] for m in methods.values()), baseline=baseline,
               baseline_label="base model alone, one answer", unit="MiB", target="≤ 6 GiB for every method",
               details={"methods": methods, "activation_budget_mib": 1024}),
    ]
