"""Ranking by drag and drop, with ties, in a real headless Chromium (app/pages/rank_board.py):
answers dragged with the mouse into rank slots, two in one slot a tie; then by keyboard alone,
a card focused and its rank typed. Each is stored as the right tiers and pairs."""

import json

import pytest

from annotations import store
from tests.app.conftest import ANNOTATORS, start_app, wait_until
from tests.app.test_workbench_browser import next_shown
from tests.conftest import browser_login

pytestmark = pytest.mark.browser

BOX = "#ranking textarea, #ranking input"


def card(letter):
    return f"#rank-board .rank-card[data-letter='{letter}']"


def slot(rank):
    return f"#rank-board .rank-slot[data-rank='{rank}']"


def stored(db, user_id):
    return db.execute("SELECT id, ranking, shown_order FROM judgements WHERE user_id = ? ORDER BY id",
                      [user_id]).fetchall()


def test_answers_dragged_into_ranks_with_a_tie_and_ranked_by_typing_on_cards(tmp_path, tiny_model_dir, browser):
    app = start_app(tmp_path, tiny_model_dir, mode="ranking", k=4, prompts=2)
    try:
        db = app.db()
        user = store.get_user(db, ANNOTATORS[0][0])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        browser_login(page, app.url, *ANNOTATORS[0])
        item = next_shown(page)
        wait_until(lambda: page.locator("#rank-board .rank-card").count() == 4, timeout=30, message="the board")
        assert page.locator(f"{slot(0)} .rank-card").count() == 4  # nothing ranked yet
        for letter, rank in (("A", 1), ("B", 1), ("C", 2), ("D", 3)):  # a real mouse drag each
            page.drag_and_drop(card(letter), slot(rank))
        assert page.input_value(BOX) == "A = B > C > D"  # the board writes the typed ranking
        assert page.locator(f"{slot(1)} .rank-card").count() == 2  # a tie: two in one rank
        page.locator("#submit-ranking").click()
        wait_until(lambda: len(stored(db, user["id"])) == 1, timeout=30, message="the dragged ranking")
        judgement_id, ranking, shown = stored(db, user["id"])[0]
        a, b, c, d = json.loads(shown)
        assert json.loads(ranking) == [[a, b], [c], [d]]
        pairs = sorted(db.execute("SELECT chosen_candidate_id, rejected_candidate_id FROM pairs WHERE judgement_id"
                                  " = ?", [judgement_id]).fetchall())
        assert pairs == sorted([(a, c), (a, d), (b, c), (b, d), (c, d)])

        next_shown(page, item)
        wait_until(lambda: page.locator(f"{slot(0)} .rank-card").count() == 4, timeout=30, message="a fresh board")
        for letter, rank in (("C", "1"), ("A", "2"), ("B", "2"), ("D", "3"), ("B", "0"), ("B", "4")):
            page.locator(card(letter)).focus()
            page.keyboard.press(rank)  # a digit on a card is its rank, not a page shortcut
        assert page.input_value(BOX) == "C > A > D > B"
        assert not page.locator("#annotate-message").is_visible()
        page.keyboard.press("r")  # to the ranking box, then Enter submits it
        page.keyboard.press("Enter")
        wait_until(lambda: len(stored(db, user["id"])) == 2, timeout=30, message="the typed-on-cards ranking")
        _, ranking, shown = stored(db, user["id"])[1]
        a, b, c, d = json.loads(shown)
        assert json.loads(ranking) == [[c], [a], [d], [b]]
        page.close()
    finally:
        app.close()
