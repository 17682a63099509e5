"""No secrets leak: exports, quality reports and store statistics hold no password hashes, and a
running app's output shows the first admin password once (the first-start message, printed,
never logged) and no other password, attempted or set, anywhere."""

import json

import httpx
import pytest
from gradio_client import Client

from annotations import store
from annotations.__main__ import main as annotations_cli
from annotations.formats import export_pairs, import_file
from annotations.quality import agreement_report, format_report
from bench.load import add_ready_items
from tests.app.processes import start_app_process

ADMIN_PASSWORD = "first-admin-secret-1234"
GUESS = "wrong-guess-secret-5678"
NEW_PASSWORD = "newbie-secret-9012"


def as_text(path) -> str:
    """A written export as text, whatever its format (parquet is decoded, not grepped compressed)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return json.dumps(pq.read_table(path).to_pylist())
    if path.is_dir():
        from datasets import load_from_disk

        return json.dumps(load_from_disk(str(path)).to_list())
    return path.read_text(encoding="utf-8")


def test_exports_reports_and_stats_hold_no_password_hashes(db, tmp_path, capsys):
    hashes_before = db.execute("SELECT count(*) FROM users").fetchone()[0]
    users = [store.add_user(db, f"ann{i}", "annotator", f"annotator-password-{i}") for i in range(3)]
    (tmp_path / "in.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    import_file(db, tmp_path / "in.jsonl", "trl")
    for item_id in add_ready_items(db, 4, overlap=3):
        for user in users:
            first, second = (r[0] for r in db.execute("SELECT id FROM candidates WHERE item_id = ?", [item_id]))
            store.submit_judgement(db, user, item_id, [[first], [second]], shown_order=[first, second])
    hashes = [r[0] for r in db.execute("SELECT password_hash FROM users")]
    assert len(hashes) == hashes_before + 3 and all(h.startswith("$argon2") for h in hashes)

    outputs = []
    for name in ("pairs.jsonl", "pairs.csv", "pairs.parquet", "pairs_dataset"):
        export_pairs(db, tmp_path / name, with_meta=True, weight_by="agreement")
        outputs.append(as_text(tmp_path / name))
    outputs.append(format_report(agreement_report(db)))
    db_path = db.conn.execute("PRAGMA database_list").fetchone()[2]
    for command in ("stats", "quality"):
        assert annotations_cli(["--db", db_path, command]) == 0
    outputs.append(capsys.readouterr().out)
    for text in outputs:
        assert "argon2" not in text and not any(h in text for h in hashes)
        assert "annotator-password" not in text


@pytest.mark.slow
def test_app_output_shows_the_first_admin_password_once_and_logs_no_secret(tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    app = start_app_process(home, tiny_model_dir, env={"RANKLOOP_ADMIN_PASSWORD": ADMIN_PASSWORD})
    try:
        assert httpx.post(app.url + "login", data={"username": "admin", "password": GUESS}).status_code == 400
        admin = Client(app.url, auth=("admin", ADMIN_PASSWORD), verbose=False)
        accounts = admin.predict("newbie", "annotator", NEW_PASSWORD, api_name="/add_account")[0]
        assert ["newbie", "annotator"] in [row[:2] for row in accounts["data"]]
        admin.predict(api_name="/quality_report")
        Client(app.url, auth=("newbie", NEW_PASSWORD), verbose=False).predict(api_name="/next_item")
    finally:
        app.stop()
    stdout, stderr = app.stdout.read_text(), app.stderr.read_text()
    assert "HTTP Request" in stderr or "rankloop" in stdout  # the output was captured at all
    shown = [line for line in (stdout + stderr).splitlines() if ADMIN_PASSWORD in line]
    assert len(shown) == 1 and shown[0].startswith("First admin account created") and shown[0] in stdout
    for secret in (GUESS, NEW_PASSWORD, "argon2"):
        assert secret not in stdout + stderr

    again = start_app_process(home, tiny_model_dir, name="app-again", env={"RANKLOOP_ADMIN_PASSWORD": ADMIN_PASSWORD})
    again.stop()
    assert ADMIN_PASSWORD not in again.output()  # the admin exists: nothing is shown a second time
