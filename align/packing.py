"""Packed DPO batches: a pair's prompt is run once, not twice.

TRL's DPO trainer runs `prompt + chosen` and `prompt + rejected` as two sequences. Human
preference prompts are long and answers short (the real harmless pairs: a median prompt of
147 tokens, answers of 30), so most of that work is the prompt, done twice, for the policy
and again for the reference. Here each pair is one sequence,

    prompt | chosen | copy of the prompt's last token | rejected

with position ids that restart after the prompt for the rejected branch and a 4-D attention
mask in which the rejected branch sees the prompt but not the chosen answer. The copied token
(same token, same position, same context) stands in for the prompt's last token as the
predictor of the rejected answer's first token, so every answer token has its own predicting
position and the log-probabilities are exactly those of the two separate sequences
(tests/align/test_packing.py checks this against plain forward passes).

`WeightedDPOTrainer` is TRL's `DPOTrainer` with per-pair loss weights: each pair's loss
(`align.dpo.pair_losses`, TRL's formulas) times its "weight", reduced to the weighted mean
sum(w_i * loss_i) / sum(w_i), over TRL's unpacked batches. `PackedDPOTrainer` is that trainer
with the per-pair log-probabilities computed packed (policy, reference, and the
precomputed-reference pass); everything else — optimizer, accelerate, PEFT reference
handling — is TRL's. Packed rounds take the sigmoid, hinge, IPO and robust losses; the other
loss types train unpacked.
"""

from __future__ import annotations

import contextlib

import torch
from accelerate.utils import is_peft_model
from trl import DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from align.dpo import BATCH_LOSS_TYPES, pair_losses, refuse_weights_of_batch_losses
from align.training import (
    WEIGHT, ActivationBudget, KeepWeights, example_weights, truncate, weighted_mean, without_weights,
)

PACKED_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")
IGNORE = -100


def pack_pairs(triples: list[tuple[list[int], list[int], list[int]]], pad_token_id: int) -> dict:
    """One packed row per (prompt_ids, chosen_ids, rejected_ids).

    Returns input_ids, position_ids and `allowed` (bool, batch x 1 x L x L: may query i attend to
    key j), `shift_labels` (the token each position predicts, -100 for none) and
    `chosen_mask` / `rejected_mask` marking which predictions belong to which answer.
    """
    rows = []
    for prompt, chosen, rejected in triples:
        p, c, r = len(prompt), len(chosen), len(rejected)
        copy = [prompt[-1]] if p else []  # without a prompt, neither answer's first token is scored
        ids = list(prompt) + list(chosen) + copy + list(rejected)
        positions = list(range(p + c)) + [p - 1] * len(copy) + list(range(p, p + r))
        rows.append((ids, positions, p, chosen, len(copy), rejected))
    width = max(len(row[0]) for row in rows)
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    shift_labels = torch.full((batch, width), IGNORE, dtype=torch.long)
    chosen_mask = torch.zeros((batch, width), dtype=torch.bool)
    rejected_mask = torch.zeros((batch, width), dtype=torch.bool)
    allowed = torch.zeros((batch, 1, width, width), dtype=torch.bool)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    for b, (ids, positions, p, chosen, k, rejected) in enumerate(rows):
        n = len(ids)
        input_ids[b, :n] = torch.tensor(ids)
        position_ids[b, :n] = torch.tensor(positions)
        allowed[b, 0, :n, :n] = causal[:n, :n]
        branch = p + len(chosen)  # first index of the rejected branch (the copied token, if any)
        allowed[b, 0, branch:n, p - 1 if k else p:branch] = False  # not the chosen answer, nor the original last prompt token
        for i in range(n, width):
            allowed[b, 0, i, i] = True  # padding attends to itself only (no all-masked rows)
        for j, token in enumerate(chosen):
            if p + j - 1 >= 0:
                shift_labels[b, p + j - 1] = token
                chosen_mask[b, p + j - 1] = True
        for j, token in enumerate(rejected):
            at = branch + j if k else branch + j - 1
            if at >= branch:
                shift_labels[b, at] = token
                rejected_mask[b, at] = True
    return {"input_ids": input_ids, "position_ids": position_ids, "allowed": allowed,
            "shift_labels": shift_labels, "chosen_mask": chosen_mask, "rejected_mask": rejected_mask}


def make_packed_collator(pad_token_id: int, max_length: int, side: str):
    """Collate TRL-tokenised preference examples (prompt_ids, chosen_ids, rejected_ids) into
    packed rows, truncated like the unpacked collator; precomputed reference log-probs and the
    examples' weights pass through."""

    def collate(examples: list[dict]) -> dict:
        triples = []
        for example in examples:
            prompt, (chosen, rejected) = truncate(
                list(example["prompt_ids"]), [list(example["chosen_ids"]), list(example["rejected_ids"])],
                max_length, side,
            )
            triples.append((prompt, chosen, rejected))
        batch = pack_pairs(triples, pad_token_id)
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([float(e[key]) for e in examples])
        batch[WEIGHT] = example_weights(examples)
        return batch

    return collate


def float_mask(model, allowed: torch.Tensor) -> torch.Tensor:
    """The additive attention mask (0 where allowed, the dtype's minimum elsewhere) of a bool one."""
    dtype = next(p for p in model.parameters()).dtype
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def packed_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the chosen and rejected answers, and their token counts.

    `model` has TRL's fused LM head (log-probabilities without the full logits)."""
    mask = float_mask(model, batch["allowed"])
    tokens = {"inputs_embeds": batch["inputs_embeds"]} if "inputs_embeds" in batch else {"input_ids": batch["input_ids"]}
    outputs = model(**tokens, attention_mask=mask, position_ids=batch["position_ids"],
                    shift_labels=batch["shift_labels"], fused_lm_head=True, use_cache=False)
    logps = outputs.log_probs
    chosen, rejected = batch["chosen_mask"], batch["rejected_mask"]
    return ((logps * chosen).sum(1), (logps * rejected).sum(1), chosen.sum(1), rejected.sum(1))


def _decoder(model):
    """The transformer stack (embeddings, `layers`, norm) inside a causal LM, PEFT-wrapped or not."""
    inner = model.get_base_model() if is_peft_model(model) else model
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    return decoder if decoder is not None and hasattr(decoder, "layers") else None


def frozen_bottom_layers(model) -> int:
    """How many bottom layers hold no trainable parameter (and sit below every one that does).

    The policy and its reference compute those layers identically — a fresh adapter on the top
    layers over the base, or a parent adapter whose bottom part is frozen — so the reference
    pass can start from the policy's hidden states at that height."""
    decoder = _decoder(model)
    if decoder is None:
        return 0
    trainable = [i for i, layer in enumerate(decoder.layers) if any(p.requires_grad for p in layer.parameters())]
    if any(p.requires_grad for p in decoder.embed_tokens.parameters()):
        return 0
    return min(trainable) if trainable else 0


@contextlib.contextmanager
def capture_output(module):
    """Keep the (detached) output of `module`'s next forward call in `box["output"]`."""
    box = {}

    def hook(_, __, output):
        box["output"] = (output[0] if isinstance(output, tuple) else output).detach()

    handle = module.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


@contextlib.contextmanager
def top_layers_only(model, start: int):
    """Run `model` from layer `start` up: the caller passes that layer's input as `inputs_embeds`."""
    decoder = _decoder(model)
    layers = decoder.layers
    decoder.layers = torch.nn.ModuleList(list(layers)[start:])
    try:
        yield
    finally:
        decoder.layers = layers


class WeightedDPOTrainer(ActivationBudget, KeepWeights, DPOTrainer):
    """TRL's DPOTrainer with per-pair loss weights (see the module's docstring).

    TRL 1.16 averages the per-pair losses inline, in `_compute_loss`, with nothing to override
    in between: this `_compute_loss` computes the same log-probabilities and losses and takes
    their weighted mean. The loss types of `BATCH_LOSS_TYPES` run TRL's own, with weights of 1.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.f_divergence_type != "reverse_kl" or self.ld_alpha is not None or self.use_weighting:
            raise ValueError("f-divergences, ld_alpha and WPO weighting are not implemented with pair weights")

    def compute_ref_log_probs(self, model, inputs):
        return super().compute_ref_log_probs(model, without_weights(inputs))

    def pair_log_probs(self, model, inputs):
        """(chosen, rejected, chosen tokens, rejected tokens, reference chosen, reference rejected):
        each pair's answers' summed log-probabilities under the policy and the reference, and
        their token counts, from TRL's batch (the chosen sequences, then the rejected ones)."""
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, IGNORE)
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                        fused_lm_head=True, use_cache=False)
        logps = outputs.log_probs[:, -(labels.shape[1] - 1):].sum(1)
        if "ref_chosen_logps" in inputs:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self.compute_ref_log_probs(self.ref_model or self.model, inputs)
        return (*logps.chunk(2), *completion_mask.sum(1).chunk(2), ref_chosen, ref_rejected)

    def _compute_loss(self, model, inputs, return_outputs):
        weights = inputs.get(WEIGHT)
        if set(self.loss_types) & set(BATCH_LOSS_TYPES):
            refuse_weights_of_batch_losses(self.loss_types, [] if weights is None else weights.tolist())
            return super()._compute_loss(model, without_weights(inputs), return_outputs)
        chosen_logps, rejected_logps, chosen_n, rejected_n, ref_chosen, ref_rejected = \
            self.pair_log_probs(model, inputs)
        chosen_ratio, rejected_ratio = chosen_logps - ref_chosen, rejected_logps - ref_rejected
        loss = 0.0
        for loss_type, loss_weight in zip(self.loss_types, self.loss_weights, strict=True):
            losses = pair_losses(loss_type, chosen_ratio, rejected_ratio, chosen_n, rejected_n, self.beta,
                                 self.label_smoothing, self.args.discopop_tau)
            loss = loss + weighted_mean(losses, weights) * loss_weight
        self._log_pair_metrics(chosen_logps, rejected_logps, chosen_ratio, rejected_ratio)
        return (loss, None) if return_outputs else loss

    def _log_pair_metrics(self, chosen_logps, rejected_logps, chosen_ratio, rejected_ratio):
        """TRL's reward and log-probability metrics (unweighted: they describe the batch)."""
        chosen_rewards = self.beta * chosen_ratio.detach()
        rejected_rewards = self.beta * rejected_ratio.detach()
        gather = self.accelerator.gather
        metrics = self._metrics["train" if self.model.training else "eval"]
        metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(gather(chosen_logps.detach()).mean().item())
        metrics["logps/rejected"].append(gather(rejected_logps.detach()).mean().item())


class PackedDPOTrainer(WeightedDPOTrainer):
    """The weighted DPOTrainer over packed pairs (see the module's docstring).

    Without precomputed reference log-probs, the reference pass reuses the policy pass's hidden
    states below the lowest trainable layer and runs only the layers above: with an adapter on
    the top 8 of SmolLM2's 30 layers, the reference costs 8/30 of a forward pass, not all of it.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        unpacked = [t for t in self.loss_types if t not in PACKED_LOSS_TYPES]
        if unpacked:
            raise ValueError(f"loss type {', '.join(unpacked)} is not packed; train it unpacked (packed=false)")

    def _reference_context(self):
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            return self.model, use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        return self.ref_model or self.model, contextlib.nullcontext()

    def compute_ref_log_probs(self, model, inputs):
        reference, adapter = self._reference_context()
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                adapter, self.accelerator.autocast():
            chosen, rejected, _, _ = packed_logps(reference, inputs)
        return chosen, rejected

    def _shared_reference_logps(self, hidden, start: int, inputs):
        """Reference log-probs from the policy's hidden states entering layer `start`."""
        reference, adapter = self._reference_context()
        reference = self.accelerator.unwrap_model(reference)
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                adapter, self.accelerator.autocast(), top_layers_only(reference, start):
            chosen, rejected, _, _ = packed_logps(reference, {**inputs, "inputs_embeds": hidden})
        return chosen, rejected

    def pair_log_probs(self, model, inputs):
        shared = 0 if "ref_chosen_logps" in inputs or self.ref_model is not None else \
            frozen_bottom_layers(self.accelerator.unwrap_model(model))
        if shared:
            with capture_output(_decoder(self.accelerator.unwrap_model(model)).layers[shared - 1]) as box:
                chosen_logps, rejected_logps, chosen_n, rejected_n = packed_logps(model, inputs)
        else:
            chosen_logps, rejected_logps, chosen_n, rejected_n = packed_logps(model, inputs)
        if "ref_chosen_logps" in inputs:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        elif shared:
            ref_chosen, ref_rejected = self._shared_reference_logps(box["output"], shared, inputs)
        else:
            ref_chosen, ref_rejected = self.compute_ref_log_probs(model, inputs)
        return chosen_logps, rejected_logps, chosen_n, rejected_n, ref_chosen, ref_rejected
