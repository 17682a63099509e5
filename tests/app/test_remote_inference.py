"""Answers from an external OpenAI-compatible inference server (app/remote.py), tested against
rankloop's own API served by a second app instance, so both ends of the protocol are real: the
first app's candidates and chat come from the second, each recorded with the version that
answered; with runtime LoRA (vLLM's `/v1/load_lora_adapter`, which rankloop's API serves too)
a promotion in the first app loads the version's adapter into the second, and the next answers
are that version's."""

from __future__ import annotations

import httpx
import pytest
from gradio_client import Client

from annotations import api_keys, model_versions
from app.remote import RemoteError, RemoteServer, inference_settings
from tests.app.conftest import ADMIN, ANNOTATORS, start_app, wait_until
from tests.app.test_hot_swap import save_tiny_adapter


@pytest.fixture(scope="module")
def inference_server(tmp_path_factory, tiny_model_dir):
    """The second app: the inference server, with an admin's API key for the first."""
    app = start_app(tmp_path_factory.mktemp("inference-home"), tiny_model_dir, prompts=2, prefetch=2)
    _, key = api_keys.create_key(app.ctx.db(), ADMIN[0], "the first app")
    yield app, key
    app.close()


@pytest.fixture(scope="module")
def client_app(tmp_path_factory, tiny_model_dir, inference_server):
    """The first app, answering through the second, with runtime LoRA."""
    server, key = inference_server
    home = tmp_path_factory.mktemp("client-home")
    app = start_app(home, tiny_model_dir, prompts=2, mode="ranking", k=3, prefetch=2,
                    inference={"url": server.url + "v1", "model": "base", "api_key": key, "lora": True})
    yield app
    app.close()


def served_replies(server) -> list[dict]:
    return [dict(zip(("version", "text", "api_key_id"), row)) for row in server.ctx.db().execute(
        "SELECT policy_version, reply, api_key_id FROM chat_replies ORDER BY id")]


def test_candidates_and_chat_come_from_the_inference_server_recorded_with_the_version(inference_server,
                                                                                      client_app):
    server, _ = inference_server
    db = client_app.ctx.db()
    candidates = db.execute("SELECT text, policy_version FROM candidates WHERE policy_version IS NOT NULL").fetchall()
    assert len(candidates) >= 6 and {version for _, version in candidates} == {"base"}
    answered = served_replies(server)  # the second app stored every answer it gave, with the key that asked
    assert {r["version"] for r in answered} == {"base"} and all(r["api_key_id"] for r in answered)
    assert {text for text, _ in candidates} <= {r["text"].strip() for r in answered}

    annotator = Client(client_app.url, auth=ANNOTATORS[0], verbose=False)
    reply = annotator.predict([], "Say hello in one sentence.", "live", 0.7, 0.95, 1.1, 12, api_name="/chat")
    assert "Answered by **base**" in reply[-1]
    mine = db.execute("SELECT reply, policy_version FROM chat_replies ORDER BY id DESC LIMIT 1").fetchone()
    assert mine[1] == "base" and mine[0] == served_replies(server)[-1]["text"]


def test_promoting_a_version_loads_its_adapter_into_the_inference_server(inference_server, client_app,
                                                                         tiny_model_dir):
    server, _ = inference_server
    db = client_app.ctx.db()
    path = save_tiny_adapter(tiny_model_dir, client_app.home / "versions" / "v1")
    model_versions.register_version(db, "v1", "policy", "base", "dpo", None, str(path), {})
    model_versions.promote(db, "v1")
    wait_until(lambda: client_app.ctx.server.live_version == "v1", timeout=60, message="the first app to go live")
    assert server.ctx.named_adapters == {"v1": path.resolve()}  # loaded there by vLLM's route
    assert "v1" in server.ctx.server.versions()

    annotator = Client(client_app.url, auth=ANNOTATORS[0], verbose=False)
    reply = annotator.predict([], "Say hello again.", "live", 0.7, 0.95, 1.1, 12, api_name="/chat")
    assert "Answered by **v1**" in reply[-1]
    assert db.execute("SELECT policy_version FROM chat_replies ORDER BY id DESC LIMIT 1").fetchone()[0] == "v1"
    assert served_replies(server)[-1]["version"] == "v1"  # the second app answered as v1, and said so

    def item_from_v1():  # items dealt after the promotion are answered by v1, through the server
        rows = db.execute("SELECT DISTINCT policy_version FROM candidates WHERE policy_version IS NOT NULL")
        return "v1" in {r[0] for r in rows}

    client_app.ctx.wake_prefetcher()
    from annotations import store

    prompt_id = store.add_prompt(db, "One more question for v1?")[0]
    store.queue_items(db, [prompt_id], mode="ranking", k=3)
    client_app.ctx.wake_prefetcher()
    wait_until(item_from_v1, timeout=120, message="candidates from v1")


def test_the_lora_routes_are_for_admin_keys_and_check_what_they_load(inference_server, tiny_model_dir, tmp_path):
    server, admin_key = inference_server
    _, annotator_key = api_keys.create_key(server.ctx.db(), ANNOTATORS[1][0], "not allowed")

    def load(key, **body):
        return httpx.post(server.url + "v1/load_lora_adapter", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {key}"})

    adapter = save_tiny_adapter(tiny_model_dir, tmp_path / "adapter")
    assert load(annotator_key, lora_name="mine", lora_path=str(adapter)).status_code == 403
    refused = load(admin_key, lora_name="mine", lora_path=str(tmp_path / "nowhere"))
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "lora_path"
    assert load(admin_key, lora_name="live", lora_path=str(adapter)).status_code == 400
    loaded = load(admin_key, lora_name="mine", lora_path=str(adapter))
    assert loaded.status_code == 200 and loaded.text == "Success: LoRA adapter 'mine' added successfully."
    again = load(admin_key, lora_name="mine", lora_path=str(adapter))
    assert again.status_code == 400 and "has already been loaded" in again.text  # vLLM's words, which clients expect
    models = httpx.get(server.url + "v1/models", headers={"Authorization": f"Bearer {admin_key}"}, timeout=60)
    assert "mine" in [m["id"] for m in models.json()["data"]]
    unloaded = httpx.post(server.url + "v1/unload_lora_adapter", json={"lora_name": "mine"}, timeout=60,
                          headers={"Authorization": f"Bearer {admin_key}"})
    assert unloaded.status_code == 200 and "mine" not in server.ctx.server.versions()


def test_a_server_without_runtime_lora_refuses_versions_and_an_answer_as_another_model_is_refused(
        inference_server, tiny_model_dir, tmp_path):
    server, key = inference_server
    remote = RemoteServer(tiny_model_dir, server.url + "v1", "base", api_key=key, lora=False)
    try:
        with pytest.raises(RemoteError, match="serves the base model only: to serve v9 there, start it with LoRA"):
            remote.set_live("v9", tmp_path)
        assert remote.live_version == "base"
        [answer] = remote.generate([{"role": "user", "content": "Hi"}], sampling=None)
        assert answer.version == "base" and answer.seconds > 0
        asked_live = RemoteServer(tiny_model_dir, server.url + "v1", "live", api_key=key)
        with pytest.raises(RemoteError, match="answered as 'base' when asked for 'live'"):
            asked_live.generate([{"role": "user", "content": "Hi"}])
        asked_live.close()
    finally:
        remote.close()
    with pytest.raises(RemoteError, match="serves live, base.*name the base model with --inference-model"):
        inference_settings(server.url + "v1", None, False, key)
    assert inference_settings(None, None, False, None) is None
