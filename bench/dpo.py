"""DPO throughput: pairs/s of rankloop's DPO training (`align.dpo.train_dpo` with the product
defaults) against TRL `DPOTrainer` with its defaults (full fine-tune, the reference a frozen
copy of the model), on the same real pairs from ../shared/data, the same max_length and the
same 4 pairs per optimizer step (TRL 4 at once, rankloop 2 x 2 accumulated), both with 2 torch threads. Wall time counts everything each side does
for those pairs: loading the model, tokenising, any reference pre-pass, the optimizer steps.

Quality, at equal pairs seen: each side's DPO implicit-reward accuracy on the same 400 unseen
pairs (its own reference: the base for both), with its binomial standard error. On so few
pairs both stay near chance; the figure says that neither side buys its speed with quality,
not that either has learned much.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import REPO, Result

MAX_LENGTH = 256
BATCH = 4


def _pairs(quick: bool) -> tuple[list[dict], list[dict]]:
    """Train rows and unseen rows, split by the store as a round would.

    The unseen rows are the store's held-out split (103 pairs) topped up with training-split
    pairs beyond the ones trained on, so that accuracies compare with a standard error near
    0.025 rather than 0.05."""
    from annotations import open_db, training_data
    from annotations.formats import import_file
    from align.training import preference_rows

    home = Path(tempfile.mkdtemp(prefix="rankloop-dpo-bench-"))
    db = open_db(home / "rankloop.db")
    import_file(db, REPO.parent / "shared" / "data" / "hh-rlhf-harmless-dev.jsonl.gz", "hh")
    train = preference_rows(training_data.select_pairs(db, None, "train"))
    heldout = preference_rows(training_data.select_pairs(db, None, "heldout"))
    n_train, n_eval = (16, 32) if quick else (64, 400)
    unseen = (heldout + train[n_train:])[:n_eval]
    return train[:n_train], unseen


def _accuracy(policy, tokenizer, heldout, reference=None) -> float:
    """Implicit-reward accuracy; `reference` None means the policy with its adapter disabled."""
    from align import evaluate

    chosen, rejected = evaluate.pair_logprobs(policy, tokenizer, heldout, 8, MAX_LENGTH)
    if reference is None:
        with evaluate.using_version(policy, "base"):
            ref_chosen, ref_rejected = evaluate.pair_logprobs(policy, tokenizer, heldout, 8, MAX_LENGTH)
    else:
        ref_chosen, ref_rejected = evaluate.pair_logprobs(reference, tokenizer, heldout, 8, MAX_LENGTH)
    return ((chosen - ref_chosen) > (rejected - ref_rejected)).float().mean().item()


def _trl_defaults(base_path: Path, train: list[dict], out_dir: Path):
    """TRL DPOTrainer as its docs start it: full model, reference copied by the trainer."""
    from trl import DPOConfig, DPOTrainer

    from align.models import load_causal_lm, load_tokenizer
    from align.training import as_dataset

    start = time.perf_counter()
    tokenizer = load_tokenizer(base_path)
    model = load_causal_lm(base_path)
    args = DPOConfig(output_dir=str(out_dir), per_device_train_batch_size=BATCH, max_length=MAX_LENGTH,
                     num_train_epochs=1, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
                     disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=as_dataset(train), processing_class=tokenizer)
    trainer.train()
    # with its default keep_start truncation TRL drops pairs whose prompt alone fills max_length
    return time.perf_counter() - start, trainer.model, tokenizer, len(trainer.train_dataset)


def _rankloop(base_path: Path, train: list[dict], out_dir: Path):
    from align.dpo import DPORoundConfig, train_dpo
    from align.models import load_policy, load_tokenizer

    config = DPORoundConfig(max_length=MAX_LENGTH, threads=2)  # the product's defaults otherwise
    assert config.batch_size * config.gradient_accumulation_steps == BATCH  # the same optimizer batch as TRL's
    start = time.perf_counter()
    train_dpo(base_path, train, config, out_dir)
    seconds = time.perf_counter() - start
    return seconds, load_policy(base_path, {"new": out_dir}), load_tokenizer(base_path), config


def run(base_path: Path, quick: bool = False) -> list[Result]:
    import torch

    from align.models import load_causal_lm, using_version

    from align.training import tune_malloc

    torch.set_num_threads(2)
    # rankloop's allocator setting for both sides, so that the ratio is the training's alone
    # (without it TRL's side runs about 1.5x slower: 0.29 instead of 0.46 pairs/s)
    tune_malloc()
    train, heldout = _pairs(quick)
    work = Path(tempfile.mkdtemp(prefix="rankloop-dpo-bench-"))

    trl_s, trl_model, tokenizer, trl_pairs = _trl_defaults(base_path, train, work / "trl")
    trl_model.eval()
    reference = load_causal_lm(base_path).eval()
    with torch.no_grad():
        trl_acc = _accuracy(trl_model, tokenizer, heldout, reference)
    del trl_model, reference

    ours_s, policy, tokenizer, config = _rankloop(base_path, train, work / "ours")
    policy.eval()
    with torch.no_grad(), using_version(policy, "new"):
        ours_acc = _accuracy(policy, tokenizer, heldout)
    shutil.rmtree(work, ignore_errors=True)

    n, m = len(train), len(heldout)
    stderr = round(math.sqrt(0.25 / m), 3)
    return [Result(
        name="dpo_throughput", metric=f"pairs/s, DPO on {n} real pairs (max_length {MAX_LENGTH}, {BATCH} per step)",
        value=n / ours_s, baseline=trl_pairs / trl_s, baseline_label="TRL DPOTrainer defaults, full fine-tune",
        unit="pairs/s", higher_is_better=True, target="≥ 4× (stretch ≥ 1 pair/s), equal held-out accuracy",
        details={"rankloop_s": round(ours_s, 1), "trl_s": round(trl_s, 1), "trl_pairs_trained": trl_pairs,
                 "rankloop_heldout_accuracy": round(ours_acc, 3), "trl_heldout_accuracy": round(trl_acc, 3),
                 "heldout_pairs": m, "accuracy_stderr_at_0.5": stderr,
                 "rankloop_config": {k: getattr(config, k) for k in (
                     "batch_size", "gradient_accumulation_steps", "lora_top_layers", "lora_r", "packed", "precision",
                     "precompute_ref_log_probs", "learning_rate",
                     "max_length")}},
    )]
