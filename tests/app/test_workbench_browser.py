"""The annotate page's flow in a real headless Chromium: refusals shown beside the controls with
the page still usable, rankings by keyboard item after item, and a dry queue that refills the
page by itself."""

import json
import time

import pytest

from annotations import store
from tests.app.conftest import ANNOTATORS, answer_text, start_app, wait_until
from tests.conftest import browser_login

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def ranking_app(tmp_path_factory, tiny_model_dir):
    app = start_app(tmp_path_factory.mktemp("workbench-home"), tiny_model_dir, mode="ranking", k=3, prompts=7)
    yield app
    app.close()


def item_shown(page) -> int | None:
    """The id of the item on the page once its answers are there, else None."""
    header = page.inner_text("#annotate-header").replace("*", "")
    if not header.startswith("Item ") or not answer_text(page, "c"):
        return None
    return int(header.split("Item ")[1].split(" ")[0])


def next_shown(page, previous: int | None = None) -> int:
    """Wait for an item other than `previous` (the page brings it in by itself when it is ready)."""
    return wait_until(lambda: (item := item_shown(page)) and item != previous and item, timeout=90, interval=0.2,
                      message="the next item on the page")

def save_setting(app, browser, setting: str, choice: str):
    """As the admin: pick `choice` in the settings field `setting`, save, and wait for "Saved."; the page."""
    from tests.app.conftest import ADMIN

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    browser_login(page, app.url, *ADMIN)
    page.get_by_role("tab", name="Admin").click()
    page.locator(f"#{setting}").get_by_text(choice).click()
    page.locator("#save-settings").click()
    wait_until(lambda: "Saved." in page.inner_text("#settings-status"), timeout=30, message="saved")
    return page



def test_an_unreadable_ranking_is_refused_beside_the_controls_and_the_page_stays_usable(ranking_app, browser):
    page = browser.new_page()
    browser_login(page, ranking_app.url, *ANNOTATORS[1])
    item = next_shown(page)
    answer_a = answer_text(page, "a")

    page.keyboard.press("r")
    page.keyboard.type("A > B")  # C is missing
    page.keyboard.press("Enter")
    message = page.locator("#annotate-message")
    message.wait_for(state="visible", timeout=20_000)
    assert "C" in message.inner_text()
    # nothing else changed: the same item, its answers, no "Error" badge covering the fields
    assert item_shown(page) == item and answer_text(page, "a") == answer_a
    assert page.locator("#answer-a .error, #prompt .error, #annotate-header .error").count() == 0

    started = time.monotonic()
    page.locator("#skip").click(timeout=3_000)  # clickable at once: no overlay swallows it
    assert time.monotonic() - started < 3
    wait_until(lambda: "Skipped" in page.inner_text("#annotate-header"), timeout=30, message="the skip")
    assert not page.locator("#annotate-message").is_visible()  # the next action clears the message
    page.close()
    db = ranking_app.db()
    user = store.get_user(db, ANNOTATORS[1][0])
    assert db.execute("SELECT count(*) FROM judgements WHERE user_id = ?", [user["id"]]).fetchone()[0] == 0
    assert db.execute("SELECT item_id FROM skips WHERE user_id = ?", [user["id"]]).fetchall() == [(item,)]


def test_five_rankings_in_a_row_by_keyboard_alone(ranking_app, browser):
    db = ranking_app.db()
    user = store.get_user(db, ANNOTATORS[0][0])
    page = browser.new_page()
    browser_login(page, ranking_app.url, *ANNOTATORS[0])
    seen = []
    for n in range(5):
        seen.append(next_shown(page, seen[-1] if seen else None))
        page.keyboard.press("r")
        page.keyboard.type("B > A = C" if n % 2 else "C > B > A")
        page.keyboard.press("Enter")
        wait_until(lambda: db.execute("SELECT count(*) FROM judgements WHERE user_id = ?",
                                      [user["id"]]).fetchone()[0] == n + 1, timeout=30, message=f"judgement {n + 1}")
        assert not page.locator("#annotate-message").is_visible(), page.inner_text("#annotate-message")
    page.close()

    rows = db.execute("SELECT item_id, ranking, shown_order FROM judgements WHERE user_id = ? ORDER BY id",
                      [user["id"]]).fetchall()
    assert [r[0] for r in rows] == seen
    for n, (_, ranking, shown_order) in enumerate(rows):
        a, b, c = json.loads(shown_order)
        assert json.loads(ranking) == ([[b], [a, c]] if n % 2 else [[c], [b], [a]])


def test_a_dry_queue_disables_the_actions_and_the_next_item_arrives_by_itself(tmp_path, tiny_model_dir, browser):
    app = start_app(tmp_path, tiny_model_dir, mode="pairwise", k=2, prompts=2)
    try:
        page = browser.new_page()
        browser_login(page, app.url, *ANNOTATORS[0])
        judged = []
        for _ in range(2):  # the two queued items, then the queue is dry
            judged.append(next_shown_pairwise(page, judged[-1] if judged else None))
            page.keyboard.press("1")
        wait_until(lambda: "No item is waiting" in page.inner_text("#annotate-header"), timeout=30,
                   message="the empty state")
        for button in ("#choose-a", "#choose-b", "#choose-tie", "#choose-both-bad", "#skip", "#flag"):
            assert page.locator(button).is_disabled(), button
        page.keyboard.press("1")  # a key on a disabled action does nothing, and says nothing
        assert not page.locator("#annotate-message").is_visible()

        db = app.db()
        store.queue_items(db, [store.add_prompt(db, "A question that arrives later")[0]], mode="pairwise", k=2)
        app.ctx.wake_prefetcher()
        third = next_shown_pairwise(page, judged[-1])  # nobody pressed anything
        assert page.locator("#choose-a").is_enabled()
        page.keyboard.press("2")
        wait_until(lambda: "Saved judgement" in page.inner_text("#annotate-header"), timeout=30,
                   message="the second judgement")
        page.close()
        user = store.get_user(db, ANNOTATORS[0][0])
        assert [r[0] for r in db.execute("SELECT item_id FROM judgements WHERE user_id = ? ORDER BY id",
                                         [user["id"]])] == [*judged, third]
    finally:
        app.close()


def next_shown_pairwise(page, previous: int | None = None) -> int:
    def shown():
        header = page.inner_text("#annotate-header").replace("*", "")
        if not header.startswith("Item ") or not answer_text(page, "b"):
            return None
        item = int(header.split("Item ")[1].split(" ")[0])
        return item if item != previous else None
    return wait_until(shown, timeout=90, interval=0.2, message="an item on the page")


def test_the_arena_explains_itself_on_a_fresh_install_and_locks_its_votes_after_one(tmp_path, tiny_model_dir,
                                                                                    browser):
    from annotations import model_versions
    from tests.app.test_hot_swap import save_tiny_adapter

    app = start_app(tmp_path, tiny_model_dir, prompts=2)
    try:
        page = browser.new_page()
        browser_login(page, app.url, *ANNOTATORS[0])
        page.wait_for_function("(document.querySelector('#who') || {innerText: ''}).innerText.includes('Logged in')",
                               timeout=30_000)
        page.get_by_role("tab", name="Arena").click()
        notice = page.locator("#arena-notice")
        notice.wait_for(state="visible", timeout=30_000)
        assert "opens when a training round registers a second" in notice.inner_text()
        assert page.locator("#arena-battle").is_disabled()

        path = save_tiny_adapter(tiny_model_dir, tmp_path / "versions" / "v1")
        model_versions.register_version(app.db(), "v1", "policy", "base", "dpo", None, str(path), {})
        page.get_by_role("tab", name="Chat").click()
        page.get_by_role("tab", name="Arena").click()  # shown again: a second version is there now
        wait_until(lambda: page.locator("#arena-battle").is_enabled(), timeout=30, message="the battle button")
        assert not notice.is_visible()
        votes = [page.locator(f"#arena-vote-{w}") for w in ("a", "b", "tie", "both_bad")]
        assert all(v.is_disabled() for v in votes)  # nothing to vote on yet

        page.locator("#arena-prompt textarea").fill("Say something kind.")
        page.locator("#arena-battle").click()
        wait_until(lambda: all(v.is_enabled() for v in votes), timeout=90, message="the answers to vote on")
        assert page.locator("#arena-a textarea").input_value() and page.locator("#arena-b textarea").input_value()
        votes[0].click()
        wait_until(lambda: "A was" in page.inner_text("#arena-reveal"), timeout=30, message="the reveal")
        reveal = page.inner_text("#arena-reveal")
        assert {"base", "v1"} <= set(reveal.replace("*", "").replace(".", " ").replace(",", " ").split())
        assert all(v.is_disabled() for v in votes)  # one vote per battle
        page.close()
        assert app.db().execute("SELECT count(*) FROM arena_battles WHERE winner IS NOT NULL").fetchone()[0] == 1
    finally:
        app.close()


def test_promote_picks_a_version_from_a_list_and_asks_before_it_acts(tmp_path, tiny_model_dir, browser):
    from annotations import model_versions
    from tests.app.conftest import ADMIN

    app = start_app(tmp_path, tiny_model_dir, prompts=2)
    try:
        db = app.db()
        model_versions.register_version(db, "v1", "policy", "base", "dpo", None, str(tmp_path / "nowhere"), {})
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        browser_login(page, app.url, *ADMIN)
        page.wait_for_function("(document.querySelector('#who') || {innerText: ''}).innerText.includes('Logged in')",
                               timeout=30_000)
        page.get_by_role("tab", name="Admin").click()
        page.get_by_role("tab", name="Versions").click()
        page.locator("#version-promote").click()  # nothing picked: said beside the buttons
        message = page.locator("#version-message")
        message.wait_for(state="visible", timeout=20_000)
        assert "pick a version" in message.inner_text()

        page.locator("#version-name input").click()
        page.get_by_role("option", name="v1").click()
        page.locator("#version-promote").click()
        question = page.locator("#version-confirm-text")
        question.wait_for(state="visible", timeout=20_000)
        assert "Make v1 the live policy version? base retires." in question.inner_text()
        page.locator("#version-confirm-no").click()  # cancelled: nothing changes
        wait_until(lambda: not question.is_visible(), timeout=20, message="the question dismissed")
        assert model_versions.get_live_version(db)["version"] == "base"

        page.locator("#version-promote").click()
        question.wait_for(state="visible", timeout=20_000)
        page.locator("#version-confirm-yes").click()
        wait_until(lambda: "v1 is live" in page.inner_text("#version-status"), timeout=30, message="the promotion")
        assert model_versions.get_live_version(db)["version"] == "v1"
        assert not page.locator("#version-message").is_visible()
        page.close()
    finally:
        app.close()


def test_a_long_prompt_opens_at_its_start_and_answers_are_rendered_cards_two_to_a_row(tmp_path, tiny_model_dir, browser):
    from annotations import open_db

    db = open_db(tmp_path / "rankloop.db")
    long_prompt = "The beginning of a long prompt. " + "More context follows here. " * 560  # 15,000+ characters
    (item,) = store.queue_items(db, [store.add_prompt(db, long_prompt)[0]], mode="ranking", k=4)
    markdown = ("**Steps**\n\n- one\n- two\n\n```\nprint('hi')\n```\n\n![a remote image](http://example.com/x.png) "
                "[a link](http://example.com)")
    long_answer = "\n\n".join(f"Paragraph {p} of a long answer. " + "It goes on. " * 20 for p in range(8))
    store.add_candidates(db, item, [{"text": markdown if n == 0 else long_answer if n == 3 else
                                     f"Answer {n}\n" + "line\n" * (5 + 10 * n),
                                     "policy_version": "base"} for n in range(4)])
    db.close()
    app = start_app(tmp_path, tiny_model_dir, mode="ranking", k=4, prompts=1)
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        browser_login(page, app.url, *ANNOTATORS[0])
        wait_until(lambda: f"Item {item} " in page.inner_text("#annotate-header").replace("*", ""), timeout=60,
                   message="the long item (the oldest)")
        scrolled = page.evaluate("""() => Math.max(...Array.from(document.querySelectorAll('#prompt *'))
                                        .filter(e => e.scrollHeight > e.clientHeight + 5).map(e => e.scrollTop), 0)""")
        assert scrolled == 0
        assert "The beginning of a long prompt" in page.inner_text("#prompt")
        boxes = {x: page.locator(f"#answer-{x}").bounding_box() for x in "abcd"}
        assert boxes["a"]["y"] == boxes["b"]["y"] and boxes["c"]["y"] == boxes["d"]["y"] > boxes["a"]["y"]
        assert boxes["a"]["height"] == boxes["b"]["height"]  # cards of a row are equally tall
        assert boxes["a"]["width"] > 440
        # markdown renders (emphasis, a list, a code block); images and links stay text: nothing is fetched
        cards = page.locator("#answers .rankloop-answer")
        assert cards.locator("strong").count() == 1 and cards.locator("li").count() == 2
        assert cards.locator("pre code").inner_text().strip() == "print('hi')"
        assert cards.locator("img, a").count() == 0
        assert "![a remote image](http://example.com/x.png)" in page.inner_text("#answers")
        # a long answer shows its start; the rest opens in place, nothing cut
        more = page.locator("#answers details.rankloop-more")
        assert more.count() == 1 and "Paragraph 0 of a long answer" in page.inner_text("#answers")
        assert not page.get_by_text("Paragraph 7 of a long answer").is_visible()
        more.locator("summary").click()
        assert page.get_by_text("Paragraph 7 of a long answer").is_visible()
        page.close()
    finally:
        app.close()


def test_the_round_form_refuses_a_bad_value_beside_the_form_and_queues_nothing(running_app, browser):
    from tests.app.conftest import ADMIN

    page = browser.new_page(viewport={"width": 1280, "height": 800})
    browser_login(page, running_app.url, *ADMIN)
    page.wait_for_function("(document.querySelector('#who') || {innerText: ''}).innerText.includes('Logged in')",
                           timeout=30_000)
    page.get_by_role("tab", name="Admin").click()
    page.get_by_role("tab", name="Training").click()
    # the typed form: a value that cannot work is refused under its own field, and nothing is queued
    page.locator("#round-field-eval_pairs input").wait_for(state="attached", timeout=30_000)
    page.get_by_text("Round settings (data, parent").click()
    page.locator("#round-field-eval_pairs input").fill("-5")
    page.locator("#round-field-eval_pairs input").press("Tab")
    page.locator("#round-field-beta input").fill("0.2")
    page.locator("#round-field-beta input").press("Tab")
    page.locator("#round-start").click()
    beside = page.locator("#round-field-eval_pairs-message")
    beside.wait_for(state="visible", timeout=20_000)
    assert "eval_pairs must be 0 or more, got -5" in beside.inner_text()
    assert not page.locator("#round-field-beta-message").is_visible()  # a good value says nothing
    assert "1 setting(s) cannot work (eval_pairs)" in page.inner_text("#round-start-message")
    assert running_app.db().execute("SELECT count(*) FROM rounds").fetchone()[0] == 0
    page.locator("#round-field-eval_pairs input").fill("200")
    page.locator("#round-field-eval_pairs input").press("Tab")  # committed to the form before the next click
    # the YAML box is kept for power users, as "advanced"
    page.locator("#round-advanced").get_by_text("Advanced: settings as YAML").click()
    page.locator("#round-overrides .cm-content").click()
    page.keyboard.type("beta: lots\nlearning_rat: 0.1")
    page.locator("#round-start").click()
    message = page.locator("#round-start-message")
    # the earlier refusal stays on screen until this answer replaces it: wait for the answer itself
    wait_until(lambda: "learning_rat" in message.inner_text(), timeout=20, message="the unknown key named")
    assert "valid keys" in message.inner_text()  # with the valid ones
    assert page.locator("#round-start-status .error, #rounds-table .error").count() == 0
    page.locator("#round-overrides .cm-content").click()
    page.keyboard.press("Control+a")
    page.keyboard.type("beta: lots")
    page.locator("#round-start").click()
    wait_until(lambda: "beta" in message.inner_text() and "learning_rat" not in message.inner_text(), timeout=20,
               message="the bad value named")
    assert not page.locator("#round-field-eval_pairs-message").is_visible()
    assert running_app.db().execute("SELECT count(*) FROM rounds").fetchone()[0] == 0
    page.locator("#round-overrides .cm-content").click()
    page.keyboard.press("Control+a")
    page.keyboard.press("Delete")
    page.locator("#round-field-max_steps input").fill("3")
    page.locator("#round-field-max_steps input").press("Tab")
    page.locator("#round-start").click()  # the form's changed values are what the round records
    wait_until(lambda: "Queued round" in page.inner_text("#round-start-status"), timeout=20, message="queued")
    assert "max_steps = 3, beta = 0.2)" in page.inner_text("#round-start-status")  # only what was changed
    page.close()
    config = running_app.db().execute("SELECT config FROM rounds").fetchone()[0]
    assert json.loads(config) == {"beta": 0.2, "max_steps": 3, "data": "all"}
    from annotations.round_records import cancel_round

    cancel_round(running_app.db(), 1)  # no worker here; leave nothing queued for other tests


def test_an_admin_makes_an_api_key_sees_it_once_and_revokes_it(running_app, browser):
    from annotations import api_keys
    from tests.app.conftest import ADMIN

    page = browser.new_page(viewport={"width": 1280, "height": 800})
    browser_login(page, running_app.url, *ADMIN)
    page.wait_for_function("(document.querySelector('#who') || {innerText: ''}).innerText.includes('Logged in')",
                           timeout=30_000)
    page.get_by_role("tab", name="Admin").click()
    page.locator("#api-key-owner textarea, #api-key-owner input").first.fill("nobody-here")
    page.locator("#api-key-create").click()
    message = page.locator("#api-keys-message")
    message.wait_for(state="visible", timeout=20_000)
    assert "nobody-here" in message.inner_text()  # no such account: said beside the form

    page.locator("#api-key-owner textarea, #api-key-owner input").first.fill(ANNOTATORS[0][0])
    page.locator("#api-key-label textarea, #api-key-label input").first.fill("notebook")
    page.locator("#api-key-create").click()
    shown = page.locator("#api-key-new textarea, #api-key-new input").first
    key = wait_until(lambda: shown.is_visible() and shown.input_value(), timeout=20, message="the new key")
    db = running_app.db()
    assert api_keys.user_for_key(db, key)["name"] == ANNOTATORS[0][0]
    assert not message.is_visible()
    (key_id,) = db.execute("SELECT id FROM api_keys WHERE label = 'notebook'").fetchone()
    assert key not in page.inner_text("#api-keys")  # the table shows only its first characters

    page.locator("#api-key-revoke-id input").fill(str(key_id))
    page.locator("#api-key-revoke").click()
    wait_until(lambda: not shown.is_visible(), timeout=20, message="the key hidden once revoked")
    assert api_keys.user_for_key(db, key) is None
    page.close()


def test_the_annotate_page_works_in_a_narrow_window_and_shows_where_the_keyboard_is(tmp_path, tiny_model_dir,
                                                                                      browser):
    ranking_app = start_app(tmp_path, tiny_model_dir, mode="ranking", k=3, prompts=2)  # its own items
    page = browser.new_page(viewport={"width": 400, "height": 800})
    browser_login(page, ranking_app.url, *ANNOTATORS[0])
    item = next_shown(page)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 400  # nothing wider than the window: no sideways scrolling
    boxes = [page.locator(f"#answer-{x}").bounding_box() for x in "abc"]
    assert all(b["width"] <= 400 for b in boxes) and boxes[0]["y"] < boxes[1]["y"] < boxes[2]["y"]  # stacked

    page.keyboard.press("Tab")
    for _ in range(40):  # tab to the Skip button; where the focus is must be visible
        if page.evaluate("document.activeElement && document.activeElement.id") == "skip":
            break
        page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "skip"
    style = page.evaluate("""() => { const s = getComputedStyle(document.activeElement);
                                     return [s.outlineStyle, s.outlineWidth, s.boxShadow]; }""")
    assert (style[0] != "none" and style[1] != "0px") or style[2] != "none", style
    page.keyboard.press("Enter")  # skip by keyboard, in the narrow window
    wait_until(lambda: "Skipped" in page.inner_text("#annotate-header"), timeout=30, message="the skip")
    page.close()
    db = ranking_app.db()
    user = store.get_user(db, ANNOTATORS[0][0])
    assert db.execute("SELECT item_id FROM skips WHERE user_id = ?", [user["id"]]).fetchall() == [(item,)]
    ranking_app.close()


def test_changing_k_says_which_queued_items_keep_the_old_one_and_requeues_them_on_request(tmp_path, tiny_model_dir,
                                                                                         browser):
    app = start_app(tmp_path, tiny_model_dir, mode="pairwise", k=2, prompts=2)
    try:
        db = app.db()
        page = save_setting(app, browser, "setting-mode", "ranking")
        status = page.inner_text("#settings-status")
        assert "2 unjudged item(s) already queued keep their earlier mode, K or overlap" in status
        page.locator("#requeue-items").click()
        wait_until(lambda: "Requeued" in page.inner_text("#settings-status"), timeout=30, message="requeued")
        held = db.execute("SELECT count(DISTINCT item_id) FROM leases").fetchone()[0]  # the admin's own open item
        assert f"Requeued {2 - held} unjudged item(s)" in page.inner_text("#settings-status")
        page.close()
        modes = db.execute("SELECT mode, k, count(*) FROM items WHERE status != 'retired' GROUP BY mode, k").fetchall()
        assert dict(((m, k), n) for m, k, n in modes) == {("ranking", 4): 2 - held, **({("pairwise", 2): held}
                                                                                       if held else {})}
    finally:
        app.close()


def test_an_admin_chooses_model_disagreement_and_the_queue_follows_it(tmp_path, tiny_model_dir, browser):
    from annotations.selection import selection_policy

    app = start_app(tmp_path, tiny_model_dir, mode="pairwise", k=2, prompts=2)
    try:
        page = save_setting(app, browser, "setting-selection", "model_disagreement:")
        assert "implicit reward order the answers differently first" in page.inner_text("#settings-status")
        page.close()
        assert selection_policy(app.db()) == "model_disagreement"
    finally:
        app.close()
