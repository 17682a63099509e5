"""Reward model: a LoRA-adapted sequence classifier that scores a (prompt, answer) pair.

The base causal LM is loaded as `AutoModelForSequenceClassification` with one label: a fresh
linear `score` head over the last hidden state, read at the last non-pad token. The adapter
is LoRA on the chosen layers plus a full trainable copy of the head (`modules_to_save`), and
TRL's `RewardTrainer` fits it with the pairwise loss -log sigmoid(r_chosen - r_rejected).

Tokenisation is ours, not TRL's, so that training and `score` see exactly the same tokens:
the conversation through the chat template, cut from the left to `max_length` so the answer
(where the score is read) always survives, padded on the right (positions of real tokens do
not move, so padding cannot change a score).

Training is packed by default, as DPO is (align/packing.py): a pair is one sequence
`prompt | chosen | copy of the prompt's last token | rejected`, its two scores read at the
ends of the two branches, so the shared prompt is run once instead of twice. The scores are
those of the two conversations run apart (tests/align/test_reward.py); the one difference is
truncation, which cuts the shared prompt until the longer answer fits.

Each pair's "weight" is a per-pair loss weight, packed or not: the loss (and the optional
centring penalty) is the weighted mean sum(w_i * loss_i) / sum(w_i) over a batch's pairs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from align.models import check_vocabulary, load_tokenizer
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
    example_weights,
    native_bf16_precision,
    lora_config,
    save_adapter,
    set_threads,
    train_metrics,
    trainer_arguments,
    truncate,
    weighted_mean,
    with_weights,
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
    precision: str = native_bf16_precision()
    packed: bool = field(
        default=True,
        metadata={"help": "Run each pair as one sequence whose shared prompt is computed once for both answers "
                          "(same scores, fewer tokens; the shared prompt is what truncation cuts)."},
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
    """TRL conversational preference rows → {"chosen_ids", "rejected_ids", "weight"} (RewardTrainer's
    pre-tokenised form, which it takes as is, and the pair's loss weight)."""
    out = []
    for row in rows:
        out.append({
            "chosen_ids": conversation_ids(tokenizer, row["prompt"], answer_text(row["chosen"]), max_length, side),
            "rejected_ids": conversation_ids(tokenizer, row["prompt"], answer_text(row["rejected"]), max_length, side),
            WEIGHT: example_weight(row),
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

    `train_rows` are {"prompt": [messages], "chosen": [assistant msg], "rejected": [assistant msg]},
    each with an optional "weight" (1.0 when absent) that weighs its loss.
    The adapter (LoRA + the `score` head) and the tokenizer are written to `out_dir`.
    Returns training metrics (loss, accuracy and margin of the last logged steps, runtime).
    """
    trainer, tokenizer = build_reward_trainer(base_path, train_rows, config, out_dir)
    attach_progress(trainer, progress)
    output = trainer.train()
    save_adapter(trainer, trainer.model, tokenizer, out_dir)
    return train_metrics(trainer, output)


def build_reward_trainer(base_path: Path, train_rows: Sequence[dict], config: RewardConfig, out_dir: Path):
    """(trainer, tokenizer) of a reward-model round, ready to train."""
    from trl import RewardConfig as TRLRewardConfig
    from trl.trainer.reward_trainer import DataCollatorForPreference

    WeightedRewardTrainer, PackedRewardTrainer = _reward_trainers()

    set_threads(config.threads)
    torch.manual_seed(config.seed)  # the new score head's initialisation
    tokenizer = load_tokenizer(base_path)
    model = load_sequence_classifier(base_path, tokenizer)
    # Packed pairs are truncated by the collator, which first finds the shared prompt.
    cut = 1 << 30 if config.packed else config.max_length
    dataset = as_dataset(tokenize_pairs(tokenizer, train_rows, cut, config.truncation_side))
    args = TRLRewardConfig(
        **trainer_arguments(config, out_dir),
        max_length=None,  # truncated by us (from the left); TRL would drop long pairs instead
        center_rewards_coefficient=config.center_rewards_coefficient or None,
    )
    if config.packed:
        trainer_class = PackedRewardTrainer
        collator = make_packed_reward_collator(tokenizer.pad_token_id, config.max_length, config.truncation_side)
    else:
        trainer_class, collator = WeightedRewardTrainer, with_weights(DataCollatorForPreference(tokenizer.pad_token_id))
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        data_collator=collator,
        peft_config=lora_config(config, "SEQ_CLS", modules_to_save=["score"], model=model),
    )
    budget_activations(trainer, config.activation_budget_mib)
    return trainer, tokenizer


# ---------------------------------------------------------------- packed training


def split_pair(chosen_ids: list[int], rejected_ids: list[int]) -> tuple[list[int], list[int], list[int]]:
    """(shared prompt, rest of chosen, rest of rejected) of two conversations: their longest
    common prefix, leaving each answer at least its last token (where its score is read)."""
    limit = min(len(chosen_ids), len(rejected_ids)) - 1
    n = 0
    while n < limit and chosen_ids[n] == rejected_ids[n]:
        n += 1
    return chosen_ids[:n], chosen_ids[n:], rejected_ids[n:]


def make_packed_reward_collator(pad_token_id: int, max_length: int, side: str):
    """Collate {"chosen_ids", "rejected_ids"} conversations into packed rows (align/packing.py)
    plus `chosen_end` / `rejected_end`, the positions whose outputs are the two scores, and the
    pairs' weights."""

    from align.packing import pack_pairs  # imports TRL, which scoring alone does not need

    def collate(examples: list[dict]) -> dict:
        triples = []
        for example in examples:
            prompt, chosen, rejected = split_pair(list(example["chosen_ids"]), list(example["rejected_ids"]))
            prompt, (chosen, rejected) = truncate(prompt, [chosen, rejected], max_length, side)
            triples.append((prompt, chosen, rejected))
        batch = pack_pairs(triples, pad_token_id)
        p = torch.tensor([len(t[0]) for t in triples])
        c = torch.tensor([len(t[1]) for t in triples])
        r = torch.tensor([len(t[2]) for t in triples])
        copied = (p > 0).long()  # pack_pairs repeats the prompt's last token before the rejected branch
        packed = {key: batch[key] for key in ("input_ids", "position_ids", "allowed")}
        packed["chosen_end"] = p + c - 1
        packed["rejected_end"] = p + c + copied + r - 1
        packed["num_tokens"] = (p + c + copied + r).sum()
        if "margin" in examples[0]:
            packed["margin"] = torch.tensor([float(e["margin"]) for e in examples])
        packed[WEIGHT] = example_weights(examples)
        return packed

    return collate


def packed_scores(model, head, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (fp32) of the chosen and rejected branches of packed rows.

    `head` is the classifier's score module inside `model`: its per-position output is taken
    with a hook (gradients flow), since the classifier itself pools at the last non-pad token."""
    from align.packing import float_mask

    box = {}
    handle = head.register_forward_hook(lambda module, args, output: box.__setitem__("scores", output))
    try:
        model(input_ids=batch["input_ids"], attention_mask=float_mask(model, batch["allowed"]),
              position_ids=batch["position_ids"], use_cache=False)
    finally:
        handle.remove()
    scores = box["scores"][..., 0].float()
    rows = torch.arange(scores.shape[0], device=scores.device)
    return scores[rows, batch["chosen_end"]], scores[rows, batch["rejected_end"]]


def score_head(model):
    """The `score` module of a (PEFT-wrapped) sequence classifier."""
    from accelerate.utils import is_peft_model

    inner = model.get_base_model() if is_peft_model(model) else model
    return inner.score


def _reward_trainers():
    """(WeightedRewardTrainer, PackedRewardTrainer), made on first use: TRL is imported then."""
    from trl import RewardTrainer

    class WeightedRewardTrainer(ActivationBudget, KeepWeights, RewardTrainer):
        """TRL's RewardTrainer with per-pair loss weights: the same loss, margin, centring and
        metrics, each pair's loss weighed by its "weight" (the metrics stay unweighted)."""

        def pair_scores(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
            """Scores of the chosen and rejected conversations (TRL's batch: the chosen, then the rejected)."""
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
            return torch.chunk(outputs.logits.squeeze(-1), chunks=2)

        def batch_tokens(self, inputs) -> torch.Tensor:
            return inputs["attention_mask"].sum()

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            weights = inputs.get(WEIGHT)
            rewards_chosen, rewards_rejected = self.pair_scores(model, inputs)
            delta = rewards_chosen - rewards_rejected
            if "margin" in inputs:
                delta = delta - inputs["margin"]
            loss = weighted_mean(-torch.nn.functional.logsigmoid(delta), weights)
            if self.args.center_rewards_coefficient is not None:
                centring = weighted_mean((rewards_chosen + rewards_rejected) ** 2, weights)
                loss = loss + self.args.center_rewards_coefficient * centring

            metrics = self._metrics[mode]
            if mode == "train":
                self._total_train_tokens += self.accelerator.gather_for_metrics(self.batch_tokens(inputs)).sum().item()
            metrics["num_tokens"] = [self._total_train_tokens]
            with torch.no_grad():
                rewards = self.accelerator.gather(torch.cat([rewards_chosen, rewards_rejected]))
                metrics["min_reward"].append(rewards.min().item())
                metrics["mean_reward"].append(rewards.mean().item())
                metrics["max_reward"].append(rewards.max().item())
                chosen_minus_rejected = self.accelerator.gather_for_metrics(rewards_chosen - rewards_rejected)
                metrics["accuracy"].append((chosen_minus_rejected > 0).float().mean().item())
                metrics["margin"].append(chosen_minus_rejected.mean().item())
            return (loss, None) if return_outputs else loss

    class PackedRewardTrainer(WeightedRewardTrainer):
        """The weighted RewardTrainer over packed pairs."""

        def pair_scores(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
            return packed_scores(model, score_head(self.accelerator.unwrap_model(model)), inputs)

        def batch_tokens(self, inputs) -> torch.Tensor:
            return inputs["num_tokens"]

    return WeightedRewardTrainer, PackedRewardTrainer


# ---------------------------------------------------------------- scoring


@torch.no_grad()
def score(
    model,
    tokenizer,
    prompts_messages: Sequence[Messages],
    answers: Sequence[str],
    batch_size: int = 8,
    max_length: int = 512,
    shared: bool = True,
) -> torch.Tensor:
    """Reward scores, shape (n,), of each answer to its prompt.

    Each answer is scored as the chat-templated conversation cut from the left to `max_length`
    tokens (the answer is kept); the score is the head's output at the conversation's last token.

    With `shared` (the default), the answers to the same prompt are scored with that prompt run
    once: one row holds the prompt and then each answer as a branch that sees the prompt and
    itself, not the other answers (`_shared_rows`), the way packed training runs a pair. Rows are
    sorted by length and batched up to `batch_size * max_length` tokens, so little is padding.
    The scores are those of scoring each conversation apart, to float rounding: an answer whose
    conversation would be cut is scored apart, cut as it would be. `shared=False` is that plain
    path for every answer, in batches of `batch_size` in the order given.
    """
    if len(prompts_messages) != len(answers):
        raise ValueError(f"{len(prompts_messages)} prompts but {len(answers)} answers: give one answer per prompt.")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError("The tokenizer needs a pad token distinct from EOS: use align.models.fix_tokenizer.")
    if not shared:
        return _score_apart(model, tokenizer.pad_token_id,
                            [conversation_ids(tokenizer, m, a, max_length) for m, a in zip(prompts_messages, answers)],
                            batch_size)
    rows = _shared_rows(tokenizer, prompts_messages, answers, max_length)
    out = torch.zeros(len(answers))
    budget = batch_size * max_length
    rows.sort(key=lambda row: len(row[0]))
    start = 0
    while start < len(rows):
        end = start + 1
        while end < len(rows) and (end - start + 1) * len(rows[end][0]) <= budget:
            end += 1
        batch = rows[start:end]
        scores = _score_rows(model, tokenizer.pad_token_id, batch)
        for row, row_scores in zip(batch, scores):
            for index, at in row[2]:
                out[index] = row_scores[at]
        start = end
    return out


def _score_apart(model, pad_token_id: int, sequences: list[list[int]], batch_size: int) -> torch.Tensor:
    """Each sequence's score, right-padded batches in the order given (the plain path)."""
    device = next(model.parameters()).device
    scores = []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start:start + batch_size]
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ids in enumerate(batch):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask[i, : len(ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        scores.append(logits[:, 0].float().cpu())
    return torch.cat(scores) if scores else torch.zeros(0)


def _shared_rows(tokenizer, prompts_messages, answers, max_length: int) -> list[tuple]:
    """(token ids, position ids, [(answer index, position of its score)], branch starts) per row.

    The answers to one prompt (equal messages) share a row: the conversations' longest common
    prefix (each answer keeps at least its last token), then each answer's rest, its positions
    continuing from the prefix. An answer whose whole conversation is longer than `max_length`
    gets a row of its own, cut from the left as `conversation_ids` cuts it; so does a group too
    long for one row."""
    import json

    groups: dict[str, list[int]] = {}
    for index, messages in enumerate(prompts_messages):
        groups.setdefault(json.dumps(list(messages), sort_keys=True, default=str), []).append(index)
    rows = []
    for indices in groups.values():
        full = {i: conversation_ids(tokenizer, prompts_messages[i], answers[i], 1 << 30) for i in indices}
        fits = [i for i in indices if len(full[i]) <= max_length]
        for i in indices:
            if len(full[i]) > max_length:
                ids = full[i][-max_length:]
                rows.append((ids, list(range(len(ids))), [(i, len(ids) - 1)], []))
        while fits:  # as many answers per row as keep the row within 4 x max_length tokens
            prefix = _common_prefix([full[i] for i in fits])
            ids, positions, reads, starts, taken = list(full[fits[0]][:prefix]), list(range(prefix)), [], [], 0
            for i in fits:
                rest = full[i][prefix:]
                if taken and len(ids) + len(rest) > 4 * max_length:
                    break
                starts.append(len(ids))
                ids += rest
                positions += range(prefix, prefix + len(rest))
                reads.append((i, len(ids) - 1))
                taken += 1
            rows.append((ids, positions, reads, starts))
            fits = fits[taken:]
    return rows


def _common_prefix(sequences: list[list[int]]) -> int:
    """Length of the longest common prefix, leaving every sequence at least its last token."""
    limit = min(len(s) for s in sequences) - 1
    n = 0
    while n < limit and all(s[n] == sequences[0][n] for s in sequences[1:]):
        n += 1
    return n


def _score_rows(model, pad_token_id: int, rows: list[tuple]) -> torch.Tensor:
    """The head's output at every position of each row (batch, width), fp32 on the CPU.

    A row with branches gets a 4-D mask: a branch's tokens see the shared prefix and the branch
    so far, not the other branches; padding sees only itself."""
    device = next(model.parameters()).device
    width = max(len(row[0]) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for b, (ids, positions, _, _) in enumerate(rows):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        position_ids[b, : len(ids)] = torch.tensor(positions)
    if all(len(row[3]) <= 1 for row in rows):  # no row shares a prompt: the plain causal mask
        mask = (torch.arange(width)[None, :] < torch.tensor([len(row[0]) for row in rows])[:, None]).long()
    else:
        from align.packing import float_mask

        allowed = torch.zeros((len(rows), 1, width, width), dtype=torch.bool)
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        for b, (ids, _, _, starts) in enumerate(rows):
            n = len(ids)
            allowed[b, 0, :n, :n] = causal[:n, :n]
            bounds = [*starts, n]
            for lo, hi in zip(bounds, bounds[1:]):
                allowed[b, 0, lo:hi, starts[0]:lo] = False  # not the branches before this one
            idle = torch.arange(n, width)
            allowed[b, 0, idle, idle] = True
        mask = float_mask(model, allowed.to(device))
    box = {}
    handle = score_head(model).register_forward_hook(lambda module, args, output: box.__setitem__("scores", output))
    try:
        model(input_ids=input_ids.to(device), attention_mask=mask.to(device), position_ids=position_ids.to(device),
              use_cache=False)
    finally:
        handle.remove()
    return box["scores"][..., 0].float().cpu()
