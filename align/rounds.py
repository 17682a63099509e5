"""One training round, start to finish: select data → train → evaluate → register.

`run_round` takes a round row from the store and:

1. claims it (queued → running under this pid) and reserves the name of the version it will
   produce (v3, rm2, ...) (align/round_plan.py);
2. reads its config (round-level keys in `RoundConfig`, the rest in the method's dataclass:
   align/round_config.py);
3. selects the data (all training pairs, or those newer than the last round of this method),
   hashes the exact snapshot and records hash, size, parent version, base and code version
   (align/round_plan.py);
4. trains into a staging folder under `versions/` (progress and log lines go to the round row:
   align/round_progress.py);
5. records a policy adapter's staging folder on the round (the app loads and merges it from
   there meanwhile, so a promotion by the gate finds it ready), then evaluates the new
   version on the held-out split and stores the metrics (align/round_eval.py);
6. renames the staging folder into place, then registers the version as a `candidate` and
   marks the round succeeded in one transaction.

Whatever goes wrong, at any step, the round ends `failed` with the error, the staging folder
is removed, nothing is registered, and the live version is untouched. A process killed
outright leaves a running round and maybe a staging folder: `recover_interrupted`, run when a
worker starts, fails the round and sweeps the folder (align/recovery.py). (`tests/align/test_kill_worker.py`
kills a worker at each step (align/round_stages.py): a `checkpoint` hook stops the worker there first.)

Under `accelerate launch` every process calls `run_round`: the main process does the store
work and broadcasts the plan (the data itself) to the others, all of them train together,
and only the main one saves, evaluates and registers. A round whose config asks for several
processes is launched that way by the worker (align/launch.py), which stays its owner.
"""

from __future__ import annotations

import logging
import shutil
import threading
import traceback
from pathlib import Path

from align.config import ConfigError
from align.models import VersionDir
from align.processes import process_state, broadcast_from_main
from align.recovery import recover_interrupted
from align.round_config import RoundConfig, parse_round_config
from align.round_eval import evaluate_round
from align.round_plan import plan_round
from align.round_progress import TRAIN_PROGRESS_SHARE, RoundReporter
from align.round_stages import RoundError, RoundStopped, checkpoint

logger = logging.getLogger(__name__)


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
    from annotations.model_versions import register_version
    from annotations.round_records import finish_round, get_round, stage_adapter, update_round

    state = process_state()
    main = state.is_main_process
    versions = VersionDir(Path(home) / "versions")
    db = open_db(db_path) if main else None
    plan = error = None
    if main:
        try:
            recover_interrupted(db, home)  # a name freed by a crashed round may still have a folder
            plan = plan_round(db, round_id, versions, Path(base_path))
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
        metrics = {**train, **evaluate_round(db, plan, round_config, method_config)}
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
    """PPO (align/ppo.py) against the chosen reward model; data parallel under several processes."""
    from peft import PeftModel

    from align import ppo
    from align.models import load_causal_lm, load_tokenizer
    from align.reward import load_reward_model

    state = process_state()
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
        progress_callback=lambda step, metrics: _ppo_progress(progress, step, config.steps, metrics), state=state,
    )
    last = history[-1] if history else {}
    metrics = {f"train_{k}": float(v) for k, v in last.items() if isinstance(v, (int, float))}
    if not state.is_main_process:  # the weights are the same everywhere: the main process saves them
        return metrics
    policy.save_pretrained(str(staging), selected_adapters=["default"])
    checkpoint("save")  # a half-written staging folder: the adapter without its tokenizer
    tokenizer.save_pretrained(str(staging))
    return metrics


def _ppo_progress(progress, step: int, total: int, metrics: dict) -> None:
    progress(step, total, None)  # the stop check
    progress(step, total, {k: v for k, v in metrics.items() if k != "step"})


def _describe(e: BaseException) -> str:
    if isinstance(e, (RoundError, ConfigError)):
        return str(e)
    if isinstance(e, KeyboardInterrupt):
        return "interrupted (KeyboardInterrupt)"
    return f"{type(e).__name__}: {e}"


def _fail(db, round_id: int, e: BaseException) -> None:
    """End the round failed (or cancelled) with the error; never raises. Only a round this
    process is running is touched (not one that had already ended, or runs elsewhere)."""
    from annotations.round_records import finish_round, get_round, update_round

    from align.launch import round_owner_pid

    try:
        message = _describe(e)
        row = get_round(db, round_id)
        owner = round_owner_pid()
        if row["status"] == "cancelled" and row["pid"] == owner:
            error = message if "cancelled" in message else f"cancelled: {message}"
            finish_round(db, round_id, "cancelled", error=error)
            return
        if row["status"] != "running" or row["pid"] != owner:
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
