"""A training worker that stops at one stage of its round, for a test to kill it there:
`python -m tests.align.pausing_worker STAGE MARKER -- ARGS OF python -m align`.

At `STAGE` (see `align.round_stages.STAGES`) it writes its pid to the file MARKER and sleeps; the
test waits for the file and sends SIGKILL. The hook lives here, in the tests: production code
only names its stages (`align.round_stages.checkpoint`).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

PAUSE_SECONDS = 600.0


def main(argv: list[str]) -> int:
    stage, marker, separator, *align_args = argv
    assert separator == "--", "usage: python -m tests.align.pausing_worker STAGE MARKER -- ARGS"

    from align import round_stages
    from align.__main__ import main as align_main

    if stage not in round_stages.STAGES:
        raise SystemExit(f"unknown stage {stage!r}: one of {', '.join(round_stages.STAGES)}")

    def pause(reached: str) -> None:
        if reached == stage:
            Path(marker).write_text(f"{stage} {os.getpid()}\n")
            time.sleep(PAUSE_SECONDS)

    round_stages.CHECKPOINT_HOOKS.append(pause)
    return align_main(align_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
