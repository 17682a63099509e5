"""SFT round: supervised fine-tuning of a LoRA policy adapter on good answers, before DPO.

The usual pipeline (InstructGPT, Zephyr, TRL's examples) teaches the policy to write like the
answers people want before asking it to prefer them: an SFT round, then a DPO (or KTO, PPO)
round with the SFT version as its parent, which continues from its adapter and takes it as
the reference. The answers come from the store (`align.round_plan`, `sft_data`): those written
by annotators in the editor ('written', the default), or the chosen answer of every pair
('chosen', for imported data such as the HH transcripts).

The loss is TRL `SFTTrainer`'s, on the answer's tokens only (`completion_only_loss`), with
each answer's "weight" as a per-example loss weight. TRL averages over tokens, so the weight
is given to every token of the answer: the loss is sum_i w_i * (summed token losses of i) /
sum_i w_i * (tokens of i), which is TRL's when all weights are 1, leaves out an answer of
weight 0, and counts one of weight 2 exactly as the answer twice.
Tokenisation is ours, as for the other methods: the prompt through the chat template with
the assistant turn opened, the answer and its end-of-turn after it, the prompt cut from the
left when the pair is longer than `max_length` (the answer keeps its beginning).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from align.training import (
    WEIGHT,
    ActivationBudget,
    budget_activations,
    KeepWeights,
    Progress,
    TrainingOptions,
    as_dataset,
    attach_progress,
    example_weight,
    native_bf16_precision,
    load_policy_for_training,
    save_adapter,
    set_threads,
    train_metrics,
    trainer_arguments,
    truncate,
    with_weights,
    without_weights,
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
    """TRL conversational prompt-completion rows, with a loss weight, from store pairs, one per
    distinct (prompt, answer): the chosen answers written by annotators ('written'), or every
    chosen answer ('chosen'). Oldest first. An answer that several pairs give keeps the largest
    of their weights: it is one answer, counted once, as strongly as its strongest endorsement
    (a sum would count a repeated answer several times over)."""
    if source not in ("written", "chosen"):
        raise ValueError(f"source must be 'written' or 'chosen', got {source!r}")
    rows: dict[tuple, dict] = {}
    for pair in pairs:
        if source == "written" and not pair.get("chosen_written"):
            continue
        key = (repr(pair["messages"]), pair["chosen"])
        if key in rows:
            rows[key][WEIGHT] = max(rows[key][WEIGHT], example_weight(pair))
            continue
        rows[key] = {"prompt": pair["messages"], "completion": [{"role": "assistant", "content": pair["chosen"]}],
                     WEIGHT: example_weight(pair)}
    return list(rows.values())


def tokenize_answers(tokenizer, rows: Sequence[dict], max_length: int, side: str = "left") -> list[dict]:
    """{"input_ids", "completion_mask", "weight"} per row (TRL's processed form, and the row's
    loss weight): the templated prompt, then the answer's tokens (mask 1), the prompt cut to fit
    `max_length`."""
    out = []
    for row in rows:
        prompt = list(tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"])
        full = list(tokenizer.apply_chat_template(list(row["prompt"]) + list(row["completion"]), tokenize=True,
                                                  return_dict=True)["input_ids"])
        if full[: len(prompt)] != prompt:
            raise ValueError("the chat template does not extend the prompt with the answer; cannot mark the answer")
        prompt, (answer,) = truncate(prompt, [full[len(prompt):]], max_length, side)
        out.append({"input_ids": prompt + answer, "completion_mask": [0] * len(prompt) + [1] * len(answer),
                    WEIGHT: example_weight(row)})
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

    `train_rows` are {"prompt": [messages], "completion": [assistant msg]}, each with an optional
    "weight" (1.0 when absent) that weighs its loss. Writes the adapter and tokenizer to
    `out_dir`; returns training metrics.
    """
    trainer, tokenizer = build_sft_trainer(base_path, train_rows, config, out_dir, parent_adapter)
    attach_progress(trainer, progress)
    output = trainer.train()
    save_adapter(trainer, trainer.model, tokenizer, out_dir)
    return train_metrics(trainer, output)


def build_sft_trainer(base_path: Path, train_rows: Sequence[dict], config: SFTRoundConfig, out_dir: Path,
                      parent_adapter: Path | None = None):
    """(trainer, tokenizer) of an SFT round, ready to train."""
    from trl import SFTConfig
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

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
    trainer = _weighted_sft_trainer()(
        model=model,
        args=args,
        train_dataset=as_dataset(tokenize_answers(tokenizer, train_rows, config.max_length, config.truncation_side)),
        processing_class=tokenizer,
        peft_config=peft_config,
        data_collator=with_weights(DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)),
    )
    budget_activations(trainer, config.activation_budget_mib)
    return trainer, tokenizer


def answer_token_weights(labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(batch, length - 1): the weight of each predicted answer token (its answer's weight; 0
    where nothing is predicted), aligned with the fused LM head's next-token log-probs."""
    return (labels[:, 1:] != -100) * weights.to(labels.device)[:, None]


def _weighted_sft_trainer():
    """WeightedSFTTrainer, made on first use: TRL is imported then."""
    from trl import SFTTrainer

    class WeightedSFTTrainer(ActivationBudget, KeepWeights, SFTTrainer):
        """TRL's SFTTrainer (its plain negative log-likelihood) with per-answer weights given to
        every token of the answer (see the module's docstring), metrics as TRL's.

        TRL divides the summed token losses by `num_items_in_batch`, the answer tokens of the
        whole gradient-accumulation window; here it is their weighted count, so that the
        window's loss is the weighted token mean.
        """

        def _get_num_items_in_batch(self, batch_samples, device):
            count = super()._get_num_items_in_batch(batch_samples, device)
            if count is None or not batch_samples or WEIGHT not in batch_samples[0]:
                return count
            weighted = sum(answer_token_weights(b["labels"], b[WEIGHT]).sum() for b in batch_samples)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                weighted = self.accelerator.gather(weighted.to(device)).sum()
            return weighted.to(device)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            weights = inputs[WEIGHT] if WEIGHT in inputs else torch.ones(len(inputs["labels"]))
            model_inputs = without_weights(inputs)
            outputs = model(**model_inputs, use_cache=False, fused_lm_head=True)
            token_weights = answer_token_weights(inputs["labels"], weights)
            total = token_weights.sum() if num_items_in_batch is None else num_items_in_batch
            loss = -(outputs.log_probs * token_weights).sum() / torch.as_tensor(total).clamp(
                min=torch.finfo(torch.float32).tiny)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as TRL: DDP averages, the count is global
            self._log_token_metrics(mode, outputs, inputs)
            if return_outputs:
                with torch.no_grad():
                    outputs = model(**{k: v for k, v in model_inputs.items() if k != "labels"})
            return (loss, outputs) if return_outputs else loss

        def _log_token_metrics(self, mode, outputs, inputs):
            """TRL's entropy, token accuracy and token count (unweighted: they describe the batch)."""
            gather = self.accelerator.gather_for_metrics
            valid = gather(outputs.label_mask.sum()).sum()
            entropy = gather(outputs.entropy.detach().sum()).sum()
            correct = gather(outputs.is_top1.sum()).sum()
            self._metrics[mode]["entropy"].append((entropy / valid).item() if valid > 0 else 0.0)
            self._metrics[mode]["mean_token_accuracy"].append((correct / valid).item() if valid > 0 else 0.0)
            if mode == "train":
                self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    return WeightedSFTTrainer
