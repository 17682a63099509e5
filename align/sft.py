"""SFT round: supervised fine-tuning of a LoRA policy adapter on good answers, before DPO.

The usual pipeline (InstructGPT, Zephyr, TRL's examples) teaches the policy to write like the
answers people want before asking it to prefer them: an SFT round, then a DPO (or KTO, PPO)
round with the SFT version as its parent, which continues from its adapter and takes it as
the reference. The answers come from the store (`align.rounds`, `sft_data`): those written
by annotators in the editor ('written', the default), or the chosen answer of every pair
('chosen', for imported data such as the HH transcripts).

The loss is TRL `SFTTrainer`'s, on the answer's tokens only (`completion_only_loss`).
Tokenisation is ours, as for the other methods: the prompt through the chat template with
the assistant turn opened, the answer and its end-of-turn after it, the prompt cut from the
left when the pair is longer than `max_length` (the answer keeps its beginning).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from align.training import (
    Progress,
    TrainingOptions,
    as_dataset,
    attach_progress,
    native_bf16_precision,
    load_policy_for_training,
    save_adapter,
    set_threads,
    train_metrics,
    trainer_arguments,
    truncate,
)

logger = logging.getLogger(__name__)


@dataclass
class SFTRoundConfig(TrainingOptions):
    """An SFT round. Defaults fit SmolLM2-135M with a LoRA adapter on a 2-core CPU."""

    learning_rate: float = field(default=1e-4, metadata={"help": "Peak AdamW learning rate of the LoRA adapter."})
    batch_size: int = field(default=4, metadata={"help": "Answers per device per optimizer step."})
    lora_top_layers: int = field(
        default=8,
        metadata={"help": "Adapt only the last N transformer layers (0: all); 8 matches DPO's default, so a DPO "
                          "round continuing from this adapter trains the same layers."},
    )
    precision: str = native_bf16_precision()


def answer_rows(pairs: Sequence[dict], source: str = "written") -> list[dict]:
    """TRL conversational prompt-completion rows from store pairs, one per distinct
    (prompt, answer): the chosen answers written by annotators ('written'), or every chosen
    answer ('chosen'). Oldest first."""
    if source not in ("written", "chosen"):
        raise ValueError(f"source must be 'written' or 'chosen', got {source!r}")
    seen, rows = set(), []
    for pair in pairs:
        if source == "written" and not pair.get("chosen_written"):
            continue
        key = (repr(pair["messages"]), pair["chosen"])
        if key in seen:
            continue
        seen.add(key)
        rows.append({"prompt": pair["messages"], "completion": [{"role": "assistant", "content": pair["chosen"]}]})
    return rows


def tokenize_answers(tokenizer, rows: Sequence[dict], max_length: int, side: str = "left") -> list[dict]:
    """{"input_ids", "completion_mask"} per row (TRL's processed form): the templated prompt,
    then the answer's tokens (mask 1), the prompt cut to fit `max_length`."""
    out = []
    for row in rows:
        prompt = list(tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"])
        full = list(tokenizer.apply_chat_template(list(row["prompt"]) + list(row["completion"]), tokenize=True,
                                                  return_dict=True)["input_ids"])
        if full[: len(prompt)] != prompt:
            raise ValueError("the chat template does not extend the prompt with the answer; cannot mark the answer")
        prompt, (answer,) = truncate(prompt, [full[len(prompt):]], max_length, side)
        out.append({"input_ids": prompt + answer, "completion_mask": [0] * len(prompt) + [1] * len(answer)})
    return out


def train_sft(
    base_path: Path,
    train_rows: Sequence[dict],
    config: SFTRoundConfig,
    out_dir: Path,
    parent_adapter: Path | None = None,
    progress: Progress | None = None,
) -> dict:
    """Train an SFT policy adapter on prompt-completion rows and save it.

    `train_rows` are {"prompt": [messages], "completion": [assistant msg]}. Writes the
    adapter and tokenizer to `out_dir`; returns training metrics.
    """
    from trl import SFTConfig, SFTTrainer

    if not train_rows:
        raise ValueError("no answers to train on")
    set_threads(config.threads)
    model, tokenizer, peft_config = load_policy_for_training(base_path, config, parent_adapter)
    args = SFTConfig(
        **trainer_arguments(config, out_dir),
        max_length=None,  # tokenised and truncated above
        completion_only_loss=True,
        packing=False,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=as_dataset(tokenize_answers(tokenizer, train_rows, config.max_length, config.truncation_side)),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    attach_progress(trainer, progress)
    output = trainer.train()
    save_adapter(trainer, trainer.model, tokenizer, out_dir)
    return train_metrics(trainer, output)
