"""Reward model: a LoRA-adapted sequence classifier that scores a (prompt, answer) pair.

The base causal LM is loaded as `AutoModelForSequenceClassification` with one label: a fresh
linear `score` head over the last hidden state, read at the last non-pad token. The adapter
is LoRA on the chosen layers plus a full trainable copy of the head (`modules_to_save`), and
TRL's `RewardTrainer` fits it with the pairwise loss -log sigmoid(r_chosen - r_rejected).

Tokenisation is ours, not TRL's, so that training and `score` see exactly the same tokens:
the conversation through the chat template, cut from the left to `max_length` so the answer
(where the score is read) always survives, padded on the right (positions of real tokens do
not move, so padding cannot change a score).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from align.models import check_vocabulary, load_tokenizer
from align.training import (
    Progress,
    TrainingOptions,
    as_dataset,
    attach_progress,
    lora_config,
    save_adapter,
    set_threads,
    train_metrics,
    trainer_arguments,
)

logger = logging.getLogger(__name__)

Messages = list[dict]


@dataclass
class RewardConfig(TrainingOptions):
    """A reward-model round. Defaults fit SmolLM2-135M on a 2-core CPU."""

    learning_rate: float = field(default=2e-4, metadata={"help": "Peak AdamW learning rate of the adapter and head."})
    epochs: float = field(default=2.0, metadata={"help": "Passes over the training pairs (fractions allowed)."})
    batch_size: int = field(default=8, metadata={"help": "Pairs per device per optimizer step."})
    center_rewards_coefficient: float = field(
        default=0.0,
        metadata={"help": "Weight of a penalty pulling mean scores to 0 (0 turns it off; 0.01 is typical)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.center_rewards_coefficient < 0:
            raise ValueError(
                f"center_rewards_coefficient must be 0 (off) or positive, got {self.center_rewards_coefficient}."
            )


# ---------------------------------------------------------------- tokenisation


def conversation_ids(tokenizer, messages: Messages, answer: str, max_length: int, side: str = "left") -> list[int]:
    """Token ids of `messages` followed by the assistant `answer`, cut to `max_length`
    (from the left by default, which keeps the answer's end, where the score is read)."""
    ids = tokenizer.apply_chat_template(
        list(messages) + [{"role": "assistant", "content": answer}], tokenize=True, return_dict=True
    )["input_ids"]
    ids = list(ids)
    if len(ids) > max_length:
        ids = ids[-max_length:] if side == "left" else ids[:max_length]
    return ids


def tokenize_pairs(tokenizer, rows: Sequence[dict], max_length: int, side: str = "left") -> list[dict]:
    """TRL conversational preference rows → {"chosen_ids", "rejected_ids"} (RewardTrainer's
    pre-tokenised form, which it takes as is)."""
    out = []
    for row in rows:
        out.append({
            "chosen_ids": conversation_ids(tokenizer, row["prompt"], answer_text(row["chosen"]), max_length, side),
            "rejected_ids": conversation_ids(tokenizer, row["prompt"], answer_text(row["rejected"]), max_length, side),
        })
    return out


def answer_text(value) -> str:
    """The text of a TRL answer: plain text, or a one-message assistant list."""
    if isinstance(value, str):
        return value
    return value[-1]["content"]


# ---------------------------------------------------------------- models


def load_sequence_classifier(base_path: Path, tokenizer):
    """The base folder as a one-label sequence classifier, its pad token set to the tokenizer's."""
    from transformers import AutoModelForSequenceClassification

    with _quiet_new_head():
        model = AutoModelForSequenceClassification.from_pretrained(str(base_path), num_labels=1, dtype=torch.float32)
    check_vocabulary(model, tokenizer, base_path)
    # The score is read at the last token that is not pad: the model must know the pad id.
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _quiet_new_head():
    """Loading a causal LM as a classifier reports a missing `score` and an unused `lm_head`:
    both are expected. TRL's context manager silences exactly those two."""
    import contextlib

    try:
        from trl.trainer.reward_trainer import suppress_seqcls_warning
    except ImportError:  # pragma: no cover - older or newer TRL
        return contextlib.nullcontext()
    return suppress_seqcls_warning()


def load_reward_model(base_path: Path, adapter_path: Path):
    """A trained reward model (base + adapter folder) in eval mode, and its tokenizer."""
    from peft import PeftModel

    tokenizer = load_tokenizer(base_path)
    model = load_sequence_classifier(base_path, tokenizer)
    model = PeftModel.from_pretrained(model, str(adapter_path))
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------- training


def train_reward_model(
    base_path: Path,
    train_rows: Sequence[dict],
    config: RewardConfig,
    out_dir: Path,
    progress: Progress | None = None,
) -> dict:
    """Train a reward-model adapter on TRL conversational preference rows and save it.

    `train_rows` are {"prompt": [messages], "chosen": [assistant msg], "rejected": [assistant msg]}.
    The adapter (LoRA + the `score` head) and the tokenizer are written to `out_dir`.
    Returns training metrics (loss, accuracy and margin of the last logged steps, runtime).
    """
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    set_threads(config.threads)
    torch.manual_seed(config.seed)  # the new score head's initialisation
    tokenizer = load_tokenizer(base_path)
    model = load_sequence_classifier(base_path, tokenizer)
    dataset = as_dataset(tokenize_pairs(tokenizer, train_rows, config.max_length, config.truncation_side))
    args = TRLRewardConfig(
        **trainer_arguments(config, out_dir),
        max_length=None,  # already truncated (from the left); TRL would drop long pairs instead
        center_rewards_coefficient=config.center_rewards_coefficient or None,
    )
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(config, "SEQ_CLS", modules_to_save=["score"], model=model),
    )
    attach_progress(trainer, progress)
    output = trainer.train()
    save_adapter(trainer, trainer.model, tokenizer, out_dir)
    return train_metrics(trainer, output)


# ---------------------------------------------------------------- scoring


@torch.no_grad()
def score(
    model,
    tokenizer,
    prompts_messages: Sequence[Messages],
    answers: Sequence[str],
    batch_size: int = 8,
    max_length: int = 512,
) -> torch.Tensor:
    """Reward scores, shape (n,), of each answer to its prompt, in batches.

    Each sequence is the chat-templated conversation cut from the left to `max_length` tokens
    (the answer is kept), right-padded; the score is the head's output at the last non-pad token.
    """
    if len(prompts_messages) != len(answers):
        raise ValueError(f"{len(prompts_messages)} prompts but {len(answers)} answers: give one answer per prompt.")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError("The tokenizer needs a pad token distinct from EOS: use align.models.fix_tokenizer.")
    device = next(model.parameters()).device
    sequences = [conversation_ids(tokenizer, m, a, max_length) for m, a in zip(prompts_messages, answers)]
    scores = []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start:start + batch_size]
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ids in enumerate(batch):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask[i, : len(ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        scores.append(logits[:, 0].float().cpu())
    return torch.cat(scores) if scores else torch.zeros(0)
