"""DPO, time to quality: rankloop's DPO round (`align.dpo.train_dpo` with the product defaults)
against TRL `DPOTrainer` with its defaults (full fine-tune, the reference a frozen copy of the
model), one full epoch over the same 256 real pairs from ../shared/data, the same max_length and
the same 4 pairs per optimizer step (TRL 4 at once, rankloop 2 x 2 accumulated), both with 2
torch threads. Wall time counts everything each side does for those pairs: loading the model,
tokenising, any reference pre-pass, the optimizer steps.

Quality: each side's DPO implicit-reward accuracy (its own reference: the base for both) on the
same 300 pairs neither saw, with exact intervals, and the paired difference with its interval
(`annotations.intervals.paired_difference`). The target: faster, and at least as accurate within
that interval.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from bench.common import REPO, Result, accuracy_comparison, epoch_details

MAX_LENGTH = 256
BATCH = 4


def _pairs(quick: bool) -> tuple[list[dict], list[dict]]:
    """Train rows and unseen rows, split by the store as a round would: the first 256 training-split
    pairs, and the store's held-out split (103 pairs) topped up to 300 with training-split pairs
    beyond those (a standard error near 0.03 on each accuracy). 256 pairs, not all 896: on this
    CPU (no native bf16) TRL's DPO epoch takes about 6 s a pair."""
    from annotations import open_db, training_data
    from annotations.formats import import_file
    from align.training import preference_rows

    home = Path(tempfile.mkdtemp(prefix="rankloop-dpo-bench-"))
    db = open_db(home / "rankloop.db")
    import_file(db, REPO.parent / "shared" / "data" / "hh-rlhf-harmless-dev.jsonl.gz", "hh")
    train = preference_rows(training_data.select_pairs(db, None, "train"))
    heldout = preference_rows(training_data.select_pairs(db, None, "heldout"))
    n_train, n_eval = (16, 32) if quick else (256, 300)
    unseen = (heldout + train[n_train:])[:n_eval]
    return train[:n_train], unseen


def _correct(policy, tokenizer, heldout, reference=None) -> list[bool]:
    """For each pair, whether the implicit reward ranks it right; `reference` None means the
    policy with its adapter disabled."""
    from align import evaluate

    chosen, rejected = evaluate.pair_logprobs(policy, tokenizer, heldout, 8, MAX_LENGTH)
    if reference is None:
        with evaluate.using_version(policy, "base"):
            ref_chosen, ref_rejected = evaluate.pair_logprobs(policy, tokenizer, heldout, 8, MAX_LENGTH)
    else:
        ref_chosen, ref_rejected = evaluate.pair_logprobs(reference, tokenizer, heldout, 8, MAX_LENGTH)
    return ((chosen - ref_chosen) > (rejected - ref_rejected)).tolist()


def _trl_defaults(base_path: Path, train: list[dict], out_dir: Path):
    """TRL DPOTrainer as its docs start it: full model, reference copied by the trainer. One
    change: bf16 only where the CPU has it, as for rankloop (bench/reward.py says why)."""
    from trl import DPOConfig, DPOTrainer

    from align.models import load_causal_lm, load_tokenizer
    from align.training import as_dataset, cpu_has_bf16

    start = time.perf_counter()
    tokenizer = load_tokenizer(base_path)
    model = load_causal_lm(base_path)
    args = DPOConfig(output_dir=str(out_dir), per_device_train_batch_size=BATCH, max_length=MAX_LENGTH,
                     num_train_epochs=1, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, bf16=cpu_has_bf16(),
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
    print(f"TRL DPOTrainer: {trl_s:.0f} s for {trl_pairs} pairs", flush=True)
    trl_model.eval()
    reference = load_causal_lm(base_path).eval()
    with torch.no_grad():
        trl_correct = _correct(trl_model, tokenizer, heldout, reference)
    del trl_model, reference

    ours_s, policy, tokenizer, config = _rankloop(base_path, train, work / "ours")
    print(f"rankloop DPO: {ours_s:.0f} s for {len(train)} pairs", flush=True)
    policy.eval()
    with torch.no_grad(), using_version(policy, "new"):
        ours_correct = _correct(policy, tokenizer, heldout)
    shutil.rmtree(work, ignore_errors=True)

    quality = accuracy_comparison(ours_correct, trl_correct)
    return [Result(
        name="dpo_epoch", metric=f"seconds for one DPO epoch on {len(train)} real pairs (max_length {MAX_LENGTH}, "
                                 f"{BATCH} per step), accuracy on {len(heldout)} unseen pairs",
        value=ours_s, baseline=trl_s, baseline_label="TRL 1.16 DPOTrainer defaults, full fine-tune",
        unit="s", higher_is_better=False, target="faster, at least as accurate within the paired interval",
        details=epoch_details(quality, len(train), ours_s, trl_pairs, trl_s, config, ("precompute_ref_log_probs",)),
    )]
