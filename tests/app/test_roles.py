"""Roles are enforced on the server for every endpoint, enumerated from the app's own API."""

import httpx
import pytest
from gradio_client import Client, handle_file

from app.pages.common import ENDPOINT_ROLES
from tests.app.conftest import ADMIN, ANNOTATORS


@pytest.fixture(scope="module")
def api(running_app):
    client = Client(running_app.url, auth=ANNOTATORS[0], verbose=False)
    return client.view_api(print_info=False, return_format="dict")["named_endpoints"]


@pytest.fixture(scope="module")
def clients(running_app):
    """One logged-in client per user, made on first use."""
    made = {}

    def client(user):
        if user not in made:
            made[user] = Client(running_app.url, auth=user, verbose=False)
        return made[user]

    return client


def call(app, user, name, api, client=None):
    client = client or Client(app.url, auth=user, verbose=False)
    # Gradio's own example values pass its preprocessing, so the handler (and its check) runs;
    # files are a local one (the example is a URL, and nothing here reaches the internet).
    local_file = app.home / "role-test.jsonl"
    local_file.write_text('{"prompt": "role test"}\n')
    args = [handle_file(str(local_file)) if param["component"] == "File" else param.get("example_input")
            for param in api[name]["parameters"]]
    return client.predict(*args, api_name=name)


def test_every_public_endpoint_declares_its_role(api):
    assert set(api) == {"/" + name for name in ENDPOINT_ROLES}


@pytest.mark.parametrize("name", sorted(n for n, role in ENDPOINT_ROLES.items() if role == "admin"))
def test_annotator_cannot_call_an_admin_endpoint(running_app, api, name):
    # import_file: gradio_client uploads the file first, and the guard refuses the upload (403)
    with pytest.raises(Exception, match="Permission denied|403 Forbidden"):
        call(running_app, ANNOTATORS[1], "/" + name, api)


@pytest.mark.parametrize("name", sorted(n for n, role in ENDPOINT_ROLES.items() if role == "admin"))
def test_admin_passes_the_role_check_of_an_admin_endpoint(running_app, api, name):
    try:
        call(running_app, ADMIN, "/" + name, api)
    except Exception as e:  # empty arguments may be refused, but never for the role
        assert "Permission denied" not in str(e)


def test_anonymous_http_calls_are_refused_for_every_event_handler(running_app):
    for fn_index in range(len(running_app.demo.fns)):
        response = httpx.post(running_app.url + "gradio_api/queue/join",
                              json={"fn_index": fn_index, "data": [], "session_hash": "anonymous"})
        assert response.status_code == 401, (fn_index, response.status_code)


@pytest.mark.parametrize("name", sorted(n for n, role in ENDPOINT_ROLES.items() if role == "annotator"))
@pytest.mark.parametrize("user", [ANNOTATORS[1], ADMIN], ids=["annotator", "admin"])
def test_annotator_and_admin_pass_the_role_check_of_an_annotator_endpoint(running_app, api, clients, name, user):
    try:
        call(running_app, user, "/" + name, api, clients(user))
    except Exception as e:  # example arguments may be refused (no item on screen...), never for the role
        assert "Permission denied" not in str(e) and "log in" not in str(e)


@pytest.mark.parametrize("name", sorted(ENDPOINT_ROLES))
def test_anonymous_call_of_a_named_endpoint_is_refused(running_app, name):
    response = httpx.post(running_app.url + "gradio_api/call/" + name, json={"data": []})
    assert response.status_code == 401


# ---------------------------------------------------------------- the OpenAI-compatible API (app/openai_api.py)

from app.openai_api import ROUTES as API_ROUTES  # noqa: E402


def api_request(app, route, key=None, **kwargs):
    method, path = route.split(" ")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"messages": [{"role": "user", "content": "role test"}], "max_tokens": 2} if method == "POST" else None
    return httpx.request(method, app.url + path.lstrip("/"), headers=headers, json=body, timeout=120, **kwargs)


def test_every_openai_api_route_declares_its_role(running_app):
    from app.openai_api import build_api

    served = {f"{method} {route.path}" for route in build_api(running_app.ctx).routes
              for method in route.methods - {"HEAD"}}
    assert served == set(API_ROUTES)


@pytest.mark.parametrize("route", sorted(API_ROUTES))
@pytest.mark.parametrize("key", [None, "rk-not-a-key"], ids=["no key", "bad key"])
def test_an_openai_api_call_without_a_valid_key_is_refused(running_app, route, key):
    response = api_request(running_app, route, key)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("route", sorted(API_ROUTES))
@pytest.mark.parametrize("user", [ANNOTATORS[1], ADMIN], ids=["annotator", "admin"])
def test_every_openai_api_route_lets_in_exactly_the_roles_it_declares(running_app, route, user):
    from annotations import api_keys

    _, key = api_keys.create_key(running_app.db(), user[0], "role test")
    response = api_request(running_app, route, key)
    if API_ROUTES[route] == "admin" and user != ADMIN:
        assert response.status_code == 403 and response.json()["error"]["type"] == "permission_error"
    elif API_ROUTES[route] == "admin":  # past the role check: the role test's body names no adapter
        assert response.status_code == 400 and response.json()["error"]["param"] == "lora_name"
    else:
        assert response.status_code == 200
