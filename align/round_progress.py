"""A round's progress as it trains: the bar, log lines and curves written to the round row,
and the stop check (cancelled by an admin, or the worker shutting down) every step."""

from __future__ import annotations

import logging
import threading
import time

from align.processes import broadcast_from_main
from align.round_stages import RoundStopped, checkpoint

logger = logging.getLogger(__name__)

TRAIN_PROGRESS_SHARE = 0.85  # progress bar: training fills 0 → 0.85, evaluation the rest
CURVE_SKIP = ("epoch", "total_flos", "step")  # logged values that are not curves


class RoundReporter:
    """The training progress callable: writes progress and log lines to the round row (main
    process only) and stops training (on every process together) when the round was cancelled,
    the worker is stopping."""

    def __init__(self, db, round_id: int, state, *, stop_event: threading.Event | None = None,
                 min_interval_s: float = 1.0):
        self.db, self.round_id, self.state = db, round_id, state
        self.stop_event = stop_event
        self.min_interval_s = min_interval_s
        self._last_write = self._last_check = 0.0

    def __call__(self, step: int, total: int, logs: dict | None) -> None:
        from annotations.db import write_transaction
        from annotations.round_records import record_step_metrics, update_round

        main = self.state.is_main_process
        progress = TRAIN_PROGRESS_SHARE * step / total if total else None
        now = time.monotonic()
        if main and logs:
            line = format_log(step, total, logs)
            logger.info("round %d: %s", self.round_id, line)
            with write_transaction(self.db):
                update_round(self.db, self.round_id, progress=progress, log_line=line)
                record_step_metrics(self.db, self.round_id, step, {
                    k: v for k, v in logs.items() if k not in CURVE_SKIP and not k.startswith("train_")
                })
            self._last_write = now
        elif main and now - self._last_write >= self.min_interval_s:
            update_round(self.db, self.round_id, progress=progress)
            self._last_write = now
        if logs is None:  # once per optimizer step, on every process: decide together whether to stop
            checkpoint("train")
            stop = self._stop_reason(step, now) if main else None
            stop = broadcast_from_main(stop, self.state)
            if stop is not None:
                raise RoundStopped(stop[1], status=stop[0])

    def _stop_reason(self, step: int, now: float):
        from annotations.round_records import round_status

        if self.stop_event is not None and self.stop_event.is_set():
            return ("failed", f"interrupted at step {step}: the worker is shutting down")
        if now - self._last_check >= self.min_interval_s:
            self._last_check = now
            if round_status(self.db, self.round_id) == "cancelled":
                return ("cancelled", f"cancelled at step {step}")
        return None


def format_log(step: int, total: int, logs: dict) -> str:
    parts = [f"step {step}/{total}"]
    for key, value in logs.items():
        if key in ("epoch", "total_flos"):
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return " ".join(parts)
