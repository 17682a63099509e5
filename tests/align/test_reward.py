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
    make_packed_reward_collator,
    packed_scores,
    score,
    score_head,
    split_pair,
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


def test_shared_prompt_scores_equal_each_conversation_scored_apart(reward_model):
    """Answers to one prompt share its run: the scores are those of the plain path, including
    an answer long enough to be cut (scored apart) and prompts given out of order."""
    model, tokenizer = reward_model
    sea = [{"role": "user", "content": "name a colour of the sea, please"}]
    prompts = [PROMPT, sea, PROMPT, PROMPT, sea, PROMPT]
    answers = ["Paris.", "blue", "no", "Paris is the capital. " * 30, "It is often green or grey.", "Paris."]
    plain = score(model, tokenizer, prompts, answers, batch_size=2, max_length=64, shared=False)
    shared = score(model, tokenizer, prompts, answers, batch_size=2, max_length=64)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
    assert float(shared[0]) == pytest.approx(float(shared[5]), abs=1e-5)  # the same answer twice, read from the same row


def test_shared_rows_put_the_prompt_once_and_each_answer_after_it(reward_model):
    from align.reward import _shared_rows

    _, tokenizer = reward_model
    rows = _shared_rows(tokenizer, [PROMPT] * 3, ["Paris.", "no", "Paris is the capital. " * 30], max_length=64)
    full = [conversation_ids(tokenizer, PROMPT, a, 1 << 30) for a in ("Paris.", "no")]
    shared, alone = sorted(rows, key=lambda row: len(row[2]), reverse=True)
    prefix = shared[3][0]
    assert shared[0] == full[0] + full[1][prefix:]  # the prompt once, then each answer's rest
    assert shared[1][shared[3][1]] == prefix  # the second answer's positions start where the prompt ends
    assert [at for _, at in shared[2]] == [len(full[0]) - 1, len(shared[0]) - 1]
    assert alone[2] == [(2, 63)] and len(alone[0]) == 64  # the long one, cut from the left, on its own


def test_score_refuses_tokenizer_whose_pad_is_eos(reward_model):
    model, tokenizer = reward_model
    bad = copy.deepcopy(tokenizer)
    bad.pad_token = bad.eos_token
    with pytest.raises(ValueError, match="pad token distinct from EOS"):
        score(model, bad, [PROMPT], ["Paris."])


# ---------------------------------------------------------------- packed training


def test_split_pair_finds_the_shared_prompt_and_leaves_each_answer_a_token():
    assert split_pair([1, 2, 3, 4], [1, 2, 5]) == ([1, 2], [3, 4], [5])
    assert split_pair([1, 2, 3], [1, 2, 3]) == ([1, 2], [3], [3])  # identical: the last token is each score's
    assert split_pair([1, 2], [1, 2, 3]) == ([1], [2], [2, 3])
    assert split_pair([7], [8, 9]) == ([], [7], [8, 9])


def test_packed_collator_reads_scores_at_each_branch_end_worked_by_hand():
    collate = make_packed_reward_collator(pad_token_id=0, max_length=100, side="left")
    batch = collate([{"chosen_ids": [5, 6, 7, 8], "rejected_ids": [5, 6, 9]},
                     {"chosen_ids": [3], "rejected_ids": [4, 4]}])
    # row 0: 5 6 | 7 8 | 6 (copy) | 9  -> chosen ends at 3, rejected at 5
    assert batch["input_ids"][0].tolist() == [5, 6, 7, 8, 6, 9]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 1, 2]
    # row 1: no shared prompt: 3 | 4 4 (no copy), positions restart at 0
    assert batch["input_ids"][1].tolist()[:3] == [3, 4, 4] and batch["position_ids"][1].tolist()[:3] == [0, 0, 1]
    assert batch["chosen_end"].tolist() == [3, 0] and batch["rejected_end"].tolist() == [5, 2]
    assert batch["num_tokens"].item() == 9
    assert not batch["allowed"][0, 0, 5, 2] and batch["allowed"][0, 0, 5, 0] and not batch["allowed"][1, 0, 1, 0]


def test_packed_collator_cuts_the_shared_prompt_from_the_left():
    collate = make_packed_reward_collator(pad_token_id=0, max_length=5, side="left")
    batch = collate([{"chosen_ids": [1, 2, 3, 4, 5, 6], "rejected_ids": [1, 2, 3, 4, 7, 8]}])
    # prompt 1 2 3 4, answers (5 6) and (7 8): the prompt keeps its last 3 tokens
    assert batch["input_ids"][0].tolist() == [2, 3, 4, 5, 6, 4, 7, 8]


def test_packed_scores_equal_each_conversation_scored_apart(reward_model):
    model, tokenizer = reward_model
    prompts = [PROMPT, [{"role": "user", "content": "name a colour of the sea, please"}]]
    answers = [("Paris is the capital.", "no"), ("blue", "It is often green or grey, and blue.")]
    examples = [{"chosen_ids": conversation_ids(tokenizer, p, c, 10_000),
                 "rejected_ids": conversation_ids(tokenizer, p, r, 10_000)} for p, (c, r) in zip(prompts, answers)]
    batch = make_packed_reward_collator(tokenizer.pad_token_id, 10_000, "left")(examples)
    with torch.no_grad():
        chosen, rejected = packed_scores(model, score_head(model), batch)
    apart = score(model, tokenizer, prompts + prompts, [c for c, _ in answers] + [r for _, r in answers])
    torch.testing.assert_close(torch.cat([chosen, rejected]), apart, atol=1e-5, rtol=1e-5)


def test_packed_and_unpacked_reward_rounds_take_the_same_first_step(tiny_model_dir, tmp_path):
    config = {**FAST_TRAINING, "max_steps": 1, "lora_dropout": 0.0}
    weights = {}
    for packed in (True, False):
        out = tmp_path / str(packed)
        metrics = train_reward_model(tiny_model_dir, rows(4), RewardConfig(**config, packed=packed), out)
        assert metrics["train_loss"] == pytest.approx(0.6931, abs=1e-3)  # a fresh head: scores all near 0
        weights[packed] = load_file(out / "adapter_model.safetensors")
    assert weights[True].keys() == weights[False].keys()
    for name in weights[True]:
        torch.testing.assert_close(weights[True][name], weights[False][name], atol=1e-5, rtol=1e-4)
