"""Failures in plain sight (app/health.py): errors counted once, a failing item parked while the
queue moves on, a live version that cannot load reported while the previous one serves, and
the report over HTTP, from the command line and on the admin's Health tab."""

import subprocess
import sys

import httpx
import pytest

from annotations import model_versions, store
from app import prefetch
from app.health import ErrorLog, format_report, health_report
from app.prefetch import MAX_ITEM_TRIES, Prefetcher
from app.serving import SamplingParams
from tests.app.conftest import ADMIN, ANNOTATORS, wait_until
from tests.conftest import REPO, browser_login


def test_an_error_is_counted_not_repeated():
    errors = ErrorLog(limit=3)
    assert errors.record("prefetch", "boom", now=1.0)
    assert not errors.record("prefetch", "boom", now=2.0)
    (entry,) = errors.entries()
    assert (entry["count"], entry["first"], entry["last"]) == (2, 1.0, 2.0)
    for i in range(5):
        errors.record("live", f"error {i}")
    assert len(errors.entries()) == 3  # bounded: the oldest go
    errors.clear("live")
    assert errors.entries() == []


def test_an_item_whose_adapter_cannot_load_is_parked_and_never_blocks_the_queue(empty_ctx, monkeypatch):
    monkeypatch.setattr(prefetch, "RETRY_SECONDS", 0.0)
    db = empty_ctx.db()
    model_versions.register_version(db, "broken", "policy", "base", "dpo", None, "/nowhere/broken", {})
    (stuck,) = store.queue_items(db, [store.add_prompt(db, "Contrast me")[0]], versions=["broken"])
    plain = store.queue_items(db, [store.add_prompt(db, f"Plain {i}?")[0] for i in range(2)])
    errors = ErrorLog()
    filler = Prefetcher(empty_ctx.db, empty_ctx.server, target_ready=10, sampling=SamplingParams(max_new_tokens=2),
                        errors=errors)
    while filler.fill_once(db):
        pass
    assert [store.count_items(db, s) for s in ("pending", "ready")] == [0, 2]
    assert all(db.execute("SELECT status FROM items WHERE id = ?", [i]).fetchone()[0] == "ready" for i in plain)
    (parked,) = store.parked_items(db)
    assert parked["id"] == stuck and f"{MAX_ITEM_TRIES} times" in parked["reason"] and "broken" in parked["reason"]
    (error,) = errors.entries()
    assert error["where"] == "prefetch" and error["count"] == MAX_ITEM_TRIES


def test_a_live_version_that_cannot_load_is_reported_and_the_previous_one_keeps_serving(empty_ctx):
    from app.live import LiveWatcher

    empty_ctx.errors = ErrorLog()
    db = empty_ctx.db()
    model_versions.register_version(db, "v1", "policy", "base", "dpo", None, "/nowhere/v1", {})
    model_versions.promote(db, "v1")
    watcher = LiveWatcher(empty_ctx)
    for _ in range(3):
        watcher.check()  # retried at most every LIVE_RETRY_S: one error, counted once
    assert empty_ctx.server.live_version == "base"
    (error,) = empty_ctx.errors.entries()
    assert "live version v1 cannot be loaded" in error["message"] and "base keeps serving" in error["message"]
    assert error["count"] == 1
    report = health_report(empty_ctx)
    assert report["status"] == "degraded"
    assert "the store's live version is v1 but base is serving" in report["problems"]
    assert "**base** (the store says v1)" in format_report(report)
    assert empty_ctx.server.generate([{"role": "user", "content": "still there?"}],
                                     sampling=SamplingParams(max_new_tokens=2))[0].version == "base"


def test_health_over_http_is_for_admins(running_app):
    with httpx.Client(base_url=running_app.url, timeout=30) as client:
        assert client.get("health").status_code == 403  # nobody logged in
        client.post("login", data={"username": ANNOTATORS[0][0], "password": ANNOTATORS[0][1]})
        assert client.get("health").status_code == 403
    with httpx.Client(base_url=running_app.url, timeout=30) as client:
        client.post("login", data={"username": ADMIN[0], "password": ADMIN[1]})
        response = client.get("health")
    assert response.status_code in (200, 503)
    report = response.json()
    assert report["serving"]["live_served"] == "base" and report["prefetch"]["running"]


def test_health_from_the_command_line(running_app):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "app", "health", "--url", running_app.url, *args],
                              cwd=REPO, capture_output=True, text=True, timeout=120)

    result = run("--user", ADMIN[0], "--password", ADMIN[1])
    assert result.returncode in (0, 1), result.stderr
    assert "live version served" in result.stdout and "prefetcher" in result.stdout
    refused = run("--user", ADMIN[0], "--password", "wrong-password")
    assert refused.returncode == 2 and "cannot log in" in refused.stderr


@pytest.mark.browser
def test_a_broken_adapter_shows_on_the_health_tab_and_the_queue_keeps_moving(running_app, browser, monkeypatch):
    monkeypatch.setattr(prefetch, "RETRY_SECONDS", 0.0)
    db = running_app.db()
    model_versions.register_version(db, "v-broken", "policy", "base", "dpo", None, "/nowhere/v-broken", {})
    (stuck,) = store.queue_items(db, [store.add_prompt(db, "Answer me with the broken version")[0]],
                                 versions=["v-broken"])
    fresh = store.queue_items(db, [store.add_prompt(db, "A plain question after the broken one")[0]])
    monkeypatch.setattr(running_app.ctx.prefetcher, "target_ready", 1000)  # generate every pending item now
    running_app.ctx.wake_prefetcher()
    wait_until(lambda: store.parked_items(db) and store.parked_items(db)[0]["id"] == stuck, timeout=120,
               message="the broken item parked")
    wait_until(lambda: db.execute("SELECT status FROM items WHERE id = ?", fresh).fetchone()[0] == "ready",
               timeout=120, message="the item queued after it answered")
    page = browser.new_page()
    browser_login(page, running_app.url, *ADMIN)
    page.get_by_role("tab", name="Admin").click()
    page.get_by_role("tab", name="Health").click()
    page.locator("#health-refresh").click()
    page.wait_for_function("(document.querySelector('#health-report')?.innerText || '').includes('Parked items')",
                           timeout=30_000)
    text = page.inner_text("#health-report")
    page.close()
    assert f"{stuck}" in text and "v-broken" in text and "degraded" in text
