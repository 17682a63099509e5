"""Handlers called directly, on a real store and the tiny model."""

import json

import pytest

from annotations import store
from annotations.errors import InvalidInput, PermissionDenied
from app import handlers
from app.prefetch import Prefetcher
from app.serving import PolicyServer, SamplingParams


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    return PolicyServer(tiny_model_dir)


@pytest.fixture
def ctx(tmp_path, server):
    from annotations import open_db

    open_db(tmp_path / "rankloop.db").close()
    context = handlers.AppContext(db_path=tmp_path / "rankloop.db", server=server)
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


def test_stream_yields_growing_text_and_records_the_version(server):
    pieces = list(server.stream([{"role": "user", "content": "hello"}], SamplingParams(max_new_tokens=6)))
    assert pieces and all(version == "base" for _, version in pieces)
    assert all(len(a[0]) <= len(b[0]) for a, b in zip(pieces, pieces[1:]))


def test_closing_a_stream_early_releases_the_model(server):
    stream = server.stream([{"role": "user", "content": "hello"}], SamplingParams(max_new_tokens=64))
    next(stream)
    stream.close()
    assert server.generate([{"role": "user", "content": "hi"}], sampling=SamplingParams(max_new_tokens=2))


def test_background_generation_gives_way_to_an_interactive_request(server):
    import threading

    from app.serving import Preempted

    outcome = {}

    def background():
        try:
            server.generate([{"role": "user", "content": "a long one"}], n=2,
                            sampling=SamplingParams(max_new_tokens=1024, temperature=1.0), preemptible=True)
            outcome["result"] = "finished"
        except Preempted:
            outcome["result"] = "preempted"

    thread = threading.Thread(target=background)
    thread.start()
    while not server._lock.locked():
        pass
    reply = server.generate([{"role": "user", "content": "quick"}], sampling=SamplingParams(max_new_tokens=2),
                            interactive=True)
    thread.join()
    assert reply and outcome["result"] == "preempted"
