"""`python -m align`: rounds, versions, promote and rollback from the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from align.__main__ import main
from annotations import open_db
from annotations.model_versions import get_live_version, list_versions
from annotations.round_records import get_round
from tests.align.stores import FAST_EVAL, FAST_TRAINING, import_pairs, one_thread  # noqa: F401 (one_thread: autouse)
from tests.conftest import REPO


@pytest.fixture
def store(tmp_path):
    db = open_db(tmp_path / "rankloop.db")
    import_pairs(db, tmp_path)
    db.close()
    return tmp_path / "rankloop.db"


def settings(**extra) -> list[str]:
    args = []
    for key, value in {**FAST_TRAINING, **FAST_EVAL, **extra}.items():
        args += ["--set", f"{key}={value}"]
    return args


def test_round_from_yaml_and_set_then_versions_promote_rollback(store, tiny_model_dir, tmp_path, capsys):
    config = tmp_path / "rm.yaml"
    config.write_text("max_steps: 1\ncenter_rewards_coefficient: 0.01\n")
    db = ["--db", str(store)]
    assert main([*db, "round", "--method", "rm", "--config", str(config), "--base", str(tiny_model_dir),
                 *settings(max_steps=2)]) == 0
    out = capsys.readouterr().out
    assert "round 1 succeeded: registered rm1" in out
    # a handful of held-out pairs cannot show a reward model beats chance: the gate says so, with its figures
    assert "promotion gate: kept rm1 a candidate: held-out accuracy" in out and "n=" in out
    assert "python -m align promote rm1" in out
    round_row = get_round(open_db(store), 1)
    assert round_row["config"]["center_rewards_coefficient"] == 0.01 and round_row["config"]["max_steps"] == 2

    assert main([*db, "promote", "rm1"]) == 0
    assert capsys.readouterr().out == "rm1 is live\n"
    assert main([*db, "versions"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:6] == ["version", "kind", "parent", "method", "state", "round"]
    assert any(line.split()[:5] == ["rm1", "reward", "-", "rm", "live"] for line in table)

    assert main([*db, "rollback", "--kind", "reward"]) == 2
    assert "rm1 has no parent version to roll back to" in capsys.readouterr().err
    assert get_live_version(open_db(store), "reward")["version"] == "rm1"


def test_round_with_unknown_key_exits_2_naming_valid_keys(store, capsys):
    assert main(["--db", str(store), "round", "--method", "dpo", "--set", "betta=0.2"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'betta' for a dpo round" in err and "beta" in err
    assert open_db(store).execute("SELECT count(*) FROM rounds").fetchone()[0] == 0  # nothing queued


def test_compare_judges_two_policy_versions_with_the_live_reward_model(store, tiny_model_dir, capsys):
    db = ["--db", str(store)]
    base = ["--base", str(tiny_model_dir)]
    assert main([*db, "compare", "v1", *base]) == 2
    assert "live is not a reward model" in capsys.readouterr().err
    assert main([*db, "round", "--method", "rm", *base, *settings()]) == 0
    assert main([*db, "promote", "rm1"]) == 0
    assert main([*db, "round", "--method", "dpo", *base, *settings(parent="base")]) == 0
    capsys.readouterr()
    assert main([*db, "compare", "rm1", *base]) == 2
    assert "rm1 is a reward version" in capsys.readouterr().err
    assert main([*db, "compare", "v1", "--prompts", "3", "--max-new-tokens", "4", "--threads", "1", "--json",
                 *base]) == 0
    line, counts = capsys.readouterr().out.splitlines()[-2:]
    assert line.startswith("v1 vs base, judged by rm1 on 3 held-out prompts: win rate ")
    result = json.loads(counts)
    assert result["wins"] + result["ties"] + result["losses"] == result["n"] == 3
    assert result["win_rate"] == (result["wins"] + 0.5 * result["ties"]) / 3


def test_versions_json_lists_base(store, capsys):
    assert main(["--db", str(store), "versions", "--json"]) == 0
    assert [v["version"] for v in json.loads(capsys.readouterr().out)] == ["base"]


def test_config_lists_method_and_round_keys_with_defaults(capsys):
    assert main(["config", "--method", "dpo"]) == 0
    out = capsys.readouterr().out
    assert "dpo keys:" in out and "  beta = 0.1\n" in out and "round keys:" in out and "  data = 'all'\n" in out


@pytest.mark.slow
def test_dpo_round_under_accelerate_launch_with_two_cpu_processes(store, tiny_model_dir):
    # `accelerate launch --cpu` starts a single process unless MPI is set up; `--multi_gpu` starts
    # torchrun workers, and with no GPU visible they join over gloo on the CPU.
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        "-m", "align", "--db", str(store), "round", "--method", "dpo", "--base", str(tiny_model_dir),
        *settings(max_steps=2),
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "round 1 succeeded: registered v1" in result.stdout and "kept v1 a candidate" in result.stdout
    db = open_db(store)
    assert [v["version"] for v in list_versions(db)] == ["base", "v1"]
    assert get_round(db, 1)["status"] == "succeeded"
    assert result.stderr.count("Tokenizing train dataset") >= 2  # both processes prepared their data
    assert sorted(p.name for p in (store.parent / "versions").iterdir()) == ["v1"]
