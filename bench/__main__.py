"""Run the benchmarks: `python -m bench [--only NAME ...] [--quick]`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

NAMES_OUT = "RANKLOOP_BENCH_NAMES_OUT"
BENCHMARKS = ("candidates", "completeness", "next_item", "hot_swap", "memory", "load", "dpo", "reward", "scoring",
              "turnaround", "ppo", "ppo_tiny")
ON_REQUEST = ("loop", "selection")  # the closed-loop simulations (hours): `python -m bench --only loop`


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS + ON_REQUEST, default=None)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--same-process", action="store_true",
                        help="run the benchmarks in this process instead of one process each")
    args = parser.parse_args(argv)

    import importlib
    import subprocess

    from align.models import default_base_path, is_prepared, prepare_base
    from bench.common import RESULTS, Result, print_table, write_results

    names = args.only or list(BENCHMARKS)
    command = "make bench" if not args.only else f"python -m bench --only {' '.join(args.only)}"
    command += " --quick" if args.quick else ""
    base = default_base_path()
    if not is_prepared(base):
        prepare_base(base)
    if len(names) > 1 and not args.same_process:
        # One process each: a benchmark run after others inherits their threads, memory and
        # OpenMP teams (a hot-swap run right after others read 1.5 s instead of 0.9-1.0 s).
        produced = []
        with tempfile.TemporaryDirectory() as tmp:
            for name in names:
                print(f"== {name}", flush=True)
                out = Path(tmp) / f"{name}.json"
                subprocess.run([sys.executable, "-m", "bench", "--only", name, "--same-process"]
                               + (["--quick"] if args.quick else []),
                               check=True, env={**os.environ, NAMES_OUT: str(out)})
                produced += json.loads(out.read_text())
        figures = json.loads(RESULTS.read_text())["figures"]
        results = [Result(**{k: v for k, v in figures[n].items() if k not in ("ratio", "measured")}) for n in produced]
    else:
        results = []
        for name in names:
            print(f"== {name}", flush=True)
            results += importlib.import_module(f"bench.{name}").run(base, quick=args.quick)
        if os.environ.get(NAMES_OUT):  # a child of the one-process-each run: tell it what we measured
            Path(os.environ[NAMES_OUT]).write_text(json.dumps([r.name for r in results]))
    print_table(results)
    write_results(results, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
