"""Per-example loss weights in every method: a weight of 0 leaves an example out, a weight of 2
counts it twice, in the loss and in its gradients.

Each check builds a method's real trainer on the tiny model, collates batches from its own
training set with its own collator and compares `compute_loss` and the gradients of the
trainable parameters: [p (w=0), q, r] against [q, r], and [p (w=2), q] against [p, p, q].
The adapters' LoRA B matrices are perturbed first, so that the policy differs from its
reference and the examples' losses differ from one another.
"""

from __future__ import annotations

import pytest
import torch
from trl import DPOTrainer

from align.dpo import BATCH_LOSS_TYPES, DPO_LOSS_TYPES, DPORoundConfig, build_dpo_trainer
from align.kto import KTORoundConfig, build_kto_trainer
from align.reward import RewardConfig, build_reward_trainer
from align.sft import SFTRoundConfig, answer_rows, build_sft_trainer
from align.training import preference_rows, unpaired_rows, without_weights
from tests.align.stores import FAST_TRAINING, one_thread  # noqa: F401 (one_thread: autouse)

SETTINGS = {**FAST_TRAINING, "lora_dropout": 0.0}
TOLERANCE = {"atol": 1e-6, "rtol": 0.0}


def pairs(n: int = 6) -> list[dict]:
    """Pairs of one length (so batches pad alike) whose losses differ through their prompts,
    weighing 0.5, 1.0, 1.5, ... (the checks below set their own weights)."""
    return [{"messages": [{"role": "user", "content": f"question {i} about the sea"}],
             "chosen": "Here is a good answer about the sea. yes thanks", "rejected": "no sorry bad",
             "chosen_written": True, "weight": 0.5 * (i + 1)}
            for i in range(n)]


def perturb_adapter(model, seed: int = 0) -> None:
    """Random LoRA B matrices (they start at 0, where the adapter changes nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def batch(trainer, picks: list[tuple[int, float]]) -> dict:
    """A batch of the trainer's training examples `(index, weight)`, from its own collator."""
    examples = [{**trainer.train_dataset[i], "weight": weight} for i, weight in picks]
    return trainer.data_collator(examples)


def loss_and_gradients(trainer, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    gradients = {name: param.grad.clone() for name, param in model.named_parameters()
                 if param.requires_grad and param.grad is not None}
    assert gradients
    return loss.detach(), gradients


def assert_same_training_signal(trainer, weighted: list[tuple[int, float]], plain: list[tuple[int, float]]):
    loss, gradients = loss_and_gradients(trainer, batch(trainer, weighted))
    expected_loss, expected_gradients = loss_and_gradients(trainer, batch(trainer, plain))
    torch.testing.assert_close(loss, expected_loss, **TOLERANCE)
    assert gradients.keys() == expected_gradients.keys()
    for name in gradients:
        torch.testing.assert_close(gradients[name], expected_gradients[name], **TOLERANCE)


def assert_weights_count_like_examples(trainer, p: int, q: int, r: int):
    assert_same_training_signal(trainer, [(p, 0.0), (q, 1.0), (r, 1.0)], [(q, 1.0), (r, 1.0)])
    assert_same_training_signal(trainer, [(p, 2.0), (q, 1.0)], [(p, 1.0), (p, 1.0), (q, 1.0)])


def assert_zero_weights_give_a_zero_loss(trainer, p: int, q: int):
    loss, gradients = loss_and_gradients(trainer, batch(trainer, [(p, 0.0), (q, 0.0)]))
    assert loss.item() == 0.0
    assert all(torch.isfinite(g).all() and not g.any() for g in gradients.values())


def assert_weights_reach_the_training_batches(trainer):
    """The weight column survives TRL's dataset preparation and `remove_unused_columns`."""
    weights = next(iter(trainer.get_train_dataloader()))["weight"]
    assert set(weights.tolist()) <= {0.5 * (i + 1) for i in range(6)} and (weights != 1).any()


def assert_examples_differ(trainer, p: int, q: int):
    """Guard against a vacuous check: the two examples must have different losses."""
    with torch.no_grad():
        losses = [trainer.compute_loss(trainer.model, batch(trainer, [(i, 1.0)])).item() for i in (p, q)]
    assert abs(losses[0] - losses[1]) > 1e-4, losses


# ---------------------------------------------------------------- reward model


@pytest.fixture(scope="module", params=[True, False], ids=["packed", "unpacked"])
def reward_trainer(request, tiny_model_dir, tmp_path_factory):
    config = RewardConfig(**SETTINGS, packed=request.param, center_rewards_coefficient=0.01)
    trainer, _ = build_reward_trainer(tiny_model_dir, preference_rows(pairs()), config,
                                      tmp_path_factory.mktemp("rm"))
    perturb_adapter(trainer.model)
    return trainer


def test_reward_pair_weights_count_like_copies_of_the_pair(reward_trainer):
    assert_weights_reach_the_training_batches(reward_trainer)
    assert_examples_differ(reward_trainer, 0, 1)
    assert_weights_count_like_examples(reward_trainer, 0, 1, 2)
    assert_zero_weights_give_a_zero_loss(reward_trainer, 0, 1)


# ---------------------------------------------------------------- DPO


@pytest.fixture(scope="module", params=[True, False], ids=["packed", "unpacked"])
def dpo_trainer(request, tiny_model_dir, tmp_path_factory):
    config = DPORoundConfig(**SETTINGS, packed=request.param, loss_type="sigmoid")
    trainer, _ = build_dpo_trainer(tiny_model_dir, preference_rows(pairs()), config, tmp_path_factory.mktemp("dpo"))
    assert (type(trainer).__name__ == "PackedDPOTrainer") == request.param
    perturb_adapter(trainer.model)
    return trainer


def test_dpo_pair_weights_count_like_copies_of_the_pair(dpo_trainer):
    assert_weights_reach_the_training_batches(dpo_trainer)
    assert_examples_differ(dpo_trainer, 0, 1)
    assert_weights_count_like_examples(dpo_trainer, 0, 1, 2)
    assert_zero_weights_give_a_zero_loss(dpo_trainer, 0, 1)


PER_PAIR_LOSS_TYPES = [t for t in DPO_LOSS_TYPES if t not in BATCH_LOSS_TYPES]


@pytest.fixture(scope="module")
def unpacked_dpo_trainer(tiny_model_dir, tmp_path_factory):
    config = DPORoundConfig(**SETTINGS, packed=False)
    trainer, _ = build_dpo_trainer(tiny_model_dir, preference_rows(pairs()), config, tmp_path_factory.mktemp("dpo"))
    perturb_adapter(trainer.model, seed=1)
    return trainer


@pytest.mark.parametrize("loss_type", PER_PAIR_LOSS_TYPES)
def test_unpacked_dpo_loss_of_unit_weights_is_trls(unpacked_dpo_trainer, loss_type):
    """With all weights 1, the weighted trainer's loss is TRL's own for every per-pair loss type."""
    trainer = unpacked_dpo_trainer
    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    trainer.label_smoothing = 1e-3 if loss_type == "exo_pair" else 0.1 if loss_type == "robust" else 0.0
    inputs = batch(trainer, [(0, 1.0), (1, 1.0), (2, 1.0)])
    with torch.no_grad():
        ours = trainer.compute_loss(trainer.model, inputs)
        trls = DPOTrainer._compute_loss(trainer, trainer.model, without_weights(inputs), False)
    torch.testing.assert_close(ours, trls, atol=1e-6, rtol=1e-6)


def test_batch_loss_types_refuse_weights_other_than_one(tiny_model_dir, tmp_path):
    rows = preference_rows([{**pair, "weight": 0.5} for pair in pairs(2)])
    with pytest.raises(ValueError, match="mixes the pairs of a batch"):
        build_dpo_trainer(tiny_model_dir, rows, DPORoundConfig(**SETTINGS, loss_type="aot"), tmp_path)


# ---------------------------------------------------------------- KTO


@pytest.fixture(scope="module")
def kto_trainer(tiny_model_dir, tmp_path_factory):
    ratings = [{"messages": pair["messages"], "completion": pair["chosen"] if i % 2 else pair["rejected"],
                "label": bool(i % 2), "weight": pair["weight"]} for i, pair in enumerate(pairs())]
    config = KTORoundConfig(**{**SETTINGS, "batch_size": 3})
    trainer, _ = build_kto_trainer(tiny_model_dir, unpaired_rows(ratings), config, tmp_path_factory.mktemp("kto"))
    perturb_adapter(trainer.model)
    return trainer


def test_kto_example_weights_count_like_copies_of_the_example(kto_trainer):
    # 0 and 2 are thumbs-down, 1 and 3 thumbs-up: both sides and the KL estimate take part
    assert_weights_reach_the_training_batches(kto_trainer)
    assert_examples_differ(kto_trainer, 0, 2)
    assert_weights_count_like_examples(kto_trainer, 0, 1, 2)
    assert_weights_count_like_examples(kto_trainer, 3, 0, 1)
    assert_zero_weights_give_a_zero_loss(kto_trainer, 0, 1)


def test_kto_example_weights_multiply_its_desirable_weight(kto_trainer):
    """A thumbs-up of weight 2 beside a thumbs-down of weight 1, desirable weight 3: the loss is
    (1 * down + 2 * 3 * up) / (1 + 2). Without the KL term, which weights also move."""
    def loss(picks):
        return kto_trainer.compute_loss(kto_trainer.model, batch(kto_trainer, picks))

    kto_trainer.calculate_KL, kto_trainer.desirable_weight = False, 3.0
    try:
        with torch.no_grad():
            both = loss([(0, 1.0), (1, 2.0)])  # 0: thumbs-down, 1: thumbs-up
            up = loss([(1, 1.0)]) / 3
            kto_trainer.desirable_weight = 1.0
            down = loss([(0, 1.0)])
    finally:
        kto_trainer.calculate_KL, kto_trainer.desirable_weight = True, 1.0
    assert up.item() != down.item()
    torch.testing.assert_close(both, (down + 2 * 3 * up) / 3, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- SFT


@pytest.fixture(scope="module")
def sft_trainer(tiny_model_dir, tmp_path_factory):
    trainer, _ = build_sft_trainer(tiny_model_dir, answer_rows(pairs()), SFTRoundConfig(**SETTINGS),
                                   tmp_path_factory.mktemp("sft"))
    perturb_adapter(trainer.model)
    return trainer


def test_sft_answer_weights_count_like_copies_of_the_answer(sft_trainer):
    assert_weights_reach_the_training_batches(sft_trainer)
    assert_examples_differ(sft_trainer, 0, 1)
    assert_weights_count_like_examples(sft_trainer, 0, 1, 2)
    assert_zero_weights_give_a_zero_loss(sft_trainer, 0, 1)


def test_sft_weighs_every_token_of_an_answer(sft_trainer):
    """Answers of different lengths: the loss is sum_i w_i * S_i / sum_i w_i * n_i (S_i the summed
    token losses of answer i, n_i its tokens)."""
    examples = [sft_trainer.train_dataset[0], {**sft_trainer.train_dataset[1], "input_ids":
                sft_trainer.train_dataset[1]["input_ids"][:-3], "labels": sft_trainer.train_dataset[1]["labels"][:-3]}]
    sums, counts = [], []
    with torch.no_grad():
        for example in examples:
            inputs = sft_trainer.data_collator([{**example, "weight": 1.0}])
            n = (inputs["labels"][:, 1:] != -100).sum()
            sums.append(sft_trainer.compute_loss(sft_trainer.model, inputs) * n)
            counts.append(n)
        both = sft_trainer.compute_loss(sft_trainer.model, sft_trainer.data_collator(
            [{**examples[0], "weight": 0.5}, {**examples[1], "weight": 2.0}]))
    assert counts[0] != counts[1]
    expected = (0.5 * sums[0] + 2.0 * sums[1]) / (0.5 * counts[0] + 2.0 * counts[1])
    torch.testing.assert_close(both, expected, atol=1e-6, rtol=0)


def test_sft_divides_an_accumulation_window_by_its_weighted_answer_tokens(sft_trainer):
    first = batch(sft_trainer, [(0, 0.5), (1, 2.0)])
    second = batch(sft_trainer, [(2, 0.0)])
    tokens = [(b["labels"][:, 1:] != -100).sum(1) for b in (first, second)]
    expected = 0.5 * tokens[0][0] + 2.0 * tokens[0][1] + 0.0 * tokens[1][0]
    count = sft_trainer._get_num_items_in_batch([first, second], torch.device("cpu"))
    assert count is not None and count.item() == pytest.approx(expected.item())
