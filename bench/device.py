"""Serving figures on whatever device is present: `python -m bench.device [--quick] [--base DIR]`.

Runs the serving paths the app uses, on `app.serving.serving_device("auto")` (the first CUDA
GPU when one is visible, else the CPU), and prints one table; with `--out FILE` it also writes
the figures as JSON. Run it whenever a GPU machine is at hand and put the table in
docs/scaling.md ("Serving on a GPU"). Each figure is a median over repetitions, with its spread.

- candidates: one item's K=4 answers of up to 96 new tokens (`PolicyServer.generate`), and
  `Prefetcher.batch_items` items' answers in one batch (`generate_many`), in s per item and
  generated tokens per second;
- chat: 8 answers of 64 tokens streamed at once through the running chat batch
  (`PolicyServer.stream`): time to the first token, and tokens per second over all of them;
- hot swap: a version never loaded before (r16 on all linear layers), from `set_live` with its
  folder to the first complete 16-token answer from it;
- memory: peak GPU memory allocated (CUDA), else the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

K, MAX_NEW, CHAT_STREAMS, CHAT_TOKENS, SWAP_TOKENS = 4, 96, 8, 64, 16
PROMPTS = ["Explain in two sentences why the sky is blue.", "Give me three tips for staying focused.",
           "How do I make a cup of green tea?", "Suggest three names for a small bakery."]


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "n": len(values)}


def measure(base: Path, quick: bool = False) -> dict:
    import torch

    from app.prefetch import BATCH_ITEMS
    from app.serving import PolicyServer, SamplingParams
    from bench.common import make_adapter, peak_rss_mib

    repeats = 1 if quick else 3
    server = PolicyServer(base, dtype="auto", device="auto")
    device = server.device
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    sampling = SamplingParams(temperature=0.8, top_p=0.95, repetition_penalty=1.1, max_new_tokens=MAX_NEW)
    tokens = lambda text: len(server.tokenizer(text)["input_ids"])  # noqa: E731
    server.generate([{"role": "user", "content": "warm up"}], n=K, sampling=SamplingParams(max_new_tokens=4))

    alone, batched, rates = [], [], []
    for r in range(repeats):
        for i, text in enumerate(PROMPTS[:2] if quick else PROMPTS):
            start = time.perf_counter()
            server.generate([{"role": "user", "content": text}], n=K, sampling=sampling, seed=100 * r + i)
            alone.append(time.perf_counter() - start)
        prompts = [[{"role": "user", "content": p}] for p in PROMPTS[:BATCH_ITEMS]]
        start = time.perf_counter()
        groups = server.generate_many(prompts, n=K, sampling=sampling, seed=r)
        seconds = time.perf_counter() - start
        batched.append(seconds / len(prompts))
        rates.append(sum(tokens(a.text) for g in groups for a in g) / seconds)

    first_tokens, chat_rates = [], []
    chat_sampling = SamplingParams(max_new_tokens=CHAT_TOKENS)
    for _ in range(repeats):
        firsts, counts = [], []
        start = time.perf_counter()

        def ask(i):
            text, first = "", None
            for text, _ in server.stream([{"role": "user", "content": f"Tell me a story about the number {i}."}],
                                         chat_sampling):
                first = first or time.perf_counter() - start
            firsts.append(first or time.perf_counter() - start)
            counts.append(tokens(text))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(CHAT_STREAMS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        chat_rates.append(sum(counts) / (time.perf_counter() - start))
        first_tokens.append(statistics.median(firsts))

    swaps = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            version = f"cold{r}"
            path = make_adapter(base, Path(tmp) / version, seed=r)
            start = time.perf_counter()
            server.set_live(version, path)
            server.generate([{"role": "user", "content": "hi"}], sampling=SamplingParams(max_new_tokens=SWAP_TOKENS))
            swaps.append(time.perf_counter() - start)

    memory = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
              else peak_rss_mib(os.getpid()))
    return {
        "device": str(device), "gpu": gpu, "dtype": server.dtype, "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "base": base.name, "quick": quick,
        "candidates_item_alone_s": spread(alone), "candidates_item_batched_s": spread(batched),
        "candidates_tokens_per_s": spread(rates), "chat_first_token_s": spread(first_tokens),
        "chat_tokens_per_s": spread(chat_rates), "hot_swap_cold_s": spread(swaps),
        "peak_memory_mib": round(memory, 1),
        "memory_kind": "GPU memory allocated (peak)" if device.type == "cuda" else "resident (peak)",
    }


def table(figures: dict) -> str:
    where = figures["gpu"] or f"CPU ({figures['cpu']}, {figures['threads']} threads)"
    rows = [
        (f"candidates: one item, K={K}, ≤{MAX_NEW} new tokens", "candidates_item_alone_s", "s"),
        ("candidates: per item, batched as the prefetcher does", "candidates_item_batched_s", "s"),
        ("candidates: generated tokens per second", "candidates_tokens_per_s", "tok/s"),
        (f"chat: first token, {CHAT_STREAMS} streams at once", "chat_first_token_s", "s"),
        (f"chat: tokens per second over {CHAT_STREAMS} streams", "chat_tokens_per_s", "tok/s"),
        (f"hot swap, never loaded: to a complete {SWAP_TOKENS}-token answer", "hot_swap_cold_s", "s"),
    ]
    lines = [f"{where}, {figures['dtype']}, torch {figures['torch']}, base {figures['base']}", "",
             "| figure | median | min – max | n |", "|---|---|---|---|"]
    for label, key, unit in rows:
        f = figures[key]
        lines.append(f"| {label} | {f['median']:.3g} {unit} | {f['min']:.3g} – {f['max']:.3g} | {f['n']} |")
    lines.append(f"| memory: {figures['memory_kind']} | {figures['peak_memory_mib']:.0f} MiB | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.device", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None, help="base model folder (default: the prepared SmolLM2)")
    parser.add_argument("--quick", action="store_true", help="one repetition (a smoke run)")
    parser.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    from align.models import default_base_path, is_prepared, prepare_base

    base = Path(args.base) if args.base else default_base_path()
    if not args.base and not is_prepared(base):
        prepare_base(base)
    figures = measure(base, quick=args.quick)
    print(table(figures))
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
