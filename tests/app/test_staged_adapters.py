"""Which adapters the app holds. A round's adapter is loaded (and merged) while the round
evaluates it, before it is registered: the gate's promotion then finds it ready. Until
registration nobody can ask for it by name, and a round that fails takes it back out of the
server. Retired versions nobody uses are unloaded, except the live version's parent."""

import os
import threading

import pytest
import torch

from annotations import model_versions, open_db, round_records, store
from annotations.errors import PermissionDenied
from app import chat_and_arena as chat
from app import handlers
from app.live import LiveWatcher
from app.serving import PolicyServer, ensure_loaded
from tests.app.conftest import wait_until
from tests.app.test_hot_swap import save_tiny_adapter


@pytest.fixture
def staged(tmp_path, tiny_model_dir):
    """A store, a server over the tiny model and a watcher (driven by hand: `check()`), and a
    helper that runs a DPO round up to its evaluation: claimed by this process, its version
    reserved, an adapter written to a staging folder and recorded on the round."""
    open_db(tmp_path / "rankloop.db").close()
    server = PolicyServer(tiny_model_dir)
    ctx = handlers.AppContext(db_path=tmp_path / "rankloop.db", server=server)
    watcher = LiveWatcher(ctx)
    db = ctx.db()

    def stage(seed=0):
        round_id = round_records.create_round(db, "dpo")
        round_records.claim_round(db, round_id, os.getpid())
        version = round_records.reserve_version(db, round_id)
        torch.manual_seed(seed)
        folder = save_tiny_adapter(tiny_model_dir, tmp_path / "versions" / f".{version}.tmp-{seed}")
        round_records.stage_adapter(db, round_id, str(folder))
        return round_id, version, folder

    yield ctx, watcher, stage
    watcher.stop()


def register(ctx, round_id, version, folder):
    """What the round does after evaluating: rename the folder into place, register, finish."""
    final = folder.parent / version
    os.replace(folder, final)
    db = ctx.db()
    model_versions.register_version(db, version, "policy", "base", "dpo", round_id, str(final), {})
    round_records.finish_round(db, round_id, "succeeded", version=version)
    return final


def logits(model, tokens=(1, 2, 3)):
    with torch.inference_mode():
        return model(input_ids=torch.tensor([tokens])).logits


def test_a_staged_adapter_is_loaded_and_merged_before_registration_and_goes_live_without_a_load(staged):
    ctx, watcher, stage = staged
    server = ctx.server
    round_id, version, folder = stage()
    watcher.check()
    assert version in server.versions() and server.provisional_versions() == {version: round_id}
    wait_until(lambda: version in server.merged_versions(), timeout=30, message="the staged adapter merged")

    store.add_user(ctx.db(), "asker", "annotator", "a-long-password")
    with pytest.raises(PermissionDenied, match="not available"):  # not registered: nobody can ask for it
        list(chat.chat_stream(ctx, store.get_user(ctx.db(), "asker"), "hi", conversation="c", version=version))
    admin = {"id": 0, "name": "root", "role": "admin"}
    with pytest.raises(KeyError, match="no policy version"):  # not even an admin
        list(chat.chat_stream(ctx, admin, "hi", conversation="c", version=version))
    assert version not in chat.policy_versions(ctx)

    final = register(ctx, round_id, version, folder)
    model_versions.promote(ctx.db(), version)
    loads = server._loads
    watcher.check()
    assert server.live_version == version and server._loads == loads  # a pointer change, nothing loaded
    assert server.provisional_versions() == {} and server._adapters[version] == final
    assert server._model_for(version) is server._merged[version][0]
    reply = list(server.stream([{"role": "user", "content": "hi"}]))
    assert reply[-1][1] == version


def test_a_failed_rounds_staged_adapter_is_unloaded_and_its_name_can_serve_the_next_round(staged):
    ctx, watcher, stage = staged
    server = ctx.server
    first_round, version, _ = stage(seed=1)
    watcher.check()
    wait_until(lambda: version in server.merged_versions(), timeout=30, message="the staged adapter merged")
    round_records.finish_round(ctx.db(), first_round, "failed", error="evaluation failed")
    assert ctx.db().execute("SELECT staged_path FROM rounds WHERE id = ?", [first_round]).fetchone()[0] is None
    watcher.check()
    assert version not in server.versions() and version not in server.merged_versions()
    assert server.provisional_versions() == {}

    second_round, again, folder = stage(seed=2)
    assert again == version  # the failed round gave its name up
    watcher.check()
    assert server.provisional_versions() == {version: second_round}
    from peft import PeftModel

    from align.models import load_causal_lm

    expected = PeftModel.from_pretrained(load_causal_lm(server.base_path), str(folder)).eval()
    torch.testing.assert_close(logits(server._model_for(version)), logits(expected))


def test_a_staged_folder_gone_before_the_app_reads_it_is_loaded_from_the_registry_instead(staged):
    ctx, watcher, stage = staged
    server = ctx.server
    round_id, version, folder = stage()
    final = register(ctx, round_id, version, folder)  # the round registered before the watcher looked
    with ctx.db().conn:  # as if the watcher had read the round a moment before it finished
        ctx.db().execute("UPDATE rounds SET status = 'running', staged_path = ? WHERE id = ?",
                         [str(folder), round_id])
    watcher.check()
    assert version not in server.versions() and watcher.last_error is None
    with ctx.db().conn:
        ctx.db().execute("UPDATE rounds SET status = 'succeeded', staged_path = NULL WHERE id = ?", [round_id])
    model_versions.promote(ctx.db(), version)
    watcher.check()
    assert server.live_version == version and server._adapters[version] == final


def test_asking_for_a_staged_version_after_its_registration_confirms_it(staged):
    ctx, watcher, stage = staged
    round_id, version, folder = stage()
    watcher.check()
    final = register(ctx, round_id, version, folder)
    assert ensure_loaded(ctx.server, ctx.db(), version) == version  # before the watcher's next look
    assert ctx.server.provisional_versions() == {} and ctx.server._adapters[version] == final


def test_answers_in_flight_on_an_unloaded_version_fail_alone(staged, tiny_model_dir, tmp_path):
    from app.decoding import ChatRequest
    from app.serving import SamplingParams

    server = staged[0].server
    server.load_adapter("v7", save_tiny_adapter(tiny_model_dir, tmp_path / "v7"), provisional_round=1)
    sampling = SamplingParams(max_new_tokens=6, temperature=0)
    on_v7, on_base = ChatRequest([1, 2, 3], sampling, "v7"), ChatRequest([1, 2, 3], sampling, "base")
    batcher = server._batcher
    for request in (on_v7, on_base):
        batcher.enqueue(request)
    with server._lock.hold():
        batcher.advance()
    server.unload_adapter("v7")
    with server._lock.hold():
        while batcher.advance():
            pass
    v7_events = [on_v7.events.get_nowait() for _ in range(on_v7.events.qsize())]
    base_events = [on_base.events.get_nowait() for _ in range(on_base.events.qsize())]
    assert v7_events[-1][0] == "error" and "unloaded" in str(v7_events[-1][1])
    assert base_events[-1] == ("end", None) and sum(kind == "token" for kind, _ in base_events) >= 1


def test_a_merge_overtaken_by_an_unload_does_not_land(staged, tiny_model_dir, tmp_path, monkeypatch):
    """The merge goes a chunk at a time; an unload between two chunks wins and the merged copy
    is never stored (else the next adapter loaded under that name would be served the old one)."""
    import app.serving as serving

    server = staged[0].server
    server.load_adapter("v7", save_tiny_adapter(tiny_model_dir, tmp_path / "v7"), provisional_round=1)
    monkeypatch.setattr(serving, "MERGE_CHUNK", 1)
    real = server._owner.call
    unloading = []

    def call(priority, fn, *args, **kwargs):
        if getattr(fn, "__name__", "") == "merge_chunk" and not unloading:
            # between two chunks of the merge, someone unloads the version (and wins its turn)
            unloading.append(threading.Thread(target=server.unload_adapter, args=("v7",)))
            unloading[0].start()
            unloading[0].join(10)
        return real(priority, fn, *args, **kwargs)

    monkeypatch.setattr(server._owner, "call", call)
    assert server.merge("v7") is False
    unloading[0].join(10)
    assert "v7" not in server.versions() and server.merged_versions() == []


def test_retired_versions_nobody_uses_are_unloaded_but_the_live_versions_parent_stays(staged, tiny_model_dir,
                                                                                       tmp_path, monkeypatch):
    import app.live as live

    ctx, watcher, _ = staged
    server, db = ctx.server, ctx.db()
    for version, parent in (("v1", "base"), ("v2", "v1"), ("v3", "base")):
        path = save_tiny_adapter(tiny_model_dir, tmp_path / version)
        model_versions.register_version(db, version, "policy", parent, "dpo", None, str(path), {})
        server.load_adapter(version, path)
    model_versions.promote(db, "v1")
    watcher.check()
    model_versions.promote(db, "v2")  # v1 retires, but it is v2's parent
    watcher.check()
    model_versions.promote(db, "v3")  # v2 retires and is nobody's parent; v1 is not v3's parent either
    watcher.check()
    assert set(server.versions()) == {"base", "v1", "v2", "v3"}  # used less than a minute ago
    monkeypatch.setattr(live, "RETIRED_IDLE_S", 1.0)
    wait_until(lambda: server.idle_seconds("v1") > 1.0, timeout=5, message="v1 idle")
    ensure_loaded(server, db, "v2")  # someone asks for v2 by name: it stays a while longer
    for _ in range(2):
        watcher.check()  # one unload per check
    assert set(server.versions()) == {"base", "v2", "v3"}
    wait_until(lambda: server.idle_seconds("v2") > 1.0, timeout=5, message="v2 idle")
    watcher.check()
    assert set(server.versions()) == {"base", "v3"}
    model_versions.rollback(db)  # v3's parent is the base
    watcher.check()
    assert server.live_version == "base"


def test_a_retired_version_decoding_an_answer_is_not_unloaded(staged, tiny_model_dir, tmp_path):
    from app.decoding import ChatRequest
    from app.serving import SamplingParams

    server = staged[0].server
    server.load_adapter("v7", save_tiny_adapter(tiny_model_dir, tmp_path / "v7"))
    batcher = server._batcher
    batcher.enqueue(request := ChatRequest([1, 2, 3], SamplingParams(max_new_tokens=6, temperature=0), "v7"))
    with server._lock.hold():
        batcher.advance()
    assert not server.unload_adapter("v7", idle_for=5.0)  # decoded a moment ago
    with server._lock.hold():
        while batcher.advance():
            pass
    assert request.events.qsize() > 1 and "v7" in server.versions()
    assert server.unload_adapter("v7", idle_for=0.0) and "v7" not in server.versions()
