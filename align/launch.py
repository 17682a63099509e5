"""Rounds as several processes: `accelerate launch`, its shipped configs, and the owner that waits.

A round's `processes` and `launch` keys (align/round_config.py) say how it runs. With one
process and `launch=auto` it trains in the process that claimed it, as always. Otherwise the
claiming process — a worker, or `python -m align round` — stays the round's *owner*: it
starts `accelerate launch --config_file CONFIG --num_processes N -m align run-round ID`, and
the launched processes run `run_round` together (the main one does the store work:
align/rounds.py). They know the round is theirs through `RANKLOOP_ROUND_OWNER`, the owner's
pid, which the store keeps as the round's pid, so progress, cancellation and recovery behave
as for one process. The owner waits; asked to stop (SIGTERM to a worker), it ends the launch's
process group. When the launch exits with the round still running — one process killed, the
launcher failing — the owner fails the round with the launch's last lines and sweeps its
folders. If the owner itself dies, the launched processes notice and stop at their next step.

Shipped configs (align/accelerate_configs/, in the layout of TRL's `accelerate_configs`):
cpu_gloo (several CPU processes over gloo), multi_gpu (DDP), fsdp2, zero2 and zero3
(DeepSpeed). `launch` may also be the path of a user's own accelerate YAML file.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from align.config import ConfigError
from align.round_stages import RoundError

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = Path(__file__).resolve().parent / "accelerate_configs"
SHIPPED = {
    "cpu_gloo": "several processes on the CPU, joined over gloo (no GPU needed)",
    "multi_gpu": "data parallel (DDP), one process per GPU",
    "fsdp2": "fully sharded data parallel (FSDP2) on GPUs",
    "zero2": "DeepSpeed ZeRO stage 2 on GPUs (needs `pip install deepspeed`)",
    "zero3": "DeepSpeed ZeRO stage 3 on GPUs (needs `pip install deepspeed`)",
}
SUPPORTED_TYPES = ("NO", "MULTI_GPU", "FSDP", "DEEPSPEED")
GPU_ONLY_TYPES = ("FSDP", "DEEPSPEED")
OWNER_ENV = "RANKLOOP_ROUND_OWNER"
STOP_GRACE_S = 30.0


@dataclass(frozen=True)
class Launch:
    """How a round's processes are started: the accelerate config and how many."""

    name: str  # a shipped config's name, or the user's file as given
    path: Path
    distributed_type: str
    processes: int
    sets_port: bool  # the config names its own main_process_port

    @property
    def needs_gpu(self) -> bool:
        return self.distributed_type in GPU_ONLY_TYPES

    @property
    def hides_gpus(self) -> bool:
        return self.name == "cpu_gloo"

    def describe(self) -> str:
        return f"{self.processes} process{'es' if self.processes != 1 else ''} with accelerate config {self.name}"


def round_owner_pid() -> int:
    """The pid the store records for a round this process runs: the owner's, under a launch."""
    return int(os.environ.get(OWNER_ENV) or os.getpid())


def resolve_launch(launch: str, processes: int) -> Launch | None:
    """The launch a round's keys ask for; None to train in the claiming process itself.

    Raises ConfigError for an unknown name, a missing file, or a file accelerate cannot read."""
    if processes < 1:
        raise ConfigError(f"processes must be at least 1, got {processes}")
    if launch == "auto":
        if processes == 1:
            return None
        import torch

        launch = "multi_gpu" if torch.cuda.is_available() else "cpu_gloo"
    path = CONFIG_DIR / f"{launch}.yaml" if launch in SHIPPED else Path(launch).expanduser()
    if not path.is_file():
        raise ConfigError(f"launch {launch!r} is neither a shipped accelerate config ({', '.join(SHIPPED)}) "
                          f"nor an existing file")
    config = read_accelerate_config(path)
    kind = getattr(config.distributed_type, "value", str(config.distributed_type))
    if kind not in SUPPORTED_TYPES:
        raise ConfigError(f"{path}: distributed_type {kind} is not supported for rounds; use one of "
                          f"{', '.join(SUPPORTED_TYPES)}")
    if config.num_machines not in (None, 1):
        raise ConfigError(f"{path}: rounds run on one machine (num_machines: 1), not {config.num_machines}")
    return Launch(name=launch, path=path.resolve(), distributed_type=kind, processes=processes,
                  sets_port=config.main_process_port is not None)


def read_accelerate_config(path: Path):
    """The file as accelerate itself reads it (unknown keys and a missing distributed_type refused)."""
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file

    try:
        return load_config_from_file(str(path))
    except (ValueError, TypeError, KeyError, OSError, yaml.YAMLError) as e:
        raise ConfigError(f"accelerate cannot read the launch config {path}: {e}") from None


def check_runnable(launch: Launch) -> None:
    """Refuse, before starting anything, a launch this machine cannot run."""
    import torch

    gpus = 0 if launch.hides_gpus else torch.cuda.device_count()
    if launch.needs_gpu and gpus == 0:
        raise RoundError(f"launch {launch.name} ({launch.distributed_type}) needs CUDA GPUs and none is visible "
                         f"here: use launch=cpu_gloo, or run the worker on a GPU machine")
    if launch.distributed_type == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        raise RoundError(f"launch {launch.name} needs the deepspeed package: `pip install deepspeed` "
                         f"where the worker runs")
    if gpus and launch.processes > gpus:
        raise RoundError(f"launch {launch.name} asks for {launch.processes} processes and {gpus} GPU(s) are "
                         f"visible: one process per GPU")


def launch_command(launch: Launch, round_id: int, db_path: Path, base_path: Path) -> list[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch.path),
               "--num_processes", str(launch.processes)]
    if not launch.sets_port:
        command += ["--main_process_port", "0"]  # a free port: two launches on one machine never collide
    return command + ["-m", "align", "--db", str(db_path), "run-round", str(round_id), "--base", str(base_path)]


def launch_env(launch: Launch) -> dict:
    env = {**os.environ, OWNER_ENV: str(os.getpid())}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    if launch.hides_gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // launch.processes)))
    return env


def round_launch(db, round_id: int) -> Launch | None:
    """The launch round `round_id`'s config asks for (None: train here). A config that does not
    parse also gives None: the round then fails in `run_round`, with the config's error."""
    from annotations.round_records import get_round

    from align.round_config import parse_round_config

    row = get_round(db, round_id)
    try:
        round_config, _ = parse_round_config(row["method"], row["config"])
    except (ConfigError, ValueError, TypeError):
        return None
    return round_config.launch_plan()


def run_claimed_round(db_path: Path, round_id: int, home: Path, base_path: Path, *,
                      stop_event: threading.Event | None = None) -> dict:
    """Run a round queued for, or claimed by, this process: here, or under `accelerate launch`
    when its config asks for it. Returns what `run_round` returns; raises when it did not succeed."""
    from annotations import open_db
    from annotations.round_records import claim_round, finish_round, get_round

    from align.rounds import run_round

    db = open_db(db_path)
    try:
        try:
            launch = round_launch(db, round_id)
        except ConfigError as e:
            if get_round(db, round_id)["status"] == "queued":
                claim_round(db, round_id, os.getpid())
            finish_round(db, round_id, "failed", error=str(e))
            raise RoundError(str(e)) from None
        if launch is None:
            db.close()
            db = None
            return run_round(db_path, round_id, home, base_path, stop_event=stop_event)
        if get_round(db, round_id)["status"] == "queued":
            claim_round(db, round_id, os.getpid())
        try:
            check_runnable(launch)
        except RoundError as e:
            finish_round(db, round_id, "failed", error=str(e))
            raise
        return run_launched(db, round_id, home, base_path, launch, db_path=db_path, stop_event=stop_event)
    finally:
        if db is not None:
            db.close()


def run_launched(db, round_id: int, home: Path, base_path: Path, launch: Launch, *, db_path: Path,
                 stop_event: threading.Event | None = None, poll_s: float = 0.5) -> dict:
    """Run round `round_id` (running under this process's pid) as `launch` says and wait for it."""
    from annotations.round_records import finish_round, get_round, update_round

    from align.recovery import recover_interrupted

    log_path = Path(home) / "logs" / f"round-{round_id}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = launch_command(launch, round_id, Path(db_path), Path(base_path))
    update_round(db, round_id, log_line=f"launching {launch.describe()}; their output goes to {log_path}")
    logger.info("round %d: %s", round_id, " ".join(command))
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, cwd=REPO, env=launch_env(launch), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    stopped = False
    while process.poll() is None:
        if stop_event is not None and stop_event.is_set() and not stopped:
            stopped = True
            logger.warning("round %d: stopping its %d processes", round_id, launch.processes)
            _end_group(process)
        time.sleep(poll_s)
    row = get_round(db, round_id)
    ended = f"accelerate launch ({launch.describe()}) ended with exit code {process.returncode}"
    if row["status"] == "running":  # the launch ended and nobody ended the round: a process died
        tail = log_tail(log_path)
        cause = failure_line(tail)
        reason = "stopped: the worker is shutting down" if stopped else f"a training process failed: {ended}"
        update_round(db, round_id, log_line="\n".join(tail[-20:]))
        finish_round(db, round_id, "failed", error=f"{reason}{': ' + cause if cause else ''} (output: {log_path})")
        recover_interrupted(db, home)  # the round is no longer running: its staging folder goes
        row = get_round(db, round_id)
    elif row["status"] == "failed" and process.returncode != 0:
        # The main process failed the round itself, often because another process died under it
        # (a collective's "connection closed by peer"): say which, from torchrun's report.
        cause = failure_line(log_tail(log_path))
        finish_round(db, round_id, "failed",
                     error=f"{row['error']} ({ended}{': ' + cause if cause else ''}; output: {log_path})")
        row = get_round(db, round_id)
    if row["status"] != "succeeded":
        raise RoundError(f"round {round_id} {row['status']}: {row['error']}")
    metrics = dict(row["metrics"] or {})
    return {"round_id": round_id, "version": row["version"], "status": row["status"], "metrics": metrics,
            "gate": metrics.get("gate")}


def _end_group(process: subprocess.Popen) -> None:
    """SIGTERM to the launch's process group, SIGKILL after a grace period."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def log_tail(path: Path, lines: int = 60) -> list[str]:
    try:
        text = path.read_bytes()[-20000:].decode("utf-8", errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


def failure_line(lines: list[str]) -> str | None:
    """torchrun's line naming the process that failed and how (exit code, signal), if any."""
    for pattern in (r"Signal \d+ \(\w+\) received by PID \d+", r"exitcode\s*:\s*-?\d+.*", r"\w+Error: .+"):
        for line in reversed(lines):
            match = re.search(pattern, line)
            if match:
                return match.group(0).strip()
    return None


def watch_owner(stop: threading.Event, interval: float = 1.0) -> None:
    """In a launched process: set `stop` once the round's owner is gone (so training stops at its
    next step instead of running on for nobody)."""
    from annotations.round_records import pid_alive

    owner = os.environ.get(OWNER_ENV)
    if not owner:
        return

    def watch():
        while not stop.wait(interval):
            if not pid_alive(int(owner)):
                logger.warning("process %d: the round's owner %s is gone, stopping", os.getpid(), owner)
                stop.set()

    threading.Thread(target=watch, name="rankloop-owner-watch", daemon=True).start()
