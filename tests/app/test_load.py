"""Twenty annotators at once, fifty judgements each, through the HTTP API: every judgement is
stored exactly once, with its pair, and none fails (the driver is bench/load.py's)."""

import pytest

from annotations import store
from annotations.db import check_db
from bench.load import add_ready_items, drive_annotators, make_annotators
from tests.app.conftest import free_port

pytestmark = pytest.mark.slow

ANNOTATORS, SUBMISSIONS = 20, 50


@pytest.fixture(scope="module")
def load_app(tmp_path_factory, tiny_model_dir):
    """The app on the tiny model with 1,020 ready items (overlap 1: one judgement each) and
    20 annotators; no prefetcher, since every item already has its answers."""
    from app.server import create_app, launch, shutdown

    home = tmp_path_factory.mktemp("load-home")
    ctx, demo, auth, _ = create_app(home, tiny_model_dir, threads=1, prefetch=0, demo_prompts=False)
    db = ctx.db()
    add_ready_items(db, ANNOTATORS * SUBMISSIONS + ANNOTATORS)  # each annotator ends holding one more
    users = make_annotators(db, ANNOTATORS)
    port = free_port()
    launch(demo, auth, "127.0.0.1", port, block=False, ctx=ctx)
    yield f"http://127.0.0.1:{port}/", ctx, users
    shutdown(ctx, demo)


def test_twenty_annotators_store_exactly_one_thousand_judgements(load_app):
    url, ctx, users = load_app
    report = drive_annotators(url, users, SUBMISSIONS)
    assert report.errors == [], report.errors
    assert len(report.acknowledged) == len(set(report.acknowledged)) == ANNOTATORS * SUBMISSIONS

    db = ctx.db()
    rows = db.execute("SELECT id, item_id, user_id, idempotency_key FROM judgements").fetchall()
    assert {r[0] for r in rows} == set(report.acknowledged)  # each acknowledged one stored, nothing else
    assert len({r[1] for r in rows}) == len(rows)  # no item judged twice (overlap 1)
    assert len({r[3] for r in rows if r[3]}) == len(rows)  # every submission carried its own key
    per_user = db.execute("SELECT user_id, count(*) FROM judgements GROUP BY user_id").fetchall()
    assert sorted(n for _, n in per_user) == [SUBMISSIONS] * ANNOTATORS
    # No lost pairs: "A is better" gives each judgement exactly one pair, chosen = the answer shown as A.
    assert store.count_rows(db, "pairs") == len(rows)
    assert db.execute("SELECT count(*) FROM judgements j WHERE (SELECT count(*) FROM pairs p"
                      " WHERE p.judgement_id = j.id AND p.chosen_candidate_id = json_extract(j.shown_order, '$[0]')"
                      ") != 1").fetchone()[0] == 0
    assert store.count_items(db, "complete") == len(rows)
    assert check_db(db) == []
    print(f"\n{len(rows)} judgements in {report.seconds:.1f} s ({report.throughput:.1f}/s)")
