"""SFT rounds on good answers (written by annotators, or every pair's chosen answer)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from align.models import load_policy, load_tokenizer
from align.sft import SFTRoundConfig, answer_rows, tokenize_answers, train_sft
from tests.align.stores import FAST_TRAINING, one_thread  # noqa: F401 (one_thread: autouse)

ANSWER = "The sea is blue because it reflects the sky."


def pair(i, chosen, written):
    return {"messages": [{"role": "user", "content": f"question {i} about the sea"}], "chosen": chosen,
            "rejected": "no", "chosen_written": written}


def test_answer_rows_keep_written_answers_once_each_or_every_chosen_answer():
    pairs = [pair(0, "mine", True), pair(0, "mine", True), pair(1, "model answer", False), pair(2, "mine too", True)]
    written = answer_rows(pairs, "written")
    assert [row["completion"][0]["content"] for row in written] == ["mine", "mine too"]
    assert written[0]["prompt"] == pairs[0]["messages"] and written[0]["completion"][0]["role"] == "assistant"
    assert [row["completion"][0]["content"] for row in answer_rows(pairs, "chosen")] == \
        ["mine", "model answer", "mine too"]
    with pytest.raises(ValueError, match="'written' or 'chosen'"):
        answer_rows(pairs, "all")


def test_answer_rows_keep_the_largest_weight_of_a_repeated_answer():
    pairs = [{**pair(0, "mine", True), "weight": 0.5}, {**pair(0, "mine", True), "weight": 2.0},
             {**pair(0, "mine", True), "weight": 1.0}, pair(1, "other", True)]
    assert [(row["completion"][0]["content"], row["weight"]) for row in answer_rows(pairs)] == \
        [("mine", 2.0), ("other", 1.0)]


def test_only_the_answer_tokens_are_trained_and_the_prompt_is_cut_from_the_left(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    rows = answer_rows([pair(0, ANSWER, True)])
    [full] = tokenize_answers(tokenizer, rows, max_length=10_000)
    answer_ids = [t for t, m in zip(full["input_ids"], full["completion_mask"]) if m]
    assert tokenizer.decode(answer_ids).startswith(ANSWER)  # then the end-of-turn the model must learn
    assert full["completion_mask"][0] == 0 and full["completion_mask"][-1] == 1
    n_answer = len(answer_ids)
    [cut] = tokenize_answers(tokenizer, rows, max_length=n_answer + 3)
    assert cut["input_ids"] == full["input_ids"][-(n_answer + 3):] and sum(cut["completion_mask"]) == n_answer


def test_two_steps_change_adapter_and_it_loads_back(tiny_model_dir, tmp_path):
    rows = answer_rows([pair(i, ANSWER, True) for i in range(8)])
    metrics = train_sft(tiny_model_dir, rows, SFTRoundConfig(**FAST_TRAINING), tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert any(w.abs().sum() > 0 for name, w in weights.items() if "lora_B" in name)
    assert metrics["train_steps"] == 2.0
    assert "v1" in load_policy(tiny_model_dir, {"v1": tmp_path}).peft_config


def answer_nll(policy, tokenizer, rows) -> float:
    [ids] = tokenize_answers(tokenizer, rows[:1], max_length=10_000)
    input_ids = torch.tensor([ids["input_ids"]])
    labels = torch.where(torch.tensor([ids["completion_mask"]]) == 1, input_ids, -100)
    with torch.no_grad():
        return policy(input_ids=input_ids, labels=labels).loss.item()


def test_sft_makes_the_answer_more_likely(tiny_model_dir, tmp_path):
    rows = answer_rows([pair(i, ANSWER, True) for i in range(8)])
    tokenizer = load_tokenizer(tiny_model_dir)
    train_sft(tiny_model_dir, rows, SFTRoundConfig(**{**FAST_TRAINING, "max_steps": 20, "lora_dropout": 0.0}), tmp_path)
    policy = load_policy(tiny_model_dir, {"v1": tmp_path}).eval()
    with policy.disable_adapter():
        before = answer_nll(policy, tokenizer, rows)
    policy.set_adapter("v1")
    after = answer_nll(policy, tokenizer, rows)
    # The tiny model's tied head (std 0.02) keeps every distribution near uniform over its 300
    # tokens (NLL ~5.7), so an adapter can only move it a little: 5.70 -> 5.61 here.
    assert after < before - 0.05
