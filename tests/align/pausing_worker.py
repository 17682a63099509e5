"""A training worker that stops at one stage of its round, for a test to kill it there:
`python -m tests.align.pausing_worker STAGE MARKER -- ARGS OF python -m align`.

At `STAGE` (see `align.rounds.STAGES`) it writes its pid to the file MARKER and sleeps; the
test waits for the file and sends SIGKILL. The hook lives here, in the tests: production code
only names its stages (`align.rounds.checkpoint`).
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

    from align import rounds
    from align.__main__ import main as align_main

    if stage not in rounds.STAGES:
        raise SystemExit(f"unknown stage {stage!r}: one of {', '.join(rounds.STAGES)}")

    def pause(reached: str) -> None:
        if reached == stage:
            Path(marker).write_text(f"{stage} {os.getpid()}\n")
            time.sleep(PAUSE_SECONDS)

    rounds.CHECKPOINT_HOOKS.append(pause)
    return align_main(align_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
