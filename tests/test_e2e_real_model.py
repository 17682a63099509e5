"""End to end on the real default model: `python -m app` (what `make run` starts) serves the
page, an annotator logs in with a real headless browser, judges one item by keyboard, and the
store holds one judgement and one pair that the TRL export contains."""

import json
import subprocess
import sys

import pytest

from tests.app.conftest import answer_text, wait_until
from tests.conftest import REPO, AppProcess, browser_login

pytestmark = [pytest.mark.slow, pytest.mark.browser]


@pytest.fixture(scope="module")
def real_app(tmp_path_factory, real_base_dir):
    with AppProcess(tmp_path_factory.mktemp("real-home"), real_base_dir, ("carol", "carol-password-1"),
                    "--prefetch", "2") as app:
        yield app.url, app.home


def test_annotator_judges_one_item_in_a_real_browser(real_app, browser):
    from annotations.db import connect

    url, home = real_app
    page = browser.new_page()
    browser_login(page, url, "carol", "carol-password-1")
    page.wait_for_selector("#answer-a", timeout=60_000)
    # Candidates come from the prefetcher; "n" asks again until an item is ready.
    wait_until(lambda: answer_text(page, "a") or page.keyboard.press("n"),
               timeout=180, interval=2, message="an item with answers")
    page.keyboard.press("1")  # A is better
    page.wait_for_function("document.querySelector('#annotate-header').innerText.includes('Saved judgement')",
                           timeout=60_000)
    page.close()

    db = connect(home / "rankloop.db")
    assert db.execute("SELECT count(*) FROM judgements").fetchone()[0] == 1
    pair = db.execute(
        "SELECT chosen_version, rejected_version, chosen, rejected FROM pairs").fetchall()
    assert len(pair) == 1 and pair[0][:2] == ("base", "base") and pair[0][2] and pair[0][3]

    out = home / "export.jsonl"
    subprocess.run([sys.executable, "-m", "annotations", "--db", str(home / "rankloop.db"), "export",
                    "--out", str(out)], check=True, cwd=REPO)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["chosen"][0]["content"] == pair[0][2]
