"""Launch the rankloop web app: `python -m app` (see --help); `python -m app health` and
`python -m app api-key ...` (see their --help)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "7860")))
    parser.add_argument("--home", default=os.environ.get("RANKLOOP_HOME", "data"),
                        help="data folder: store, models, versions (default: $RANKLOOP_HOME or ./data)")
    parser.add_argument("--base", default=None, help="base model folder (default: the prepared SmolLM2)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("RANKLOOP_SERVE_THREADS", "2")),
                        help="torch threads for serving")
    parser.add_argument("--prefetch", type=int, default=4, help="ready items to keep ahead of annotators (0: off)")
    parser.add_argument("--dtype", default=os.environ.get("RANKLOOP_SERVE_DTYPE", "auto"),
                        choices=("auto", "float32", "bfloat16"),
                        help="weights of the serving model (auto: bfloat16 on a GPU or CPU with native bf16, "
                             "else float32)")
    parser.add_argument("--device", default=os.environ.get("RANKLOOP_SERVE_DEVICE", "auto"),
                        help="where the serving model runs: auto (the first CUDA GPU if any, else the CPU), cpu, "
                             "cuda or cuda:N")
    parser.add_argument("--no-demo", action="store_true", help="do not queue the demo prompts on an empty store")
    parser.add_argument("--no-worker", action="store_true",
                        help="do not start the training worker (run `python -m align worker` yourself)")
    parser.add_argument("--inference-url", default=os.environ.get("RANKLOOP_INFERENCE_URL"),
                        help="answers (candidates, chat, arena, API) from this OpenAI-compatible server instead "
                             "of the in-process model, e.g. http://gpu-box:8000/v1 (vLLM, TGI, SGLang, "
                             "llama.cpp, another rankloop); its key in $RANKLOOP_INFERENCE_KEY")
    parser.add_argument("--inference-model", default=os.environ.get("RANKLOOP_INFERENCE_MODEL"),
                        help="the base model's name on that server (default: the one it lists, if only one)")
    parser.add_argument("--inference-lora", action="store_true",
                        help="the server loads LoRA adapters at runtime (vLLM --enable-lora with "
                             "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True): versions are loaded there by name")
    return parser


def health_command(argv) -> int:
    """`python -m app health`: the running app's health report (exit 0: ok, 1: degraded, 2: unreachable)."""
    import json

    import httpx

    parser = argparse.ArgumentParser(prog="python -m app health", description=health_command.__doc__)
    parser.add_argument("--url", default=f"http://{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '7860')}/")
    parser.add_argument("--user", default=os.environ.get("RANKLOOP_ADMIN_USER", "admin"), help="an admin account")
    parser.add_argument("--password", default=os.environ.get("RANKLOOP_ADMIN_PASSWORD"),
                        help="its password (default: $RANKLOOP_ADMIN_PASSWORD)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if not args.password:
        print("error: give the admin's password with --password or RANKLOOP_ADMIN_PASSWORD", file=sys.stderr)
        return 2
    from app.health import format_report

    try:
        with httpx.Client(base_url=args.url, timeout=30) as client:
            login = client.post("login", data={"username": args.user, "password": args.password})
            if login.status_code != 200:
                print(f"error: cannot log in as {args.user}: HTTP {login.status_code}", file=sys.stderr)
                return 2
            response = client.get("health")
    except httpx.HTTPError as e:
        print(f"error: the app at {args.url} does not answer: {e}", file=sys.stderr)
        return 2
    if response.status_code not in (200, 503):
        print(f"error: HTTP {response.status_code}: {response.text[:200]}", file=sys.stderr)
        return 2
    report = response.json()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["status"] == "ok" else 1


def api_key_command(argv) -> int:
    """`python -m app api-key create NAME | list | revoke ID | limit [N]`: keys of the
    OpenAI-compatible API (docs/scaling.md), made and revoked by the operator, in the store."""
    from annotations import api_keys
    from annotations.db import open_db
    from annotations.errors import AnnotationsError

    parser = argparse.ArgumentParser(prog="python -m app api-key", description=api_key_command.__doc__)
    parser.add_argument("--home", default=os.environ.get("RANKLOOP_HOME", "data"),
                        help="data folder holding the store (default: $RANKLOOP_HOME or ./data)")
    commands = parser.add_subparsers(dest="action", required=True)
    p = commands.add_parser("create", help="make a key for an account and print it (shown once)")
    p.add_argument("name", help="the account the key acts as (its role applies)")
    p.add_argument("--label", default="", help="what the key is for (shown in the list)")
    commands.add_parser("list", help="every key: id, account, label, first characters, created, last used, revoked")
    p = commands.add_parser("revoke", help="revoke a key for good")
    p.add_argument("id", type=int)
    p = commands.add_parser("limit", help="show, or set, the requests per minute each key may make")
    p.add_argument("per_minute", type=int, nargs="?")
    args = parser.parse_args(argv)
    try:
        db = open_db(Path(args.home).resolve() / "rankloop.db")
        if args.action == "create":
            key_id, key = api_keys.create_key(db, args.name, args.label)
            print(f"API key {key_id} for {args.name} (shown once: keep it now):\n{key}")
        elif args.action == "list":
            rows = api_keys.list_keys(db)
            for k in rows:
                state = f"revoked {k['revoked_at']}" if k["revoked_at"] else f"last used {k['last_used_at'] or 'never'}"
                print(f"{k['id']:>4}  {k['user']:<16} {k['prefix']}...  created {k['created_at']}  {state}"
                      + (f"  ({k['label']})" if k["label"] else ""))
            if not rows:
                print("no API keys yet: `python -m app api-key create NAME` makes one")
        elif args.action == "revoke":
            print(f"revoked API key {args.id}" if api_keys.revoke_key(db, args.id)
                  else f"API key {args.id} was revoked already")
        elif args.per_minute is not None:
            print(f"each API key may make {api_keys.set_rate_limit(db, args.per_minute)} requests per minute")
        else:
            print(f"each API key may make {api_keys.rate_limit(db)} requests per minute")
    except AnnotationsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["health"]:
        return health_command(argv[1:])
    if argv[:1] == ["api-key"]:
        return api_key_command(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    home = Path(args.home).resolve()
    os.environ["RANKLOOP_HOME"] = str(home)

    from align.models import ModelError, default_base_path, is_prepared, prepare_base
    from app.server import create_app, launch, shutdown

    base = Path(args.base) if args.base else default_base_path(home)
    if not args.base and not is_prepared(base):
        print(f"Preparing the default base model in {base} (once, about 30 s)...", flush=True)
        prepare_base(base)
    from app.remote import RemoteError, inference_settings

    try:
        inference = inference_settings(args.inference_url, args.inference_model, args.inference_lora,
                                       os.environ.get("RANKLOOP_INFERENCE_KEY"))
        ctx, demo, auth, created_admin = create_app(
            home, base, threads=args.threads, prefetch=args.prefetch, demo_prompts=not args.no_demo,
            worker=not args.no_worker, dtype=args.dtype, inference=inference, device=args.device,
        )
    except (ModelError, RemoteError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if created_admin:
        name, password = created_admin
        print(f"\nFirst admin account created: user {name!r}, password {password!r}\n"
              "(shown once; set RANKLOOP_ADMIN_PASSWORD to choose it)\n", flush=True)
    print(f"rankloop: http://{args.host}:{args.port}", flush=True)
    try:
        launch(demo, auth, args.host, args.port, ctx=ctx)
    finally:
        shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
