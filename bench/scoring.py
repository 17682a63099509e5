"""Reward-model scoring: sequences/s of `align.reward.score` with each prompt run once for all
its answers (the default) against the plain path it replaced (each conversation on its own, in
padded batches of 8 in the order given), on the same real hh pairs and the same model, at equal
scores.

Two workloads, both with 2 torch threads, fp32 (this CPU has no native bf16), max_length 384:
- held-out pairs, as the gate and `reward_accuracy` score them: each pair's chosen and rejected
  answer to the same multi-turn prompt;
- items, as the prefetcher scores them for suggestions and uncertainty selection: K=4 answers to
  one prompt (a pair's two answers and the next pair's two, under the first pair's prompt).

Equal scores: the largest absolute difference between the two paths' scores, and whether every
pair is judged the same way. The model is the base with a fresh score head (seeded): speed and
equality do not depend on training.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.common import Result

MAX_LENGTH = 384
BATCH = 8
K = 4


def _rows(n: int) -> list[dict]:
    import tempfile

    from align.training import preference_rows
    from annotations import open_db, training_data
    from annotations.formats import import_file
    from bench.common import REPO

    db = open_db(Path(tempfile.mkdtemp(prefix="rankloop-scoring-bench-")) / "rankloop.db")
    import_file(db, REPO.parent / "shared" / "data" / "hh-rlhf-harmless-dev.jsonl.gz", "hh")
    rows = preference_rows(training_data.select_pairs(db, None, "heldout"))
    rows += preference_rows(training_data.select_pairs(db, None, "train"))
    return rows[:n]


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run(base_path: Path, quick: bool = False) -> list[Result]:
    import torch

    from align.models import load_tokenizer
    from align.reward import answer_text, load_sequence_classifier, score
    from align.training import tune_malloc

    torch.set_num_threads(2)
    tune_malloc()
    rows = _rows(40 if quick else 200)
    tokenizer = load_tokenizer(base_path)
    torch.manual_seed(0)
    model = load_sequence_classifier(base_path, tokenizer).eval()
    prompts = [row["prompt"] for row in rows]
    chosen = [answer_text(row["chosen"]) for row in rows]
    rejected = [answer_text(row["rejected"]) for row in rows]
    n = len(rows)
    results = []

    with torch.inference_mode():
        # pairs: the plain path scored chosen, then rejected (align.evaluate.reward_correct before)
        plain_s, (plain_c, plain_r) = _timed(lambda: (
            score(model, tokenizer, prompts, chosen, BATCH, MAX_LENGTH, shared=False),
            score(model, tokenizer, prompts, rejected, BATCH, MAX_LENGTH, shared=False)))
        shared_s, both = _timed(lambda: score(model, tokenizer, prompts + prompts, chosen + rejected, BATCH,
                                              MAX_LENGTH))
        plain = torch.cat([plain_c, plain_r])
        same_verdicts = int(((both[:n] > both[n:]) == (plain_c > plain_r)).sum())
        results.append(Result(
            name="reward_scoring_pairs",
            metric=f"sequences/s, reward model scoring {2 * n} held-out hh answers ({n} pairs, "
                   f"max_length {MAX_LENGTH})",
            value=2 * n / shared_s, baseline=2 * n / plain_s,
            baseline_label="each conversation apart, padded batches of 8",
            unit="seq/s", higher_is_better=True, target=">= 5x at equal scores",
            details={"quality": f"{same_verdicts}/{n} pairs judged the same; largest score difference "
                                f"{float((both - plain).abs().max()):.1e}",
                     "shared_s": round(shared_s, 1), "plain_s": round(plain_s, 1),
                     "max_abs_score_difference": float((both - plain).abs().max()),
                     "pairs_judged_the_same": f"{same_verdicts}/{n}", "dtype": "float32 (no native bf16 here)"}))

        # items: K answers to one prompt, as the prefetcher scores an item
        items = [(prompts[i], [chosen[i], rejected[i], chosen[i + 1], rejected[i + 1]]) for i in range(0, n - 1, 2)]
        plain_s, plain = _timed(lambda: torch.cat([
            score(model, tokenizer, [p] * K, answers, K, MAX_LENGTH, shared=False) for p, answers in items]))
        shared_s, shared = _timed(lambda: torch.cat([
            score(model, tokenizer, [p] * K, answers, K, MAX_LENGTH) for p, answers in items]))
        m = len(items) * K
        results.append(Result(
            name="reward_scoring_items",
            metric=f"sequences/s, reward model scoring {len(items)} items of K={K} answers (max_length {MAX_LENGTH})",
            value=m / shared_s, baseline=m / plain_s,
            baseline_label="each answer's conversation apart, one batch per item",
            unit="seq/s", higher_is_better=True, target=">= 5x at equal scores",
            details={"quality": f"largest score difference {float((shared - plain).abs().max()):.1e}",
                     "shared_s": round(shared_s, 1), "plain_s": round(plain_s, 1),
                     "max_abs_score_difference": float((shared - plain).abs().max()),
                     "dtype": "float32 (no native bf16 here)"}))
    return results
