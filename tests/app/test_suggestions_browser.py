"""The reward model's suggestion on the annotate page, in a real headless Chromium: shown marked
as a suggestion with its scores, already in the ranking box; accepted with `r` then Enter,
overridden by typing; the judgement records what was suggested either way."""

import json

import pytest

from annotations import model_versions, store
from app.handlers import suggestion_in_letters
from tests.app.conftest import ANNOTATORS, start_app, wait_until
from tests.app.test_reward_scores import save_tiny_reward_model
from tests.app.test_workbench_browser import next_shown
from tests.conftest import browser_login

pytestmark = pytest.mark.browser


def test_a_suggestion_is_accepted_with_enter_and_overridden_by_typing(tmp_path, tiny_model_dir, browser):
    app = start_app(tmp_path, tiny_model_dir, mode="ranking", k=3, prompts=2)  # served before any reward model
    try:
        db = app.db()
        path = save_tiny_reward_model(tiny_model_dir, tmp_path / "versions" / "rm1")
        model_versions.register_version(db, "rm1", "reward", None, "rm", None, str(path), {})
        model_versions.promote(db, "rm1")
        store.queue_items(db, [store.add_prompt(db, f"Scored question {i}?")[0] for i in range(2)], mode="ranking",
                          k=3)
        app.ctx.wake_prefetcher()
        user = store.get_user(db, ANNOTATORS[0][0])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        browser_login(page, app.url, *ANNOTATORS[0])

        def judged():
            return db.execute("SELECT count(*) FROM judgements WHERE user_id = ?", [user["id"]]).fetchone()[0]

        item = None
        for n in range(2):  # answered before the reward model went live: no suggestion
            item = next_shown(page, item)
            assert not page.locator("#suggestion").is_visible()
            page.keyboard.press("r")
            page.keyboard.type("A > B > C")
            page.keyboard.press("Enter")
            wait_until(lambda: judged() == n + 1, timeout=30, message="a judgement")

        def suggested_letters(item_id):
            shown, suggestion = db.execute("SELECT shown_order, suggestion FROM item_views WHERE item_id = ? AND"
                                           " user_id = ?", [item_id, user["id"]]).fetchone()
            return suggestion_in_letters(json.loads(suggestion), json.loads(shown))["ranking"]

        item = next_shown(page, item)  # scored as it was prefetched
        note = page.inner_text("#suggestion")
        assert "Suggestion from reward model rm1" in note and "Scores: A " in note and "Judge for yourself" in note
        accepted = suggested_letters(item)
        assert page.input_value("#ranking textarea, #ranking input") == accepted and accepted in note
        page.keyboard.press("r")
        page.keyboard.press("Enter")  # accept it as it stands
        wait_until(lambda: judged() == 3, timeout=30, message="the accepted suggestion")

        item = next_shown(page, item)
        suggested = suggested_letters(item)
        typed = next(r for r in ("C > B > A", "B > C > A", "A = B > C") if r != suggested)
        page.keyboard.press("r")
        page.keyboard.type(typed)  # the selected suggestion is replaced, not appended to
        page.keyboard.press("Enter")
        wait_until(lambda: judged() == 4, timeout=30, message="the overriding judgement")
        assert not page.locator("#annotate-message").is_visible()
        page.close()

        rows = db.execute("SELECT ranking, shown_order, suggestion FROM judgements WHERE user_id = ? ORDER BY id",
                          [user["id"]]).fetchall()
        assert [r[2] is None for r in rows] == [True, True, False, False]
        accept_row, override_row = rows[2], rows[3]
        assert json.loads(accept_row[0]) == json.loads(accept_row[2])["ranking"]  # stored exactly as suggested
        letters = {cid: "ABC"[i] for i, cid in enumerate(json.loads(override_row[1]))}
        assert " > ".join(" = ".join(sorted(letters[c] for c in tier)) for tier in json.loads(override_row[0])) == typed
        from annotations.suggestions import suggestion_agreement

        [version] = suggestion_agreement(db)["by_version"]
        assert version["judgements"] == 2 and version["accepted_unchanged"] == 1
    finally:
        app.close()
