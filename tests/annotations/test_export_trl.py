"""The export is TRL's own format: the conversational JSONL loads straight into DPOTrainer
and RewardTrainer (tiny local model, CPU, 2 steps). And the CLI imports and exports."""

import json
import math
import os
import subprocess
import sys

import pytest

from annotations.formats import export_pairs, import_file
from tests.conftest import REPO

PREFERENCES = [
    {"prompt": "What is the capital of France?", "chosen": "Paris is the capital of France.",
     "rejected": "I cannot help with that."},
    {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Write a poem about the sea."}],
     "chosen": [{"role": "assistant", "content": "The sea and the sky, blue and wide."}],
     "rejected": [{"role": "assistant", "content": "no"}]},
    {"prompt": "hello world", "chosen": "hello, thanks for the question", "rejected": "bad answer"},
    {"prompt": "Is this answer good or bad?", "chosen": "It is a good answer.", "rejected": "maybe yes no"},
]
TRAINING = dict(
    use_cpu=True, bf16=False, max_steps=2, per_device_train_batch_size=2, report_to=[],
    logging_steps=1, save_strategy="no", learning_rate=1e-2, max_length=64, seed=0,
)


@pytest.fixture
def exported_dataset(db, tmp_path):
    """A `datasets.Dataset` read from the store's conversational JSONL export."""
    from datasets import Dataset

    source = tmp_path / "preferences.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in PREFERENCES), encoding="utf-8")
    import_file(db, source, "trl")
    out = tmp_path / "export.jsonl"
    assert export_pairs(db, out) == len(PREFERENCES)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").split("\n") if line]
    return Dataset.from_list(rows)


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def changed(model, before) -> list[str]:
    import torch

    return [name for name, p in model.named_parameters() if name in before and not torch.equal(p, before[name])]


def logged_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_dpo_trainer_trains_on_exported_jsonl(exported_dataset, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = snapshot(model)
    trainer = DPOTrainer(
        model=model, ref_model=reference, processing_class=tokenizer, train_dataset=exported_dataset,
        args=DPOConfig(output_dir=str(tmp_path / "dpo"), **TRAINING),
    )
    trainer.train()
    assert trainer.state.global_step == 2
    assert len(logged_losses(trainer)) == 2 and all(map(math.isfinite, logged_losses(trainer)))
    assert changed(model, before)
    assert not changed(reference, snapshot(AutoModelForCausalLM.from_pretrained(tiny_model_dir)))


def test_reward_trainer_trains_on_exported_jsonl(exported_dataset, tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    before = snapshot(model)
    trainer = RewardTrainer(
        model=model, processing_class=tokenizer, train_dataset=exported_dataset,
        args=RewardConfig(output_dir=str(tmp_path / "reward"), **TRAINING),
    )
    trainer.train()
    assert trainer.state.global_step == 2
    assert len(logged_losses(trainer)) == 2 and all(map(math.isfinite, logged_losses(trainer)))
    assert changed(model, before)


# ---------------------------------------------------------------- CLI


def run_cli(*args, home):
    env = {**os.environ, "RANKLOOP_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "annotations", *map(str, args)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )


def hh_line(reply):
    shared = "\n\nHuman: Tell me something nice."
    return json.dumps({"chosen": f"{shared}\n\nAssistant: {reply}", "rejected": f"{shared}\n\nAssistant: No."})


def test_cli_import_hh_then_export_exits_zero(tmp_path):
    store, source, out = tmp_path / "cli.db", tmp_path / "hh.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(hh_line(f"You are great, number {i}.") for i in range(3)) + "\n", encoding="utf-8")
    imported = run_cli("--db", store, "import", source, "--format", "hh", home=tmp_path)
    assert imported.returncode == 0, imported.stderr
    exported = run_cli("--db", store, "export", "--out", out, home=tmp_path)
    assert exported.returncode == 0, exported.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").split("\n") if line]
    assert [row["chosen"][0]["content"] for row in rows] == [f"You are great, number {i}." for i in range(3)]
    assert rows[0]["prompt"] == [{"role": "user", "content": "Tell me something nice."}]


def test_cli_import_bad_file_exits_two_with_error_naming_line(tmp_path):
    store, source = tmp_path / "cli.db", tmp_path / "bad.jsonl"
    source.write_text(hh_line("ok") + "\n" + hh_line("ok too") + "\n{not json\n", encoding="utf-8")
    result = run_cli("--db", store, "import", source, "--format", "hh", home=tmp_path)
    assert result.returncode == 2
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert str(source) in error and "line 3" in error
    assert "Traceback" not in result.stderr
