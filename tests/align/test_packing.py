"""Packed DPO pairs: the layout worked by hand, log-probabilities equal to running the two
sequences apart, and a packed DPO round that trains."""

from __future__ import annotations

import pytest
import torch

from align.dpo import DPORoundConfig, train_dpo
from align.evaluate import _token_logprobs
from align.packing import IGNORE, pack_pairs, packed_logps
from tests.align.stores import FAST_TRAINING, one_thread  # noqa: F401 (one_thread: autouse)
from tests.align.test_dpo import lora_weights, rows


def test_layout_of_one_pair_worked_by_hand():
    # prompt 10 11 12, chosen 20 21, rejected 30 31 32
    batch = pack_pairs([([10, 11, 12], [20, 21], [30, 31, 32])], pad_token_id=0)
    #            index:  0   1   2   3   4   5(copy) 6   7   8
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21, 12, 30, 31, 32]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3, 4, 5]]
    # index 2 (last prompt token) predicts chosen[0], the copy at 5 predicts rejected[0]
    assert batch["shift_labels"].tolist() == [[IGNORE, IGNORE, 20, 21, IGNORE, 30, 31, 32, IGNORE]]
    assert batch["chosen_mask"].nonzero()[:, 1].tolist() == [2, 3]
    assert batch["rejected_mask"].nonzero()[:, 1].tolist() == [5, 6, 7]
    allowed = batch["allowed"][0, 0].int().tolist()
    assert allowed[4] == [1, 1, 1, 1, 1, 0, 0, 0, 0]  # chosen: prompt and itself
    assert allowed[5] == [1, 1, 0, 0, 0, 1, 0, 0, 0]  # the copy stands where prompt[2] stood
    assert allowed[8] == [1, 1, 0, 0, 0, 1, 1, 1, 1]  # rejected: never the chosen answer


def test_padding_rows_attend_to_themselves_and_predict_nothing():
    batch = pack_pairs([([1, 2], [3], [4]), ([1, 2, 5, 6], [3, 7], [4, 8])], pad_token_id=0)
    assert batch["input_ids"].shape == (2, 9)
    short = batch["allowed"][0, 0]
    assert all(short[i].sum() == 1 and short[i, i] for i in range(5, 9))
    assert batch["shift_labels"][0, 5:].eq(IGNORE).all()


def test_without_a_prompt_the_first_answer_tokens_are_not_scored():
    batch = pack_pairs([([], [20, 21], [30, 31])], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[20, 21, 30, 31]]
    assert batch["shift_labels"].tolist() == [[21, IGNORE, 31, IGNORE]]


@pytest.fixture(scope="module")
def fused_model(tiny_model_dir):
    from trl.trainer.utils import add_fused_lm_head

    from align.models import load_causal_lm

    model = load_causal_lm(tiny_model_dir).eval()
    add_fused_lm_head(model)
    return model


def separate_logps(model, prompt, answer):
    ids = torch.tensor([prompt + answer])
    logps = _token_logprobs(model, ids, torch.ones_like(ids))[0]
    start = max(len(prompt) - 1, 0) if prompt else 0
    return logps[start:].sum().item() if prompt else logps.sum().item()


def test_packed_log_probs_equal_two_separate_sequences(fused_model):
    triples = [([5, 6, 7, 8, 9], [40, 41, 42], [50, 51]),
               ([5, 6], [60], [70, 71, 72, 73]),
               ([9, 8, 7, 6, 5, 4, 3], [80, 81], [90, 91, 92])]
    with torch.no_grad():
        chosen, rejected, n_chosen, n_rejected = packed_logps(fused_model, pack_pairs(triples, pad_token_id=0))
    for i, (prompt, good, bad) in enumerate(triples):
        assert chosen[i].item() == pytest.approx(separate_logps(fused_model, prompt, good), abs=1e-4)
        assert rejected[i].item() == pytest.approx(separate_logps(fused_model, prompt, bad), abs=1e-4)
        assert (n_chosen[i].item(), n_rejected[i].item()) == (len(good), len(bad))


def test_a_packed_round_trains_and_its_first_loss_is_log_2(tiny_model_dir, tmp_path):
    """A fresh adapter equals its reference, so the first sigmoid loss is -log sigmoid(0) = log 2."""
    logs = []
    config = DPORoundConfig(**{**FAST_TRAINING, "logging_steps": 1})
    assert config.packed
    train_dpo(tiny_model_dir, rows(), config, tmp_path, progress=lambda step, total, log: logs.append(log))
    first = next(log for log in logs if log and "loss" in log)
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    assert any(w.abs().sum() > 0 for name, w in lora_weights(tmp_path).items() if "lora_B" in name)


def test_packed_and_unpacked_rounds_take_the_same_first_step(tiny_model_dir, tmp_path):
    """Same data, same seed: the adapters after one step agree (the loss and its gradient are the same)."""
    # an adapter on the top layer only: the packed reference pass reuses the policy's bottom layer
    config = {**FAST_TRAINING, "max_steps": 1, "lora_dropout": 0.0, "lora_top_layers": 1}
    train_dpo(tiny_model_dir, rows(), DPORoundConfig(**config, packed=True), tmp_path / "packed")
    train_dpo(tiny_model_dir, rows(), DPORoundConfig(**config, packed=False), tmp_path / "unpacked")
    packed, unpacked = lora_weights(tmp_path / "packed"), lora_weights(tmp_path / "unpacked")
    assert packed.keys() == unpacked.keys()
    for name in packed:
        torch.testing.assert_close(packed[name], unpacked[name], atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not __import__("align.training", fromlist=["x"]).cpu_has_bf16() or torch.cuda.is_available(),
                    reason="needs a CPU with native bf16")
def test_a_packed_round_trains_in_bf16_on_a_cpu_that_has_it(tiny_model_dir, tmp_path):
    metrics = train_dpo(tiny_model_dir, rows(), DPORoundConfig(**{**FAST_TRAINING, "precision": "bf16"}), tmp_path)
    assert metrics["train_steps"] == 2.0 and torch.isfinite(torch.tensor(metrics["train_loss"]))
    assert any(w.abs().sum() > 0 for name, w in lora_weights(tmp_path).items() if "lora_B" in name)


def test_reference_from_shared_bottom_layers_equals_a_full_reference_pass(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    from align.models import load_causal_lm
    from align.packing import _decoder, capture_output, frozen_bottom_layers, top_layers_only

    model = load_causal_lm(tiny_model_dir)
    add_fused_lm_head(model)
    policy = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # the policy differs from its reference
    assert frozen_bottom_layers(policy) == 1
    batch = pack_pairs([([5, 6, 7, 8], [40, 41], [50, 51, 52]), ([9, 3], [60], [70])], pad_token_id=0)
    with torch.no_grad():
        with capture_output(_decoder(policy).layers[0]) as box:
            policy_logps = packed_logps(policy, batch)
        with policy.disable_adapter():
            full = packed_logps(policy, batch)
            with top_layers_only(policy, 1):
                shared = packed_logps(policy, {**batch, "inputs_embeds": box["output"]})
    assert not torch.allclose(policy_logps[0], full[0])
    torch.testing.assert_close(shared[0], full[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(shared[1], full[1], atol=1e-5, rtol=0)
    assert len(_decoder(policy).layers) == 2  # put back
