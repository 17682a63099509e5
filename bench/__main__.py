"""Run the benchmarks: `python -m bench [--only NAME ...] [--quick]`."""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

BENCHMARKS = ("candidates", "next_item", "hot_swap", "memory", "load", "dpo", "reward", "turnaround", "ppo")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, default=None)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    args = parser.parse_args(argv)

    import importlib

    from align.models import default_base_path, is_prepared, prepare_base
    from bench.common import print_table, write_results

    base = default_base_path()
    if not is_prepared(base):
        prepare_base(base)
    results = []
    for name in args.only or BENCHMARKS:
        print(f"== {name}", flush=True)
        results += importlib.import_module(f"bench.{name}").run(base, quick=args.quick)
    print_table(results)
    command = "make bench" if not args.only else f"python -m bench --only {' '.join(args.only)}"
    write_results(results, command + (" --quick" if args.quick else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
