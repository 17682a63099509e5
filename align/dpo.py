"""DPO round: train a LoRA policy adapter directly on preference pairs with TRL's DPOTrainer.

The loss (for the default 'sigmoid' type) is -log sigmoid(beta * (Δ_chosen - Δ_rejected)),
where Δ = log π(answer | prompt) - log π_ref(answer | prompt) summed over the answer tokens.

What the reference π_ref is:
- a first round (no parent adapter): the base model, i.e. the policy with its adapter
  disabled, so no second copy of the weights is held;
- a continual round (`parent_adapter` given, round N starting from round N-1's adapter):
  training starts *from* the parent adapter, and TRL keeps a frozen copy of it as a second
  adapter named "ref", so the reference is the parent policy. Each round thus stays close
  to the version annotators last judged, not to the original base. Only the trained adapter
  is saved.

Sequences are cut from the left (`truncation_side`): the oldest prompt tokens go first and
the answers, whose log-probabilities make the loss, are kept whole where they fit.

Each pair's "weight" is a per-pair loss weight: a batch's loss is the weighted mean of its
per-pair losses (`pair_losses`), sum(w_i * loss_i) / sum(w_i), packed or not (align/packing.py).
The loss types that mix the pairs of a batch (`BATCH_LOSS_TYPES`) have no per-pair loss to
weigh and refuse weights other than 1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from align.training import (
    WEIGHT,
    budget_activations,
    Progress,
    TrainingOptions,
    as_dataset,
    attach_progress,
    example_weight,
    native_bf16_precision,
    load_policy_for_training,
    make_preference_collator,
    save_adapter,
    set_threads,
    train_metrics,
    trainer_arguments,
)

logger = logging.getLogger(__name__)


# The loss types TRL 1.16's DPOTrainer implements.
DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
# Loss types whose losses mix the pairs of a batch (AOT sorts them, 'sft' averages all chosen
# tokens): no per-pair loss, so no per-pair weight.
BATCH_LOSS_TYPES = ("aot", "aot_unpaired", "sft")


@dataclass
class DPORoundConfig(TrainingOptions):
    """A DPO round. Defaults fit SmolLM2-135M with a LoRA adapter on a 2-core CPU."""

    learning_rate: float = field(default=5e-5, metadata={"help": "Peak AdamW learning rate of the LoRA adapter."})
    batch_size: int = field(
        default=2,
        metadata={"help": "Pairs per device per forward pass; with gradient_accumulation_steps 2 an optimizer step "
                          "sees 4. Two at a time pad less and need less memory than four (docs/performance.md)."},
    )
    gradient_accumulation_steps: int = field(
        default=2,
        metadata={"help": "Batches summed into one optimizer step (effective batch: batch_size x this x processes)."},
    )
    lora_top_layers: int = field(
        default=8,
        metadata={"help": "Adapt only the last N transformer layers (0: all). Back-propagation then stops at the "
                          "lowest adapted layer: on SmolLM2 (30 layers) 8 trains 1.6x faster than all of them "
                          "and needs half the memory (docs/benchmarks.md)."},
    )
    precision: str = native_bf16_precision()
    beta: float = field(
        default=0.1,
        metadata={"help": "Strength of the pull towards the reference: higher stays closer (0.01-0.5 is usual)."},
    )
    loss_type: str | list[str] = field(
        default="sigmoid",
        metadata={"help": f"DPO loss, or a list combined with loss_weights: {', '.join(DPO_LOSS_TYPES)}."},
    )
    loss_weights: list[float] | None = field(
        default=None, metadata={"help": "Weights of several loss types, one per entry of loss_type (default: all 1)."}
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={"help": "Assumed fraction of flipped labels for 'robust' (in [0, 0.5)), epsilon for 'exo_pair'."},
    )
    packed: bool = field(
        default=True,
        metadata={"help": "Run each pair as one sequence whose prompt is computed once for both answers "
                          "(align/packing.py); same log-probabilities, fewer tokens. Losses: sigmoid, hinge, ipo, "
                          "robust; others train unpacked."},
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={"help": "Score every pair under the reference once before training, instead of at every step: "
                          "one extra pass up front, then each step skips the reference forward pass."},
    )

    def __post_init__(self):
        super().__post_init__()
        types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        unknown = [t for t in types if t not in DPO_LOSS_TYPES]
        if not types or unknown:
            raise ValueError(
                f"loss_type {unknown or types!r} is unknown: use one or more of {', '.join(DPO_LOSS_TYPES)}."
            )
        if self.loss_weights is not None and len(self.loss_weights) != len(types):
            raise ValueError(
                f"loss_weights has {len(self.loss_weights)} entries but loss_type has {len(types)}: "
                "give one weight per loss."
            )
        if not self.beta > 0:
            raise ValueError(f"beta must be greater than 0, got {self.beta} (0.1 is the usual start).")
        if "robust" in types and not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5) for the 'robust' loss, got {self.label_smoothing}.")
        if "exo_pair" in types and self.label_smoothing <= 0:
            raise ValueError("the 'exo_pair' loss needs label_smoothing > 0 (1e-3 is recommended).")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}.")


def pair_losses(loss_type: str, chosen_ratio: torch.Tensor, rejected_ratio: torch.Tensor,
                chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor, beta: float,
                label_smoothing: float = 0.0, discopop_tau: float = 0.05) -> torch.Tensor:
    """Per-pair losses, shape (pairs,), of one loss type, as TRL 1.16's DPOTrainer computes them.

    `chosen_ratio`, `rejected_ratio`: log π(answer) - log π_ref(answer), summed over the answer's
    tokens; `chosen_tokens`, `rejected_tokens`: the answers' token counts ('ipo' and
    'sigmoid_norm' compare per-token averages). Not for `BATCH_LOSS_TYPES`.
    """
    logits = beta * (chosen_ratio - rejected_ratio)
    if loss_type == "sigmoid":
        return -F.logsigmoid(logits)
    if loss_type == "hinge":
        return torch.relu(1 - logits)
    if loss_type in ("ipo", "sigmoid_norm"):
        per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        return (per_token - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else -F.logsigmoid(beta * per_token)
    if loss_type == "robust":
        eps = label_smoothing
        return (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
    if loss_type == "exo_pair":  # KL(policy's softmax over the two answers || [1 - eps, eps])
        eps = logits.new_tensor(label_smoothing)
        return (torch.sigmoid(logits) * (F.logsigmoid(logits) - torch.log1p(-eps))
                + torch.sigmoid(-logits) * (F.logsigmoid(-logits) - torch.log(eps)))
    if loss_type == "nca_pair":
        chosen, rejected = beta * chosen_ratio, beta * rejected_ratio
        return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * chosen_ratio) - F.logsigmoid(-beta * rejected_ratio)
    if loss_type == "sppo_hard":
        return (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return (1 - torch.sigmoid(beta * chosen_ratio)) + torch.sigmoid(beta * rejected_ratio)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * chosen_ratio) + (1 - torch.sigmoid(logits))
    if loss_type == "discopop":
        mix = torch.sigmoid(logits / discopop_tau)
        return -F.logsigmoid(logits) * (1 - mix) + torch.exp(-logits) * mix
    raise ValueError(f"loss type {loss_type!r} has no per-pair loss (use one of {', '.join(DPO_LOSS_TYPES)} "
                     f"other than {', '.join(BATCH_LOSS_TYPES)})")


def refuse_weights_of_batch_losses(loss_types: Sequence[str], weights: Iterable[float]) -> None:
    """Raise if a loss type that mixes the pairs of a batch would have to weigh pairs unequally."""
    mixing = [t for t in loss_types if t in BATCH_LOSS_TYPES]
    if mixing and any(float(w) != 1.0 for w in weights):
        raise ValueError(
            f"the {', '.join(mixing)} loss mixes the pairs of a batch, so it cannot weigh them one by one, and "
            "these pairs have weights other than 1: use another loss type, or select pairs of weight 1 only."
        )


def train_dpo(
    base_path: Path,
    train_rows: Sequence[dict],
    config: DPORoundConfig,
    out_dir: Path,
    parent_adapter: Path | None = None,
    progress: Progress | None = None,
) -> dict:
    """Train a DPO policy adapter on TRL conversational preference rows and save it.

    `train_rows` are {"prompt": [messages], "chosen": [assistant msg], "rejected": [assistant msg]}.
    Each row's "weight" (1.0 when absent) weighs its loss.
    Starts from `parent_adapter` (trainable; the reference is then the parent policy) or from a
    fresh LoRA adapter (the reference is the base). Writes the adapter and tokenizer to `out_dir`;
    returns training metrics (loss, reward accuracy and margins of the last logged steps, runtime).
    """
    trainer, tokenizer = build_dpo_trainer(base_path, train_rows, config, out_dir, parent_adapter)
    attach_progress(trainer, progress)
    output = trainer.train()
    save_adapter(trainer, trainer.model, tokenizer, out_dir)
    return train_metrics(trainer, output)


def build_dpo_trainer(base_path: Path, train_rows: Sequence[dict], config: DPORoundConfig, out_dir: Path,
                      parent_adapter: Path | None = None):
    """(trainer, tokenizer) of a DPO round, ready to train: packed where the loss types allow."""
    from trl import DPOConfig

    from align.packing import PACKED_LOSS_TYPES, PackedDPOTrainer, WeightedDPOTrainer, make_packed_collator

    loss_types = [config.loss_type] if isinstance(config.loss_type, str) else list(config.loss_type)
    refuse_weights_of_batch_losses(loss_types, (example_weight(row) for row in train_rows))
    set_threads(config.threads)
    model, tokenizer, peft_config = load_policy_for_training(base_path, config, parent_adapter)
    args = DPOConfig(
        **trainer_arguments(config, out_dir),
        beta=config.beta,
        loss_type=loss_types,
        loss_weights=config.loss_weights,
        label_smoothing=config.label_smoothing,
        precompute_ref_log_probs=config.precompute_ref_log_probs,
        max_length=None,  # our collator truncates (from the left); TRL's would cut the answers' ends
    )
    packed = config.packed and set(args.loss_type) <= set(PACKED_LOSS_TYPES)
    trainer_class, collator = (PackedDPOTrainer, make_packed_collator) if packed else \
        (WeightedDPOTrainer, make_preference_collator)
    rows = [{"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"], WEIGHT: example_weight(row)}
            for row in train_rows]
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=as_dataset(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
        data_collator=collator(tokenizer.pad_token_id, config.max_length, config.truncation_side),
    )
    budget_activations(trainer, config.activation_budget_mib)
    return trainer, tokenizer
