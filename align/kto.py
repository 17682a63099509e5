"""KTO round: train a LoRA policy adapter from unpaired thumbs-up / thumbs-down answers.

KTO needs no pairs: each example is one answer to a prompt labelled desirable (True) or
undesirable (False). Its loss compares the answer's implicit reward
beta * (log π - log π_ref) with a reference point, an estimate of KL(π || π_ref) taken from
answers paired with other prompts of the same batch; hence a batch needs at least two
examples. Rows come from `annotations.answer_labels.kto_examples`: one label per answer, from
thumbs, rankings and pairs (see `align.round_plan`). The reference is as in DPO: the base with the adapter
disabled, or a frozen copy of the parent adapter when a round continues from one.

Each answer's "weight" is a per-example loss weight: a batch's loss is the weighted mean
sum(w_i * c_i * loss_i) / sum(w_i), c_i the desirable or undesirable weight of its label, and
the KL reference point is the weighted mean of the batch's mismatched pairs, each weighed as
the row it belongs to (so a weight of 2 is exactly the row twice).
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
    load_policy_for_training,
    make_unpaired_collator,
    save_adapter,
    set_threads,
    train_metrics,
    trainer_arguments,
    without_weights,
)

logger = logging.getLogger(__name__)

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


@dataclass
class KTORoundConfig(TrainingOptions):
    """A KTO round. Defaults fit SmolLM2-135M with a LoRA adapter on a 2-core CPU."""

    learning_rate: float = field(default=5e-5, metadata={"help": "Peak AdamW learning rate of the LoRA adapter."})
    beta: float = field(
        default=0.1, metadata={"help": "Strength of the pull towards the reference: higher stays closer."}
    )
    loss_type: str = field(default="kto", metadata={"help": f"One of {', '.join(KTO_LOSS_TYPES)}."})
    desirable_weight: float | None = field(
        default=None,
        metadata={"help": "Weight of thumbs-up losses; empty: balance it from the data "
                          "(number of thumbs-down / number of thumbs-up), as the KTO paper recommends."},
    )
    undesirable_weight: float = field(default=1.0, metadata={"help": "Weight of thumbs-down losses."})
    precompute_ref_log_probs: bool = field(
        default=False, metadata={"help": "Score every example under the reference once before training."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type not in KTO_LOSS_TYPES:
            raise ValueError(f"loss_type {self.loss_type!r} is unknown: use one of {', '.join(KTO_LOSS_TYPES)}.")
        if self.loss_type == "kto" and self.batch_size < 2:
            raise ValueError(
                "batch_size must be at least 2 for the 'kto' loss: its KL estimate pairs each answer with "
                "another prompt of the same batch."
            )
        if not self.beta > 0:
            raise ValueError(f"beta must be greater than 0, got {self.beta}.")
        if self.desirable_weight is not None and not self.desirable_weight > 0:
            raise ValueError(
                f"desirable_weight must be positive (or empty for automatic), got {self.desirable_weight}."
            )
        if not self.undesirable_weight > 0:
            raise ValueError(f"undesirable_weight must be positive, got {self.undesirable_weight}.")


def balanced_desirable_weight(labels: Sequence[bool], undesirable_weight: float = 1.0) -> float:
    """The desirable weight that makes both sides count equally: n_undesirable / n_desirable
    times the undesirable weight (the KTO paper's Eq. 8 asks for a ratio in [1, 4/3])."""
    desirable = sum(1 for label in labels if label)
    undesirable = len(labels) - desirable
    if not desirable or not undesirable:
        return 1.0
    return undesirable * undesirable_weight / desirable


def example_scales(weights: torch.Tensor) -> torch.Tensor:
    """n * w_i / sum(w): multiplying example i's term of a batch mean by this turns the mean into
    the weighted mean sum(w_i * x_i) / sum(w_i) (all 0 when every weight is 0)."""
    return len(weights) * weights / weights.sum().clamp(min=torch.finfo(torch.float32).tiny)


def train_kto(
    base_path: Path,
    train_rows: Sequence[dict],
    config: KTORoundConfig,
    out_dir: Path,
    parent_adapter: Path | None = None,
    progress: Progress | None = None,
) -> dict:
    """Train a KTO policy adapter on TRL conversational unpaired rows and save it.

    `train_rows` are {"prompt": [messages], "completion": [assistant msg], "label": bool}, each
    with an optional "weight" (1.0 when absent) that weighs its loss.
    Writes the adapter and tokenizer to `out_dir`; returns training metrics.
    """
    trainer, tokenizer = build_kto_trainer(base_path, train_rows, config, out_dir, parent_adapter)
    attach_progress(trainer, progress)
    output = trainer.train()
    save_adapter(trainer, trainer.model, tokenizer, out_dir)
    metrics = train_metrics(trainer, output)
    metrics["train_desirable_weight"] = float(trainer.args.desirable_weight)
    return metrics


def build_kto_trainer(base_path: Path, train_rows: Sequence[dict], config: KTORoundConfig, out_dir: Path,
                      parent_adapter: Path | None = None):
    """(trainer, tokenizer) of a KTO round, ready to train."""
    from trl import KTOConfig

    labels = [bool(row["label"]) for row in train_rows]
    if not any(labels):
        logger.warning("KTO data holds only undesirable answers: the policy can learn what to avoid, not what to say")
    set_threads(config.threads)
    model, tokenizer, peft_config = load_policy_for_training(base_path, config, parent_adapter)
    desirable_weight = config.desirable_weight or balanced_desirable_weight(labels, config.undesirable_weight)
    args = KTOConfig(
        **trainer_arguments(config, out_dir),
        beta=config.beta,
        loss_type=config.loss_type,
        desirable_weight=desirable_weight,
        undesirable_weight=config.undesirable_weight,
        precompute_ref_log_probs=config.precompute_ref_log_probs,
        max_length=None,  # our collator truncates (from the left)
    )
    rows = [{"prompt": row["prompt"], "completion": row["completion"], "label": row["label"],
             WEIGHT: example_weight(row)} for row in train_rows]
    trainer = _weighted_kto_trainer()(
        model=model,
        args=args,
        train_dataset=as_dataset(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
        data_collator=make_unpaired_collator(tokenizer.pad_token_id, config.max_length, config.truncation_side),
    )
    budget_activations(trainer, config.activation_budget_mib)
    return trainer, tokenizer


def _weighted_kto_trainer():
    """WeightedKTOTrainer, made on first use: TRL is imported then."""
    from trl import KTOTrainer

    class WeightedKTOTrainer(ActivationBudget, KeepWeights, KTOTrainer):
        """TRL's KTOTrainer with per-example loss weights (see the module's docstring).

        TRL 1.16 reduces inline, in `_compute_loss`: the loss is mean_i(c_i * loss_i), c_i the
        desirable or undesirable weight, and the KL reference point mean_i(KL_i - KL_ref_i). Both
        become weighted means when example i's terms are scaled by n * w_i / sum(w)
        (`example_scales`): for one batch, the class weights become per-example tensors and the
        KL log-probabilities (policy and reference) are scaled, and TRL's code runs unchanged.
        """

        kl_scales = None  # the batch's example scales while its loss is computed

        def _compute_kl_logps(self, model, batch):
            kl_logps = super()._compute_kl_logps(model, batch)
            return kl_logps if kl_logps is None or self.kl_scales is None else kl_logps * self.kl_scales

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if WEIGHT not in inputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            scales = example_scales(inputs[WEIGHT])
            inputs = without_weights(inputs)
            if "ref_KL_logps" in inputs:
                inputs["ref_KL_logps"] = inputs["ref_KL_logps"] * scales
            desirable = inputs["label"].bool()
            class_weights = self.desirable_weight, self.undesirable_weight
            self.desirable_weight = class_weights[0] * scales[desirable]
            self.undesirable_weight = class_weights[1] * scales[~desirable]
            self.kl_scales = scales
            try:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            finally:
                self.desirable_weight, self.undesirable_weight = class_weights
                self.kl_scales = None

    return WeightedKTOTrainer
