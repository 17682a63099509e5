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


@dataclass
class RunningApp:
    url: str
    ctx: object
    home: Path

    def db(self):
        from annotations.db import connect

        return connect(self.home / "rankloop.db")


@pytest.fixture(scope="module")
def running_app(tmp_path_factory, tiny_model_dir):
    import os

    from annotations import store
    from app.server import create_app, launch

    home = tmp_path_factory.mktemp("app-home")
    os.environ["RANKLOOP_ADMIN_USER"], os.environ["RANKLOOP_ADMIN_PASSWORD"] = ADMIN
    try:
        ctx, demo, auth, created = create_app(home, tiny_model_dir, threads=1, prefetch=3)
    finally:
        del os.environ["RANKLOOP_ADMIN_USER"], os.environ["RANKLOOP_ADMIN_PASSWORD"]
    assert created == ADMIN
    for name, password in ANNOTATORS:
        store.add_user(ctx.db(), name, "annotator", password)
    port = free_port()
    launch(demo, auth, "127.0.0.1", port, block=False)
    app = RunningApp(url=f"http://127.0.0.1:{port}/", ctx=ctx, home=home)
    wait_until(lambda: store.count_items(ctx.db(), "ready") >= 2, message="prefetched items")
    yield app
    ctx.prefetcher.stop()
    demo.close()
