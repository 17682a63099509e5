"""Reward model: LoRA + score head training, and scoring read at the last non-pad token."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from align.models import load_tokenizer
from align.reward import (
    RewardConfig,
    conversation_ids,
    load_reward_model,
    load_sequence_classifier,
    score,
    train_reward_model,
)
from align.training import preference_rows
from tests.align.stores import FAST_TRAINING, one_thread  # noqa: F401 (one_thread: autouse)

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def rows(n: int = 8) -> list[dict]:
    return preference_rows([
        {"messages": [{"role": "user", "content": f"question {i} about the sea"}],
         "chosen": "Paris is the capital of France. yes", "rejected": "no sorry bad"}
        for i in range(n)
    ])


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm")
    logs = []
    metrics = train_reward_model(tiny_model_dir, rows(), RewardConfig(**FAST_TRAINING), out,
                                 progress=lambda step, total, log: logs.append((step, total, log)))
    return out, metrics, logs


@pytest.fixture(scope="module")
def reward_model(tiny_model_dir, trained):
    return load_reward_model(tiny_model_dir, trained[0])


def test_two_steps_train_lora_and_score_head(tiny_model_dir, trained):
    out, metrics, _ = trained
    weights = load_file(out / "adapter_model.safetensors")
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and any(w.abs().sum() > 0 for w in lora_b)  # LoRA B starts at zero
    torch.manual_seed(FAST_TRAINING.get("seed", 0))
    fresh_head = load_sequence_classifier(tiny_model_dir, load_tokenizer(tiny_model_dir)).score.weight
    assert not torch.allclose(weights["base_model.model.score.weight"], fresh_head)
    assert metrics["train_steps"] == 2.0


def test_progress_reports_every_step(trained):
    steps = [step for step, total, log in trained[2] if log is None]
    assert steps == [1, 2] and all(total == 2 for _, total, _ in trained[2])


def test_saved_reward_model_loads_back_with_adapter_and_tokenizer(trained, reward_model):
    model, tokenizer = reward_model
    assert (trained[0] / "tokenizer_config.json").exists()
    assert model.active_adapter == "default" and not model.training
    scores = score(model, tokenizer, [PROMPT, PROMPT], ["Paris.", "no"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_score_does_not_depend_on_padding(reward_model):
    model, tokenizer = reward_model
    short = score(model, tokenizer, [PROMPT], ["Paris."], batch_size=1)
    batched = score(model, tokenizer, [PROMPT, PROMPT], ["Paris.", "Paris is the capital. " * 8], batch_size=2)
    torch.testing.assert_close(batched[:1], short, atol=1e-5, rtol=1e-5)


def test_score_is_read_at_last_non_pad_token(reward_model):
    model, tokenizer = reward_model
    ids = conversation_ids(tokenizer, PROMPT, "Paris.", max_length=512)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([ids])).logits[0, 0]
        padded = model(input_ids=torch.tensor([ids + [tokenizer.pad_token_id] * 3]),
                       attention_mask=torch.tensor([[1] * len(ids) + [0] * 3])).logits[0, 0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(score(model, tokenizer, [PROMPT], ["Paris."])[0], alone, atol=1e-5, rtol=1e-5)


def test_truncation_keeps_the_answer(reward_model):
    _, tokenizer = reward_model
    long_prompt = [{"role": "user", "content": "please tell me about the sea and the sky " * 20}]
    full = conversation_ids(tokenizer, long_prompt, "Paris is the capital of France.", max_length=10_000)
    cut = conversation_ids(tokenizer, long_prompt, "Paris is the capital of France.", max_length=24)
    assert len(cut) == 24 and cut == full[-24:]
    assert conversation_ids(tokenizer, long_prompt, "x", max_length=24, side="right") == \
        conversation_ids(tokenizer, long_prompt, "x", max_length=10_000)[:24]


def test_score_refuses_tokenizer_whose_pad_is_eos(reward_model):
    model, tokenizer = reward_model
    bad = copy.deepcopy(tokenizer)
    bad.pad_token = bad.eos_token
    with pytest.raises(ValueError, match="pad token distinct from EOS"):
        score(model, bad, [PROMPT], ["Paris."])
