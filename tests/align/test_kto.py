"""KTO rounds from thumbs-up / thumbs-down answers."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from align.kto import KTORoundConfig, balanced_desirable_weight, train_kto
from align.models import load_policy
from align.training import unpaired_rows
from tests.align.stores import FAST_TRAINING, one_thread  # noqa: F401 (one_thread: autouse)


def rows(n: int = 8) -> list[dict]:
    return unpaired_rows([
        {"messages": [{"role": "user", "content": f"question {i} about the sea"}],
         "completion": "Here is a good answer. yes" if i % 2 else "no sorry bad", "label": bool(i % 2)}
        for i in range(n)
    ])


def test_two_steps_change_adapter_and_it_loads_back(tiny_model_dir, tmp_path):
    metrics = train_kto(tiny_model_dir, rows(), KTORoundConfig(**FAST_TRAINING), tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert any(w.abs().sum() > 0 for name, w in weights.items() if "lora_B" in name)
    assert metrics["train_steps"] == 2.0 and metrics["train_desirable_weight"] == 1.0
    policy = load_policy(tiny_model_dir, {"v1": tmp_path})
    assert "v1" in policy.peft_config
    with torch.no_grad():
        assert torch.isfinite(policy(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_balanced_desirable_weight_evens_out_the_two_sides():
    assert balanced_desirable_weight([True, False, False, False]) == 3.0
    assert balanced_desirable_weight([True, True, False], undesirable_weight=2.0) == 1.0
    assert balanced_desirable_weight([False, False]) == 1.0
