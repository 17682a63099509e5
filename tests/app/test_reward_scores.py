"""The live reward model scores an item's answers while it is prefetched (app/reward_scores.py),
and under the uncertainty selection policy the item whose answers it can least tell apart is
served first."""

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
