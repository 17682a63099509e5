"""What people give the app reaches the store as given, tried in a real headless Chromium:
a thumb after clearing the chat lands on the reply on screen; an item someone has open stays
answerable through a promotion; an item is dealt only when the Annotate tab shows it."""

import json

import pytest

from annotations import model_versions, store
from tests.app.conftest import ANNOTATORS, answer_text, start_app, wait_until
from tests.app.test_hot_swap import save_tiny_adapter
from tests.conftest import browser_login

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    home = tmp_path_factory.mktemp("fidelity-home")
    running = start_app(home, tiny_model_dir, prompts=6)
    path = save_tiny_adapter(tiny_model_dir, home / "versions" / "v1")
    model_versions.register_version(running.ctx.db(), "v1", "policy", "base", "dpo", None, str(path), {})
    yield running
    running.close()


def open_tab(page, name):
    # after the page's own load, which opens the tab last used: a click before it would be undone
    page.wait_for_function("document.querySelector('#who')?.innerText.includes('Logged in')", timeout=30_000)
    page.get_by_role("tab", name=name).click()


def send_chat(page, text):
    """Send one message and wait for its reply to finish: the status of an earlier reply does not count."""
    shown = page.locator("#chatbot .message").count()
    page.locator("#chat-input textarea").fill(text)
    page.locator("#chat-send").click()
    wait_until(lambda: page.locator("#chatbot .message").count() >= shown + 2
               and "Answered by" in page.inner_text("#chat-status"), timeout=60, message="the reply finished")


def test_a_thumb_after_clearing_the_chat_is_stored_on_the_reply_shown(app, browser):
    page = browser.new_page()
    browser_login(page, app.url, *ANNOTATORS[1])
    open_tab(page, "Chat")
    send_chat(page, "first question, soon cleared")
    page.locator("#chatbot button[aria-label='Clear']").click()
    # the clear is done when the server has reset the conversation, not only when the messages are gone
    wait_until(lambda: page.locator("#chatbot .message").count() == 0
               and "Answered by" not in page.inner_text("#chat-status"), timeout=20, message="the chat cleared")
    send_chat(page, "second question")
    page.locator("#chatbot button[aria-label='Like']").last.click()
    try:
        wait_until(lambda: "Rated" in page.inner_text("#chat-status"), timeout=60, message="'Rated'")
    except AssertionError as e:  # say what the page showed instead
        raise AssertionError(f"{e}; the status reads {page.inner_text('#chat-status')!r}, the chat "
                             f"{page.inner_text('#chatbot')!r}") from None
    page.close()

    db = app.db()
    user = store.get_user(db, ANNOTATORS[1][0])["id"]
    rated = db.execute("SELECT messages, rating FROM chat_replies WHERE user_id = ? AND rating IS NOT NULL",
                       [user]).fetchall()
    assert len(rated) == 1
    messages, rating = rated[0]
    assert rating == 1
    assert [m["content"] for m in json.loads(messages)] == ["second question"]  # not the cleared reply
    kto = db.execute("SELECT value FROM ratings WHERE source = 'chat' AND user_id = ?", [user]).fetchall()
    assert kto == [(1,)]


def item_on_screen(page) -> int:
    """The id of the item the Annotate tab shows (waiting for one to be shown)."""
    import re

    page.wait_for_function("/Item \\d+/.test(document.querySelector('#annotate-header')?.innerText || '')",
                           timeout=60_000)
    return int(re.search(r"Item (\d+)", page.inner_text("#annotate-header")).group(1))


def test_an_item_open_through_a_promotion_is_still_stored_when_submitted(app, browser):
    db = app.db()
    page = browser.new_page()
    browser_login(page, app.url, *ANNOTATORS[0])
    page.wait_for_function("document.querySelector('#annotate-header')?.innerText.includes('Item')",
                           timeout=60_000)
    item_id = item_on_screen(page)
    wait_until(lambda: answer_text(page, "a") and answer_text(page, "b"), timeout=30, message="the answers shown")
    user_id = store.get_user(db, ANNOTATORS[0][0])["id"]
    (shown_before,) = db.execute("SELECT shown_order FROM item_views WHERE item_id = ? AND user_id = ?",
                                 [item_id, user_id]).fetchone()
    # the lease runs out while the page stays open (a long think), then a promotion retires old items
    with db.conn:
        db.execute("UPDATE leases SET expires_at = 0 WHERE item_id = ?", [item_id])
    model_versions.promote(db, "v1")
    app.ctx.live.check()  # what the admin's Promote does: hot-load now
    assert app.ctx.server.live_version == "v1"
    assert db.execute("SELECT status FROM items WHERE id = ?", [item_id]).fetchone()[0] == "retired"

    page.keyboard.press("1")  # A is better
    page.wait_for_function("document.querySelector('#annotate-header')?.innerText.includes('Saved judgement')",
                           timeout=30_000)
    page.close()
    judgement = db.execute("SELECT id, shown_order FROM judgements WHERE item_id = ?", [item_id]).fetchone()
    assert judgement is not None
    a, b = json.loads(judgement[1])
    chosen = db.execute("SELECT chosen_candidate_id, rejected_candidate_id, chosen_version FROM pairs"
                        " WHERE judgement_id = ?", [judgement[0]]).fetchone()
    assert chosen == (a, b, "base")  # the answer shown as A, from the version that wrote it
    assert json.loads(shown_before) == [a, b]  # the letters on screen before the promotion are the ones judged


def test_an_item_is_dealt_only_when_the_annotate_tab_is_shown(app, browser):
    db = app.db()
    user = store.get_user(db, ANNOTATORS[1][0])["id"]
    with db.conn:
        db.execute("DELETE FROM leases WHERE user_id = ?", [user])
    page = browser.new_page()
    browser_login(page, app.url, *ANNOTATORS[1])
    page.wait_for_selector("#annotate-header")
    open_tab(page, "Chat")
    with db.conn:  # whatever the first look at Annotate dealt
        db.execute("DELETE FROM leases WHERE user_id = ?", [user])
    page.reload()  # the page opens on the tab last used: Chat, and deals nothing
    wait_until(lambda: page.locator("#chat-input textarea").is_visible(), timeout=30, message="the chat tab shown")
    page.wait_for_function("document.querySelector('#who')?.innerText.includes('Logged in')", timeout=30_000)
    assert db.execute("SELECT count(*) FROM leases WHERE user_id = ?", [user]).fetchone()[0] == 0
    open_tab(page, "Annotate")
    wait_until(lambda: db.execute("SELECT count(*) FROM leases WHERE user_id = ?", [user]).fetchone()[0] == 1,
               timeout=30, message="an item dealt when Annotate is shown")
    first = item_on_screen(page)
    served = db.execute("SELECT served_at, shown_order FROM item_views WHERE user_id = ?", [user]).fetchall()
    answers = [answer_text(page, x) for x in "ab"]
    page.reload()  # the same item, the same letters, the same served time
    assert item_on_screen(page) == first
    wait_until(lambda: [answer_text(page, x) for x in "ab"] == answers, timeout=30,
               message="the same answers under the same letters")
    assert db.execute("SELECT served_at, shown_order FROM item_views WHERE user_id = ?", [user]).fetchall() == served
    page.close()
