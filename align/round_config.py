"""A round's configuration: the round-level keys (`RoundConfig`) and each method's dataclass.

A round stores its config as a plain dict; `parse_round_config` splits and validates it, and
unknown keys are refused with the list of valid ones (the admin form and the CLI show it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from annotations.gate import DEFAULT_GATE_PROMPTS

from align.config import ConfigError, config_from_dict

DATA_CHOICES = ("all", "new")
KTO_DATA_CHOICES = ("ratings", "pairs", "both")
SFT_DATA_CHOICES = ("written", "chosen")


@dataclass
class RoundConfig:
    """Round-level settings: which data, which parent, how to evaluate. The other keys of a
    round's config belong to its method (`RewardConfig`, `DPORoundConfig`, ...)."""

    data: str = field(
        default="all",
        metadata={"help": "'all' training pairs, or 'new': only those added since the last succeeded round "
                          "of the same method."},
    )
    min_weight: float | None = field(default=None, metadata={"help": "Leave out pairs lighter than this weight."})
    min_agreement: float | None = field(
        default=None, metadata={"help": "Leave out pairs whose item agreement among annotators is below this (0-1)."})
    min_annotator_accuracy: float | None = field(
        default=None, metadata={"help": "Leave out pairs from annotators whose gold-item accuracy is below this (0-1)."})
    kto_data: str = field(
        default="both",
        metadata={"help": "KTO labels from thumbs 'ratings' only, from rankings and imported/arena 'pairs', or "
                          "'both' (a thumb then overrides what a ranking implies). One label per answer: "
                          "annotations/answer_labels.py."},
    )
    sft_data: str = field(
        default="written",
        metadata={"help": "SFT answers: those annotators 'written' in the editor, or every pair's 'chosen' answer."},
    )
    parent: str = field(
        default="live",
        metadata={"help": "Version the new one descends from: 'live', 'base', or a version name."},
    )
    continue_from_parent: bool = field(
        default=True,
        metadata={"help": "dpo, kto, ppo, sft: start from the parent's adapter (its reference becomes the parent). "
                          "A reward model always trains fresh from the base."},
    )
    reward_model: str = field(
        default="live",
        metadata={"help": "Reward model PPO trains against and win rates are judged by: 'live' or a version name."},
    )
    eval_pairs: int = field(default=200, metadata={"help": "Held-out pairs to evaluate on (0: skip)."})
    eval_prompts: int = field(
        default=16, metadata={"help": "Held-out prompts to sample from for KL and win rate (0: skip)."}
    )
    eval_samples: int = field(default=3, metadata={"help": "Side-by-side sample answers stored with the metrics."})
    gate_prompts: int = field(
        default=DEFAULT_GATE_PROMPTS,
        metadata={"help": "Held-out prompts, drawn at random, on which the new policy and its parent answer side by "
                          "side for the promotion gate (0: skip). The gate decides only from at least its "
                          "min_prompts."})
    gate_seed: int | None = field(
        default=None, metadata={"help": "Seed of that draw and of the sampled answers (empty: the round's id, so "
                                        "each round draws a fresh sample, recorded with its metrics)."})
    eval_max_new_tokens: int = field(default=64, metadata={"help": "Longest sampled answer during evaluation."})
    eval_batch_size: int = field(
        default=4, metadata={"help": "Pairs or answers per forward pass during evaluation (4 keeps a DPO round's "
                                     "worker under 5 GiB at 512 tokens)."})
    processes: int = field(
        default=1, metadata={"help": "Training processes. 1 trains in the worker's own process; more start them "
                                     "with `accelerate launch` and the `launch` config (align/launch.py)."})
    launch: str = field(
        default="auto",
        metadata={"help": "accelerate config for the processes: cpu_gloo (CPU, no GPU needed), multi_gpu (DDP), "
                          "fsdp2, zero2, zero3 (DeepSpeed), or the path of your own accelerate YAML file. auto: "
                          "multi_gpu when GPUs are visible, else cpu_gloo (and, with processes=1, no launch)."})

    def __post_init__(self):
        if self.data not in DATA_CHOICES:
            raise ValueError(f"data must be 'all' or 'new', got {self.data!r}.")
        if self.sft_data not in SFT_DATA_CHOICES:
            raise ValueError(f"sft_data must be one of {', '.join(SFT_DATA_CHOICES)}, got {self.sft_data!r}.")
        if self.kto_data not in KTO_DATA_CHOICES:
            raise ValueError(f"kto_data must be one of {', '.join(KTO_DATA_CHOICES)}, got {self.kto_data!r}.")
        for name in ("eval_pairs", "eval_prompts", "eval_samples", "gate_prompts"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}.")
        for name in ("eval_max_new_tokens", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if not self.parent:
            raise ValueError("parent must be 'live', 'base' or a version name.")
        try:
            self.launch_plan()
        except ConfigError as e:
            raise ValueError(str(e)) from None

    def launch_plan(self):
        """How the round's processes start (align/launch.py): None to train in the worker itself."""
        from align.launch import resolve_launch

        return resolve_launch(self.launch, self.processes)


def method_configs() -> dict:
    """{method: its config dataclass}."""
    from align.dpo import DPORoundConfig
    from align.kto import KTORoundConfig
    from align.ppo import PPOConfig
    from align.reward import RewardConfig
    from align.sft import SFTRoundConfig

    return {"rm": RewardConfig, "dpo": DPORoundConfig, "kto": KTORoundConfig, "ppo": PPOConfig,
            "sft": SFTRoundConfig}


def parse_round_config(method: str, values: dict | None):
    """Split a round's config into (RoundConfig, the method's config), both validated.

    Unknown keys raise ConfigError naming every valid key of both.
    """
    configs = method_configs()
    if method not in configs:
        raise ConfigError(f"method {method!r} is unknown: use one of {', '.join(configs)}")
    method_cls = configs[method]
    values = dict(values or {})
    round_keys = {f.name for f in dataclasses.fields(RoundConfig)}
    method_keys = {f.name for f in dataclasses.fields(method_cls)}
    unknown = sorted(set(values) - round_keys - method_keys)
    if unknown:
        raise ConfigError(
            f"unknown {'key' if len(unknown) == 1 else 'keys'} {', '.join(map(repr, unknown))} for a {method} round; "
            f"valid keys: {', '.join(sorted(round_keys | method_keys))}"
        )
    round_config = config_from_dict(RoundConfig, {k: v for k, v in values.items() if k in round_keys},
                                    what="round config")
    method_config = config_from_dict(method_cls, {k: v for k, v in values.items() if k in method_keys},
                                     what=f"{method} config")
    return round_config, method_config


def normalize_round_config(method: str, values: dict | None) -> dict:
    """The given keys with their values converted to the fields' types (as a round stores them)."""
    round_config, method_config = parse_round_config(method, values)
    round_keys = {f.name for f in dataclasses.fields(RoundConfig)}
    return {key: getattr(round_config if key in round_keys else method_config, key) for key in (values or {})}
