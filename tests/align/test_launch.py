"""Rounds under `accelerate launch` (align/launch.py): the shipped configs, the checks before a
launch, a round started through the CLI and through the app's admin endpoint as 2 CPU
processes over gloo, and one of those processes killed mid-round."""

from __future__ import annotations

import os
import signal
import sys
import threading

import psutil
import pytest
import torch

from align.__main__ import main
from align.config import ConfigError
from align.launch import (
    OWNER_ENV, SHIPPED, check_runnable, failure_line, launch_command, read_accelerate_config, resolve_launch,
)
from align.round_config import parse_round_config
from align.round_stages import RoundError
from align.worker import run_worker
from annotations import open_db
from annotations.model_versions import list_versions
from annotations.round_records import create_round, get_round
from tests.align.stores import FAST_EVAL, FAST_TRAINING, import_pairs, one_thread  # noqa: F401 (one_thread: autouse)
from tests.align.test_cli import store  # noqa: F401 (a store with imported pairs: the same fixture)
from tests.app.conftest import wait_until

NO_GPU = not torch.cuda.is_available()


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_config_is_read_by_accelerate_itself(name):
    launch = resolve_launch(name, 2)
    config = read_accelerate_config(launch.path)
    assert launch.path.name == f"{name}.yaml" and config.num_machines == 1
    assert launch.distributed_type == {"cpu_gloo": "MULTI_GPU", "multi_gpu": "MULTI_GPU", "fsdp2": "FSDP",
                                       "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}[name]
    assert launch.needs_gpu == (name in ("fsdp2", "zero2", "zero3"))
    if name.startswith("zero"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
    if name == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2


def test_auto_trains_in_the_worker_with_one_process_and_picks_gloo_or_ddp_with_more():
    assert resolve_launch("auto", 1) is None
    assert resolve_launch("auto", 2).name == ("cpu_gloo" if NO_GPU else "multi_gpu")
    assert parse_round_config("dpo", {})[0].launch_plan() is None
    assert parse_round_config("dpo", {"processes": "2", "launch": "cpu_gloo"})[0].launch_plan().processes == 2


def test_a_bad_launch_is_refused_when_the_round_is_queued(tmp_path):
    with pytest.raises(ConfigError, match="neither a shipped accelerate config .*cpu_gloo, multi_gpu"):
        parse_round_config("dpo", {"processes": 2, "launch": "ddp8"})
    with pytest.raises(ConfigError, match="processes must be at least 1"):
        parse_round_config("dpo", {"processes": 0})
    own = tmp_path / "mine.yaml"
    own.write_text("distributed_type: MULTI_GPU\nnum_processes: 2\ngradient_clipping_typo: 1\n")
    with pytest.raises(ConfigError, match="accelerate cannot read the launch config .*unknown keys"):
        parse_round_config("dpo", {"processes": 2, "launch": str(own)})
    own.write_text("distributed_type: XLA\n")
    with pytest.raises(ConfigError, match="distributed_type XLA is not supported"):
        parse_round_config("dpo", {"processes": 2, "launch": str(own)})
    own.write_text("distributed_type: MULTI_GPU\nnum_machines: 1\nmixed_precision: 'no'\n")
    assert resolve_launch(str(own), 2).name == str(own)  # the user's own file


@pytest.mark.skipif(not NO_GPU, reason="checks what a machine without GPUs refuses")
def test_gpu_configs_are_refused_before_launching_on_a_machine_without_gpus():
    for name in ("fsdp2", "zero2", "zero3"):
        with pytest.raises(RoundError, match=f"launch {name} .* needs CUDA GPUs and none is visible here"):
            check_runnable(resolve_launch(name, 2))
    check_runnable(resolve_launch("cpu_gloo", 2))  # fine
    check_runnable(resolve_launch("multi_gpu", 2))  # with no GPU, DDP joins over gloo on the CPU


def test_the_launch_command_runs_this_round_in_every_process(tmp_path):
    launch = resolve_launch("cpu_gloo", 3)
    command = launch_command(launch, 7, tmp_path / "rankloop.db", tmp_path / "base")
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert command[command.index("--config_file") + 1] == str(launch.path)
    assert command[command.index("--num_processes") + 1] == "3"
    assert command[command.index("--main_process_port") + 1] == "0"
    assert command[-8:] == ["-m", "align", "--db", str(tmp_path / "rankloop.db"), "run-round", "7", "--base",
                            str(tmp_path / "base")]


def test_the_failed_process_is_named_from_torchruns_report():
    lines = ["[rank0]: training...", "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:",
             "  exitcode  : -9 (pid: 4242)", "  error_file: <N/A>",
             "  traceback : Signal 9 (SIGKILL) received by PID 4242"]
    assert failure_line(lines) == "Signal 9 (SIGKILL) received by PID 4242"
    assert failure_line(["nothing useful"]) is None




def launched_processes(rank: str) -> list[psutil.Process]:
    """The processes launched for a round owned by this test process, of one rank."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            env = process.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if env.get(OWNER_ENV) == str(os.getpid()) and env.get("RANK") == rank:
            found.append(process)
    return found


@pytest.mark.slow
def test_cli_round_with_processes_2_runs_under_accelerate_launch(store, tiny_model_dir, capsys):
    args = ["--db", str(store), "round", "--method", "dpo", "--base", str(tiny_model_dir), "--set", "processes=2"]
    for key, value in {**FAST_TRAINING, **FAST_EVAL}.items():
        args += ["--set", f"{key}={value}"]
    assert main(args) == 0
    assert "round 1 succeeded: registered v1" in capsys.readouterr().out
    db = open_db(store)
    row = get_round(db, 1)
    assert row["status"] == "succeeded" and row["pid"] == os.getpid()  # the owner, as for one process
    assert "launching 2 processes with accelerate config cpu_gloo" in row["log_tail"]
    log = (store.parent / "logs" / "round-1.log").read_text()
    assert log.count("Tokenizing train dataset") >= 2  # both processes prepared their data
    assert [v["version"] for v in list_versions(db)] == ["base", "v1"]
    assert sorted(p.name for p in (store.parent / "versions").iterdir()) == ["v1"]


@pytest.mark.slow
def test_killing_one_launched_process_fails_the_round_cleanly(store, tiny_model_dir):
    db = open_db(store)
    round_id = create_round(db, "dpo", {**FAST_TRAINING, **FAST_EVAL, "max_steps": 400, "processes": 2,
                                        "launch": "cpu_gloo"})
    ran = []
    worker = threading.Thread(target=lambda: ran.append(run_worker(
        store, store.parent, tiny_model_dir, once=True, handle_signals=False)))
    worker.start()
    wait_until(lambda: (get_round(db, round_id)["progress"] or 0) > 0, timeout=180, message="training to start")
    [victim] = wait_until(lambda: launched_processes("1"), timeout=30, message="the second process")
    victim.send_signal(signal.SIGKILL)
    worker.join(timeout=120)
    assert not worker.is_alive() and ran == [1]
    row = get_round(db, round_id)
    assert row["status"] == "failed"
    # torchrun ends the other process, or the main one first fails in a collective with its peer
    # gone ("connection closed by peer"); either way the error names the launch and the process
    assert "accelerate launch (2 processes with accelerate config cpu_gloo) ended with exit code" in row["error"]
    assert f"PID {victim.pid}" in row["error"] or "exitcode" in row["error"], row["error"]
    assert [v["version"] for v in list_versions(db)] == ["base"]  # nothing registered
    assert not any((store.parent / "versions").iterdir())  # its staging folder swept
    wait_until(lambda: not launched_processes("0"), timeout=30, message="the other process to be gone")


@pytest.mark.slow
def test_a_round_queued_from_the_admin_endpoint_runs_as_two_gloo_processes(tmp_path_factory, tiny_model_dir):
    from gradio_client import Client

    from tests.app.conftest import ADMIN, start_app

    home = tmp_path_factory.mktemp("launch-home")
    app = start_app(home, tiny_model_dir, prompts=2, worker=True)  # the app's own worker process
    try:
        db = app.ctx.db()
        import_pairs(db, home)
        overrides = "\n".join(f"{k}: {v}" for k, v in {**FAST_TRAINING, **FAST_EVAL, "processes": 2,
                                                        "launch": "cpu_gloo"}.items())
        admin = Client(app.url, auth=ADMIN, verbose=False)
        status = admin.predict("dpo", "all", overrides, api_name="/queue_round")[0]
        assert "Queued round" in status
        round_id = int(status.split("round ")[1].rstrip("."))
        final = wait_until(lambda: get_round(db, round_id)["status"] not in ("queued", "running")
                           and get_round(db, round_id), timeout=300, interval=1, message="the launched round")
        assert final["status"] == "succeeded", (final["error"], final["log_tail"])
        assert "launching 2 processes with accelerate config cpu_gloo" in final["log_tail"]
        assert (home / "logs" / f"round-{round_id}.log").read_text().count("Tokenizing train dataset") >= 2
        assert [v["version"] for v in list_versions(db)] == ["base", final["version"]]  # one version
        assert final["pid"] != os.getpid()  # owned by the app's worker process, not the app
    finally:
        app.close()


@pytest.mark.slow
def test_a_ppo_round_runs_as_two_processes(store, tiny_model_dir, capsys):
    db_args, base_args = ["--db", str(store)], ["--base", str(tiny_model_dir)]
    fast = [arg for key, value in {**FAST_TRAINING, **FAST_EVAL}.items() for arg in ("--set", f"{key}={value}")]
    assert main([*db_args, "round", "--method", "rm", *base_args, *fast]) == 0
    assert main([*db_args, "promote", "rm1"]) == 0
    ppo = {"steps": 2, "batch_size": 2, "mini_batch_size": 1, "ppo_epochs": 1, "max_new_tokens": 4, "lora_r": 4,
           **FAST_EVAL, "processes": 2}
    assert main([*db_args, "round", "--method", "ppo", *base_args,
                 *[arg for key, value in ppo.items() for arg in ("--set", f"{key}={value}")]]) == 0
    assert "round 2 succeeded: registered v1" in capsys.readouterr().out
    row = get_round(open_db(store), 2)
    assert row["status"] == "succeeded" and "launching 2 processes" in row["log_tail"]
    assert "ppo step 2/2" in (store.parent / "logs" / "round-2.log").read_text()  # the main process's log
    assert (store.parent / "versions" / "v1" / "adapter_config.json").exists()


@pytest.mark.slow
def test_cancelling_a_launched_round_stops_every_process_at_the_same_step(store, tiny_model_dir):
    from annotations.round_records import cancel_round

    db = open_db(store)
    round_id = create_round(db, "dpo", {**FAST_TRAINING, **FAST_EVAL, "max_steps": 400, "processes": 2})
    worker = threading.Thread(target=run_worker, args=(store, store.parent, tiny_model_dir),
                              kwargs={"once": True, "handle_signals": False})
    worker.start()
    wait_until(lambda: (get_round(db, round_id)["progress"] or 0) > 0, timeout=180, message="training to start")
    cancel_round(db, round_id)
    worker.join(timeout=120)
    assert not worker.is_alive()
    row = get_round(db, round_id)
    assert row["status"] == "cancelled" and row["error"].startswith("cancelled at step"), row["error"]
    assert [v["version"] for v in list_versions(db)] == ["base"]
    assert not any((store.parent / "versions").iterdir())
    assert not launched_processes("0") and not launched_processes("1")
