"""One owner for the model (app/model_thread.py): eight threads hammer one PolicyServer with
random loads, unloads, promotions, rollbacks, merges, chat answers and candidates. Nothing
fails that should not, and afterwards the server agrees with the store and holds nothing it
should not."""

import random
import threading
from collections import Counter

import pytest

from annotations import model_versions
from annotations.db import connect
from annotations.errors import InvalidInput
from app.live import LiveWatcher
from app.serving import SamplingParams
from tests.app.test_hot_swap import save_tiny_adapter

THREADS, OPS = 8, 500
VERSIONS = ("v1", "v2", "v3", "v4")
PROMPT = [{"role": "user", "content": "hello"}]
SHORT = SamplingParams(max_new_tokens=2)


@pytest.fixture
def stressed(empty_ctx, tiny_model_dir, tmp_path):
    db = empty_ctx.db()
    paths = {}
    for i, version in enumerate(VERSIONS):
        paths[version] = save_tiny_adapter(tiny_model_dir, tmp_path / version)
        model_versions.register_version(db, version, "policy", VERSIONS[i - 1] if i else "base", "dpo", None,
                                  str(paths[version]), {})
    return empty_ctx, LiveWatcher(empty_ctx, poll_seconds=3600), paths


def refusal(e: Exception) -> bool:
    """The documented ways an operation says no (not errors)."""
    return (isinstance(e, ValueError) and "is live" in str(e)) or \
        (isinstance(e, InvalidInput) and "no parent version" in str(e))


def test_eight_threads_of_random_operations_leave_the_server_consistent(stressed):
    ctx, watcher, paths = stressed
    server = ctx.server
    errors, done = [], Counter()

    def worker(seed):
        rng = random.Random(seed)
        db = connect(ctx.db_path)
        for _ in range(OPS):
            op, version = rng.choice(("load", "unload", "promote", "rollback", "merge", "chat", "candidates")), \
                rng.choice(VERSIONS)
            try:
                if op == "load":
                    server.load_adapter(version, paths[version])
                elif op == "unload":
                    server.unload_adapter(version)
                elif op == "promote":
                    model_versions.promote(db, version)
                    watcher.check()
                elif op == "rollback":
                    model_versions.rollback(db)
                    watcher.check()
                elif op == "merge":
                    server.merge(version)
                elif op == "chat":
                    *_, (text, answered_by) = server.stream(PROMPT, SHORT)
                    assert answered_by in ("base", *VERSIONS)
                else:
                    (group,) = server.generate_many([PROMPT], n=2, sampling=SHORT)
                    assert len(group) == 2
                done[op] += 1
            except Exception as e:  # noqa: BLE001 - every failure is collected and reported
                if refusal(e):
                    done["refused"] += 1
                else:
                    errors.append(f"{op} {version}: {type(e).__name__}: {e}")
        db.close()

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sum(done.values()) == THREADS * OPS and all(done[op] for op in ("load", "unload", "chat", "candidates"))

    watcher.check()  # a last look at the store, as the watcher's next poll takes it
    db = ctx.db()
    live = model_versions.get_live_version(db, "policy")["version"]
    assert server.live_version == live  # the version served is the one the store names
    registered = {v["version"] for v in model_versions.list_versions(db, "policy")}
    loaded = set(server.versions()) - {"base"}
    assert loaded <= registered  # every loaded adapter is registered
    peft = set(getattr(server.model, "peft_config", {}))
    assert peft == loaded  # PEFT holds exactly the adapters of the table: nothing leaked
    assert set(server.merged_versions()) <= loaded and server.provisional_versions() == {}
    *_, (_, answered_by) = server.stream(PROMPT, SHORT)
    assert answered_by == live
