"""Shared training pieces: truncation that keeps the answers, TRL rows, device arguments."""

from __future__ import annotations

import pytest

from align.training import (
    TrainingOptions,
    device_arguments,
    example_weight,
    make_preference_collator,
    make_unpaired_collator,
    preference_rows,
    trainer_arguments,
    truncate,
    unpaired_rows,
)


def test_truncate_left_drops_oldest_prompt_tokens_shared_by_both_answers():
    prompt, answers = truncate([1, 2, 3, 4, 5], [[6, 7], [8, 9, 10]], max_length=6, side="left")
    assert prompt == [3, 4, 5] and answers == [[6, 7], [8, 9, 10]]


def test_truncate_left_keeps_end_of_answer_longer_than_limit():
    prompt, answers = truncate([1, 2], [[3, 4, 5, 6, 7], [8]], max_length=4, side="left")
    assert prompt == [] and answers == [[4, 5, 6, 7], [8]]


def test_truncate_right_keeps_prompt_and_cuts_answer_ends():
    prompt, answers = truncate([1, 2, 3], [[4, 5, 6], [7]], max_length=5, side="right")
    assert prompt == [1, 2, 3] and answers == [[4, 5], [7]]


def test_truncate_leaves_short_sequences_alone():
    assert truncate([1], [[2], [3]], max_length=8, side="left") == ([1], [[2], [3]])


def test_preference_collator_truncates_from_left_and_masks_answers():
    collate = make_preference_collator(pad_token_id=0, max_length=4, side="left")
    batch = collate([{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]}])
    assert batch["input_ids"].tolist() == [[2, 3, 4, 5], [2, 3, 6, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1], [0, 0, 1, 0]]


def test_unpaired_collator_truncates_answer_and_kl_answer_from_left():
    collate = make_unpaired_collator(pad_token_id=0, max_length=3, side="left")
    batch = collate([{"prompt_ids": [1, 2, 3], "completion_ids": [4], "KL_completion_ids": [5, 6], "label": True}])
    assert batch["input_ids"].tolist() == [[3, 4]]
    assert batch["KL_input_ids"].tolist() == [[3, 5, 6]]


def test_rows_in_trl_conversational_format():
    pair = {"id": 1, "messages": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}
    assert preference_rows([pair]) == [{"prompt": pair["messages"], "chosen": [{"role": "assistant", "content": "a"}],
                                        "rejected": [{"role": "assistant", "content": "b"}], "weight": 1.0}]
    rating = {"id": 2, "messages": pair["messages"], "completion": "c", "label": False}
    assert [(r["completion"][0]["content"], r["label"]) for r in unpaired_rows([pair, rating])] == [
        ("a", True), ("b", False), ("c", False)]


def test_rows_carry_the_weight_of_their_pair_or_rating_defaulting_to_one():
    messages = [{"role": "user", "content": "q"}]
    pairs = [{"messages": messages, "chosen": "a", "rejected": "b", "weight": 2.5},
             {"messages": messages, "chosen": "a", "rejected": "b", "weight": None},
             {"messages": messages, "chosen": "a", "rejected": "b", "weight": 0.0},
             {"messages": messages, "chosen": "a", "rejected": "b"}]
    assert [row["weight"] for row in preference_rows(pairs)] == [2.5, 1.0, 0.0, 1.0]
    rating = {"messages": messages, "completion": "c", "label": True, "weight": 0.5}
    assert [row["weight"] for row in unpaired_rows(pairs[:1] + [rating])] == [2.5, 2.5, 0.5]


def test_example_weight_refuses_a_negative_weight():
    with pytest.raises(ValueError, match="must be 0 or more"):
        example_weight({"weight": -1.0})


def test_collators_put_the_weights_in_the_batch():
    preference = make_preference_collator(pad_token_id=0, max_length=8, side="left")
    batch = preference([{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3], "weight": 2.0},
                        {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]}])
    assert batch["weight"].tolist() == [2.0, 1.0]
    unpaired = make_unpaired_collator(pad_token_id=0, max_length=8, side="left")
    batch = unpaired([{"prompt_ids": [1], "completion_ids": [2], "label": True, "weight": 0.0}])
    assert batch["weight"].tolist() == [0.0]


def test_device_arguments_turn_off_bf16_on_cpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU path")
    assert device_arguments("auto") == {"use_cpu": True, "bf16": False, "fp16": False}
    args = trainer_arguments(TrainingOptions(), "out")
    assert args["report_to"] == [] and args["save_strategy"] == "no" and args["use_cpu"] is True


def test_bf16_precision_refused_without_gpu_or_bf16_cpu(monkeypatch):
    import torch

    from align import training

    if torch.cuda.is_available():
        pytest.skip("checks the CPU path")
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: False)
    with pytest.raises(ValueError, match="needs a GPU or a CPU with bf16"):
        TrainingOptions(precision="bf16")
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: True)
    assert device_arguments(TrainingOptions(precision="bf16").precision)["bf16"] is True


def test_dpo_and_reward_model_default_to_bf16_only_where_the_cpu_has_it(monkeypatch):
    import torch

    from align import training
    from align.dpo import DPORoundConfig
    from align.reward import RewardConfig

    if torch.cuda.is_available():
        pytest.skip("checks the CPU path")
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: True)
    assert DPORoundConfig().precision == "bf16" and RewardConfig().precision == "bf16"
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: False)
    assert DPORoundConfig().precision == "auto" and RewardConfig().precision == "auto"
