"""Memory: peak RSS of the app serving the live version with its parent loaded (the arena's
pair), both merged into serving copies (adapters on all layers: the largest copies), and
prefetching 4 items (K=4, ~500-token prompts), and of the worker during a DPO round, on the
default model. Baseline: a process that only loads the base model and answers once."""

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
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    log = open(home / "round.log", "w+b")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    peak = 0.0
    while process.poll() is None:  # VmHWM only grows: the last reading is the peak (to within 0.1 s)
        try:
            peak = max(peak, peak_rss_mib(process.pid))
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.1)
    if process.wait() != 0:
        log.seek(0)
        raise RuntimeError(f"the DPO round failed: {log.read().decode(errors='replace')[-2000:]}")
    return peak


def run(base_path: Path, quick: bool = False) -> list[Result]:
    home = Path(tempfile.mkdtemp(prefix="rankloop-memory-"))
    adapters = {name: str(make_adapter(base_path, home / "versions" / name, seed=i))
                for i, name in enumerate(("v1", "v2"))}
    baseline = _python(BASELINE_SCRIPT, base_path)["peak_mib"]
    app = _python(APP_SCRIPT, home, base_path, json.dumps(adapters))
    started = time.perf_counter()
    worker_home = Path(tempfile.mkdtemp(prefix="rankloop-memory-worker-"))
    worker_peak = _worker_peak(worker_home, base_path, quick)
    return [
        Result(name="memory_app", metric="peak RSS, app (live + parent loaded)", value=app["peak_mib"],
               baseline=baseline, baseline_label="base model alone, one answer", unit="MiB", target="≤ 2.5 GiB",
               details={"merged_serving_copies": app["merged"], "adapters": "all 30 layers, r16",
                        "note": "ratio < 1 means the app needs more than the bare model"}),
        Result(name="memory_worker", metric="peak RSS, worker during a DPO round", value=worker_peak,
               baseline=baseline, baseline_label="base model alone, one answer", unit="MiB", target="≤ 6 GiB",
               details={"dpo_round_seconds": round(time.perf_counter() - started, 1)}),
    ]
