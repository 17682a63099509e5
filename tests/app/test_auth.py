"""Failed logins are slowed down: after five wrong passwords for a name, every attempt for it,
even with the right password, is refused for a time that doubles with each further failure."""

import time
from types import SimpleNamespace

import httpx
import pytest

from annotations import store
from app import auth
from app.auth import FREE_FAILURES, MAX_BACKOFF_SECONDS, Authenticator
from tests.app.conftest import wait_until


@pytest.fixture
def clock(monkeypatch):
    """A fake wall clock for app.auth only (not for the process), moved by hand."""
    now = [1_000_000.0]
    monkeypatch.setattr(auth, "time", SimpleNamespace(time=lambda: now[0]))
    return now


@pytest.fixture
def authenticator(db):
    store.add_user(db, "carol", "annotator", "carol-password")
    return Authenticator(lambda: db)


def fail(authenticator, times: int, name: str = "carol") -> None:
    for _ in range(times):
        assert not authenticator.check_login(name, "wrong password")


def test_five_wrong_passwords_are_free(authenticator, clock):
    fail(authenticator, FREE_FAILURES - 1)
    assert authenticator.check_login("carol", "carol-password")


def test_after_five_wrong_passwords_the_right_one_is_refused_until_the_wait_is_over(authenticator, clock):
    fail(authenticator, FREE_FAILURES)
    assert authenticator.locked_for("carol") == 1.0
    assert not authenticator.check_login("carol", "carol-password")
    clock[0] += 1.0
    assert authenticator.check_login("carol", "carol-password")
    assert authenticator.locked_for("carol") == 0.0  # a success clears the count


def test_the_wait_doubles_with_each_further_failure_up_to_a_cap(authenticator, clock):
    waits = []
    for _ in range(14):
        fail(authenticator, 1)
        waits.append(authenticator.locked_for("carol"))
        clock[0] += waits[-1]  # each attempt comes once the previous wait is over
    assert waits[:FREE_FAILURES - 1] == [0.0] * (FREE_FAILURES - 1)
    assert waits[FREE_FAILURES - 1:FREE_FAILURES + 4] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert max(waits) == MAX_BACKOFF_SECONDS


def test_attempts_during_the_wait_do_not_check_the_password(authenticator, clock, monkeypatch):
    fail(authenticator, FREE_FAILURES)
    checked = []
    monkeypatch.setattr(store, "authenticate", lambda *args: checked.append(args))
    assert not authenticator.check_login("carol", "anything")
    assert checked == []  # refused at once: no Argon2 work for an attacker to spend


def test_one_name_under_attack_does_not_lock_out_another(authenticator, db, clock):
    store.add_user(db, "dave", "annotator", "dave-password")
    fail(authenticator, FREE_FAILURES + 3)
    assert authenticator.check_login("dave", "dave-password")


def test_login_over_http_is_refused_after_five_wrong_passwords_then_allowed_again(running_app):
    store.add_user(running_app.db(), "erin", "annotator", "erin-password")
    with httpx.Client(base_url=running_app.url, timeout=30) as client:
        def login(password):
            return client.post("login", data={"username": "erin", "password": password}).status_code

        assert [login("wrong password") for _ in range(FREE_FAILURES)] == [400] * FREE_FAILURES
        refused_at = time.monotonic()
        assert login("erin-password") == 400  # right password, refused during the 1 s wait
        assert time.monotonic() - refused_at < 1.0
        wait_until(lambda: login("erin-password") == 200, timeout=10, interval=0.3, message="the wait to pass")
