"""The activation budget (align/training.py): a batch whose activations would not fit recomputes
just enough of its lowest trained layers in the backward pass, and trains exactly as it would
have without."""

from __future__ import annotations

import pytest
import torch

from align.training import ACTIVATION_BYTES, activation_bytes_per_token, layers_to_recompute, trained_layers
from tests.align.stores import FAST_TRAINING, one_thread  # noqa: F401 (one_thread: autouse)
from tests.align.test_reward import rows


def test_bytes_per_token_of_smollm2():
    class SmolLM2:  # SmolLM2-135M's widths
        hidden_size, intermediate_size = 576, 1536

    assert activation_bytes_per_token(SmolLM2) == 4 * (10 * 576 + 4 * 1536) == 47_616


def test_the_fewest_layers_that_make_a_batch_fit_recompute():
    # 1,000 tokens, 4 trained layers keeping 100 bytes a token each: 400,000 bytes. A recomputed
    # layer keeps only its input: hidden 10 x 4 bytes = 40 bytes a token, 40,000 bytes.
    assert ACTIVATION_BYTES == 4
    assert layers_to_recompute(1000, 4, 100, 10, budget=400_000) == 0  # fits as it is
    assert layers_to_recompute(1000, 4, 100, 10, budget=0) == 0  # no budget
    assert layers_to_recompute(1000, 4, 100, 10, budget=340_000) == 1  # 3 x 100k + 40k
    assert layers_to_recompute(1000, 4, 100, 10, budget=300_000) == 2  # 1 layer: 340k > 300k; 2: 280k
    assert layers_to_recompute(1000, 4, 100, 10, budget=100_000) == 4  # even 160k does not fit: all


def _trained(tiny_model_dir, tmp_path, budget_mib: float):
    from align.reward import RewardConfig, build_reward_trainer

    config = RewardConfig(**{**FAST_TRAINING, "lora_dropout": 0.0}, activation_budget_mib=1)
    trainer, _ = build_reward_trainer(tiny_model_dir, rows(), config, tmp_path)
    trainer.activation_budget_bytes = int(budget_mib * 2**20)  # below a MiB: what a tiny model's batch needs
    trainer.train()
    weights = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    return trainer, weights


def test_a_batch_over_the_budget_recomputes_and_trains_the_same(tiny_model_dir, tmp_path, monkeypatch):
    import torch.utils.checkpoint

    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    unbounded, expected = _trained(tiny_model_dir, tmp_path / "a", budget_mib=0)
    assert unbounded.recomputed == 0 and not calls
    bounded, weights = _trained(tiny_model_dir, tmp_path / "b", budget_mib=1e-4)  # 105 bytes: nothing fits
    assert bounded.recomputed == 2  # both steps
    assert len(calls) == 2 * bounded.model.config.num_hidden_layers  # every layer of both steps, recomputed
    layers = trained_layers(bounded.model)
    assert layers and all(layer.gradient_checkpointing for layer in layers)
    assert weights.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(weights[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_only_trained_layers_keep_activations(tiny_model_dir):
    from align.reward import RewardConfig, load_sequence_classifier
    from align.training import lora_config
    from align.models import load_tokenizer
    from peft import get_peft_model

    model = load_sequence_classifier(tiny_model_dir, load_tokenizer(tiny_model_dir))
    total = model.config.num_hidden_layers
    top = get_peft_model(model, lora_config(RewardConfig(lora_top_layers=1), "SEQ_CLS", modules_to_save=["score"],
                                            model=model))
    assert len(trained_layers(top)) == 1 < total


def test_a_negative_budget_is_refused():
    from align.reward import RewardConfig

    with pytest.raises(ValueError, match="activation_budget_mib must be 0"):
        RewardConfig(activation_budget_mib=-1)


def test_ppo_minibatches_over_the_budget_recompute_and_train_the_same(monkeypatch):
    import torch.utils.checkpoint

    from align.ppo import PPOConfig, attach_lora, train_ppo
    from tests.tiny import PPO_PROMPTS, build_model, build_tokenizer, says_yes

    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    tokenizer = build_tokenizer()

    def run(budget_mib: float):
        config = PPOConfig(steps=2, batch_size=4, mini_batch_size=2, ppo_epochs=2, max_new_tokens=6,
                           learning_rate=1e-2, lora_r=4, lora_alpha=8)
        config.activation_budget_mib = budget_mib  # below a MiB: what a tiny model's minibatch needs
        policy = attach_lora(build_model(tokenizer), config)
        history = train_ppo(policy, tokenizer, PPO_PROMPTS, says_yes, config)
        layers = trained_layers(policy)
        assert not any(layer.gradient_checkpointing or layer.training for layer in layers)  # put back after
        return history, {name: p.detach().clone() for name, p in policy.named_parameters() if p.requires_grad}

    expected_history, expected = run(0)
    assert not calls
    history, weights = run(1e-4)  # 105 bytes: every layer of every minibatch recomputes
    assert len(calls) == 2 * 2 * 2 * 2  # steps x epochs x minibatches x layers
    assert [m["score"] for m in history] == [m["score"] for m in expected_history]
    for name in expected:
        torch.testing.assert_close(weights[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
