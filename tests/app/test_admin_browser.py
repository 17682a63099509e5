"""The admin training page in a real headless Chromium: queue a round, watch it progress, see
its curves and log (the app's own worker process trains the tiny model)."""

import json

import pytest

from annotations.formats import import_file
from tests.app.conftest import ADMIN, start_app, wait_until
from tests.conftest import browser_login

pytestmark = pytest.mark.browser

ROUND = "max_steps: 6\nlogging_steps: 1\nbatch_size: 2\nmax_length: 64\neval_prompts: 0\neval_samples: 0"


@pytest.fixture(scope="module")
def worker_app(tmp_path_factory, tiny_model_dir):
    home = tmp_path_factory.mktemp("admin-home")
    app = start_app(home, tiny_model_dir, prompts=2, worker=True)
    rows = [{"prompt": f"question {i}?", "chosen": f"good answer {i}", "rejected": f"bad {i}"} for i in range(24)]
    source = home / "pairs.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    import_file(app.ctx.db(), source, "trl", queue=False)
    yield app
    app.close()


def test_admin_queues_a_round_and_sees_progress_and_curves(worker_app, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1600})
    browser_login(page, worker_app.url, *ADMIN)
    page.wait_for_selector("#who")
    page.get_by_role("tab", name="Admin").click()
    page.get_by_role("tab", name="Training").click()
    page.locator("#round-advanced").get_by_text("Advanced: settings as YAML").click()  # the power user's path
    page.locator("#round-overrides .cm-content").click()
    page.keyboard.type(ROUND)
    page.locator("#round-start").click()
    page.wait_for_function("document.querySelector('#round-start-status').innerText.includes('Queued round')",
                           timeout=30_000)
    page.wait_for_function("document.querySelector('#round-progress').innerText.includes('succeeded')",
                           timeout=180_000)
    wait_until(lambda: "step 6/6" in page.locator("#round-log").inner_text(), timeout=30, message="the log")
    # The curves: the plot draws one mark per logged step and metric.
    wait_until(lambda: page.locator("#round-curves canvas, #round-curves svg path").count() > 0, timeout=30,
               message="drawn curves")
    wait_until(lambda: "held-out" in page.locator("#round-figures").inner_text(), timeout=30,
               message="the held-out figures")  # in words, with their interval and n
    assert "n=" in page.locator("#round-figures").inner_text()
    page.close()
    db = worker_app.db()
    assert db.execute("SELECT status, version FROM rounds").fetchall() == [("succeeded", "v1")]
    assert db.execute("SELECT count(DISTINCT step) FROM round_metrics").fetchone()[0] == 6
