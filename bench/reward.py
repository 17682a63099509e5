"""Reward model, time to quality: rankloop's reward-model training
(`align.reward.train_reward_model` with the product defaults) against TRL `RewardTrainer` with
its defaults (full fine-tune of the sequence classifier), one full epoch over the same 256 real
pairs from ../shared/data, the same max_length and 8 pairs per optimizer step, both with 2 torch
threads and rankloop's allocator setting. Wall time counts loading, tokenising and training.

Quality: each side's accuracy (chosen scored above rejected) on the same 300 pairs neither saw,
with exact intervals, and the paired difference with its interval
(`annotations.intervals.paired_difference`). The target: faster, and at least as accurate within
that interval.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from bench.common import Result, accuracy_comparison, epoch_details
from bench.dpo import MAX_LENGTH, _pairs

BATCH = 8


def _trl_defaults(base_path: Path, train: list[dict], out_dir: Path):
    """TRL RewardTrainer as its docs start it: the whole model trained, TRL's own tokenisation.
    One change: TRL's bf16=True default only where the CPU has bf16 (as rankloop's precision);
    on a CPU without it, bf16 autocast runs a training step about 26x slower than fp32."""
    from trl import RewardConfig, RewardTrainer

    from align.models import load_tokenizer
    from align.reward import load_sequence_classifier
    from align.training import as_dataset, cpu_has_bf16

    start = time.perf_counter()
    tokenizer = load_tokenizer(base_path)
    model = load_sequence_classifier(base_path, tokenizer)
    args = RewardConfig(output_dir=str(out_dir), per_device_train_batch_size=BATCH, max_length=MAX_LENGTH,
                        num_train_epochs=1, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, bf16=cpu_has_bf16(),
                        disable_tqdm=True)
    trainer = RewardTrainer(model=model, args=args, train_dataset=as_dataset(train), processing_class=tokenizer)
    trainer.train()
    # TRL drops the pairs longer than max_length (it does not truncate them)
    return time.perf_counter() - start, trainer.model, tokenizer, len(trainer.train_dataset)


def _rankloop(base_path: Path, train: list[dict], out_dir: Path):
    from align.reward import RewardConfig, load_reward_model, train_reward_model

    config = RewardConfig(max_length=MAX_LENGTH, threads=2, epochs=1)  # the product's defaults otherwise
    assert config.batch_size * config.gradient_accumulation_steps == BATCH
    start = time.perf_counter()
    train_reward_model(base_path, train, config, out_dir)
    seconds = time.perf_counter() - start
    model, tokenizer = load_reward_model(base_path, out_dir)
    return seconds, model, tokenizer, config


def run(base_path: Path, quick: bool = False) -> list[Result]:
    import torch

    from align.evaluate import reward_correct
    from align.training import tune_malloc

    torch.set_num_threads(2)
    tune_malloc()
    train, heldout = _pairs(quick)
    work = Path(tempfile.mkdtemp(prefix="rankloop-rm-bench-"))

    trl_s, trl_model, tokenizer, trl_pairs = _trl_defaults(base_path, train, work / "trl")
    print(f"TRL RewardTrainer: {trl_s:.0f} s for {trl_pairs} pairs", flush=True)
    trl_model.eval()
    with torch.no_grad():
        trl_correct = reward_correct(trl_model, tokenizer, heldout, 8, MAX_LENGTH)
    del trl_model

    ours_s, model, tokenizer, config = _rankloop(base_path, train, work / "ours")
    print(f"rankloop reward model: {ours_s:.0f} s for {len(train)} pairs", flush=True)
    with torch.no_grad():
        ours_correct = reward_correct(model, tokenizer, heldout, 8, MAX_LENGTH)
    shutil.rmtree(work, ignore_errors=True)

    quality = accuracy_comparison(ours_correct, trl_correct)
    return [Result(
        name="reward_model_epoch", metric=f"seconds for one reward-model epoch on {len(train)} real pairs (max_length "
                                          f"{MAX_LENGTH}, {BATCH} per step), accuracy on {len(heldout)} unseen pairs",
        value=ours_s, baseline=trl_s, baseline_label="TRL 1.16 RewardTrainer defaults, full fine-tune",
        unit="s", higher_is_better=False, target="faster, at least as accurate within the paired interval",
        details=epoch_details(quality, len(train), ours_s, trl_pairs, trl_s, config, ("epochs",)),
    )]
