"""Planning a round (main process only): claim it, reserve its version name, resolve its parent
and reward model, select and hash the exact data it trains on, and record all of it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from align.config import ConfigError
from align.models import BASE_VERSION, VersionDir
from align.round_config import RoundConfig, parse_round_config
from align.round_stages import RoundError, checkpoint

REPO = Path(__file__).resolve().parent.parent


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


def resolve_version(db, kind: str, name: str) -> dict | None:
    """'live', 'base' or a version name → that version's row (None: no such live version)."""
    from annotations.errors import NotFound
    from annotations.model_versions import get_live_version, get_version

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


def select_data(db, method: str, round_config: RoundConfig, until: dict):
    """(training rows, snapshot rows to hash, description) for a method. `until` holds the
    snapshot's edges: the highest pair, rating and judgement ids it may read."""
    from annotations.answer_labels import kto_examples
    from annotations.training_data import select_pairs, select_prompts, since_watermark

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
        edges = {key: since_watermark(db, since, method, f"data_until_{key}_id") for key in until}
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


def plan_round(db, round_id: int, versions: VersionDir, base_path: Path) -> dict:
    """Claim the round and prepare everything training needs (main process only)."""
    from annotations.model_versions import method_kind
    from annotations.round_records import claim_round, get_round, reserve_version, set_round_data, update_round
    from annotations.training_data import judgement_watermark, pair_watermark, rating_watermark, snapshot_hash

    from align.launch import round_owner_pid

    row = get_round(db, round_id)
    owner = round_owner_pid()  # this process, or the worker that launched it (align/launch.py)
    if row["status"] == "queued":
        claim_round(db, round_id, owner)
    elif not (row["status"] == "running" and row["pid"] == owner):
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
    parent = resolve_version(db, kind, round_config.parent)
    reward = resolve_version(db, "reward", round_config.reward_model) if kind == "policy" else None
    if method == "ppo" and reward is None:
        raise RoundError("PPO needs a reward model: train one (`python -m align round --method rm`) and promote it")

    until = {"pair": pair_watermark(db), "rating": rating_watermark(db), "judgement": judgement_watermark(db)}
    rows, snapshot, description = select_data(db, method, round_config, until)
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
