"""The annotate page in a real headless Chromium, driven only by the keyboard."""

import json

import pytest

from annotations import store
from tests.app.conftest import ANNOTATORS, answer_text, start_app, wait_until
from tests.conftest import browser_login

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def ranking_app(tmp_path_factory, tiny_model_dir):
    app = start_app(tmp_path_factory.mktemp("ranking-home"), tiny_model_dir, mode="ranking", k=4, prompts=4)
    yield app
    app.close()


def wait_for_answers(page):
    page.wait_for_selector("#answer-d", timeout=60_000)
    wait_until(lambda: answer_text(page, "a") or page.keyboard.press("n"),
               timeout=60, interval=1, message="an item with answers")


def test_annotator_ranks_four_answers_and_rewrites_one_by_keyboard(ranking_app, browser):
    page = browser.new_page()
    browser_login(page, ranking_app.url, *ANNOTATORS[0])
    wait_for_answers(page)
    header = page.inner_text("#annotate-header")
    item_id = int(header.split("Item ")[1].split(" ")[0].strip("*"))
    assert answer_text(page, "c")

    page.keyboard.press("r")
    page.keyboard.type("C > A = B > D")
    page.keyboard.press("Escape")
    page.keyboard.press("c")  # copy the best-ranked answer (C) into the editor
    copied = wait_until(lambda: page.locator("#edited textarea").input_value(), timeout=20,
                        message="the best answer copied into the editor")
    page.keyboard.press("e")
    page.keyboard.press("End")
    page.keyboard.type(" Rewritten by a human.")
    page.keyboard.press("Control+Enter")
    page.wait_for_function("document.querySelector('#annotate-header').innerText.includes('Saved judgement')",
                           timeout=30_000)
    page.close()

    db = ranking_app.db()
    judgement_id, ranking, shown_order, decision_ms = db.execute(
        "SELECT id, ranking, shown_order, decision_ms FROM judgements WHERE item_id = ?", [item_id]).fetchone()
    a, b, c, d = json.loads(shown_order)
    human = db.execute("SELECT id, text FROM candidates WHERE item_id = ? AND policy_version IS NULL",
                       [item_id]).fetchone()
    (stored_c,) = db.execute("SELECT text FROM candidates WHERE id = ?", [c]).fetchone()
    assert copied == stored_c  # the answer as stored, not as rendered
    assert human[1] == stored_c.strip() + " Rewritten by a human."
    assert json.loads(ranking) == [[human[0]], [c], [a, b], [d]]
    assert decision_ms > 0
    pairs = {tuple(r) for r in db.execute(
        "SELECT chosen_candidate_id, rejected_candidate_id FROM pairs WHERE judgement_id = ?", [judgement_id])}
    # policy "all": the human answer beats all four, C beats A, B, D; A and B (tied) beat D.
    assert pairs == {(human[0], x) for x in (a, b, c, d)} | {(c, a), (c, b), (c, d), (a, d), (b, d)}


def test_second_annotator_is_given_a_different_item(ranking_app, browser):
    first = store.next_item(ranking_app.db(), store.get_user(ranking_app.db(), ANNOTATORS[0][0])["id"])
    page = browser.new_page()
    browser_login(page, ranking_app.url, *ANNOTATORS[1])
    wait_for_answers(page)
    header = page.inner_text("#annotate-header")
    page.close()
    assert first is not None
    assert f"Item {first['id']} " not in header.replace("*", "")
