"""One training round, start to finish: select data → train → evaluate → register.

`run_round` takes a round row from the store and:

1. claims it (queued → running under this pid) and reserves the name of the version it will
   produce (v3, rm2, ...);
2. reads its config (round-level keys in `RoundConfig`, the rest in the method's dataclass);
3. selects the data (all training pairs, or those newer than the last round of this method),
   hashes the exact snapshot and records hash, size, parent version, base and code version;
4. trains into a staging folder under `versions/` (progress and log lines go to the round row);
5. records a policy adapter's staging folder on the round (the app loads and merges it from
   there meanwhile, so a promotion by the gate finds it ready), then evaluates the new
   version on the held-out split and stores the metrics;
6. renames the staging folder into place, then registers the version as a `candidate` and
   marks the round succeeded in one transaction.

Whatever goes wrong, at any step, the round ends `failed` with the error, the staging folder
is removed, nothing is registered, and the live version is untouched. A process killed
outright leaves a running round and maybe a staging folder: `recover_interrupted`, run when a
worker starts, fails the round and sweeps the folder. (`tests/align/test_kill_worker.py`
kills a worker at each step: its `checkpoint` hook stops the worker there first.)

Under `accelerate launch` every process calls `run_round`: the main process does the store
work and broadcasts the plan (the data itself) to the others, all of them train together,
and only the main one saves, evaluates and registers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from annotations.gate import DEFAULT_GATE_PROMPTS

from align.config import ConfigError, config_from_dict
from align.models import BASE_VERSION, VersionDir

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
TRAIN_PROGRESS_SHARE = 0.85  # progress bar: training fills 0 → 0.85, evaluation the rest
DATA_CHOICES = ("all", "new")
KTO_DATA_CHOICES = ("ratings", "pairs", "both")
SFT_DATA_CHOICES = ("written", "chosen")
CURVE_SKIP = ("epoch", "total_flos", "step")  # logged values that are not curves
STAGES = ("claim", "reserve", "select_data", "stage", "train", "save", "evaluate", "commit", "register",
          "registering", "gate")
GATE_GENERATION_BATCH = 16  # answers sampled together for the gate's comparison


class RoundError(Exception):
    """A round cannot run or was stopped; the message says why and what to do."""


class RoundStopped(RoundError):
    """Training was stopped on purpose: cancelled by an admin, or the worker is shutting down."""

    def __init__(self, message: str, status: str = "failed"):
        super().__init__(message)
        self.status = status


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


def code_version() -> str:
    """`git describe --always --dirty` of this checkout, else the installed package version."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        if out.returncode == 0 and out.stdout.strip():
            return f"git:{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version

        return f"rankloop {version('rankloop')}"
    except Exception:  # not installed as a package either
        return "unknown"


# ---------------------------------------------------------------- test hook


CHECKPOINT_HOOKS: list[Callable[[str], None]] = []


def checkpoint(stage: str) -> None:
    """A named point of a round (`STAGES`, in order; "train" once per optimizer step). In
    production nothing listens. Tests add a hook to `CHECKPOINT_HOOKS` to stop a worker there
    and kill it (tests/align/pausing_worker.py), or to make a round fail mid-way: a test hook
    lives in the test, not in a round's configuration."""
    for hook in CHECKPOINT_HOOKS:
        hook(stage)


# ---------------------------------------------------------------- processes


def process_state():
    """This process's place among the ones `accelerate launch` (or torchrun) started.

    Without a GPU it asks for CPU, so several processes join with the gloo backend (the
    first PartialState of a process fixes this for the Trainer too).
    """
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def broadcast_from_main(value, state):
    """`value` from the main process, on every process."""
    if state.num_processes <= 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


class RoundReporter:
    """The training progress callable: writes progress and log lines to the round row (main
    process only) and stops training (on every process together) when the round was cancelled,
    the worker is stopping."""

    def __init__(self, db, round_id: int, state, *, stop_event: threading.Event | None = None,
                 min_interval_s: float = 1.0):
        self.db, self.round_id, self.state = db, round_id, state
        self.stop_event = stop_event
        self.min_interval_s = min_interval_s
        self._last_write = self._last_check = 0.0

    def __call__(self, step: int, total: int, logs: dict | None) -> None:
        from annotations.db import write_transaction
        from annotations.registry import record_step_metrics, update_round

        main = self.state.is_main_process
        progress = TRAIN_PROGRESS_SHARE * step / total if total else None
        now = time.monotonic()
        if main and logs:
            line = format_log(step, total, logs)
            logger.info("round %d: %s", self.round_id, line)
            with write_transaction(self.db):
                update_round(self.db, self.round_id, progress=progress, log_line=line)
                record_step_metrics(self.db, self.round_id, step, {
                    k: v for k, v in logs.items() if k not in CURVE_SKIP and not k.startswith("train_")
                })
            self._last_write = now
        elif main and now - self._last_write >= self.min_interval_s:
            update_round(self.db, self.round_id, progress=progress)
            self._last_write = now
        if logs is None:  # once per optimizer step, on every process: decide together whether to stop
            checkpoint("train")
            stop = self._stop_reason(step, now) if main else None
            stop = broadcast_from_main(stop, self.state)
            if stop is not None:
                raise RoundStopped(stop[1], status=stop[0])

    def _stop_reason(self, step: int, now: float):
        from annotations.registry import round_status

        if self.stop_event is not None and self.stop_event.is_set():
            return ("failed", f"interrupted at step {step}: the worker is shutting down")
        if now - self._last_check >= self.min_interval_s:
            self._last_check = now
            if round_status(self.db, self.round_id) == "cancelled":
                return ("cancelled", f"cancelled at step {step}")
        return None


def format_log(step: int, total: int, logs: dict) -> str:
    parts = [f"step {step}/{total}"]
    for key, value in logs.items():
        if key in ("epoch", "total_flos"):
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return " ".join(parts)


# ---------------------------------------------------------------- plan: data and lineage


def _resolve_version(db, kind: str, name: str) -> dict | None:
    """'live', 'base' or a version name → that version's row (None: no such live version)."""
    from annotations.errors import NotFound
    from annotations.registry import get_live_version, get_version

    if name == "live":
        return get_live_version(db, kind)
    if name == BASE_VERSION:
        return get_version(db, BASE_VERSION) if kind == "policy" else None
    try:
        row = get_version(db, name)
    except NotFound as e:
        raise RoundError(str(e)) from None
    if row["kind"] != kind:
        raise RoundError(f"{name} is a {row['kind']} version; this round needs a {kind} version")
    return row


def _select_data(db, method: str, round_config: RoundConfig, until: dict):
    """(training rows, snapshot rows to hash, description) for a method. `until` holds the
    snapshot's edges: the highest pair, rating and judgement ids it may read."""
    from annotations.answer_labels import kto_examples
    from annotations.registry import _since_id, select_pairs, select_prompts

    from align.training import preference_rows, unpaired_rows

    since = "last" if round_config.data == "new" else None
    hint = ("since the last round: annotate more, or run with data=all" if since
            else ": annotate or import some first (`python -m annotations import ...`)")

    def pairs():
        return select_pairs(db, since, "train", round_config.min_weight, method=method, until_id=until["pair"],
                            min_agreement=round_config.min_agreement,
                            min_annotator_accuracy=round_config.min_annotator_accuracy)

    if method in ("rm", "dpo"):
        snapshot = pairs()
        if not snapshot:
            raise RoundError(f"no training pairs{' ' if since else ''}{hint}")
        return preference_rows(snapshot), snapshot, f"{len(snapshot)} pairs"
    if method == "kto":
        # one label per answer, from rankings, underived pairs and thumbs (annotations/answer_labels.py)
        edges = {key: _since_id(db, since, method, f"data_until_{key}_id") for key in until}
        snapshot = [row for row in kto_examples(db, "train", sources=round_config.kto_data, since=edges, until=until)
                    if round_config.min_weight is None or row["weight"] >= round_config.min_weight]
        if not snapshot:
            raise RoundError(f"no rated or ranked answers to train KTO on{' ' if since else ''}{hint}")
        rows = unpaired_rows(snapshot)
        desirable = sum(row["label"] for row in snapshot)
        return rows, snapshot, (f"{len(rows)} labelled answers ({desirable} desirable, "
                                f"{len(rows) - desirable} undesirable)")
    if method == "sft":
        from align.sft import answer_rows

        snapshot = pairs()
        rows = answer_rows(snapshot, round_config.sft_data)
        if not rows:
            written = round_config.sft_data == "written"
            raise RoundError(
                f"no {'written ' if written else ''}answers to train SFT on{' ' if since else ''}{hint}"
                + ("; or run with sft_data=chosen to use every pair's chosen answer" if written else ""))
        return rows, [pair for pair in snapshot if round_config.sft_data == "chosen" or pair["chosen_written"]], \
            f"{len(rows)} answers ({round_config.sft_data})"
    if method == "ppo":
        prompts = select_prompts(db, "train")
        if not prompts:
            raise RoundError("no training prompts for PPO to sample answers to: import some prompts first")
        return [p["messages"] for p in prompts], prompts, f"{len(prompts)} prompts"
    raise RoundError(f"method {method!r} is unknown")


def _plan_round(db, round_id: int, versions: VersionDir, base_path: Path) -> dict:
    """Claim the round and prepare everything training needs (main process only)."""
    from annotations.registry import (
        claim_round,
        get_round,
        method_kind,
        judgement_watermark,
        pair_watermark,
        rating_watermark,
        reserve_version,
        set_round_data,
        snapshot_hash,
        update_round,
    )

    row = get_round(db, round_id)
    if row["status"] == "queued":
        claim_round(db, round_id, os.getpid())
    elif not (row["status"] == "running" and row["pid"] == os.getpid()):
        raise RoundError(f"round {round_id} is {row['status']}: only a queued round can be run")
    checkpoint("claim")
    method = row["method"]
    try:
        round_config, method_config = parse_round_config(method, row["config"])
    except ConfigError as e:
        raise RoundError(str(e)) from None
    kind = method_kind(method)
    version = reserve_version(db, round_id)
    checkpoint("reserve")
    parent = _resolve_version(db, kind, round_config.parent)
    reward = _resolve_version(db, "reward", round_config.reward_model) if kind == "policy" else None
    if method == "ppo" and reward is None:
        raise RoundError("PPO needs a reward model: train one (`python -m align round --method rm`) and promote it")

    until = {"pair": pair_watermark(db), "rating": rating_watermark(db), "judgement": judgement_watermark(db)}
    rows, snapshot, description = _select_data(db, method, round_config, until)
    checkpoint("select_data")
    data_hash = snapshot_hash(snapshot)
    set_round_data(
        db, round_id, data_hash=data_hash, n_pairs=len(snapshot),
        parent_version=parent["version"] if parent else None, code_version=code_version(),
        base_path=str(base_path), data_until_pair_id=until["pair"], data_until_rating_id=until["rating"],
        data_until_judgement_id=until["judgement"],
    )
    update_round(
        db, round_id, progress=0.0,
        log_line=f"round {round_id}: {method} → {version} (parent {parent['version'] if parent else 'none'}), "
                 f"{description}, data {data_hash[:12]}",
    )
    staging = versions.staging(version)
    staging.mkdir(parents=True)
    checkpoint("stage")
    parent_path = parent["path"] if parent and parent["path"] else None
    return {
        "round_id": round_id,
        "method": method,
        "kind": kind,
        "version": version,
        "config": row["config"],
        "rows": rows,
        "parent": parent["version"] if parent else None,
        "parent_path": parent_path,
        "reward": reward["version"] if reward else None,
        "reward_path": reward["path"] if reward else None,
        "staging": str(staging),
        "base_path": str(base_path),
        "pair_until": until["pair"],
    }


# ---------------------------------------------------------------- train


def _train(plan: dict, round_config: RoundConfig, method_config, progress) -> dict:
    """Train the method into the staging folder; returns training metrics."""
    base, staging, rows = Path(plan["base_path"]), Path(plan["staging"]), plan["rows"]
    parent_adapter = (Path(plan["parent_path"]) if plan["parent_path"] and round_config.continue_from_parent
                      else None)
    method = plan["method"]
    if method == "rm":
        from align.reward import train_reward_model

        return train_reward_model(base, rows, method_config, staging, progress)
    if method == "dpo":
        from align.dpo import train_dpo

        return train_dpo(base, rows, method_config, staging, parent_adapter, progress)
    if method == "kto":
        from align.kto import train_kto

        return train_kto(base, rows, method_config, staging, parent_adapter, progress)
    if method == "sft":
        from align.sft import train_sft

        return train_sft(base, rows, method_config, staging, parent_adapter, progress)
    if method == "ppo":
        return _train_ppo(plan, method_config, parent_adapter, progress)
    raise RoundError(f"method {method!r} is unknown")


def _train_ppo(plan: dict, config, parent_adapter: Path | None, progress) -> dict:
    """PPO (align/ppo.py) against the chosen reward model, in this one process."""
    from peft import PeftModel

    from align import ppo
    from align.models import load_causal_lm, load_tokenizer
    from align.reward import load_reward_model

    state = process_state()
    if state.num_processes > 1:
        raise RoundError("ppo rounds run in a single process: start them without `accelerate launch`")
    base, staging = Path(plan["base_path"]), Path(plan["staging"])
    tokenizer = load_tokenizer(base)
    model = load_causal_lm(base).to(state.device)
    model.config.pad_token_id = tokenizer.pad_token_id
    if parent_adapter is not None:
        policy = PeftModel.from_pretrained(model, str(parent_adapter), is_trainable=True)
    else:
        policy = ppo.attach_lora(model, config)
    reward, _ = load_reward_model(base, Path(plan["reward_path"]))
    reward.to(state.device)
    history = ppo.train_ppo(
        policy, tokenizer, plan["rows"], reward, config,
        progress_callback=lambda step, metrics: _ppo_progress(progress, step, config.steps, metrics),
    )
    policy.save_pretrained(str(staging), selected_adapters=["default"])
    checkpoint("save")  # a half-written staging folder: the adapter without its tokenizer
    tokenizer.save_pretrained(str(staging))
    last = history[-1] if history else {}
    return {f"train_{k}": float(v) for k, v in last.items() if isinstance(v, (int, float))}


def _ppo_progress(progress, step: int, total: int, metrics: dict) -> None:
    progress(step, total, None)  # the stop check
    progress(step, total, {k: v for k, v in metrics.items() if k != "step"})


# ---------------------------------------------------------------- evaluate


def _evaluate(db, plan: dict, round_config: RoundConfig, method_config) -> dict:
    """Held-out metrics of the new version (main process only)."""
    from annotations.registry import select_pairs, select_prompts

    from annotations import intervals

    from align import evaluate
    from align.models import load_policy, load_tokenizer, using_version
    from align.reward import load_reward_model
    from align.training import preference_rows

    base, staging = Path(plan["base_path"]), Path(plan["staging"])
    device = process_state().device  # the GPU this process trained on, or the CPU
    max_length = getattr(method_config, "max_length", 512)
    batch = round_config.eval_batch_size
    pairs = select_pairs(db, None, "heldout", until_id=plan["pair_until"])[: round_config.eval_pairs]
    rows = preference_rows(pairs)
    metrics: dict = {"heldout_pairs": len(rows)}
    checkpoint("evaluate")

    if plan["kind"] == "reward":
        if rows:
            rm, tokenizer = load_reward_model(base, staging)
            rm.to(device)
            correct = evaluate.reward_correct(rm, tokenizer, rows, batch, max_length)
            del rm
            metrics["heldout_accuracy"] = sum(correct) / len(correct)
            metrics["heldout_accuracy_interval"] = {**intervals.accuracy(sum(correct), len(correct)),
                                                    "correct": sum(correct)}
            if plan["parent_path"]:
                parent_rm, _ = load_reward_model(base, Path(plan["parent_path"]))
                parent_rm.to(device)
                live_correct = evaluate.reward_correct(parent_rm, tokenizer, rows, batch, max_length)
                metrics["parent_heldout_accuracy"] = sum(live_correct) / len(live_correct)
                # paired on the same pairs: what the gate compares (annotations/gate.py)
                metrics["versus_live"] = {
                    "live": plan["parent"], "n": len(rows),
                    "only_candidate_right": sum(c and not p for c, p in zip(correct, live_correct)),
                    "only_live_right": sum(p and not c for c, p in zip(correct, live_correct))}
        return metrics

    version, parent = plan["version"], plan["parent"] or BASE_VERSION
    adapters = {version: staging}
    if plan["parent_path"]:
        adapters[parent] = Path(plan["parent_path"])
    tokenizer = load_tokenizer(base)
    policy = load_policy(base, adapters).to(device)
    beta = getattr(method_config, "beta", 0.1)
    if rows:
        with using_version(policy, version):
            chosen, rejected = evaluate.implicit_rewards(policy, tokenizer, rows, beta, batch, max_length)
        correct = int((chosen > rejected).sum().item())
        metrics["heldout_implicit_accuracy"] = correct / len(rows)
        metrics["heldout_implicit_accuracy_interval"] = {**intervals.accuracy(correct, len(rows)), "correct": correct}
        metrics["heldout_implicit_margin"] = (chosen - rejected).mean().item()
    prompts = [p["messages"] for p in select_prompts(db, "heldout", limit=round_config.eval_prompts)]
    if not prompts:
        prompts = [pair["messages"] for pair in pairs][: round_config.eval_prompts]
    tokens = round_config.eval_max_new_tokens
    if prompts:
        with using_version(policy, version):
            kl = evaluate.kl_to_reference(policy, tokenizer, prompts, tokens, batch_size=batch)
        metrics["kl_to_base"] = kl["mean"]
        metrics["kl_to_base_interval"] = {k: kl[k] for k in ("mean", "se", "low", "high", "n", "too_few")}
        metrics["eval_prompts"] = len(prompts)
    if plan["reward_path"] and round_config.gate_prompts:
        metrics["gate_comparison"] = _gate_comparison(db, plan, round_config, policy, tokenizer, device, max_length)
        metrics["win_rate_vs_parent"] = metrics["gate_comparison"]["win_rate"]
    if prompts and round_config.eval_samples:
        metrics["samples"] = evaluate.sample_answers(policy, tokenizer, prompts[: round_config.eval_samples],
                                                     [parent, version], tokens)
    return metrics


def _gate_comparison(db, plan: dict, round_config: RoundConfig, policy, tokenizer, device, max_length: int) -> dict:
    """The new version against its parent on paired answers to a fresh, seeded random sample of
    held-out prompts, judged by the reward model: what the promotion gate decides on
    (annotations/gate.py). Records the seed and the prompt ids, so anyone can redo it."""
    import random

    from annotations.registry import select_prompts

    from align import evaluate
    from align.reward import load_reward_model

    heldout = select_prompts(db, "heldout")
    seed = round_config.gate_seed if round_config.gate_seed is not None else plan["round_id"]
    sample = random.Random(seed).sample(heldout, min(round_config.gate_prompts, len(heldout)))
    out = {"opponent": plan["parent"] or BASE_VERSION, "judge": plan["reward"],
           # PPO maximised this very reward model: it must not judge the result (reward hacking)
           "judge_optimised": plan["method"] == "ppo", "seed": seed, "prompt_ids": [p["id"] for p in sample],
           "wins": 0, "ties": 0, "losses": 0, "n": 0, "win_rate": None}
    if not sample:
        return out
    rm, _ = load_reward_model(Path(plan["base_path"]), Path(plan["reward_path"]))
    rm.to(device)
    result = evaluate.win_rate(rm, tokenizer, policy, [p["messages"] for p in sample], plan["version"],
                               out["opponent"], round_config.eval_max_new_tokens, seed=seed,
                               batch_size=max(round_config.eval_batch_size, GATE_GENERATION_BATCH),
                               max_length=max_length)
    return {**out, **result}


# ---------------------------------------------------------------- the round


def run_round(
    db_path: Path,
    round_id: int,
    home: Path,
    base_path: Path,
    *,
    stop_event: threading.Event | None = None,
) -> dict:
    """Run round `round_id` to the end (see the module docstring). Returns
    {"round_id", "version", "status", "metrics"}; raises on failure, after marking the round
    failed (or cancelled) with the error and removing whatever it wrote under versions/."""
    from annotations import open_db
    from annotations.db import write_transaction
    from annotations.gate import apply_gate, verdict_line
    from annotations.registry import (
        finish_round,
        get_round,
        register_version,
        stage_adapter,
        update_round,
    )

    state = process_state()
    main = state.is_main_process
    versions = VersionDir(Path(home) / "versions")
    db = open_db(db_path) if main else None
    plan = error = None
    if main:
        try:
            recover_interrupted(db, home)  # a name freed by a crashed round may still have a folder
            plan = _plan_round(db, round_id, versions, Path(base_path))
        except BaseException as e:  # noqa: BLE001 - the round must end failed whatever happened
            error = _describe(e)
            _fail(db, round_id, e)
            if state.num_processes <= 1:
                db.close()
                raise
    plan, error = broadcast_from_main((plan, error), state)
    if error is not None:
        if main:
            raise RoundError(error)
        raise RoundError(f"round {round_id} failed on the main process: {error}")

    staging, committed = Path(plan["staging"]), None
    try:
        round_config, method_config = parse_round_config(plan["method"], plan["config"])
        reporter = RoundReporter(db, round_id, state, stop_event=stop_event)
        train = _train(plan, round_config, method_config, reporter)
        if not main:
            return {"round_id": round_id, "version": plan["version"], "status": "trained", "metrics": train}
        update_round(db, round_id, progress=TRAIN_PROGRESS_SHARE, metrics=train,
                     log_line=f"trained {plan['version']}; evaluating on held-out data")
        if plan["kind"] == "policy":
            stage_adapter(db, round_id, staging)  # unregistered: the app may load it, nobody can ask for it
        metrics = {**train, **_evaluate(db, plan, round_config, method_config)}
        checkpoint("commit")
        committed = versions.commit(staging, plan["version"])
        checkpoint("register")
        with write_transaction(db):
            if get_round(db, round_id)["status"] != "running":
                raise RoundStopped("cancelled during evaluation", status="cancelled")
            register_version(db, plan["version"], plan["kind"], plan["parent"], plan["method"], round_id,
                             str(committed), _summary(metrics))
            checkpoint("registering")  # inside the transaction: killed here, none of it lands
            finish_round(db, round_id, "succeeded", version=plan["version"], metrics=metrics)
        checkpoint("gate")
        update_round(db, round_id, log_line=f"registered {plan['version']} as a candidate: {_headline(metrics)}")
        logger.info("round %d: registered %s (%s)", round_id, plan["version"], _headline(metrics))
        gate = apply_gate(db, plan["version"])  # every new version goes through the promotion gate
        update_round(db, round_id, metrics={"gate": gate}, log_line=f"promotion gate: {verdict_line(gate)}")
        return {"round_id": round_id, "version": plan["version"], "status": "succeeded", "metrics": metrics,
                "gate": gate}
    except BaseException as e:
        if main:
            for path in (staging, committed):
                if path is not None:
                    shutil.rmtree(path, ignore_errors=True)
            _fail(db, round_id, e)
        raise
    finally:
        # No barrier here: after training the other processes have nothing left to do, and
        # evaluation on the main one may take longer than a collective's timeout.
        if db is not None:
            db.close()


def _describe(e: BaseException) -> str:
    if isinstance(e, (RoundError, ConfigError)):
        return str(e)
    if isinstance(e, KeyboardInterrupt):
        return "interrupted (KeyboardInterrupt)"
    return f"{type(e).__name__}: {e}"


def _fail(db, round_id: int, e: BaseException) -> None:
    """End the round failed (or cancelled) with the error; never raises. Only a round this
    process is running is touched (not one that had already ended, or runs elsewhere)."""
    from annotations.registry import finish_round, get_round, update_round

    try:
        message = _describe(e)
        row = get_round(db, round_id)
        if row["status"] == "cancelled" and row["pid"] == os.getpid():
            error = message if "cancelled" in message else f"cancelled: {message}"
            finish_round(db, round_id, "cancelled", error=error)
            return
        if row["status"] != "running" or row["pid"] != os.getpid():
            logger.error("round %d was not started: %s", round_id, message)
            return
        status = "cancelled" if isinstance(e, RoundStopped) and e.status == "cancelled" else "failed"
        if not isinstance(e, (RoundError, ConfigError)):
            lines = traceback.format_exception(type(e), e, e.__traceback__)
            update_round(db, round_id, log_line="".join(lines[:1] + lines[-6:]))
        finish_round(db, round_id, status, error=message)
        logger.error("round %d %s: %s", round_id, status, message)
    except Exception:  # the store itself failing must not hide the original error
        logger.exception("could not record the failure of round %d", round_id)


def _summary(metrics: dict) -> dict:
    """The metrics stored with a version: numbers and the samples, not every training log value."""
    keep = {}
    for key, value in metrics.items():
        if key.startswith("train_") and key not in ("train_loss", "train_runtime", "train_steps",
                                                    "train_rewards/accuracies", "train_accuracy"):
            continue
        keep[key] = value
    return keep


def _headline(metrics: dict) -> str:
    keys = ("heldout_accuracy", "heldout_implicit_accuracy", "kl_to_base", "win_rate_vs_parent")
    parts = [f"{k} {metrics[k]:.3f}" for k in keys if isinstance(metrics.get(k), float)]
    return ", ".join(parts) or "no held-out data to evaluate on"


# ---------------------------------------------------------------- recovery


def recover_interrupted(db, home: Path) -> dict:
    """Clean up after processes that died mid-round: fail their rounds, delete their staging
    folders, and delete version folders that were renamed into place but never registered.
    Folders of rounds running now (in live processes) are left alone."""
    from annotations.registry import fail_stale_rounds, list_versions, running_versions

    versions = VersionDir(Path(home) / "versions")
    failed = fail_stale_rounds(db)
    busy = running_versions(db)
    swept = versions.sweep_staging(keep=busy)
    registered = {v["version"] for v in list_versions(db)}
    orphans = []
    if versions.root.exists():
        import re

        for path in versions.root.iterdir():
            name = path.name
            if path.is_dir() and re.fullmatch(r"(v|rm)\d+", name) and name not in registered and name not in busy:
                shutil.rmtree(path, ignore_errors=True)
                orphans.append(path)
    for what, items in (("failed stale rounds", failed), ("removed staging folders", swept),
                        ("removed unregistered version folders", orphans)):
        if items:
            logger.warning("%s: %s", what, ", ".join(map(str, items)))
    return {"failed_rounds": failed, "swept": swept, "orphans": orphans}
