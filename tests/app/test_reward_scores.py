"""The live reward model scores an item's answers while it is prefetched (app/reward_scores.py),
and under the uncertainty selection policy the item whose answers it can least tell apart is
served first; under model disagreement the server also gives each answer its implicit reward
under the live policy, and the item where the two order the answers most differently comes first."""

from __future__ import annotations

import pytest

from annotations import model_versions, store
from annotations.selection import set_selection_policy
from app.prefetch import Prefetcher
from app.reward_scores import RewardScorer
from app.serving import SamplingParams


def save_tiny_reward_model(base_dir, out_dir):
    """A reward model over the tiny base: an untrained LoRA adapter and a fresh score head."""
    from peft import get_peft_model

    from align.models import load_tokenizer
    from align.reward import RewardConfig, load_sequence_classifier
    from align.training import lora_config

    tokenizer = load_tokenizer(base_dir)
    model = load_sequence_classifier(base_dir, tokenizer)
    config = RewardConfig(lora_r=4, lora_alpha=8, lora_top_layers=0)
    model = get_peft_model(model, lora_config(config, "SEQ_CLS", modules_to_save=["score"], model=model))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture
def scored_ctx(empty_ctx, tiny_model_dir, tmp_path):
    db = empty_ctx.db()
    path = save_tiny_reward_model(tiny_model_dir, tmp_path / "rm1")
    model_versions.register_version(db, "rm1", "reward", None, "rm", None, str(path), {})
    model_versions.promote(db, "rm1")
    return empty_ctx, RewardScorer(tiny_model_dir, empty_ctx.server)


def fill(ctx, scorer, prompts, k=3):
    db = ctx.db()
    ids = store.queue_items(db, [store.add_prompt(db, p)[0] for p in prompts], mode="ranking", k=k)
    filler = Prefetcher(ctx.db, ctx.server, target_ready=10, sampling=SamplingParams(max_new_tokens=6), scorer=scorer)
    while filler.fill_once(db):
        pass
    return ids


def test_answers_are_scored_by_the_live_reward_model_and_the_least_certain_item_served_first(scored_ctx,
                                                                                            tiny_model_dir):
    import torch

    from align.reward import load_reward_model, score

    ctx, scorer = scored_ctx
    db = ctx.db()
    set_selection_policy(db, "uncertainty")
    ids = fill(ctx, scorer, ["First question?", "Second question?", "Third question?"])
    rows = db.execute("SELECT item_id, text, reward_score, reward_version FROM candidates ORDER BY id").fetchall()
    assert len(rows) == 9 and {r[3] for r in rows} == {"rm1"} and all(r[2] is not None for r in rows)

    model, tokenizer = load_reward_model(tiny_model_dir, model_versions.get_live_version(db, "reward")["path"])
    gaps = {}
    for item_id in ids:
        messages = store.get_prompt(db, store.item_prompt_id(db, item_id))["messages"]
        texts = [r[1] for r in rows if r[0] == item_id]
        with torch.no_grad():
            expected = score(model, tokenizer, [messages] * 3, texts).tolist()
        stored = [r[2] for r in rows if r[0] == item_id]
        assert stored == pytest.approx(expected, abs=1e-4)  # the scores the reward model gives, as stored
        gaps[item_id] = min(abs(a - b) for i, a in enumerate(stored) for b in stored[i + 1:])
    assert dict(db.execute("SELECT id, selection FROM items").fetchall()) == dict.fromkeys(ids, "uncertainty")
    served = store.next_item(db, store.add_user(db, "ann", "annotator", "correct horse battery"))
    assert served["id"] == min(gaps, key=gaps.get)  # the smallest gap first


def test_without_suggestions_the_uncertainty_policy_or_a_reward_model_nothing_is_scored(scored_ctx, empty_ctx):
    ctx, scorer = scored_ctx
    store.set_setting(ctx.db(), "suggestions", False)  # a blind study
    fill(ctx, scorer, ["Oldest first?"])  # the default policy needs no scores
    assert ctx.db().execute("SELECT count(*) FROM candidates WHERE reward_score IS NOT NULL").fetchone()[0] == 0
    set_selection_policy(ctx.db(), "uncertainty")
    ctx.db().execute("UPDATE policies SET state = 'retired' WHERE version = 'rm1'")
    fill(ctx, scorer, ["No reward model?"])  # served all the same, after scored items
    assert ctx.db().execute("SELECT count(*) FROM candidates WHERE reward_score IS NOT NULL").fetchone()[0] == 0
    assert store.count_items(ctx.db(), "ready") == 2


def test_under_model_disagreement_each_answer_gets_its_implicit_reward_under_the_live_policy(scored_ctx,
                                                                                           tiny_model_dir, tmp_path):
    import torch

    from align.evaluate import answer_logprobs
    from align.models import load_policy, load_tokenizer, using_version
    from annotations.selection import model_disagreement_priority
    from tests.app.test_hot_swap import save_tiny_adapter

    ctx, scorer = scored_ctx
    db = ctx.db()
    store.set_setting(db, "answer_instruction", "")  # the prompt as stored is the prompt the model was asked
    set_selection_policy(db, "model_disagreement")
    base_ids = fill(ctx, scorer, ["Asked of the base?"])
    assert db.execute("SELECT implicit_reward FROM candidates").fetchall() == [(None,)] * 3  # base: no view of its own
    assert db.execute("SELECT priority FROM items WHERE id = ?", base_ids).fetchone()[0] is None

    path = save_tiny_adapter(tiny_model_dir, tmp_path / "v1")
    ctx.server.load_adapter("v1", path)
    ctx.server.set_live("v1")
    try:
        ids = fill(ctx, scorer, ["First question?", "Second question?"])
    finally:
        ctx.server.set_live("base")
        ctx.server.unload_adapter("v1")
    policy, tokenizer = load_policy(tiny_model_dir, {"v1": path}), load_tokenizer(tiny_model_dir)
    for item_id in ids:
        messages = store.get_prompt(db, store.item_prompt_id(db, item_id))["messages"]
        rows = db.execute("SELECT text, policy_version, reward_score, implicit_reward FROM candidates"
                          " WHERE item_id = ? ORDER BY id", [item_id]).fetchall()
        texts = [r[0] for r in rows]
        assert {r[1] for r in rows} == {"v1"}
        with torch.no_grad(), using_version(policy, "v1"):
            mine = answer_logprobs(policy, tokenizer, [messages] * 3, texts)
        with torch.no_grad(), using_version(policy, "base"):
            base = answer_logprobs(policy, tokenizer, [messages] * 3, texts)
        assert [r[3] for r in rows] == pytest.approx((mine - base).tolist(), abs=1e-3)
        assert any(abs(r[3]) > 1e-3 for r in rows)  # the adapter moved the policy
        expected = model_disagreement_priority([r[2] for r in rows], [r[3] for r in rows])
        assert db.execute("SELECT priority, selection FROM items WHERE id = ?", [item_id]).fetchone() \
            == (pytest.approx(expected), "model_disagreement")
