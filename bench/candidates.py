"""Candidates: K=4 sampled answers of up to 96 new tokens per item.

Baseline: the naive path, four separate `model.generate` calls, fp32. rankloop: the serving
path as the prefetcher uses it (`PolicyServer.generate_many`: the K answers of
`Prefetcher.batch_items` items in one batch), in the configuration the app uses. Same
prompts, same sampling settings; answers may stop early at EOS, so tokens are counted too.
The time of one item alone (one batch of K) is reported beside it: what an annotator waits
when the prefetch buffer is empty.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.common import Result

PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for staying focused while studying.",
    "How do I make a cup of green tea?",
    "Write a short thank-you note to a teacher.",
    "What should I pack for a weekend hiking trip?",
    "Suggest three names for a small bakery.",
]
K, MAX_NEW = 4, 96


def naive_generate(model, ids, pad_token_id):
    import torch

    with torch.inference_mode():
        return model.generate(**ids, max_new_tokens=MAX_NEW, do_sample=True, temperature=0.8, top_p=0.95,
                              repetition_penalty=1.1, pad_token_id=pad_token_id)


def run(base_path: Path, quick: bool = False, dtype: str = "auto") -> list[Result]:
    import torch

    from app.prefetch import BATCH_ITEMS
    from app.serving import PolicyServer, SamplingParams, on_model_thread

    torch.set_num_threads(2)
    prompts = PROMPTS[:2] if quick else PROMPTS
    sampling = SamplingParams(temperature=0.8, top_p=0.95, repetition_penalty=1.1, max_new_tokens=MAX_NEW)
    naive = PolicyServer(base_path)  # fp32, used through plain generate() below
    server = PolicyServer(base_path, dtype=dtype)
    tokenizer, model = naive.tokenizer, naive.model
    server.generate([{"role": "user", "content": "warm up"}], n=K, sampling=SamplingParams(max_new_tokens=4))

    naive_s, naive_tokens = 0.0, 0
    for i, text in enumerate(prompts):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True).to(naive.device)
        for k in range(K):
            torch.manual_seed(1000 * i + k)
            start = time.perf_counter()
            out = on_model_thread(naive_generate, model, ids, tokenizer.pad_token_id)  # where served work runs too
            naive_s += time.perf_counter() - start
            naive_tokens += out.shape[1] - ids["input_ids"].shape[1]

    items = BATCH_ITEMS  # the bench's short prompts stay far inside the prefetcher's token budget
    served_s, served_tokens = 0.0, 0
    for i in range(0, len(prompts), items):
        start = time.perf_counter()
        groups = server.generate_many([[{"role": "user", "content": text}] for text in prompts[i:i + items]], n=K,
                                      sampling=sampling, seed=i)
        served_s += time.perf_counter() - start
        served_tokens += sum(len(tokenizer(a.text)["input_ids"]) for group in groups for a in group)

    alone_s = 0.0
    for i, text in enumerate(prompts):
        start = time.perf_counter()
        server.generate([{"role": "user", "content": text}], n=K, sampling=sampling, seed=i)
        alone_s += time.perf_counter() - start

    n = len(prompts)
    return [Result(
        name="candidates", metric=f"s per item (K={K}, ≤{MAX_NEW} new tokens)", value=served_s / n,
        baseline=naive_s / n, baseline_label="4 × generate, fp32", unit="s", target="≥ 5× (stretch 10×)",
        details={"serving_dtype": server.dtype, "items": n, "items_per_batch": items,
                 "one_item_alone_s": round(alone_s / n, 2),
                 "naive_tokens_per_s": round(naive_tokens / naive_s, 1),
                 "served_tokens_per_s": round(served_tokens / served_s, 1)},
    )]
