"""What the TRL-based methods (reward model, DPO, KTO) share.

- `TrainingOptions`: the fields every method has (optimiser, LoRA, truncation, device, seed).
- `trainer_arguments`: those options as TRL config keyword arguments, with the CPU pitfalls
  handled (TRL defaults to bf16, which fails on CPU; no hub, no reports, no checkpoints).
- Left truncation: preference data is cut from the *left*, so the answers being compared are
  kept and the oldest prompt turns go first (DESIGN.md: right truncation cut off the answers
  of the baseline reward model). The collators here apply it to DPO and KTO batches.
- Example weights: every training row carries a "weight" (>= 0, from the store; 1.0 when
  absent), a per-example loss weight. The collators put it in each batch and every method
  reduces its per-example losses to the weighted mean sum(w_i * loss_i) / sum(w_i) (0 when
  all weights are 0): a weight of 0 drops the example, a weight of 2 counts it twice.
- `ProgressCallback`: reports training steps and logs to a plain function (the round runner
  writes them to the store, and may stop the run by raising).
- `save_adapter`: writes only the trained adapter and the tokenizer, from the main process.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

TRUNCATION_SIDES = ("left", "right")
PRECISIONS = ("auto", "fp32", "bf16")

# progress(step, total_steps, logs): logs is None on a plain step, the trainer's log dict otherwise.
Progress = Callable[[int, int, "dict | None"], None]


@dataclass
class TrainingOptions:
    """Fields common to every TRL-based round. Subclasses override the defaults they need."""

    learning_rate: float = field(default=1e-4, metadata={"help": "Peak AdamW learning rate of the LoRA adapter."})
    epochs: float = field(default=1.0, metadata={"help": "Passes over the training data (fractions allowed)."})
    max_steps: int = field(
        default=0, metadata={"help": "Stop after this many optimizer steps; 0 runs all `epochs`."}
    )
    batch_size: int = field(
        default=4, metadata={"help": "Examples per device per optimizer step (before accumulation)."}
    )
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={"help": "Batches summed into one optimizer step (effective batch: batch_size x this x processes)."},
    )
    warmup_ratio: float = field(
        default=0.0, metadata={"help": "Fraction of the steps spent warming the learning rate up from 0."}
    )
    max_length: int = field(
        default=512, metadata={"help": "Tokens per sequence (prompt + answer); longer ones are truncated."}
    )
    truncation_side: str = field(
        default="left",
        metadata={"help": "'left' drops the oldest prompt tokens and keeps the answers (recommended); "
                          "'right' keeps the start and may cut the answers off."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of a new adapter."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha of a new adapter."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA path of a new adapter."})
    lora_target_modules: str | list[str] = field(
        default="all-linear",
        metadata={"help": "Layers a new adapter wraps: 'all-linear' or a list of module names (q_proj,v_proj,...)."},
    )
    lora_top_layers: int = field(
        default=0,
        metadata={"help": "Adapt only the last N transformer layers (0: all). Back-propagation then stops at the "
                          "lowest adapted layer, so a step costs much less (see docs/benchmarks.md)."},
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass for every batch: less memory, "
                                         "about 20% slower. Without it, `activation_budget_mib` decides per batch."}
    )
    activation_budget_mib: int = field(
        default=1024,
        metadata={"help": "MiB of activations a batch may keep for its backward pass (estimated from the model's "
                          "width and the batch's tokens). A batch that needs more recomputes just enough of its "
                          "lowest trained layers in the backward pass to fit: long batches cost some time instead "
                          "of memory. 0: no limit."},
    )
    precision: str = field(
        default="auto",
        metadata={"help": "'auto': bf16 mixed precision on a GPU that supports it, fp32 on CPU; 'fp32'; or 'bf16' "
                          "(a GPU, or a CPU with avx512_bf16/AMX: master weights stay fp32, matmuls run in bf16)."},
    )
    logging_steps: int = field(default=5, metadata={"help": "Optimizer steps between two log lines."})
    seed: int = field(default=0, metadata={"help": "Seed for the adapter's initialisation and the data order."})
    threads: int = field(
        default=0, metadata={"help": "torch CPU threads for this run; 0 leaves torch's default (all cores)."}
    )

    def __post_init__(self):
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be greater than 0, got {self.learning_rate} (try 1e-4).")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be greater than 0, got {self.epochs}.")
        for name in ("batch_size", "gradient_accumulation_steps", "lora_r", "lora_alpha", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be 0 (run all epochs) or positive, got {self.max_steps}.")
        if self.max_length < 16:
            raise ValueError(f"max_length must be at least 16 tokens, got {self.max_length} (512 is a good start).")
        if self.truncation_side not in TRUNCATION_SIDES:
            raise ValueError(
                f"truncation_side must be 'left' (keep the answers) or 'right', got {self.truncation_side!r}."
            )
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout}.")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must lie in [0, 1), got {self.warmup_ratio}.")
        if isinstance(self.lora_target_modules, str) and "," in self.lora_target_modules:
            # "q_proj,v_proj" from a command line means a list; PEFT would take a string as one regex.
            self.lora_target_modules = [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]
        if not self.lora_target_modules:
            raise ValueError("lora_target_modules is empty: use 'all-linear' or name the layers to adapt.")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}.")
        if self.precision == "bf16" and not (torch.cuda.is_available() or cpu_has_bf16()):
            raise ValueError("precision 'bf16' needs a GPU or a CPU with bf16 instructions (avx512_bf16 or AMX); "
                             "use 'auto' or 'fp32' here.")
        if self.lora_top_layers < 0:
            raise ValueError(f"lora_top_layers must be 0 (all layers) or positive, got {self.lora_top_layers}.")
        if self.activation_budget_mib < 0:
            raise ValueError(
                f"activation_budget_mib must be 0 (no limit) or positive, got {self.activation_budget_mib}.")
        if self.threads < 0:
            raise ValueError(f"threads must be 0 (torch's default) or positive, got {self.threads}.")


def set_threads(threads: int) -> None:
    tune_malloc()
    if threads:
        torch.set_num_threads(threads)


_MALLOC_TUNED = False


def tune_malloc() -> bool:
    """Keep freed memory in the process instead of handing it back to the kernel at once.

    glibc returns every large freed block (activations, attention masks, optimizer buffers)
    to the kernel and faults it in again on the next step: a 16-pair DPO run on two cores
    spent 9.3 s of its 19.3 s in the kernel. Serving blocks up to 1 GiB from the heap and
    raising the trim threshold and top pad cut it to 14.9 s (1.6 s in the kernel), for 0.5 GiB
    more peak memory (docs/training.md).
    Linux/glibc only; elsewhere it does nothing. Returns whether it applied.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        ok = all(libc.mallopt(option, value) == 1 for option, value in (
            (m_mmap_threshold, 1024 ** 3),
            (m_trim_threshold, 2 * 1024 ** 3 - 1),
            (m_top_pad, 256 * 1024 * 1024),
        ))
    except (OSError, AttributeError):
        return False
    _MALLOC_TUNED = ok
    return ok


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (Linux: avx512_bf16 or AMX in /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_precision() -> str:
    """bf16 autocast on a CPU with native bf16 (1.5x faster DPO steps, docs/benchmarks.md);
    elsewhere 'auto' (bf16 on a GPU that supports it, else fp32)."""
    return "bf16" if not torch.cuda.is_available() and cpu_has_bf16() else "auto"


def native_bf16_precision():
    """The `precision` field of a method whose rounds default to `default_precision()`
    (DPO, reward model, SFT): bf16 where the CPU has it natively, else 'auto'."""
    return field(
        default_factory=default_precision,
        metadata={"help": "'auto': bf16 mixed precision on a GPU that supports it, fp32 on CPU; 'fp32'; or 'bf16' "
                          "(a GPU, or a CPU with avx512_bf16/AMX). Default: bf16 where the CPU has it, else auto."},
    )


def device_arguments(precision: str = "auto") -> dict:
    """TRL/transformers config arguments for the device at hand.

    TRL's configs default to bf16=True, which fails on CPU: without a GPU this forces CPU,
    and fp32 unless 'bf16' was asked for (CPU autocast; checked to be native by the options).
    With a GPU, 'auto' turns bf16 mixed precision on where the GPU supports it.
    """
    if not torch.cuda.is_available():
        return {"use_cpu": True, "bf16": precision == "bf16", "fp16": False}
    bf16 = precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported())
    return {"bf16": bf16, "fp16": False}


def trainer_arguments(options: TrainingOptions, out_dir: Path) -> dict:
    """Keyword arguments shared by TRL's RewardConfig, DPOConfig and KTOConfig."""
    return {
        "output_dir": str(out_dir),
        "learning_rate": options.learning_rate,
        "num_train_epochs": options.epochs,
        "max_steps": options.max_steps or -1,
        "per_device_train_batch_size": options.batch_size,
        "gradient_accumulation_steps": options.gradient_accumulation_steps,
        "warmup_steps": options.warmup_ratio,
        "gradient_checkpointing": options.gradient_checkpointing,
        "logging_steps": options.logging_steps,
        "seed": options.seed,
        "save_strategy": "no",  # the round runner saves the adapter itself, once, atomically
        "report_to": [],
        "disable_tqdm": not _interactive(),
        "dataloader_num_workers": 0,
        "ddp_find_unused_parameters": False,
        **device_arguments(options.precision),
    }


def _interactive() -> bool:
    return sys.stderr.isatty()


def lora_config(options: TrainingOptions, task_type: str, modules_to_save: list[str] | None = None,
                model=None):
    from peft import LoraConfig

    layers, targets = None, options.lora_target_modules
    if options.lora_top_layers:
        if model is None:
            raise ValueError("lora_top_layers needs the model to count its layers")
        num_layers = model.config.num_hidden_layers
        top = min(options.lora_top_layers, num_layers)
        layers = list(range(num_layers - top, num_layers))
        if targets == "all-linear":  # PEFT takes a layer range only with explicit module names
            targets = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                              if isinstance(module, torch.nn.Linear) and ".layers." in name})
    return LoraConfig(
        layers_to_transform=layers,
        r=options.lora_r,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout,
        target_modules=targets,
        task_type=task_type,
        modules_to_save=modules_to_save,
    )


def load_policy_for_training(base_path: Path, options: TrainingOptions, parent_adapter: Path | None = None):
    """(model, tokenizer, peft_config) for a DPO or KTO trainer.

    Without a parent: the base causal LM and a fresh LoRA config (TRL wraps the model; with
    the adapter disabled it is the base again, which TRL uses as the reference). With a parent
    adapter folder: the base with that adapter loaded *trainable*, and no config; the new
    version continues from the parent's weights (its LoRA shape, not `options`').
    """
    from peft import PeftModel

    from align.models import check_vocabulary, load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(base_path)
    model = load_causal_lm(base_path)
    check_vocabulary(model, tokenizer, base_path)
    model.config.pad_token_id = tokenizer.pad_token_id
    if parent_adapter is None:
        return model, tokenizer, lora_config(options, "CAUSAL_LM", model=model)
    model = PeftModel.from_pretrained(model, str(parent_adapter), is_trainable=True)
    return model, tokenizer, None


# ---------------------------------------------------------------- data

WEIGHT = "weight"  # the column, and batch key, of each example's loss weight


def example_weight(row: dict) -> float:
    """The loss weight of a store or training row: its "weight", 1.0 when absent or None."""
    weight = row.get(WEIGHT)
    weight = 1.0 if weight is None else float(weight)
    if not weight >= 0:  # also refuses NaN
        raise ValueError(f"a training weight must be 0 or more, got {weight}: fix the weight of this row in the store")
    return weight


def example_weights(examples: Sequence[dict]) -> torch.Tensor:
    """The loss weights of a batch's examples, as the float tensor the trainers read."""
    return torch.tensor([example_weight(example) for example in examples], dtype=torch.float32)


def weighted_mean(losses: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """sum(w_i * loss_i) / sum(w_i) over a batch's per-example losses; the plain mean without
    weights, and 0 (with zero gradients, no NaN) when every weight is 0."""
    if weights is None:
        return losses.mean()
    weights = weights.to(losses.device)
    return (weights * losses).sum() / weights.sum().clamp(min=torch.finfo(torch.float32).tiny)


def without_weights(inputs: dict) -> dict:
    """A batch without its weights, for TRL code that passes every other key to the model."""
    return {key: value for key, value in inputs.items() if key != WEIGHT}


def with_weights(collate: Callable[[list[dict]], dict]) -> Callable[[list[dict]], dict]:
    """`collate` (one of TRL's collators, which drop unknown keys) that also puts the examples'
    loss weights in the batch."""

    def collate_with_weights(examples: list[dict]) -> dict:
        return {**collate(examples), WEIGHT: example_weights(examples)}

    return collate_with_weights


# ---------------------------------------------------------------- activation memory

ACTIVATION_BYTES = 4  # activations are fp32 here (under bf16 autocast many still are): a bound, not a guess low


def activation_bytes_per_token(config) -> int:
    """Bytes one token's activations take in one decoder layer during training, as autograd keeps
    them for the backward pass: about ten hidden-sized and four intermediate-sized vectors (norms,
    q/k/v, attention output, residuals, LoRA inputs; gate, up, activation, product). Measured on
    SmolLM2-135M with LoRA on every linear layer: 44 KB per token per layer against 47.6 KB
    from this formula (docs/performance.md, "Memory")."""
    return ACTIVATION_BYTES * (10 * config.hidden_size + 4 * config.intermediate_size)


def trained_layers(model) -> list:
    """The decoder layers that keep activations for the backward pass: from the lowest one with
    a trainable parameter (LoRA on the top layers only: back-propagation stops there) to the top."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    first = next((i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())),
                 len(layers))
    return layers[first:]


def layers_to_recompute(tokens: int, layers: int, per_token: int, hidden_size: int, budget: int) -> int:
    """How many of `layers` trained layers must recompute their activations in the backward
    pass (keeping only their input, `hidden_size` values per token) so that a batch of `tokens`
    keeps at most `budget` bytes; all of them when even that does not fit."""
    keep, recompute = tokens * per_token, tokens * ACTIVATION_BYTES * hidden_size
    if not budget or layers * keep <= budget:
        return 0
    for n in range(1, layers + 1):
        if (layers - n) * keep + n * recompute <= budget:
            return n
    return layers


def recompute_layers(layers: list, n: int) -> None:
    """For a model in eval mode (PPO's policy: no dropout noise between its passes): make the
    lowest `n` of `layers` recompute their activations in the backward pass, the others keep
    theirs; `n=0` puts them all back. A layer checkpoints only in training mode, so a
    recomputing layer is put in it by itself (`layer.training`, not `layer.train()`): the
    modules inside it, dropouts included, keep their own eval flags."""
    import functools

    from torch.utils.checkpoint import checkpoint

    for i, layer in enumerate(layers):
        if i < n and getattr(layer, "_gradient_checkpointing_func", None) is None:
            layer._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
        layer.gradient_checkpointing = layer.training = i < n


def budget_activations(trainer, budget_mib: int) -> None:
    """Give `trainer` (an `ActivationBudget` trainer) its activation budget: its layers can then
    recompute, batch by batch, as many layers as the batch needs (none for most batches)."""
    import functools

    from torch.utils.checkpoint import checkpoint

    trainer.activation_budget_bytes = budget_mib * 2**20
    if trainer.activation_budget_bytes and not trainer.args.gradient_checkpointing:
        for layer in trained_layers(trainer.model):
            layer._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
            layer.gradient_checkpointing = False


def batch_tokens(inputs: dict) -> int:
    """Token positions a training batch runs through the model with gradients (padding
    included): every `*input_ids` tensor but KTO's reference (KL) completions."""
    return sum(value.numel() for key, value in inputs.items()
               if key.endswith("input_ids") and not key.startswith("KL") and isinstance(value, torch.Tensor))


class ActivationBudget:
    """Mixin for TRL trainers: a batch whose activations would exceed the budget recomputes its
    lowest trained layers in the backward pass (the fewest that make it fit), the others keep
    theirs (`budget_activations` sets it up). `recomputed` counts the batches that did."""

    activation_budget_bytes = 0
    recomputed = 0

    def training_step(self, model, inputs, *args, **kwargs):
        if self.activation_budget_bytes and not self.args.gradient_checkpointing:
            layers = trained_layers(self.model)
            config = self.model.config
            n = layers_to_recompute(batch_tokens(inputs), len(layers), activation_bytes_per_token(config),
                                    config.hidden_size, self.activation_budget_bytes)
            for i, layer in enumerate(layers):
                layer.gradient_checkpointing = i < n
            self.recomputed += n > 0
        return super().training_step(model, inputs, *args, **kwargs)


class KeepWeights:
    """Mixin for TRL trainers: keep the "weight" column, which `remove_unused_columns` would
    drop as no input of the model."""

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if WEIGHT not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, WEIGHT]


def preference_rows(pairs: Sequence[dict]) -> list[dict]:
    """Store pairs ({"messages", "chosen", "rejected", "weight"}) as TRL conversational preference
    rows, as `annotations.formats.pair_rows` exports them, plus each pair's loss weight."""
    return [
        {
            "prompt": pair["messages"],
            "chosen": [{"role": "assistant", "content": pair["chosen"]}],
            "rejected": [{"role": "assistant", "content": pair["rejected"]}],
            WEIGHT: example_weight(pair),
        }
        for pair in pairs
    ]


def unpaired_rows(rows: Sequence[dict]) -> list[dict]:
    """TRL conversational unpaired rows {"prompt", "completion", "label", "weight"} for KTO, from
    ratings rows ({"messages", "completion", "label"}) or from pairs split in two (chosen → True,
    rejected → False); each answer keeps the weight of the rating or pair it came from."""
    out = []
    for row in rows:
        if "completion" in row:
            answers = [(row["completion"], bool(row["label"]))]
        else:
            answers = [(row["chosen"], True), (row["rejected"], False)]
        for text, label in answers:
            out.append({"prompt": row["messages"], "completion": [{"role": "assistant", "content": text}],
                        "label": label, WEIGHT: example_weight(row)})
    return out


def truncate(prompt_ids: list[int], completions: list[list[int]], max_length: int, side: str):
    """Fit the prompt plus each completion into `max_length` tokens; returns (prompt, completions).

    left: drop the oldest prompt tokens, shared by all completions, until the longest one fits;
    a completion longer than `max_length` on its own keeps its last `max_length` tokens (and
    no prompt). right: keep the prompt (at most max_length - 1 tokens) and cut the end of each
    completion.
    """
    longest = max((len(c) for c in completions), default=0)
    if side == "left":
        if len(prompt_ids) + longest <= max_length:
            return prompt_ids, completions
        if longest >= max_length:
            return [], [c[-max_length:] for c in completions]
        return prompt_ids[len(prompt_ids) + longest - max_length:], completions
    prompt_ids = prompt_ids[: max_length - 1]
    room = max_length - len(prompt_ids)
    return prompt_ids, [c[:room] for c in completions]


def make_preference_collator(pad_token_id: int, max_length: int, side: str, pad_to_multiple_of=None):
    """TRL's DPO collator, with our truncation applied per example before padding, and the
    examples' weights."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    class TruncatingPreferenceCollator(DataCollatorForPreference):
        def torch_call(self, examples):
            fitted = []
            for example in examples:
                prompt, (chosen, rejected) = truncate(
                    list(example["prompt_ids"]), [list(example["chosen_ids"]), list(example["rejected_ids"])],
                    max_length, side,
                )
                fitted.append({**example, "prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
            return {**super().torch_call(fitted), WEIGHT: example_weights(examples)}

    return TruncatingPreferenceCollator(
        pad_token_id=pad_token_id, max_length=None, pad_to_multiple_of=pad_to_multiple_of
    )


def make_unpaired_collator(pad_token_id: int, max_length: int, side: str, pad_to_multiple_of=None):
    """TRL's KTO collator, with our truncation applied per example (answer and KL answer), and
    the examples' weights."""
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    class TruncatingUnpairedCollator(DataCollatorForUnpairedPreference):
        def torch_call(self, examples):
            fitted = []
            for example in examples:
                keys = [k for k in ("completion_ids", "KL_completion_ids") if k in example]
                prompt, completions = truncate(
                    list(example["prompt_ids"]), [list(example[k]) for k in keys], max_length, side
                )
                fitted.append({**example, "prompt_ids": prompt, **dict(zip(keys, completions))})
            return {**super().torch_call(fitted), WEIGHT: example_weights(examples)}

    return TruncatingUnpairedCollator(pad_token_id=pad_token_id, max_length=None, pad_to_multiple_of=pad_to_multiple_of)


def as_dataset(rows: list[dict]):
    from datasets import Dataset

    if not rows:
        raise ValueError("there is no training data: annotate or import some pairs first")
    return Dataset.from_list(rows)


# ---------------------------------------------------------------- progress and saving


class ProgressCallback(TrainerCallback):
    """Calls `progress(step, total, logs)` after every optimizer step and with every log.

    Whatever `progress` raises stops training there (the round runner uses this to stop a
    cancelled or interrupted round); it is called on every process, so all of them stop together.
    """

    def __init__(self, progress: Progress):
        self.progress = progress

    def on_step_end(self, args, state, control, **kwargs):
        self.progress(state.global_step, state.max_steps, None)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.progress(state.global_step, state.max_steps, dict(logs))


def attach_progress(trainer, progress: Progress | None) -> None:
    """Report to `progress`; it writes its own log lines, so the trainer's printed dicts go."""
    from transformers.trainer_callback import PrinterCallback

    if progress is not None:
        trainer.add_callback(ProgressCallback(progress))
        trainer.remove_callback(PrinterCallback)


def save_adapter(trainer, model, tokenizer, out_dir: Path) -> None:
    """Write the trained adapter ("default"; not TRL's frozen "ref" copy) and the tokenizer.

    Only the main process writes; under several processes the others wait for it.
    """
    out_dir = Path(out_dir)
    if trainer.accelerator.is_main_process:
        model = trainer.accelerator.unwrap_model(model)
        model.save_pretrained(str(out_dir), selected_adapters=["default"])
        tokenizer.save_pretrained(str(out_dir))
    trainer.accelerator.wait_for_everyone()


def train_metrics(trainer, train_output) -> dict:
    """The last logged training values plus runtime, as plain floats with a `train_` prefix."""
    metrics = {}
    for entry in trainer.state.log_history:
        for key, value in entry.items():
            if isinstance(value, (int, float)) and key not in ("epoch", "step", "total_flos", "learning_rate"):
                metrics[key] = float(value)
    metrics.update({k: float(v) for k, v in (train_output.metrics or {}).items()
                    if isinstance(v, (int, float)) and k not in ("total_flos", "epoch")})
    metrics["steps"] = float(trainer.state.global_step)
    out = {}
    for key, value in metrics.items():
        key = key if key.startswith("train_") else f"train_{key}"
        out[key] = value
    return out
