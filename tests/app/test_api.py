"""The launched app through gradio_client: login, roles, and the annotate endpoints."""

import pytest
from gradio_client import Client

from annotations import store
from tests.app.conftest import ANNOTATORS, wait_until


def login(app, user):
    return Client(app.url, auth=user, verbose=False)


def test_anonymous_client_can_call_nothing(running_app):
    with pytest.raises(Exception, match="(?i)login|credentials|401"):
        Client(running_app.url, verbose=False).predict(api_name="/next_item")


def test_wrong_password_is_refused(running_app):
    with pytest.raises(Exception):
        Client(running_app.url, auth=("alice", "not-her-password"), verbose=False)


def test_annotator_judges_an_item_and_the_pair_is_stored(running_app):
    client = login(running_app, ANNOTATORS[0])
    header = wait_until(lambda: (r := client.predict(api_name="/next_item"))[0].startswith("**Item") and r,
                        message="an item for alice")
    item_id = int(header[0].split("**Item ")[1].split("**")[0])
    before = store.count_rows(running_app.db(), "pairs")
    result = client.predict("", [], [], api_name="/submit_A")
    assert "Saved judgement" in result[0]
    db = running_app.db()
    assert store.count_rows(db, "pairs") == before + 1
    row = db.execute(
        "SELECT users.name, judgements.mode FROM judgements JOIN users ON users.id = judgements.user_id"
        " WHERE item_id = ?", [item_id]
    ).fetchone()
    assert row == ("alice", "pairwise")


def test_every_endpoint_refuses_an_anonymous_http_call(running_app):
    import httpx

    endpoints = login(running_app, ANNOTATORS[1]).view_api(print_info=False, return_format="dict")
    for name in endpoints["named_endpoints"]:
        response = httpx.post(running_app.url + "gradio_api/call" + name, json={"data": []})
        assert response.status_code == 401, (name, response.status_code)


def test_double_submissions_over_http_store_one_judgement_per_item_shown(running_app):
    """Two identical submissions sent at once in one session: Gradio may run them together (both
    carry the item's idempotency key: stored once, both told the same id) or one after the other
    (the second judges the next item shown). Never two judgements of one item, never an error."""
    import re

    from bench.load import add_ready_items

    add_ready_items(running_app.db(), 24, label="double")
    user = ANNOTATORS[1]
    client = login(running_app, user)
    client.predict(api_name="/next_item")
    acknowledged = []
    for _ in range(8):
        jobs = [client.submit("", [], [], api_name="/submit_A") for _ in range(2)]
        for job in jobs:
            acknowledged.append(int(re.search(r"Saved judgement (\d+)", job.result(timeout=60)[0]).group(1)))
    db = running_app.db()
    user_id = store.get_user(db, user[0])["id"]
    rows = db.execute("SELECT id, item_id FROM judgements WHERE user_id = ?", [user_id]).fetchall()
    assert {r[0] for r in rows} == set(acknowledged)  # duplicates were told the first one's id
    assert len({r[1] for r in rows}) == len(rows)
    assert db.execute("SELECT count(*) FROM pairs WHERE judgement_id IN (SELECT id FROM judgements"
                      " WHERE user_id = ?)", [user_id]).fetchone()[0] == len(rows)


def call_raw(app, user, api_name: str, data: list, upload: bytes | None = None) -> str:
    """An API call over plain HTTP (no gradio_client, which would upload a local path itself);
    returns the event stream's text. With `upload`, those bytes are uploaded first and the
    placeholder "UPLOADED" in `data` becomes the server's path of the upload."""
    import httpx

    with httpx.Client(base_url=app.url, timeout=60) as http:
        login = http.post("login", data={"username": user[0], "password": user[1]})
        assert login.status_code == 200
        headers = {"cookie": login.headers["set-cookie"].split(";")[0]}
        if upload is not None:
            (uploaded,) = http.post("gradio_api/upload", files={"files": ("up.jsonl", upload)}, headers=headers).json()
            data = [{"path": uploaded, "meta": {"_type": "gradio.FileData"}} if d == "UPLOADED" else d for d in data]
        event = http.post(f"gradio_api/call/{api_name}", json={"data": data}, headers=headers)
        assert event.status_code == 200, event.text
        return http.get(f"gradio_api/call/{api_name}/{event.json()['event_id']}", headers=headers).text


def test_import_of_a_server_file_that_was_not_uploaded_is_refused(running_app):
    from tests.app.conftest import ADMIN

    planted = running_app.home / "planted.jsonl"
    planted.write_text('{"prompt": "planted prompt that must not be imported"}\n')
    for path in (str(planted), str(running_app.home / "rankloop.db"), "/etc/passwd"):
        stream = call_raw(running_app, ADMIN, "import_file",
                          [{"path": path, "meta": {"_type": "gradio.FileData"}}, "prompts"])
        assert "event: error" in stream and "read 1 rows" not in stream, stream
    assert running_app.db().execute("SELECT count(*) FROM prompts WHERE messages LIKE '%planted%'").fetchone()[0] == 0
    # The same request with a file that was uploaded goes through.
    stream = call_raw(running_app, ADMIN, "import_file", ["UPLOADED", "prompts"], upload=planted.read_bytes())
    assert "event: complete" in stream and "read 1 rows" in stream, stream
