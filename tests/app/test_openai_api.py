"""The OpenAI-compatible API of a running app (tiny model), through the official `openai`
client: models, completions whole and streamed (stored as chat replies with their version),
stop strings, max_tokens, keys and their rate limit."""

import json

import httpx
import openai
import pytest

from annotations import api_keys, model_versions
from tests.app.conftest import ADMIN, ANNOTATORS, start_app
from tests.app.test_hot_swap import save_tiny_adapter

HELLO = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    """A running app with a candidate v1 (a real adapter: annotators may use it) and a retired
    version `old` (nobody may)."""
    home = tmp_path_factory.mktemp("api-home")
    running = start_app(home, tiny_model_dir, prompts=2)
    db = running.db()
    path = save_tiny_adapter(tiny_model_dir, home / "versions" / "v1")
    model_versions.register_version(db, "v1", "policy", "base", "dpo", None, str(path), {})
    db.execute("INSERT INTO policies (version, kind, parent, method, path, state)"
               " VALUES ('old', 'policy', 'base', 'dpo', '/nowhere/old', 'retired')")
    db.conn.commit()
    yield running
    running.close()


@pytest.fixture(scope="module")
def keys(app):
    """{user name: (key id, key)} for an annotator and the admin."""
    db = app.db()
    return {name: api_keys.create_key(db, name, "tests") for name in (ANNOTATORS[0][0], ADMIN[0])}


def client(app, key, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.url + "v1", api_key=key, max_retries=0, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def alice(app, keys):
    return client(app, keys["alice"][1])


@pytest.fixture(scope="module")
def admin(app, keys):
    return client(app, keys["admin"][1])


def stored_reply(app, completion_id):
    """The chat reply stored for a completion: (messages, reply, version, sampling, api key id, user)."""
    row = app.db().execute(
        "SELECT messages, reply, policy_version, sampling, api_key_id, users.name FROM chat_replies"
        " JOIN users ON users.id = chat_replies.user_id WHERE conversation = ?", [completion_id]).fetchall()
    assert len(row) == 1, row
    messages, reply, version, sampling, key_id, user = row[0]
    return json.loads(messages), reply, version, json.loads(sampling), key_id, user


# ---------------------------------------------------------------- models


def test_models_lists_live_first_then_the_versions_an_annotator_may_use(alice):
    assert [m.id for m in alice.models.list()] == ["live", "base", "v1"]


def test_models_lists_every_version_not_retired_to_an_admin(admin):
    models = admin.models.list().data
    assert [m.id for m in models] == ["live", "base", "v1"]
    assert all(m.object == "model" and m.owned_by == "rankloop" and m.created > 0 for m in models)


# ---------------------------------------------------------------- completions


def test_completion_is_answered_by_the_live_version_and_stored_as_sent(app, alice, keys):
    response = alice.chat.completions.create(model="live", messages=HELLO, max_tokens=12, temperature=0)
    assert response.model == "base" and response.object == "chat.completion"
    assert response.choices[0].message.role == "assistant"
    messages, reply, version, sampling, key_id, user = stored_reply(app, response.id)
    assert (messages, reply, version) == (HELLO, response.choices[0].message.content, "base")
    assert (key_id, user) == (keys["alice"][0], "alice")
    assert sampling["temperature"] == 0 and sampling["max_new_tokens"] == 12


def test_completion_without_a_model_uses_the_live_version(app, keys):
    response = httpx.post(app.url + "v1/chat/completions", json={"messages": HELLO, "max_tokens": 4}, timeout=120,
                          headers={"Authorization": f"Bearer {keys['alice'][1]}"})
    assert response.status_code == 200 and response.json()["model"] == "base"


def test_completion_of_a_named_version_records_that_version(app, alice):
    response = alice.chat.completions.create(model="v1", messages=HELLO, max_tokens=8, temperature=0)
    assert response.model == "v1"
    assert stored_reply(app, response.id)[2] == "v1"


def test_streamed_chunks_concatenate_to_the_stored_reply(app, alice):
    stream = alice.chat.completions.create(model="live", messages=HELLO, max_tokens=16, temperature=0.7,
                                           stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.model for c in chunks} == {"base"} and len({c.id for c in chunks}) == 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 16
    messages, reply, version, *_ = stored_reply(app, chunks[0].id)
    assert (messages, reply, version) == (HELLO, text, "base")


def test_stream_ends_with_done(app, keys):
    body = {"model": "live", "messages": HELLO, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", app.url + "v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {keys['alice'][1]}"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


@pytest.mark.parametrize("max_tokens", [1, 5])
def test_max_tokens_bounds_the_answer(app, alice, max_tokens):
    response = alice.chat.completions.create(model="live", messages=HELLO, max_tokens=max_tokens, temperature=1.0)
    used = response.usage.completion_tokens
    assert 0 <= used <= max_tokens
    assert response.choices[0].finish_reason == ("length" if used == max_tokens else "stop")
    assert response.usage.prompt_tokens > 0 and response.usage.total_tokens == used + response.usage.prompt_tokens


def test_a_stop_string_ends_the_answer_before_it_whole_and_streamed(app, alice):
    """Sampled answers differ each time: ask until one was cut (the tiny model says "e" often),
    then check what was sent and stored. The cut itself is checked on known text below."""
    for _ in range(5):
        cut = alice.chat.completions.create(model="live", messages=HELLO, max_tokens=24, temperature=1.0,
                                            stop=["e", "never seen"])
        if cut.choices[0].finish_reason == "stop":  # the tiny model seldom ends an answer by itself
            break
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens <= 24
    assert "e" not in cut.choices[0].message.content
    assert stored_reply(app, cut.id)[1] == cut.choices[0].message.content
    chunks = list(alice.chat.completions.create(model="live", messages=HELLO, max_tokens=24, temperature=1.0,
                                                stop="e", stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert "e" not in text and stored_reply(app, chunks[0].id)[1] == text


def test_a_bad_request_is_refused_with_the_field_at_fault(alice):
    with pytest.raises(openai.BadRequestError) as refused:
        alice.chat.completions.create(model="live", messages=HELLO, max_tokens=5000)
    assert "max_tokens" in refused.value.message
    with pytest.raises(openai.BadRequestError, match="last message"):
        alice.chat.completions.create(model="live", messages=[{"role": "assistant", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError) as refused:
        alice.chat.completions.create(model="live", messages=HELLO, n=2)
    assert refused.value.body["param"] == "n"


# ---------------------------------------------------------------- versions a key may use


def test_an_annotator_naming_a_retired_version_is_refused(alice):
    with pytest.raises(openai.PermissionDeniedError, match="not available to you"):
        alice.chat.completions.create(model="old", messages=HELLO, max_tokens=4)


def test_an_admin_naming_a_retired_version_is_refused(admin):
    with pytest.raises(openai.PermissionDeniedError, match="retired"):
        admin.chat.completions.create(model="old", messages=HELLO, max_tokens=4)


def test_naming_an_unknown_model_is_not_found(alice):
    with pytest.raises(openai.NotFoundError) as refused:
        alice.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=4)
    assert refused.value.code == "model_not_found"


# ---------------------------------------------------------------- keys and limits


def test_a_bad_key_is_refused(app):
    with pytest.raises(openai.AuthenticationError, match="unknown or has been revoked"):
        client(app, "rk-not-a-real-key").models.list()


def test_a_missing_key_is_refused_in_openais_error_shape(app):
    response = httpx.get(app.url + "v1/models")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key" and "Bearer" in response.json()["error"]["message"]


def test_a_revoked_key_is_refused(app):
    key_id, key = api_keys.create_key(app.db(), "bob")
    bob = client(app, key)
    assert bob.models.list().data
    api_keys.revoke_key(app.db(), key_id)
    with pytest.raises(openai.AuthenticationError):
        bob.models.list()
    with pytest.raises(openai.AuthenticationError):
        bob.chat.completions.create(model="live", messages=HELLO, max_tokens=2)


def test_a_key_over_its_rate_limit_is_told_to_wait(app):
    db = app.db()
    _, key = api_keys.create_key(db, "bob", "rate test")
    api_keys.set_rate_limit(db, 2)
    try:
        limited = client(app, key)
        limited.models.list()
        limited.chat.completions.create(model="live", messages=HELLO, max_tokens=2)
        with pytest.raises(openai.RateLimitError, match="2 requests per minute") as refused:
            limited.models.list()
        assert 0 < int(refused.value.response.headers["retry-after"]) <= 60
    finally:
        api_keys.set_rate_limit(db, api_keys.DEFAULT_REQUESTS_PER_MINUTE)


def test_a_body_that_is_not_json_or_too_large_is_refused(app, keys):
    headers = {"Authorization": f"Bearer {keys['alice'][1]}", "Content-Type": "application/json"}
    url = app.url + "v1/chat/completions"
    response = httpx.post(url, content=b"{not json", headers=headers)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    assert httpx.post(url, content=b" " * (2 << 20), headers=headers, timeout=60).status_code == 413


def test_the_rate_limit_window_slides():
    from app.openai_api import KeyRateLimiter

    limiter = KeyRateLimiter()
    assert [limiter.spend(1, 2, now=t) for t in (0.0, 10.0)] == [0.0, 0.0]
    assert limiter.spend(1, 2, now=20.0) == pytest.approx(40.0)  # the first use leaves the window at 60 s
    assert limiter.spend(2, 2, now=20.0) == 0.0  # another key has its own allowance
    assert limiter.spend(1, 2, now=60.0) == 0.0


def test_the_key_records_its_last_use(app, keys, alice):
    alice.models.list()
    (listed,) = [k for k in api_keys.list_keys(app.db()) if k["id"] == keys["alice"][0]]
    assert listed["last_used_at"] is not None and listed["revoked_at"] is None


# ---------------------------------------------------------------- the answer, on known text


class ScriptedServer:
    """Stands in for PolicyServer: its stream yields the given texts so far, then returns the
    token count; `closed` says whether the answer was taken out of the batch."""

    live_version = "base"

    def __init__(self, texts, tokens):
        self.texts, self.tokens, self.closed = texts, tokens, False

    def prompt_tokens(self, messages):
        return 7

    def tokenizer(self, text, add_special_tokens=False):
        return {"input_ids": text.split()}

    def stream(self, messages, sampling, version):
        try:
            for text in self.texts:
                yield text, version or self.live_version
            return self.tokens
        finally:
            self.closed = True


@pytest.fixture
def scripted(tmp_path):
    from annotations import open_db, store
    from app.handlers import AppContext

    db = open_db(tmp_path / "rankloop.db")
    store.add_user(db, "ann", "annotator", "ann-password-1")
    ctx = AppContext(db_path=tmp_path / "rankloop.db")
    return ctx, store.get_user(db, "ann")


def answer(ctx, user, stops=(), max_tokens=16, **request):
    from app import completions

    wanted = completions.parse_request({"messages": HELLO, "max_tokens": max_tokens, "stop": list(stops), **request})
    run = completions.stream_completion(ctx, user, wanted, None, completion_id="chatcmpl-test")
    deltas = []
    while True:
        try:
            deltas.append(next(run))
        except StopIteration as end:
            return deltas, end.value


def test_a_stop_string_split_across_tokens_is_never_sent(scripted):
    ctx, user = scripted
    ctx.server = ScriptedServer(["Hel", "Hello wor", "Hello world, friend", "never reached"], tokens=9)
    deltas, completion = answer(ctx, user, stops=["world"])
    assert deltas == [("Hel", "base"), ("lo", "base")]  # "wor" held back until "world" showed it was the stop
    # the tokens decoded when the stop string showed (counted again from their text: 3 words)
    assert (completion.text, completion.finish_reason, completion.completion_tokens) == ("Hello", "stop", 3)
    assert ctx.server.closed and stored_text(ctx) == "Hello"


def test_held_back_text_that_is_no_stop_is_sent(scripted):
    ctx, user = scripted
    ctx.server = ScriptedServer(["Hello wor", "Hello worm "], tokens=3)
    deltas, completion = answer(ctx, user, stops=["world"])
    assert "".join(d for d, _ in deltas) == completion.text == "Hello worm" == stored_text(ctx)
    assert completion.finish_reason == "stop"  # 3 of 16 tokens: the answer ended by itself


def test_an_answer_that_used_every_token_finished_for_length(scripted):
    ctx, user = scripted
    ctx.server = ScriptedServer(["  one", "  one two  "], tokens=4)
    deltas, completion = answer(ctx, user, max_tokens=4)
    assert (completion.text, completion.finish_reason, completion.usage()) == (
        "one two", "length", {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11})
    assert "".join(d for d, _ in deltas) == "one two" == stored_text(ctx)


def test_an_answer_closed_early_is_not_stored(scripted):
    ctx, user = scripted
    ctx.server = ScriptedServer(["one", "one two", "one two three"], tokens=3)
    from app import completions

    run = completions.stream_completion(ctx, user, completions.parse_request({"messages": HELLO}), None)
    next(run)
    run.close()  # the client went away
    assert ctx.server.closed and stored_text(ctx) is None


def stored_text(ctx):
    from annotations import chat_replies

    replies = chat_replies.conversation_replies(ctx.db(), 1, "chatcmpl-test")
    return replies[-1]["reply"] if replies else None


# ---------------------------------------------------------------- making keys: the admin's functions and the CLI


def test_only_an_admin_makes_lists_and_revokes_keys(scripted):
    from annotations import store
    from annotations.errors import PermissionDenied
    from app import api_key_admin

    ctx, annotator = scripted
    store.add_user(ctx.db(), "root", "admin", "root-password-1")
    root = store.get_user(ctx.db(), "root")
    for call in (lambda u: api_key_admin.create_api_key(ctx, u, "ann"), lambda u: api_key_admin.list_api_keys(ctx, u),
                 lambda u: api_key_admin.revoke_api_key(ctx, u, 1), lambda u: api_key_admin.save_api_rate_limit(ctx, u, 5)):
        with pytest.raises(PermissionDenied):
            call(annotator)
    made = api_key_admin.create_api_key(ctx, root, "ann", " notebook ")
    assert made["key"].startswith("rk-") and (made["user"], made["label"]) == ("ann", "notebook")
    assert [k["id"] for k in api_key_admin.list_api_keys(ctx, root)] == [made["id"]]
    assert api_key_admin.revoke_api_key(ctx, root, made["id"]) is True
    assert api_keys.user_for_key(ctx.db(), made["key"]) is None
    assert api_key_admin.save_api_rate_limit(ctx, root, 5) == api_key_admin.api_rate_limit(ctx, root) == 5


def test_the_command_line_creates_lists_and_revokes_a_key(scripted, tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    def run(*args):
        done = subprocess.run([sys.executable, "-m", "app", "api-key", "--home", str(tmp_path), *args], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        return done.returncode, done.stdout + done.stderr

    code, out = run("create", "ann", "--label", "cli")
    key = out.split()[-1]
    assert code == 0 and "shown once" in out and key.startswith("rk-")
    assert api_keys.user_for_key(scripted[0].db(), key)["name"] == "ann"
    code, out = run("list")
    assert code == 0 and key[:10] in out and key not in out and "(cli)" in out
    assert run("revoke", "1")[0] == 0 and api_keys.user_for_key(scripted[0].db(), key) is None
    code, out = run("create", "nobody")
    assert code == 2 and "no user named 'nobody'" in out
