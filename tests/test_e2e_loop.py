"""The whole loop on the real default model, through `gradio_client` against the launched app
(`python -m app`, which also starts the training worker): annotate → a DPO round started from
the admin endpoint → promoted → the next annotation item and a chat reply come from the new
version, without restarting the app."""

import pytest
from gradio_client import Client

from tests.app.conftest import wait_until
from tests.conftest import AppProcess

pytestmark = pytest.mark.slow

ADMIN = ("admin", "admin-password-1")
ANNOTATOR = ("dana", "dana-password-1")
ROUND = "max_steps: 2\nbatch_size: 2\nmax_length: 128\nlora_top_layers: 4\neval_pairs: 4\neval_prompts: 0\n"


@pytest.fixture(scope="module")
def loop_app(tmp_path_factory, real_base_dir):
    with AppProcess(tmp_path_factory.mktemp("loop-home"), real_base_dir, ANNOTATOR, "--prefetch", "3",
                    admin_password=ADMIN[1]) as app:
        yield app.url, app.home, app.process


def item_id_of(header: str) -> int | None:
    return int(header.split("**Item ")[1].split("**")[0]) if "**Item " in header else None


def test_annotate_train_promote_and_serve_the_new_version(loop_app):
    from annotations.db import connect

    url, home, process = loop_app
    db = connect(home / "rankloop.db")
    annotator = Client(url, auth=ANNOTATOR, verbose=False)
    admin = Client(url, auth=ADMIN, verbose=False)

    judged = 0
    header = wait_until(lambda: item_id_of((h := annotator.predict(api_name="/next_item"))[0]) and h,
                        timeout=300, interval=2, message="a first item")[0]
    while judged < 5:
        if item_id_of(header):
            header = annotator.predict("", [], [], api_name="/submit_A")[0]
            judged += 1
        else:
            header = wait_until(lambda: item_id_of((h := annotator.predict(api_name="/next_item"))[0]) and h,
                                timeout=300, interval=2, message="another item")[0]
    assert db.execute("SELECT count(*) FROM pairs WHERE source = 'judgement'").fetchone()[0] == 5

    status = admin.predict("dpo", "all", ROUND, api_name="/queue_round")
    assert "Queued round" in status[0]
    round_id = int(status[0].split("round ")[1].rstrip("."))
    final = wait_until(lambda: db.execute("SELECT status FROM rounds WHERE id = ? AND status NOT IN"
                                          " ('queued', 'running')", [round_id]).fetchone(),
                       timeout=900, interval=2, message="the DPO round to finish")
    assert final[0] == "succeeded", db.execute("SELECT error, log_tail FROM rounds WHERE id = ?", [round_id]).fetchone()
    version = db.execute("SELECT version FROM rounds WHERE id = ?", [round_id]).fetchone()[0]

    promoted = admin.predict(version, api_name="/promote")
    assert f"{version} is live" in promoted[0]

    def item_from_new_version():
        header = annotator.predict(api_name="/next_item")[0]
        item_id = item_id_of(header)
        if item_id is None:
            return None
        versions = {r[0] for r in db.execute(
            "SELECT policy_version FROM candidates WHERE item_id = ? AND policy_version IS NOT NULL", [item_id])}
        if versions != {version}:
            # an item dealt before the promotion stays the annotator's and stays answerable
            assert "Saved judgement" in annotator.predict("", [], [], api_name="/submit_A")[0]
            return None
        return True

    wait_until(item_from_new_version, timeout=300, interval=3, message="an item answered by the new version")
    reply = annotator.predict([], "Say hello in one sentence.", "live", 0.7, 0.95, 1.1, 24, api_name="/chat")
    assert f"Answered by **{version}**" in reply[-1]
    assert db.execute("SELECT policy_version FROM chat_replies ORDER BY id DESC LIMIT 1").fetchone()[0] == version
    assert process.poll() is None  # the same app process all along: no restart
