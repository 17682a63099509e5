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
