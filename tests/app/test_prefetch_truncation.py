"""Answers cut off by the token budget are recorded as such, shown marked, and (a project
setting) sampled again so that items show complete answers."""

import json

import torch

from annotations import store
from app.pages.annotate import TRUNCATED_MARK, answer_label
from app.prefetch import RESAMPLE_TRIES, Prefetcher
from app.serving import Generation, SamplingParams

PROMPTS = [[{"role": "user", "content": "Tell me about the sea."}], [{"role": "user", "content": "Say hello"}]]


def test_generation_is_truncated_exactly_when_no_end_of_turn_was_sampled(server):
    sampling = SamplingParams(temperature=0, max_new_tokens=3)
    groups = server.generate_many(PROMPTS, n=1, sampling=sampling)
    for messages, (answer,) in zip(PROMPTS, groups):
        ids = server.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                   return_dict=True)
        with torch.inference_mode():
            out = server.model.generate(**ids, max_new_tokens=3, do_sample=False,
                                        pad_token_id=server.tokenizer.pad_token_id,
                                        eos_token_id=server.tokenizer.eos_token_id)
        ended = server.tokenizer.eos_token_id in out[0, ids["input_ids"].shape[1]:].tolist()
        assert answer.truncated is (not ended)


def test_prefetched_candidates_record_truncation(empty_ctx):
    db = empty_ctx.db()
    store.set_setting(db, "exclude_truncated", False)
    store.set_setting(db, "answer_instruction", "")
    prompt_id, _ = store.add_prompt(db, "Tell me about the sea.")
    (item_id,) = store.queue_items(db, [prompt_id], mode="ranking", k=3)
    prefetcher = Prefetcher(empty_ctx.db, empty_ctx.server, sampling=SamplingParams(temperature=0, max_new_tokens=2))
    assert prefetcher.fill_once(db)
    flags = [r[0] for r in db.execute("SELECT truncated FROM candidates WHERE item_id = ?", [item_id])]
    (alone,) = empty_ctx.server.generate(PROMPTS[0], n=1, sampling=SamplingParams(temperature=0, max_new_tokens=2))
    assert flags == [int(alone.truncated)] * 3  # greedy: the same answer three times, flagged as it ended


class ScriptedServer:
    """Stands in for PolicyServer.generate_many with answers decided by the test: each call
    takes the next list of flags (True = truncated) and returns Generations with those flags."""

    live_version = "base"

    def __init__(self, script):
        self.script = list(script)
        self.calls = []

    def prompt_tokens(self, messages):
        return 8

    def generate_many(self, prompts, n=1, sampling=None, version=None, seed=None, *, preemptible=False,
                      interactive=False):
        assert version in (None, "base")  # answers sampled again come from the version of the first ones
        self.calls.append((len(prompts), n))
        flags = iter(self.script.pop(0))
        return [[Generation(f"answer {i}.{j}", "base", 1.0, {}, truncated=next(flags)) for j in range(n)]
                for i in range(len(prompts))]


def pending_ranking_items(db, n, k=4):
    ids = [store.add_prompt(db, f"prompt {i}")[0] for i in range(n)]
    return store.queue_items(db, ids, mode="ranking", k=k)


def test_cut_off_answers_are_sampled_again_when_the_setting_is_on(empty_ctx):
    db = empty_ctx.db()
    store.set_setting(db, "exclude_truncated", True)
    (item,) = pending_ranking_items(db, 1)
    server = ScriptedServer([[True, False, True, False], [False, False]])
    prefetcher = Prefetcher(empty_ctx.db, server, sampling=SamplingParams())
    prefetcher.fill_once(db)
    assert server.calls == [(1, 4), (1, 2)]  # the two cut-off answers, sampled again together
    rows = db.execute("SELECT text, truncated FROM candidates WHERE item_id = ? ORDER BY id", [item]).fetchall()
    assert [t for _, t in rows] == [0, 0, 0, 0]
    assert prefetcher.resampled == 2 and prefetcher.kept_truncated == 0


def test_an_answer_that_keeps_running_long_is_kept_marked_after_the_last_try(empty_ctx):
    db = empty_ctx.db()
    store.set_setting(db, "exclude_truncated", True)
    (item,) = pending_ranking_items(db, 1)
    server = ScriptedServer([[True, False, False, False]] + [[True]] * RESAMPLE_TRIES)
    prefetcher = Prefetcher(empty_ctx.db, server, sampling=SamplingParams())
    prefetcher.fill_once(db)
    assert len(server.calls) == 1 + RESAMPLE_TRIES
    flags = [r[0] for r in db.execute("SELECT truncated FROM candidates WHERE item_id = ?", [item])]
    assert sorted(flags) == [0, 0, 0, 1] and prefetcher.kept_truncated == 1  # shown, marked, never lost


def test_cut_off_answers_are_kept_marked_when_the_setting_is_off(empty_ctx):
    db = empty_ctx.db()
    store.set_setting(db, "exclude_truncated", False)
    (item,) = pending_ranking_items(db, 1)
    server = ScriptedServer([[True, False, True, False]])
    Prefetcher(empty_ctx.db, server, sampling=SamplingParams()).fill_once(db)
    assert len(server.calls) == 1
    assert [r[0] for r in db.execute("SELECT truncated FROM candidates WHERE item_id = ? ORDER BY id", [item])] \
        == [1, 0, 1, 0]


def test_a_cut_off_answer_is_marked_on_the_page():
    assert TRUNCATED_MARK in answer_label({"truncated": True}, "B")
    assert answer_label({"truncated": False}, "B") == "Answer B"


def test_candidates_are_sampled_under_the_answer_instruction_and_record_it(empty_ctx):
    db = empty_ctx.db()
    store.set_setting(db, "answer_instruction", "Be brief.")
    (item,) = pending_ranking_items(db, 1)
    system_prompt = store.add_prompt(db, [{"role": "system", "content": "Talk like a pirate."},
                                          {"role": "user", "content": "hi"}])[0]
    (own,) = store.queue_items(db, [system_prompt], mode="ranking", k=4)
    seen = []
    server = ScriptedServer([[False] * 8])  # both items in one batch
    original = server.generate_many

    def remember(prompts, *args, **kwargs):
        seen.extend(prompts)
        return original(prompts, *args, **kwargs)

    server.generate_many = remember
    prefetcher = Prefetcher(empty_ctx.db, server, sampling=SamplingParams())
    while prefetcher.fill_once(db):
        pass
    assert seen[0] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "prompt 0"}]
    assert seen[1][0] == {"role": "system", "content": "Talk like a pirate."}  # a prompt's own system message wins
    sampling = [json.loads(r[0]) for r in db.execute("SELECT sampling FROM candidates WHERE item_id = ?", [item])]
    assert {s["instruction"] for s in sampling} == {"Be brief."}
    own_sampling = [json.loads(r[0]) for r in db.execute("SELECT sampling FROM candidates WHERE item_id = ?", [own])]
    assert all("instruction" not in s for s in own_sampling)
