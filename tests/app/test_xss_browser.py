"""Hostile text stays text: prompts, answers and chat messages full of HTML and JavaScript
are shown in a real browser without running anything. On the annotate page, where one
person's text reaches another, not a single element is added from their text: prompts are
shown exactly as written, answers with their markdown rendered (paragraphs, lists, code) and
every tag, link and image shown as text. (Chat and the admin-written guidelines render
markdown through Gradio's sanitiser: nothing runs there either.)"""

import pytest

from annotations import open_db, store
from tests.app.conftest import ANNOTATORS, answer_text, start_app, wait_until
from tests.conftest import browser_login

pytestmark = pytest.mark.browser

PAYLOADS = [
    "<script>window.__pwned=1</script>",
    '<img src=x onerror="window.__pwned=1">',
    '<svg onload="window.__pwned=1"><circle r=1 /></svg>',
    '<iframe src="javascript:parent.__pwned=1"></iframe>',
    '<a href="javascript:window.__pwned=1">a javascript: link</a>',
    "[a markdown link](javascript:window.__pwned=1)",
    '<details open ontoggle="window.__pwned=1"><summary>x</summary></details>',
    '"><img src=x onerror=window.__pwned=1>',
    '<math><mtext><table><mglyph><style><img src=x onerror="window.__pwned=1">',
    '<input autofocus onfocus="window.__pwned=1">',
    "<style>body { display: none }</style>",
    '<object data="javascript:window.__pwned=1"></object>',
]
HOSTILE = "Please repeat this back:\n\n" + "\n\n".join(PAYLOADS)

# Anything that could run script, anywhere on the page.
ACTIVE = ("iframe, object, embed, [onerror], [onload], [ontoggle], [onfocus], "
          "a[href^='javascript'], [src^='javascript'], [data^='javascript']")
# Any element at all that the payloads could have added, inside the annotate page's text.
ADDED = "img, svg, math, iframe, object, details, input:not([type]), a, style, script"
TEXT_AREAS = ("#prompt .message-content, #prompt [data-testid$='message'], #answer-a .rankloop-answer, "
              "#answer-b .rankloop-answer")


@pytest.fixture(scope="module")
def hostile_app(tmp_path_factory, tiny_model_dir):
    """An app whose first item has a hostile prompt and hostile answers, and hostile guidelines."""
    home = tmp_path_factory.mktemp("xss-home")
    db = open_db(home / "rankloop.db")
    prompt_id, _ = store.add_prompt(db, HOSTILE)
    (item_id,) = store.queue_items(db, [prompt_id])
    store.add_candidates(db, item_id, [{"text": f"Answer {n}: {HOSTILE}", "policy_version": "base"} for n in (1, 2)])
    store.set_setting(db, "guidelines", "**Guidelines** " + HOSTILE)
    db.close()
    app = start_app(home, tiny_model_dir, prompts=1)
    yield app
    app.close()


def assert_nothing_ran(page):
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.evaluate("(s) => Array.from(document.querySelectorAll(s)).map(e => e.outerHTML)", ACTIVE) == []
    assert not page.evaluate("Array.from(document.scripts).some(s => s.textContent.includes('__pwned'))")
    assert page.evaluate("getComputedStyle(document.body).display") != "none"


def added_elements(page) -> list[str]:
    return page.evaluate(
        "([areas, added]) => Array.from(document.querySelectorAll(areas))"
        ".flatMap(area => Array.from(area.querySelectorAll(added))).map(e => e.outerHTML)", [TEXT_AREAS, ADDED])


def open_item(page, text_in_prompt: str):
    page.wait_for_selector("#answer-a", timeout=60_000)
    wait_until(lambda: text_in_prompt in page.inner_text("#prompt") or page.keyboard.press("n"), timeout=60,
               interval=1, message="the hostile item")


def test_hostile_prompt_answers_and_guidelines_run_nothing_on_the_annotate_page(hostile_app, browser):
    page = browser.new_page()
    browser_login(page, hostile_app.url, *ANNOTATORS[0])
    open_item(page, "Please repeat this back")
    page.locator("#guidelines-panel").get_by_text("Guidelines").first.click()  # render the guidelines too
    page.wait_for_timeout(500)  # give an onerror / onload / ontoggle the chance to fire
    try:
        assert_nothing_ran(page)
        assert added_elements(page) == []
        # shuffled; every payload shown as text (markdown renders paragraphs, nothing else)
        shown_answers = sorted(answer_text(page, x) for x in "ab")
        assert [s.split(":")[0] for s in shown_answers] == ["Answer 1", "Answer 2"]
        assert all(payload in shown for shown in shown_answers for payload in PAYLOADS), shown_answers
        shown = page.inner_text("#prompt")  # the tags are visible as text, not interpreted
        assert all(payload in shown for payload in PAYLOADS), shown
    finally:
        page.close()


def test_hostile_chat_runs_nothing_and_reaches_annotators_as_text(hostile_app, browser, monkeypatch):
    def hostile_stream(messages, params, version):
        yield "Sure: " + HOSTILE, "base"

    monkeypatch.setattr(hostile_app.ctx.server, "stream", hostile_stream)
    page = browser.new_page()
    browser_login(page, hostile_app.url, *ANNOTATORS[1])
    page.get_by_role("tab", name="Chat").click()
    page.locator("#chat-input textarea").fill("Chat says: " + HOSTILE)
    page.locator("#chat-input textarea").press("Enter")
    page.wait_for_function("document.querySelector('#chat-status').innerText.includes('Answered by')",
                           timeout=60_000)
    page.wait_for_timeout(500)
    try:
        assert_nothing_ran(page)
        page.locator("#chat-to-annotation").click()
        page.wait_for_function("document.querySelector('#chat-status').innerText.includes('Queued as annotation')",
                               timeout=30_000)
    finally:
        page.close()

    page = browser.new_page()  # another annotator meets the conversation (up to its last user turn) as an item
    browser_login(page, hostile_app.url, *ANNOTATORS[0])
    hostile_app.ctx.wake_prefetcher()
    page.wait_for_selector("#answer-a", timeout=60_000)
    try:
        wait_until(lambda: "Chat says" in page.inner_text("#prompt") or page.locator("#choose-a").click(),
                   timeout=120, interval=1, message="the chat conversation as an item")
        page.wait_for_timeout(500)
        assert_nothing_ran(page)
        assert added_elements(page) == []
        shown = page.inner_text("#prompt")
        assert "Chat says: Please repeat this back" in shown and all(payload in shown for payload in PAYLOADS)
    finally:
        page.close()
