"""The app killed outright (SIGKILL) in the middle of a burst of submissions loses nothing it
acknowledged: every judgement a client was told "Saved judgement N" about is in the store,
whole (with its pair), and the restarted app carries on."""

import signal
import threading

import pytest
from gradio_client import Client

from annotations import open_db
from annotations.db import check_db
from bench.load import LoadReport, add_ready_items, drive_annotators, make_annotators
from tests.app.conftest import wait_until
from tests.app.processes import start_app_process

pytestmark = pytest.mark.slow

ANNOTATORS, SUBMISSIONS, KILL_AFTER = 10, 40, 60


def test_app_killed_mid_burst_keeps_every_acknowledged_judgement(tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    db = open_db(home / "rankloop.db")
    add_ready_items(db, ANNOTATORS * SUBMISSIONS + ANNOTATORS)
    users = make_annotators(db, ANNOTATORS)
    db.close()

    app = start_app_process(home, tiny_model_dir, env={"RANKLOOP_ADMIN_PASSWORD": "admin-password-1"})
    report, stop = LoadReport(), threading.Event()
    burst = threading.Thread(target=drive_annotators, args=(app.url, users, SUBMISSIONS),
                             kwargs={"report": report, "stop": stop})
    try:
        burst.start()
        wait_until(lambda: len(report.acknowledged) >= KILL_AFTER or not burst.is_alive(), timeout=180,
                   message=f"{KILL_AFTER} acknowledged judgements")
        app.process.send_signal(signal.SIGKILL)  # mid-burst: no shutdown, no flush, nothing
        app.process.wait(30)
        stop.set()
        burst.join(180)
    finally:
        stop.set()
        app.stop()
    acknowledged = set(report.acknowledged)
    assert KILL_AFTER <= len(acknowledged) < ANNOTATORS * SUBMISSIONS  # it really died mid-burst
    assert len(acknowledged) == len(report.acknowledged)
    assert report.errors  # the clients saw the server go away

    db = open_db(home / "rankloop.db")  # what a restart does first: SQLite recovers from the WAL
    stored = {r[0] for r in db.execute("SELECT id FROM judgements")}
    assert acknowledged <= stored, f"acknowledged but lost: {sorted(acknowledged - stored)}"
    # Whole or not at all: every stored judgement has its pair, and the file is sound.
    assert db.execute("SELECT count(*) FROM judgements j WHERE NOT EXISTS"
                      " (SELECT 1 FROM pairs p WHERE p.judgement_id = j.id)").fetchone()[0] == 0
    assert check_db(db) == []
    db.close()

    again = start_app_process(home, tiny_model_dir, name="app-restarted")
    try:
        client = Client(again.url, auth=users[0], verbose=False)
        assert client.predict(api_name="/next_item")[0].startswith("**Item")
        assert "Saved judgement" in client.predict("", [], [], api_name="/submit_B")[0]
    finally:
        again.stop()
