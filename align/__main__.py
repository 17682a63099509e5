"""Command line for training and models: `python -m align COMMAND ...` (see --help).

  prepare-base            convert the bundled SmolLM2 GGUF to a local safetensors folder
  round --method M        queue a training round and run it here, printing progress; with
                          --set processes=N as N processes under `accelerate launch`
                          (or start it yourself: `accelerate launch -m align round ...`)
  worker                  run queued rounds as they come (the app queues them)
  config --method M       the config keys of a method (and of every round), with defaults
  versions / rounds       list model versions / recent rounds
  promote V / rollback    make a version live / make the live version's parent live again
  compare A [B]           reward-model-judged win rate of policy version A over B (default: base)
  export V --out DIR      a version as a folder for use without rankloop: its adapter, or with
                          --merged full weights that plain transformers loads; a model card with lineage
  cancel ROUND            cancel a queued or running round
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from annotations.model_versions import METHODS

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def cmd_prepare_base(args) -> int:
    from align.models import default_base_path, is_prepared, prepare_base, smoke_generate

    if args.base:
        # Any local Hugging Face folder can be the base: check that it loads and generates.
        path = Path(args.base)
        text = smoke_generate(path)
        print(f"{path} loads and generates: {text!r}")
        return 0
    out = Path(args.out) if args.out else default_base_path()
    if is_prepared(out) and not args.force:
        print(f"base model already prepared at {out} (use --force to convert again)")
        return 0
    path, _ = prepare_base(out, force=args.force)
    print(f"base model prepared at {path}")
    return 0


# ---------------------------------------------------------------- locations


def db_path(args) -> Path:
    from annotations import default_db_path

    return Path(args.db).resolve() if args.db else default_db_path()


def home_path(args) -> Path:
    """The data folder: the store's folder (RANKLOOP_HOME unless --db points elsewhere)."""
    return db_path(args).parent


def base_path(args) -> Path:
    from align.models import default_base_path

    return Path(args.base).resolve() if args.base else default_base_path(home_path(args))


# ---------------------------------------------------------------- rounds


def round_values(args) -> dict:
    from align.config import load_config_file, parse_assignments

    values = load_config_file(args.config) if args.config else {}
    values.update(parse_assignments(args.set))
    return values


def cmd_round(args) -> int:
    from align.processes import broadcast_from_main, process_state
    from align.round_config import normalize_round_config
    from align.rounds import run_round

    state = process_state()
    if not state.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    # Reject a bad config before anything is stored; store the values typed.
    values = normalize_round_config(args.method, round_values(args))
    round_id = None
    if state.is_main_process:
        from annotations import open_db
        from annotations.round_records import create_round

        db = open_db(db_path(args))
        round_id = create_round(db, args.method, values)
        db.close()
        print(f"round {round_id}: {args.method} queued and starting here", flush=True)
    round_id = broadcast_from_main(round_id, state)
    if state.num_processes > 1:  # already under `accelerate launch -m align round ...`
        result = run_round(db_path(args), round_id, home_path(args), base_path(args))
    else:  # here, or launched as the config's `processes` ask (align/launch.py)
        from align.launch import run_claimed_round

        result = run_claimed_round(db_path(args), round_id, home_path(args), base_path(args))
    if state.is_main_process:
        from annotations.gate import verdict_line

        from align.evaluate import figure_lines

        gate = result["gate"]
        print(f"round {round_id} succeeded: registered {result['version']}")
        for line in figure_lines(result["metrics"]):
            print(f"  {line}")
        print(f"promotion gate: {verdict_line(gate)}")
        if not gate["promoted"]:
            print(f"promote it by hand with: python -m align promote {result['version']}")
    return 0


def cmd_run_round(args) -> int:
    """One process of a launched round (align/launch.py): every process runs this together."""
    import threading

    from align.launch import watch_owner
    from align.processes import process_state
    from align.rounds import run_round

    if not process_state().is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    stop = threading.Event()
    watch_owner(stop)
    run_round(db_path(args), args.round_id, home_path(args), base_path(args), stop_event=stop)
    return 0


def cmd_config(args) -> int:
    import dataclasses

    from align.round_config import RoundConfig, method_configs

    for title, cls in ((f"{args.method} keys", method_configs()[args.method]), ("round keys", RoundConfig)):
        print(f"{title}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            print(f"  {f.name} = {default!r}\n      {f.metadata.get('help', '')}")
    return 0


def cmd_worker(args) -> int:
    from align.training import set_threads
    from align.worker import run_worker

    set_threads(args.threads)
    run_worker(db_path(args), home_path(args), base_path(args), poll_seconds=args.poll, once=args.once,
               max_idle_seconds=args.max_idle, parent_pid=args.parent_pid)
    return 0


def cmd_cancel(args) -> int:
    from annotations import open_db
    from annotations.round_records import cancel_round

    previous = cancel_round(open_db(db_path(args)), args.round_id)
    more = " (its worker stops at the next training step)" if previous == "running" else ""
    print(f"round {args.round_id} cancelled{more}")
    return 0


# ---------------------------------------------------------------- versions


def cmd_promote(args) -> int:
    from annotations import open_db
    from annotations.model_versions import promote

    result = promote(open_db(db_path(args)), args.version)
    retired = f"; {result['retired']} retired" if result["retired"] else ""
    print(f"{result['live']} is live{retired}")
    return 0


def cmd_rollback(args) -> int:
    from annotations import open_db
    from annotations.model_versions import rollback

    result = rollback(open_db(db_path(args)), args.kind)
    print(f"{result['live']} is live again; {result['retired']} retired")
    return 0


def cmd_compare(args) -> int:
    from annotations import open_db
    from annotations.model_versions import get_live_version, get_version
    from annotations.training_data import select_prompts

    from align import evaluate
    from align.models import BASE_VERSION, ModelError, load_policy, load_tokenizer
    from align.reward import load_reward_model
    from align.training import set_threads

    db = open_db(db_path(args))
    judge = get_live_version(db, "reward") if args.judge == "live" else get_version(db, args.judge)
    if judge is None or judge["kind"] != "reward":
        raise ModelError(f"{args.judge} is not a reward model: train one (`python -m align round --method rm`) "
                         "and promote it, or name one with --judge")
    adapters = {}
    for name in dict.fromkeys((args.version_a, args.version_b)):
        if name == BASE_VERSION:
            continue
        row = get_version(db, name)
        if row["kind"] != "policy":
            raise ModelError(f"{name} is a {row['kind']} version: compare policy versions")
        adapters[name] = Path(row["path"])
    prompts = [p["messages"] for p in select_prompts(db, "heldout", limit=args.prompts)]
    if not prompts:
        raise ModelError("no held-out prompts to compare on: import some data first")
    set_threads(args.threads)
    base = base_path(args)
    policy = load_policy(base, adapters).eval()
    tokenizer = load_tokenizer(base)
    rm, _ = load_reward_model(base, Path(judge["path"]))
    result = evaluate.win_rate(rm, tokenizer, policy, prompts, args.version_a, args.version_b, args.max_new_tokens,
                               seed=args.seed, batch_size=4)
    from annotations.intervals import describe

    print(f"{args.version_a} vs {args.version_b}, judged by {judge['version']} on {result['n']} held-out prompts: "
          f"win rate {describe(result, digits=3)} (95% interval; "
          f"{result['wins']} wins, {result['ties']} ties, {result['losses']} losses)")
    if args.json:
        print(json.dumps({**result, "version_a": args.version_a, "version_b": args.version_b,
                          "judge": judge["version"]}))
    return 0


def cmd_export(args) -> int:
    from annotations import open_db

    from align.export import export_version

    result = export_version(
        open_db(db_path(args)), args.version, Path(args.out),
        base_path=Path(args.base) if args.base else None, default_base=base_path(args), merged=args.merged,
        force=args.force, base_model_id=args.base_model_id, license=args.license,
    )
    shape = "full weights (merged)" if result["merged"] else "adapter"
    print(f"exported {result['version']} ({result['kind']}, {shape}) to {result['out']}; "
          f"lineage {' <- '.join(result['lineage'])}, base {result['base_path']}")
    return 0


KEY_METRICS = (
    ("heldout_accuracy", "rm acc"),
    ("heldout_implicit_accuracy", "impl acc"),
    ("kl_to_base", "kl"),
    ("win_rate_vs_parent", "win"),
)


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_versions(args) -> int:
    from annotations import open_db
    from annotations.model_versions import list_versions

    versions = list_versions(open_db(db_path(args)), args.kind)
    if args.json:
        print(json.dumps(versions, indent=2))
        return 0
    header = ["version", "kind", "parent", "method", "state", "round", *[label for _, label in KEY_METRICS], "created"]
    rows = []
    for v in versions:
        metrics = [f"{v['metrics'][k]:.3f}" if isinstance(v["metrics"].get(k), (int, float)) else "-"
                   for k, _ in KEY_METRICS]
        rows.append([v["version"], v["kind"], v["parent"] or "-", v["method"], v["state"],
                     v["round_id"] or "-", *metrics, (v["created_at"] or "")[:16]])
    print(format_table(header, rows))
    return 0


def cmd_rounds(args) -> int:
    from annotations import open_db
    from annotations.round_records import list_rounds

    rounds = list_rounds(open_db(db_path(args)), limit=args.limit)
    header = ["round", "method", "status", "progress", "version", "parent", "pairs", "data", "error"]
    rows = [[r["id"], r["method"], r["status"], f"{r['progress']:.0%}", r["version"] or "-",
             r["parent_version"] or "-", r["n_pairs"] if r["n_pairs"] is not None else "-",
             (r["data_hash"] or "-")[:12], (r["error"] or "")[:60]] for r in rounds]
    print(format_table(header, rows))
    return 0


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m align", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default=None, help="store file (default: $RANKLOOP_HOME/rankloop.db, ./data); "
                                                   "versions are written beside it, under versions/")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("prepare-base", help="convert the bundled SmolLM2 GGUF to a local safetensors folder")
    p.add_argument("--out", default=None, help="target folder (default: $RANKLOOP_HOME/models/SmolLM2-135M-Instruct)")
    p.add_argument("--base", default=None, help="check an existing local Hugging Face model folder instead")
    p.add_argument("--force", action="store_true", help="convert again even if already prepared")
    p.set_defaults(func=cmd_prepare_base)

    base_help = "local base model folder (default: $RANKLOOP_HOME/models/SmolLM2-135M-Instruct)"
    p = commands.add_parser("round", help="queue a training round and run it in this process")
    p.add_argument("--method", required=True, choices=tuple(METHODS),
                   help="rm: reward model; dpo, kto, ppo: policy")
    p.add_argument("--config", default=None, help="YAML file of config keys (round keys and the method's keys)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="one config value, overriding the file (repeatable), e.g. --set beta=0.2")
    p.add_argument("--base", default=None, help=base_help)
    p.set_defaults(func=cmd_round)

    p = commands.add_parser("run-round", help="run a round a worker or `round` launched (inside accelerate launch)")
    p.add_argument("round_id", type=int)
    p.add_argument("--base", default=None, help=base_help)
    p.set_defaults(func=cmd_run_round)

    p = commands.add_parser("config", help="list the config keys of a method, with defaults and help")
    p.add_argument("--method", required=True, choices=tuple(METHODS))
    p.set_defaults(func=cmd_config)

    p = commands.add_parser("worker", help="run queued rounds as they come")
    p.add_argument("--base", default=None, help=base_help)
    p.add_argument("--poll", type=float, default=2.0, help="seconds between looks at an empty queue")
    p.add_argument("--once", action="store_true", help="run at most one round, then exit")
    p.add_argument("--max-idle", type=float, default=None, help="exit after the queue has been empty this long")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--parent-pid", type=int, default=None,
                   help="stop when this process is gone (the app passes its own pid)")
    p.set_defaults(func=cmd_worker)

    p = commands.add_parser("promote", help="make a version live (the previous live one of its kind retires)")
    p.add_argument("version")
    p.set_defaults(func=cmd_promote)

    p = commands.add_parser("rollback", help="make the live version's parent live again")
    p.add_argument("--kind", default="policy", choices=("policy", "reward"))
    p.set_defaults(func=cmd_rollback)

    p = commands.add_parser("compare", help="reward-model-judged win rate of one policy version over another")
    p.add_argument("version_a")
    p.add_argument("version_b", nargs="?", default="base")
    p.add_argument("--prompts", type=int, default=64, help="held-out prompts to sample answers to")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--judge", default="live", help="reward model version (default: the live one)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (both versions use the same)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="also print the counts as JSON")
    p.add_argument("--base", default=None, help=base_help)
    p.set_defaults(func=cmd_compare)

    p = commands.add_parser("export", help="write a version to a folder usable without rankloop, with a model card")
    p.add_argument("version")
    p.add_argument("--out", required=True, help="folder to create (written beside it first, renamed at the end)")
    p.add_argument("--merged", action="store_true",
                   help="full weights, base and adapter merged (AutoModelForCausalLM / "
                        "AutoModelForSequenceClassification load it); default: the PEFT adapter as is")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--base", default=None,
                   help="base model folder (default: the one the version's round recorded, else "
                        "$RANKLOOP_HOME/models/SmolLM2-135M-Instruct)")
    p.add_argument("--base-model-id", default=None,
                   help="the base's Hugging Face Hub id for the card's base_model (the bundled SmolLM2 is known)")
    p.add_argument("--license", default=None, help="license id for the card's front matter, e.g. apache-2.0")
    p.set_defaults(func=cmd_export)

    p = commands.add_parser("versions", help="list model versions with their lineage and key metrics")
    p.add_argument("--kind", default=None, choices=("policy", "reward"))
    p.add_argument("--json", action="store_true", help="every field, as JSON")
    p.set_defaults(func=cmd_versions)

    p = commands.add_parser("rounds", help="list recent rounds")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=cmd_rounds)

    p = commands.add_parser("cancel", help="cancel a queued or running round")
    p.add_argument("round_id", type=int)
    p.set_defaults(func=cmd_cancel)
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    from annotations.errors import AnnotationsError

    from align.config import ConfigError
    from align.models import ModelError

    known = (AnnotationsError, ConfigError, ModelError)
    try:
        from align.round_stages import RoundError

        known = (*known, RoundError)
    except ImportError:  # pragma: no cover - torch missing: only the store commands work
        pass
    try:
        return args.func(args)
    except known as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
