"""Complete answers: the share of the candidates annotators see that end by themselves at
end-of-turn, and what that costs per item.

Both sides run the real prefetcher (`app.prefetch.Prefetcher`) over a fresh store holding the
same prompts as K=4 ranking items: 12 of the demo prompts and 12 multi-turn prompts of the
shared hh-rlhf sample (a fixed random draw). Baseline: the settings before answers were made
complete (96 new tokens, no answer instruction, cut-off answers kept). rankloop: the project's
default settings (`app.handlers.DEFAULT_SETTINGS`: the token budget, the answer instruction,
and cut-off answers sampled again). The figure is the share of stored candidates not marked
truncated, with its exact 95% interval; the time per item is the prefetcher's wall time over
the items.
"""

from __future__ import annotations

import gzip
import json
import random
import tempfile
import time
from pathlib import Path

from bench.common import REPO, Result

K = 4
DEMO = REPO / "app" / "demo_prompts.jsonl"
HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-dev.jsonl.gz"


def prompts(n_each: int) -> list[list[dict]]:
    """`n_each` demo prompts and `n_each` hh prompts (every turn but the last reply)."""
    from annotations.formats import parse_hh_transcript

    from annotations.store import canonical_messages

    rows = [json.loads(line) for line in DEMO.read_text().splitlines()]
    out = [canonical_messages(row.get("messages") or row["prompt"]) for row in rows][:n_each]
    if HH.exists():
        transcripts = [json.loads(line)["chosen"] for line in gzip.open(HH, "rt", encoding="utf-8")]
        random.Random(0).shuffle(transcripts)
        for text in transcripts:
            try:
                messages = parse_hh_transcript(text)[:-1]
            except Exception:  # a degenerate transcript: the importer skips these too
                continue
            if messages and messages[-1]["role"] == "user" and all(m["content"].strip() for m in messages):
                out.append(messages)
            if len(out) == 2 * n_each:
                break
    return out


def fill(base_path: Path, messages: list[list[dict]], settings: dict, server) -> tuple[list[int], float]:
    """Run the prefetcher over `messages` as K=4 items under `settings`; returns (each stored
    candidate's truncated flag, seconds per item)."""
    from annotations import open_db, store
    from app.prefetch import Prefetcher

    db = open_db(Path(tempfile.mkdtemp(prefix="rankloop-bench-")) / "rankloop.db")
    for key, value in settings.items():
        store.set_setting(db, key, value)
    ids = [store.add_prompt(db, m)[0] for m in messages]
    store.queue_items(db, ids, mode="ranking", k=K)
    prefetcher = Prefetcher(lambda: db, server, target_ready=len(ids) + 1)
    start = time.perf_counter()
    while prefetcher.fill_once(db):
        pass
    seconds = time.perf_counter() - start
    flags = [r[0] for r in db.execute("SELECT truncated FROM candidates")]
    db.close()
    return flags, seconds / len(ids)


def run(base_path: Path, quick: bool = False) -> list[Result]:
    import torch

    from annotations.intervals import accuracy
    from app.handlers import DEFAULT_SETTINGS
    from app.serving import PolicyServer

    torch.set_num_threads(2)
    server = PolicyServer(base_path, dtype="auto")
    messages = prompts(4 if quick else 12)
    before = {"sampling": {**DEFAULT_SETTINGS["sampling"], "max_new_tokens": 96}, "answer_instruction": "",
              "exclude_truncated": False}
    after = {key: DEFAULT_SETTINGS[key] for key in ("sampling", "answer_instruction", "exclude_truncated")}
    old_flags, old_seconds = fill(base_path, messages, before, server)
    new_flags, new_seconds = fill(base_path, messages, after, server)
    old = accuracy(old_flags.count(0), len(old_flags))
    new = accuracy(new_flags.count(0), len(new_flags))
    return [Result(
        name="complete_answers", metric=f"share of K={K} candidates ending at end-of-turn", value=new["accuracy"],
        baseline=old["accuracy"], baseline_label="96 tokens, no instruction, cut-offs kept", unit="",
        higher_is_better=True, target="≥ 0.90",
        details={"items": len(messages), "answers": len(new_flags),
                 "complete_95_interval": f"[{new['low']:.3f}, {new['high']:.3f}]",
                 "baseline_95_interval": f"[{old['low']:.3f}, {old['high']:.3f}]",
                 "s_per_item": round(new_seconds, 1), "baseline_s_per_item": round(old_seconds, 1),
                 "max_new_tokens": after["sampling"]["max_new_tokens"],
                 "instruction": after["answer_instruction"], "cut_offs_sampled_again": after["exclude_truncated"],
                 "serving_dtype": server.dtype},
    )]
