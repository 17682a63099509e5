"""DPO rounds: a fresh adapter against the base, and a continual round from a parent adapter."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from align.dpo import DPORoundConfig, pair_losses, train_dpo
from align.evaluate import implicit_rewards
from align.models import load_policy, load_tokenizer, using_version
from align.training import preference_rows, weighted_mean
from tests.align.stores import FAST_TRAINING, one_thread  # noqa: F401 (one_thread: autouse)


def rows(n: int = 8) -> list[dict]:
    return preference_rows([
        {"messages": [{"role": "user", "content": f"question {i} about the sea"}],
         "chosen": "Here is a good answer about the sea. yes thanks", "rejected": "no sorry bad"}
        for i in range(n)
    ])


def lora_weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def parent(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo-parent")
    metrics = train_dpo(tiny_model_dir, rows(), DPORoundConfig(**FAST_TRAINING), out)
    return out, metrics


def test_two_steps_change_only_the_adapter(parent):
    out, metrics = parent
    weights = lora_weights(out)
    assert weights and all("lora_" in name for name in weights)  # no base weights, no "ref" copy
    assert any(w.abs().sum() > 0 for name, w in weights.items() if "lora_B" in name)
    assert metrics["train_steps"] == 2.0 and (out / "tokenizer_config.json").exists()


def test_saved_adapter_loads_back_and_changes_the_policy(tiny_model_dir, parent):
    policy = load_policy(tiny_model_dir, {"v1": parent[0]})
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad(), using_version(policy, "base"):
        base_logits = policy(input_ids=ids).logits
    with torch.no_grad(), using_version(policy, "v1"):
        adapted = policy(input_ids=ids).logits
    assert not torch.allclose(base_logits, adapted)


def test_continual_round_starts_from_parent_adapter(tiny_model_dir, parent, tmp_path):
    config = DPORoundConfig(**{**FAST_TRAINING, "learning_rate": 1e-12, "max_steps": 1})
    train_dpo(tiny_model_dir, rows(), config, tmp_path, parent_adapter=parent[0])
    before, after = lora_weights(parent[0]), lora_weights(tmp_path)
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], atol=1e-6, rtol=0)


def test_continual_round_uses_parent_as_reference(tiny_model_dir, parent, tmp_path):
    # Against the base the parent already has non-zero implicit rewards...
    policy = load_policy(tiny_model_dir, {"v1": parent[0]})
    tokenizer = load_tokenizer(tiny_model_dir)
    with using_version(policy, "v1"):
        chosen, _ = implicit_rewards(policy, tokenizer, rows(2), beta=0.1)
    assert chosen.abs().max() > 0
    # ...but the first step of a round continuing from it sees rewards of exactly 0:
    # the reference is the parent itself, not the base.
    logs = []
    train_dpo(tiny_model_dir, rows(), DPORoundConfig(**{**FAST_TRAINING, "max_steps": 1}), tmp_path,
              parent_adapter=parent[0], progress=lambda step, total, log: logs.append(log))
    first = next(log for log in logs if log and "rewards/chosen" in log)
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0


def test_precomputed_reference_log_probs_train(tiny_model_dir, tmp_path):
    config = DPORoundConfig(**{**FAST_TRAINING, "max_steps": 1, "precompute_ref_log_probs": True,
                               "loss_type": "ipo"})
    metrics = train_dpo(tiny_model_dir, rows(4), config, tmp_path)
    assert metrics["train_steps"] == 1.0


def test_weighted_sigmoid_loss_of_two_pairs_worked_by_hand():
    # beta 0.1. Pair 1: chosen log-ratio 2, rejected -3: beta * (2 - -3) = 0.5,
    #   -log sigmoid(0.5) = log(1 + e^-0.5) = log(1.6065307) = 0.4740770.
    # Pair 2: chosen -1, rejected 1: beta * (-1 - 1) = -0.2,
    #   -log sigmoid(-0.2) = log(1 + e^0.2) = log(2.2214028) = 0.7981389.
    # Weights 3 and 1: (3 * 0.4740770 + 1 * 0.7981389) / 4 = 2.2203699 / 4 = 0.5550925.
    chosen, rejected = torch.tensor([2.0, -1.0]), torch.tensor([-3.0, 1.0])
    tokens = torch.tensor([4, 4])
    losses = pair_losses("sigmoid", chosen, rejected, tokens, tokens, beta=0.1)
    torch.testing.assert_close(losses, torch.tensor([0.4740770, 0.7981389]), atol=1e-6, rtol=0)
    loss = weighted_mean(losses, torch.tensor([3.0, 1.0]))
    assert loss.item() == pytest.approx(0.5550925, abs=1e-6)
    # weight 0 leaves the pair out; weight 3 is the pair three times
    assert weighted_mean(losses, torch.tensor([0.0, 1.0])).item() == pytest.approx(0.7981389, abs=1e-6)
    assert weighted_mean(losses[[0, 0, 0, 1]]).item() == pytest.approx(loss.item(), abs=1e-6)


def test_weighted_mean_of_all_zero_weights_is_zero_with_zero_gradients():
    logits = torch.tensor([0.3, -0.7], requires_grad=True)
    loss = weighted_mean(-torch.nn.functional.logsigmoid(logits), torch.zeros(2))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad.tolist() == [0.0, 0.0]
