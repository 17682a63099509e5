"""Command line for the store: `python -m annotations COMMAND ...` (see --help).

Paths given here (import files, export and backup targets, --db) are the operator's own: they
are used as given, with the rights of whoever runs the command. The web app never passes a
user-chosen path to these functions (see docs/reliability.md).
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sqlite3
import sys
from pathlib import Path

from annotations.db import BUSY_TIMEOUT_S, backup_db, check_db, default_db_path, open_db
from annotations.errors import AnnotationsError
from annotations.formats import FORMATS, STYLES, export_dataset, export_pairs, import_file
from annotations.quality import WEIGHT_BY, agreement_report, format_report
from annotations.store import ROLES, add_user, count_rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m annotations", description=__doc__)
    parser.add_argument("--db", default=None, help="store file (default: $RANKLOOP_HOME/rankloop.db, ./data)")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("import", help="import prompts or preference data")
    p.add_argument("path", help="JSONL(.gz), CSV, parquet file or datasets folder")
    p.add_argument("--format", required=True, choices=FORMATS, help="prompts | trl | hh (Anthropic transcripts)")
    p.add_argument("--source", default=None, help="label stored with each prompt (default: import:FILENAME)")
    p.add_argument("--no-queue", action="store_true", help="store prompts without queueing them for annotation")
    p.add_argument("--mode", default="pairwise", choices=("pairwise", "ranking"), help="judgement mode of queued items")
    p.add_argument("--k", type=int, default=2, help="answers per queued item (2-6; pairwise is always 2)")
    p.add_argument("--overlap", type=int, default=1, help="judgements wanted per queued item")

    p = commands.add_parser("export", help="export preference pairs in TRL's format")
    p.add_argument("--format", default="trl", choices=("trl",))
    p.add_argument("--out", required=True,
                   help="OUT.jsonl, OUT.parquet, OUT.csv (for spreadsheets: cells that would start a formula "
                        "get a leading '), or a folder (datasets.save_to_disk)")
    p.add_argument("--split", choices=("train", "heldout"), default=None, help="only this split (default: all)")
    p.add_argument("--style", choices=STYLES, default="conversational")
    p.add_argument("--with-meta", action="store_true", help="add id, weight, split and source columns")
    p.add_argument("--min-agreement", type=float, default=None,
                   help="drop judged pairs whose item agreement (share of the item's judgements that agree) is below this")
    p.add_argument("--min-annotator-accuracy", type=float, default=None,
                   help="drop pairs from annotators whose gold accuracy is below this (no gold seen: kept)")
    p.add_argument("--weight-by", choices=WEIGHT_BY, default=None,
                   help="weight column (with --with-meta): stored weight times item agreement or annotator accuracy")

    p = commands.add_parser("export-dataset",
                            help="preference pairs as a Hugging Face datasets folder with a dataset card, "
                                 "ready for your own push_to_hub")
    p.add_argument("--out", required=True, help="folder to create (datasets.load_from_disk reads it)")
    p.add_argument("--license", default="other", help="license id for the card's front matter (default: other)")
    p.add_argument("--split", choices=("train", "heldout"), default=None, help="only this split (default: all)")
    p.add_argument("--min-agreement", type=float, default=None,
                   help="drop judged pairs whose item agreement is below this")
    p.add_argument("--min-annotator-accuracy", type=float, default=None,
                   help="drop pairs from annotators whose gold accuracy is below this (no gold seen: kept)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")

    p = commands.add_parser("add-user", help="create an account")
    p.add_argument("name")
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--password", default=None, help="default: $RANKLOOP_PASSWORD, else asked for")

    commands.add_parser("stats", help="row counts of the main tables")
    commands.add_parser("quality", help="inter-annotator agreement, Krippendorff's alpha, gold accuracy")

    p = commands.add_parser("backup", help="consistent copy of the store, safe while the app and worker write")
    p.add_argument("path", help="new file to write (never overwritten)")
    commands.add_parser("check", help="PRAGMA integrity_check and foreign_key_check; exit status 1 on any problem")
    return parser


def existing_file(path) -> sqlite3.Connection:
    """A plain connection to an existing database file: no migrations, no change of journal
    mode (backup and check must not alter what they look at)."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationsError(f"there is no store at {path}")
    return sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "backup":
            try:
                target = backup_db(existing_file(args.db or default_db_path()), args.path)
            except sqlite3.DatabaseError as e:
                raise AnnotationsError(f"cannot back up the store: {e}") from None
            problems = check_db(existing_file(target))
            if problems:
                print("error: the backup fails its check:\n  " + "\n  ".join(problems), file=sys.stderr)
                return 1
            print(f"backed up to {target} (integrity and foreign keys checked)")
            return 0
        if args.command == "check":
            problems = check_db(existing_file(args.db or default_db_path()))
            for problem in problems:
                print(problem)
            print(f"{len(problems)} problem(s) found" if problems
                  else "ok: integrity_check and foreign_key_check pass")
            return 1 if problems else 0
        db = open_db(args.db or default_db_path())
        if args.command == "import":
            report = import_file(
                db, args.path, args.format, source=args.source, queue=not args.no_queue,
                mode=args.mode, k=args.k, overlap=args.overlap,
            )
            print(report.summary())
        elif args.command == "export":
            n = export_pairs(
                db, args.out, split=args.split, style=args.style, with_meta=args.with_meta,
                min_agreement=args.min_agreement, min_annotator_accuracy=args.min_annotator_accuracy,
                weight_by=args.weight_by,
            )
            print(f"exported {n} pairs to {args.out}")
        elif args.command == "export-dataset":
            summary = export_dataset(
                db, args.out, license=args.license, split=args.split, min_agreement=args.min_agreement,
                min_annotator_accuracy=args.min_annotator_accuracy, force=args.force,
            )
            sources = ", ".join(f"{source} {count}" for source, count in summary["sources"].items())
            print(f"exported {summary['pairs']} pairs ({sources}) with a dataset card to {args.out}")
        elif args.command == "add-user":
            password = args.password or os.environ.get("RANKLOOP_PASSWORD")
            if not password:
                if not sys.stdin.isatty():
                    raise AnnotationsError("no password given: pass --password or set RANKLOOP_PASSWORD")
                password = getpass.getpass(f"password for {args.name}: ")
            add_user(db, args.name, args.role, password)
            print(f"created {args.role} {args.name}")
        elif args.command == "stats":
            for table in ("users", "prompts", "items", "candidates", "judgements", "pairs", "ratings", "rounds", "policies"):
                print(f"{table:12} {count_rows(db, table)}")
        elif args.command == "quality":
            print(format_report(agreement_report(db)))
    except AnnotationsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
