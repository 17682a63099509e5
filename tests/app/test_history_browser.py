"""Reopening and changing a past judgement on the annotate page, in a real headless Chromium:
the list of recent judgements, the item shown again in the letters judged, a new ranking
typed and saved, its pairs derived again in the store; and a refusal shown beside the list."""

import json

import pytest

from annotations import store
from tests.app.conftest import ANNOTATORS, start_app, wait_until
from tests.app.test_workbench_browser import next_shown
from tests.conftest import browser_login

pytestmark = pytest.mark.browser


def test_a_past_judgement_is_reopened_changed_and_its_pairs_derived_again(tmp_path, tiny_model_dir, browser):
    app = start_app(tmp_path, tiny_model_dir, mode="ranking", k=3, prompts=2)
    try:
        db = app.db()
        user = store.get_user(db, ANNOTATORS[0][0])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        browser_login(page, app.url, *ANNOTATORS[0])
        item = next_shown(page)
        page.keyboard.press("r")
        page.keyboard.type("C > B > A")
        page.keyboard.press("Enter")
        first = wait_until(lambda: db.execute("SELECT id, shown_order FROM judgements WHERE user_id = ?",
                                              [user["id"]]).fetchone(), timeout=30, message="the judgement")
        old_id, shown = first[0], json.loads(first[1])
        a, b, c = shown

        page.locator("#history-panel").get_by_text("Your recent judgements").click()
        # the list's own row, not a digit of the "0.1s" timer Gradio shows while the list is loading
        wait_until(lambda: "C > B > A" in page.inner_text("#history"), timeout=30, message="the list")
        assert str(old_id) in page.inner_text("#history")

        page.locator("#reopen-id input").fill("999999")  # not one of theirs: said beside the list
        page.locator("#reopen").click()
        wait_until(lambda: page.locator("#history-message").is_visible(), timeout=30, message="the refusal")
        assert "no judgement 999999" in page.inner_text("#history-message")

        page.locator("#reopen-id input").fill(str(old_id))
        page.locator("#reopen").click()
        page.wait_for_selector("#reopen-panel", state="visible", timeout=30_000)
        assert not page.locator("#history-message").is_visible()
        view = page.inner_text("#reopen-view")
        assert f"Judgement {old_id}" in view and "Answer A" in view and "Answer C" in view
        assert page.input_value("#reopen-ranking textarea, #reopen-ranking input") == "C > B > A"
        box = page.locator("#reopen-ranking textarea, #reopen-ranking input").first
        box.fill("A = B > C")
        box.press("Enter")
        wait_until(lambda: "Changed judgement" in page.inner_text("#history-note"), timeout=30, message="saved")

        new_id, ranking = db.execute("SELECT id, ranking FROM judgements WHERE user_id = ?", [user["id"]]).fetchone()
        assert new_id > old_id and json.loads(ranking) == [[a, b], [c]]
        pairs = sorted(db.execute("SELECT chosen_candidate_id, rejected_candidate_id FROM pairs WHERE judgement_id"
                                  " = ?", [new_id]).fetchall())
        assert pairs == sorted([(a, c), (b, c)])
        assert db.execute("SELECT count(*) FROM pairs WHERE judgement_id = ?", [old_id]).fetchone()[0] == 0
        assert db.execute("SELECT judgement_id FROM judgement_revisions").fetchall() == [(old_id,)]
        assert f"now judgement {new_id}" in page.inner_text("#history-note")
        assert "A = B > C" in page.inner_text("#history") and not page.locator("#reopen-panel").is_visible()
        assert db.execute("SELECT item_id FROM judgements WHERE id = ?", [new_id]).fetchone()[0] == item
        page.close()
    finally:
        app.close()
