"""A launched app (tiny model, temporary store) for API and browser tests."""

import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ADMIN = ("admin", "admin-password-1")
ANNOTATORS = [("alice", "alice-password-1"), ("bob", "bob-password-1")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.1, message: str = "condition"):
    """Poll `predicate` until it returns a truthy value or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


def answer_text(page, letter: str) -> str:
    """The text of answer `letter` ("a".."d") as the annotate page shows it ("" if none), its
    whitespace collapsed (how a browser lays out a tab or a run of spaces varies)."""
    shown = page.locator(f"#answer-{letter} .rankloop-answer")
    return " ".join(shown.inner_text().split()) if shown.count() else ""


@dataclass
class RunningApp:
    url: str
    ctx: object
    home: Path
    demo: object = None

    def close(self):
        from app.server import shutdown

        shutdown(self.ctx, self.demo)

    def db(self):
        from annotations.db import connect

        return connect(self.home / "rankloop.db")


def start_app(home: Path, base: Path, *, mode: str = "pairwise", k: int = 2, prompts: int = 0, prefetch: int = 3,
              worker: bool = False, inference: dict | None = None):
    """Launch the app in this process on a free port; demo prompts are queued when `prompts`
    is 0, else that many numbered prompts as `mode` items with `k` answers."""
    import os

    from annotations import store
    from app.server import create_app, launch
    from app.serving import SamplingParams

    os.environ["RANKLOOP_ADMIN_USER"], os.environ["RANKLOOP_ADMIN_PASSWORD"] = ADMIN
    try:
        ctx, demo, auth, created = create_app(home, base, threads=1, prefetch=prefetch, demo_prompts=not prompts,
                                              worker=worker, inference=inference)
    finally:
        del os.environ["RANKLOOP_ADMIN_USER"], os.environ["RANKLOOP_ADMIN_PASSWORD"]
    assert created == ADMIN
    ctx.prefetcher.sampling = SamplingParams(max_new_tokens=24)
    db = ctx.db()
    # the tiny model seldom ends an answer by itself: sampling cut-off answers again would only
    # triple the generation time of every app test (tests/app/test_prefetch_truncation.py tests it)
    store.set_setting(db, "exclude_truncated", False)
    if prompts:
        ids = [store.add_prompt(db, f"Test question number {i}: what do you think?")[0] for i in range(prompts)]
        store.queue_items(db, ids, mode=mode, k=k)
    for name, password in ANNOTATORS:
        store.add_user(db, name, "annotator", password)
    port = free_port()
    launch(demo, auth, "127.0.0.1", port, block=False, ctx=ctx)
    app = RunningApp(url=f"http://127.0.0.1:{port}/", ctx=ctx, home=home, demo=demo)
    ctx.wake_prefetcher()
    wait_until(lambda: store.count_items(ctx.db(), "ready") >= 2, message="prefetched items")
    return app


@pytest.fixture(scope="module")
def running_app(tmp_path_factory, tiny_model_dir):
    app = start_app(tmp_path_factory.mktemp("app-home"), tiny_model_dir)
    yield app
    app.close()


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    """A PolicyServer over the tiny model (one per test module)."""
    from app.serving import PolicyServer

    return PolicyServer(tiny_model_dir)


@pytest.fixture
def empty_ctx(tmp_path, server):
    """Handler context over a fresh, migrated store and the tiny model's server."""
    from annotations import open_db
    from app import handlers

    from annotations import store

    db = open_db(tmp_path / "rankloop.db")
    store.set_setting(db, "exclude_truncated", False)  # see start_app: the tiny model seldom ends an answer
    db.close()
    return handlers.AppContext(db_path=tmp_path / "rankloop.db", server=server)
