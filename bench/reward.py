"""Reward model: pairs/s and held-out accuracy of rankloop's reward-model training
(`align.reward.train_reward_model` with the product defaults) against TRL `RewardTrainer` with
its defaults (full fine-tune of the sequence classifier), on the same real pairs from
../shared/data, the same max_length, 8 pairs per optimizer step and one epoch, both with 2
torch threads and rankloop's allocator setting. Wall time counts loading, tokenising and
training.

Quality: each side's accuracy (chosen scored above rejected) on the same 400 unseen pairs, with
the binomial standard error. After one pass over a few dozen pairs neither side is far from
chance; the full-data figure (896 pairs) is in docs/training.md.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import Result
from bench.dpo import MAX_LENGTH, _pairs

BATCH = 8


def _heldout_accuracy(model, tokenizer, heldout: list[dict]) -> float:
    from align.reward import answer_text, score

    prompts = [row["prompt"] for row in heldout]
    chosen = score(model, tokenizer, prompts, [answer_text(r["chosen"]) for r in heldout], max_length=MAX_LENGTH)
    rejected = score(model, tokenizer, prompts, [answer_text(r["rejected"]) for r in heldout], max_length=MAX_LENGTH)
    return (chosen > rejected).float().mean().item()


def _trl_defaults(base_path: Path, train: list[dict], out_dir: Path):
    """TRL RewardTrainer as its docs start it: the whole model trained, TRL's own tokenisation."""
    from trl import RewardConfig, RewardTrainer

    from align.models import load_tokenizer
    from align.reward import load_sequence_classifier
    from align.training import as_dataset

    start = time.perf_counter()
    tokenizer = load_tokenizer(base_path)
    model = load_sequence_classifier(base_path, tokenizer)
    args = RewardConfig(output_dir=str(out_dir), per_device_train_batch_size=BATCH, max_length=MAX_LENGTH,
                        num_train_epochs=1, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
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

    from align.training import tune_malloc

    torch.set_num_threads(2)
    tune_malloc()
    train, heldout = _pairs(quick)
    work = Path(tempfile.mkdtemp(prefix="rankloop-rm-bench-"))

    trl_s, trl_model, tokenizer, trl_pairs = _trl_defaults(base_path, train, work / "trl")
    trl_model.eval()
    with torch.no_grad():
        trl_acc = _heldout_accuracy(trl_model, tokenizer, heldout)
    del trl_model

    ours_s, model, tokenizer, config = _rankloop(base_path, train, work / "ours")
    with torch.no_grad():
        ours_acc = _heldout_accuracy(model, tokenizer, heldout)
    shutil.rmtree(work, ignore_errors=True)

    n, m = len(train), len(heldout)
    return [Result(
        name="reward_model", metric=f"pairs/s, reward model on {n} real pairs (max_length {MAX_LENGTH}, {BATCH} per step)",
        value=n / ours_s, baseline=trl_pairs / trl_s, baseline_label="TRL RewardTrainer defaults, full fine-tune",
        unit="pairs/s", higher_is_better=True, target="faster at equal held-out accuracy",
        details={"rankloop_s": round(ours_s, 1), "trl_s": round(trl_s, 1), "trl_pairs_trained": trl_pairs,
                 "rankloop_heldout_accuracy": round(ours_acc, 3), "trl_heldout_accuracy": round(trl_acc, 3),
                 "heldout_pairs": m, "accuracy_stderr_at_0.5": round(math.sqrt(0.25 / m), 3),
                 "rankloop_config": {k: getattr(config, k) for k in (
                     "batch_size", "gradient_accumulation_steps", "lora_top_layers", "lora_r", "packed", "precision",
                     "learning_rate", "max_length")}},
    )]
