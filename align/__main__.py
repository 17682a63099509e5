"""Command line for training and models: `python -m align COMMAND ...` (see --help)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m align", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare-base", help="convert the bundled SmolLM2 GGUF to a local safetensors folder")
    p.add_argument("--out", default=None, help="target folder (default: $RANKLOOP_HOME/models/SmolLM2-135M-Instruct)")
    p.add_argument("--base", default=None, help="check an existing local Hugging Face model folder instead")
    p.add_argument("--force", action="store_true", help="convert again even if already prepared")
    p.set_defaults(func=cmd_prepare_base)
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    from align.models import ModelError

    try:
        return args.func(args)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
