"""Handlers called directly, on a real store and the tiny model."""

import dataclasses
import json
from pathlib import Path

import pytest

from annotations import store
from annotations.errors import InvalidInput, PermissionDenied
from app import handlers
from app.prefetch import Prefetcher
from app.serving import SamplingParams


@pytest.fixture
def ctx(empty_ctx, server):
    context = empty_ctx
    db = context.db()
    prompt_ids = [store.add_prompt(db, f"Question number {i}?")[0] for i in range(3)]
    store.queue_items(db, prompt_ids)
    filler = Prefetcher(context.db, server, target_ready=10, sampling=SamplingParams(max_new_tokens=8))
    while filler.fill_once(db):
        pass
    return context


def make_user(ctx, name, role="annotator"):
    store.add_user(ctx.db(), name, role, f"{name}-password")
    return store.get_user(ctx.db(), name)


def test_prefetch_fills_items_with_candidates_from_the_live_version(ctx):
    rows = ctx.db().execute("SELECT policy_version, count(*) FROM candidates GROUP BY policy_version").fetchall()
    assert rows == [("base", 6)]
    assert store.count_items(ctx.db(), "ready") == 3


def test_next_item_refuses_anonymous_users(ctx):
    with pytest.raises(PermissionDenied):
        handlers.next_item(ctx, None)


def test_submit_pairwise_stores_judgement_and_pair_in_shown_order(ctx):
    alice = make_user(ctx, "alice")
    view = handlers.next_item(ctx, alice)
    result = handlers.submit_pairwise(ctx, alice, view, "B")
    assert result["pairs"] == 1 and not result["duplicate"]
    chosen_id, rejected_id = ctx.db().execute(
        "SELECT chosen_candidate_id, rejected_candidate_id FROM pairs WHERE judgement_id = ?",
        [result["judgement_id"]],
    ).fetchone()
    assert (chosen_id, rejected_id) == (view["shown_order"][1], view["shown_order"][0])
    shown, decision_ms = ctx.db().execute(
        "SELECT shown_order, decision_ms FROM judgements WHERE id = ?", [result["judgement_id"]]
    ).fetchone()
    assert json.loads(shown) == view["shown_order"] and decision_ms >= 0


def test_submit_pairwise_twice_with_the_same_view_stores_once(ctx):
    alice = make_user(ctx, "alice")
    view = handlers.next_item(ctx, alice)
    first = handlers.submit_pairwise(ctx, alice, view, "A")
    second = handlers.submit_pairwise(ctx, alice, view, "A")
    assert second == {**first, "duplicate": True}
    assert store.count_rows(ctx.db(), "judgements") == 1


def test_submit_pairwise_rejects_an_unknown_choice(ctx):
    alice = make_user(ctx, "alice")
    view = handlers.next_item(ctx, alice)
    with pytest.raises(InvalidInput):
        handlers.submit_pairwise(ctx, alice, view, "C")
    assert store.count_rows(ctx.db(), "judgements") == 0


def test_both_bad_gives_no_pair_and_two_negative_ratings(ctx):
    alice = make_user(ctx, "alice")
    view = handlers.next_item(ctx, alice)
    result = handlers.submit_pairwise(ctx, alice, view, "both_bad")
    assert result["pairs"] == 0
    assert ctx.db().execute("SELECT value FROM ratings").fetchall() == [(-1,), (-1,)]


def test_two_annotators_get_different_items_with_overlap_one(ctx):
    alice, bob = make_user(ctx, "alice"), make_user(ctx, "bob")
    assert handlers.next_item(ctx, alice)["item_id"] != handlers.next_item(ctx, bob)["item_id"]


def test_policy_server_records_the_version_and_rejects_unknown_ones(server):
    out = server.generate([{"role": "user", "content": "hello"}], n=2, sampling=SamplingParams(max_new_tokens=4))
    assert [g.version for g in out] == ["base", "base"]
    with pytest.raises(KeyError):
        server.generate([{"role": "user", "content": "hello"}], version="v999")


def test_sampling_params_reject_out_of_range_values():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=5)


def test_prompts_generated_together_get_the_answers_they_get_alone(server):
    """Left padding does not change an answer: greedy answers to prompts of different lengths,
    sampled in one batch, equal each prompt's own."""
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    prompts = [[{"role": "user", "content": "hi"}],
               [{"role": "user", "content": "a much longer question about the colour of the sea at night?"}]]
    together = server.generate_many(prompts, n=2, sampling=greedy)
    assert [len(group) for group in together] == [2, 2]
    for messages, group in zip(prompts, together):
        alone = server.generate(messages, n=1, sampling=greedy)[0].text
        assert [g.text for g in group] == [alone, alone]


def test_prefetch_batches_plain_items_and_generates_contrast_items_alone(empty_ctx, server):
    db = empty_ctx.db()
    plain = store.queue_items(db, [store.add_prompt(db, f"Plain question {i}?")[0] for i in range(3)])
    (contrast,) = store.queue_items(db, [store.add_prompt(db, "Contrast question?")[0]], versions=["base"])
    filler = Prefetcher(empty_ctx.db, server, target_ready=10, batch_items=2, sampling=SamplingParams(max_new_tokens=4))
    calls = []
    original = server.generate_many

    def counting(prompts, *args, **kwargs):
        calls.append(len(prompts))
        return original(prompts, *args, **kwargs)

    server.generate_many = counting
    try:
        while filler.fill_once(db):
            pass
    finally:
        server.generate_many = original
    assert calls == [2, 1, 1]  # two plain items together, then the third, then the contrast item
    for item_id in plain + [contrast]:
        status, = db.execute("SELECT status FROM items WHERE id = ?", [item_id]).fetchone()
        count, = db.execute("SELECT count(*) FROM candidates WHERE item_id = ?", [item_id]).fetchone()
        assert (status, count) == ("ready", 2)
    assert filler.generated == 4


def test_prefetch_keeps_a_batch_within_its_prompt_token_budget(empty_ctx, server):
    db = empty_ctx.db()
    short = [store.add_prompt(db, f"Short {i}?")[0] for i in range(2)]
    long = store.add_prompt(db, "A long question about the sea and the sky, " * 30)[0]
    store.queue_items(db, short + [long])
    width = server.prompt_tokens([{"role": "user", "content": "Short 0?"}])
    filler = Prefetcher(empty_ctx.db, server, target_ready=10, batch_items=4, batch_tokens=2 * 2 * (width + 1),
                        sampling=SamplingParams(max_new_tokens=2))
    calls = []
    original = server.generate_many
    server.generate_many = lambda prompts, *a, **k: calls.append(len(prompts)) or original(prompts, *a, **k)
    try:
        while filler.fill_once(db):
            pass
    finally:
        server.generate_many = original
    assert calls == [2, 1]  # the two short prompts together; the long one alone (a single item always goes)


def test_prefetch_fills_a_whole_batch_once_the_buffer_is_low(empty_ctx, server):
    db = empty_ctx.db()
    store.queue_items(db, [store.add_prompt(db, f"Question {i}?")[0] for i in range(5)])
    filler = Prefetcher(empty_ctx.db, server, target_ready=1, batch_items=3, sampling=SamplingParams(max_new_tokens=4))
    assert filler.fill_once(db) and not filler.fill_once(db)  # 3 ready: the buffer holds more than 1
    assert store.count_items(db, "ready") == 3


def test_stream_yields_growing_text_and_records_the_version(server):
    pieces = list(server.stream([{"role": "user", "content": "hello"}], SamplingParams(max_new_tokens=6)))
    assert pieces and all(version == "base" for _, version in pieces)
    assert all(len(a[0]) <= len(b[0]) for a, b in zip(pieces, pieces[1:]))


def test_closing_a_stream_early_releases_the_model(server):
    stream = server.stream([{"role": "user", "content": "hello"}], SamplingParams(max_new_tokens=64))
    next(stream)
    stream.close()
    assert server.generate([{"role": "user", "content": "hi"}], sampling=SamplingParams(max_new_tokens=2))


def long_preemptible_generation(server, outcome: dict):
    """A background generation that records whether it finished or gave way."""
    from app.serving import Preempted

    try:
        server.generate([{"role": "user", "content": "a long one"}], n=2,
                        sampling=SamplingParams(max_new_tokens=1024, temperature=1.0), preemptible=True)
        outcome["result"] = "finished"
    except Preempted:
        outcome["result"] = "preempted"


def test_background_generation_gives_way_to_an_interactive_request(server):
    import threading

    outcome = {}

    thread = threading.Thread(target=long_preemptible_generation, args=(server, outcome))
    thread.start()
    while not server._lock.locked():
        pass
    reply = server.generate([{"role": "user", "content": "quick"}], sampling=SamplingParams(max_new_tokens=2),
                            interactive=True)
    thread.join()
    assert reply and outcome["result"] == "preempted"


def test_changing_the_thread_count_stops_a_prefetch_batch_instead_of_waiting_for_it(server):
    """The live watcher changes the thread count when a round starts or ends; an admin's
    promotion waits on it. It is a turn of the model's owner at swap priority: a preemptible
    batch gives way at its next step (before, it waited for the whole batch, minutes on the
    real model)."""
    import threading
    import time

    import torch

    outcome = {}

    threads = torch.get_num_threads()
    thread = threading.Thread(target=long_preemptible_generation, args=(server, outcome))
    thread.start()
    while not server._lock.locked():
        pass
    started = time.monotonic()
    assert server.configure_threads(1) == 1
    waited = time.monotonic() - started
    thread.join()
    server.configure_threads(threads)
    assert outcome["result"] == "preempted" and waited < 5


# ---------------------------------------------------------------- paths a web user can influence


def test_import_upload_refuses_a_file_outside_the_upload_folder(ctx, tmp_path):
    admin = make_user(ctx, "root1", "admin")
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    ctx.upload_dir = uploads
    outside = tmp_path / "outside.jsonl"
    outside.write_text('{"prompt": "not uploaded"}\n')
    (uploads / "link.jsonl").symlink_to(outside)  # a link inside pointing out is still outside
    for path in (outside, uploads / ".." / "outside.jsonl", uploads / "link.jsonl"):
        with pytest.raises(PermissionDenied, match="uploaded"):
            handlers.import_upload(ctx, admin, str(path), "prompts")
    (uploads / "mine.jsonl").write_text('{"prompt": "uploaded"}\n')
    assert "1 new prompts" in handlers.import_upload(ctx, admin, str(uploads / "mine.jsonl"), "prompts")


def test_export_download_writes_into_a_fresh_private_folder_and_checks_its_arguments(ctx, tmp_path):
    import stat

    admin = make_user(ctx, "root2", "admin")
    ctx.export_dir = tmp_path / "exports"
    (tmp_path / "pair.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    handlers.import_upload(ctx, admin, str(tmp_path / "pair.jsonl"), "trl")
    paths = [Path(handlers.export_download(ctx, admin, file_format=f)[0]) for f in ("jsonl", "csv", "jsonl")]
    assert len({p.parent for p in paths}) == 3  # each export in its own new folder
    for path in paths:
        assert path.parent.parent == ctx.export_dir and path.exists()
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    for split in ("../../etc/x", "/tmp/x", "train/../.."):
        with pytest.raises(InvalidInput, match="split"):
            handlers.export_download(ctx, admin, split=split)
    with pytest.raises(InvalidInput, match="export format"):
        handlers.export_download(ctx, admin, file_format="../x")
    assert sorted(p.parent for p in paths) == sorted(ctx.export_dir.iterdir())  # refusals wrote nothing


# ---------------------------------------------------------------- typed rankings (properties)

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def typed_rankings(draw):
    """(k, tiers of positions best first, the ranking typed as letters with '>' and '=')."""
    k = draw(st.integers(2, 6))
    order = draw(st.permutations(range(k)))
    cuts = sorted(draw(st.sets(st.integers(1, k - 1), max_size=k - 1)))
    bounds = [0, *cuts, k]
    tiers = [list(order[a:b]) for a, b in zip(bounds, bounds[1:])]
    spaced = draw(st.booleans())
    text = (" > " if spaced else ">").join(("=" if not spaced else " = ").join(handlers.LETTERS[p] for p in tier)
                                         for tier in tiers)
    return k, tiers, draw(st.sampled_from([text, text.lower()]))


@given(case=typed_rankings())
def test_parse_ranking_reads_back_any_typed_ranking(case):
    k, tiers, text = case
    assert handlers.parse_ranking(text, k) == tiers


@given(text=st.text(max_size=24), k=st.integers(2, 6))
def test_parse_ranking_of_any_text_is_a_full_ranking_or_a_clear_refusal(text, k):
    try:
        tiers = handlers.parse_ranking(text, k)
    except InvalidInput as e:
        assert str(e)
        return
    assert sorted(p for tier in tiers for p in tier) == list(range(k)) and all(tiers)


def test_answers_generated_across_a_promotion_are_not_stored(ctx, server, tmp_path):
    """A generation in flight finishes on its version; if another version went live
    meanwhile, the prefetcher leaves the item pending instead of storing stale answers."""
    prompt_id, _ = store.add_prompt(ctx.db(), "A question asked during a promotion?")
    (item_id,) = store.queue_items(ctx.db(), [prompt_id])
    filler = Prefetcher(ctx.db, server, target_ready=10, sampling=SamplingParams(max_new_tokens=4))
    original = server.generate_many

    def generate_then_promote(*args, **kwargs):
        out = original(*args, **kwargs)
        server.view = dataclasses.replace(server.view, live="v-new")  # what set_live publishes, mid-generation
        return out

    server.generate_many = generate_then_promote
    try:
        assert filler.fill_once(ctx.db())
    finally:
        server.generate_many = original
        server.view = dataclasses.replace(server.view, live="base")
    assert filler.discarded == 1
    assert ctx.db().execute("SELECT status FROM items WHERE id = ?", [item_id]).fetchone()[0] == "pending"
