"""Evaluation metrics against hand-made models and hand-worked numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from align.evaluate import (
    answer_logprobs,
    dpo_implicit_accuracy,
    kl_to_reference,
    reward_accuracy,
    sample_answers,
    win_rate,
)
from align.models import load_causal_lm, load_tokenizer, using_version
from align.training import preference_rows
from tests.align.stores import one_thread  # noqa: F401 (autouse)

PROMPTS = [[{"role": "user", "content": "Tell me about the sea."}], [{"role": "user", "content": "Say hello"}]]


class LengthRewardModel(nn.Module):
    """A hand-made 'reward model': the score at a position is the conversation's length up to it
    (its position + 1), read through a `score` head as the product reads a classifier's."""

    def __init__(self, pad_token_id: int):
        super().__init__()
        self.pad_token_id = pad_token_id
        self.dummy = nn.Parameter(torch.zeros(1))
        self.score = nn.Identity()

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        per_position = self.score((position_ids + 1).float().unsqueeze(-1))
        lengths = (input_ids != self.pad_token_id).sum(1)
        return type("Output", (), {"logits": per_position[torch.arange(len(lengths)), lengths - 1]})


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def fresh_policy(tiny_model_dir):
    """The base wrapped in a new LoRA adapter named v1: B is zero, so v1 equals the base."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_causal_lm(tiny_model_dir), LoraConfig(r=4, target_modules="all-linear"),
                           adapter_name="v1")
    model.eval()
    return model


def test_reward_accuracy_counts_chosen_scored_strictly_above_rejected(tokenizer):
    rm = LengthRewardModel(tokenizer.pad_token_id)
    pairs = [{"messages": PROMPTS[0], "chosen": "a much longer answer here", "rejected": "no"},
             {"messages": PROMPTS[1], "chosen": "yes", "rejected": "a longer answer than yes"},
             {"messages": PROMPTS[1], "chosen": "same", "rejected": "same"}]
    assert reward_accuracy(rm, tokenizer, preference_rows(pairs), batch_size=2) == pytest.approx(1 / 3)


def test_answer_logprobs_sum_answer_tokens_only(tiny_model_dir, tokenizer):
    model = load_causal_lm(tiny_model_dir)
    prompt_ids = tokenizer.apply_chat_template(PROMPTS[0], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(PROMPTS[0] + [{"role": "assistant", "content": "hello world"}],
                                         tokenize=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([full])).logits[0].log_softmax(-1)
    expected = sum(logprobs[t - 1, full[t]].item() for t in range(len(prompt_ids), len(full)))
    got = answer_logprobs(model, tokenizer, [PROMPTS[1], PROMPTS[0]], ["something else", "hello world"], batch_size=2)
    assert got[1].item() == pytest.approx(expected, abs=1e-4)


def test_pair_logprobs_packed_equal_each_answer_scored_apart(tiny_model_dir, tokenizer):
    from align.evaluate import pair_logprobs

    model = load_causal_lm(tiny_model_dir)
    pairs = [{"messages": PROMPTS[0], "chosen": "hello world", "rejected": "no"},
             {"messages": PROMPTS[1], "chosen": "yes thanks", "rejected": "a longer answer than yes"},
             {"messages": PROMPTS[0], "chosen": "good", "rejected": "bad answer"}]
    rows = preference_rows(pairs)
    chosen, rejected = pair_logprobs(model, tokenizer, rows, batch_size=2)
    prompts = [p["messages"] for p in pairs]
    torch.testing.assert_close(chosen, answer_logprobs(model, tokenizer, prompts, [p["chosen"] for p in pairs]),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(rejected, answer_logprobs(model, tokenizer, prompts, [p["rejected"] for p in pairs]),
                               atol=1e-4, rtol=0)


def test_fused_answer_logps_equal_full_logits(tiny_model_dir):
    from align.evaluate import _token_logprobs, sequence_answer_logps

    model = load_causal_lm(tiny_model_dir)
    prompts, answers = [[5, 6, 7], [9, 8, 7, 6, 5]], [[40, 41, 42, 43], [50]]
    got = sequence_answer_logps(model, prompts, answers, pad_id=0)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        ids = torch.tensor([p + a])
        expected = _token_logprobs(model, ids, torch.ones_like(ids))[0, len(p) - 1:].sum().item()
        assert got[i].item() == pytest.approx(expected, abs=1e-4)


def test_fresh_adapter_has_zero_implicit_reward_and_zero_kl(fresh_policy, tokenizer):
    rows = preference_rows([{"messages": PROMPTS[0], "chosen": "yes", "rejected": "no"}])
    with using_version(fresh_policy, "v1"):
        assert dpo_implicit_accuracy(fresh_policy, tokenizer, rows) == 0.0  # a tie is not a win
        kl = kl_to_reference(fresh_policy, tokenizer, PROMPTS, max_new_tokens=4)
        assert kl["mean"] == pytest.approx(0.0, abs=1e-6) and kl["n"] == len(PROMPTS)


def test_changed_adapter_moves_implicit_reward_and_kl(fresh_policy, tokenizer):
    rows = preference_rows([{"messages": PROMPTS[0], "chosen": "yes", "rejected": "no"}])
    with torch.no_grad():
        for name, parameter in fresh_policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    try:
        with using_version(fresh_policy, "v1"):
            accuracy = dpo_implicit_accuracy(fresh_policy, tokenizer, rows)
            kl = kl_to_reference(fresh_policy, tokenizer, PROMPTS, max_new_tokens=4)
        assert accuracy in (0.0, 1.0) and kl["mean"] > 1e-4
        assert min(kl["per_answer"]) >= 0.0 and kl["se"] >= 0.0
    finally:
        with torch.no_grad():
            for name, parameter in fresh_policy.named_parameters():
                if "lora_B" in name:
                    parameter.zero_()


def test_win_rate_of_a_version_against_itself_is_all_ties(fresh_policy, tokenizer):
    rm = LengthRewardModel(tokenizer.pad_token_id)
    result = win_rate(rm, tokenizer, fresh_policy, PROMPTS, "v1", "v1", max_new_tokens=4)
    assert {k: result[k] for k in ("win_rate", "wins", "ties", "losses", "n")} == \
        {"win_rate": 0.5, "wins": 0, "ties": 2, "losses": 0, "n": 2}
    assert result["low"] < 0.5 < result["high"]  # two prompts say little


def test_sample_answers_side_by_side(fresh_policy, tokenizer):
    samples = sample_answers(fresh_policy, tokenizer, PROMPTS, ["base", "v1"], max_new_tokens=3)
    assert [s["prompt"] for s in samples] == ["Tell me about the sea.", "Say hello"]
    assert all(set(s["answers"]) == {"base", "v1"} for s in samples)
    assert samples[0]["answers"]["base"] == samples[0]["answers"]["v1"]  # greedy, and v1 equals the base


def test_kl_to_reference_equals_the_exact_sum_over_the_vocabulary(fresh_policy, tokenizer):
    """Per answer: sum over its positions of sum_v p(v) log(p(v) / q(v)), p the policy's and q
    the base's next-token distribution, computed here one sequence at a time, unpadded."""
    from align.evaluate import generate

    with torch.no_grad():
        for name, parameter in fresh_policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    try:
        with using_version(fresh_policy, "v1"):
            kl = kl_to_reference(fresh_policy, tokenizer, PROMPTS, max_new_tokens=5, seed=3)
            samples = generate(fresh_policy, tokenizer, PROMPTS, 5, seed=3)
            expected = []
            for s in samples:
                ids = torch.tensor([s["prompt_ids"] + s["answer_ids"]])
                with torch.no_grad():
                    p = fresh_policy(input_ids=ids).logits[0].log_softmax(-1)
                    with using_version(fresh_policy, "base"):
                        q = fresh_policy(input_ids=ids).logits[0].log_softmax(-1)
                start = len(s["prompt_ids"]) - 1
                rows = slice(start, start + len(s["answer_ids"]))
                expected.append((p[rows].exp() * (p[rows] - q[rows])).sum().item())
        assert kl["per_answer"] == pytest.approx(expected, abs=1e-4)
    finally:
        with torch.no_grad():
            for name, parameter in fresh_policy.named_parameters():
                if "lora_B" in name:
                    parameter.zero_()
