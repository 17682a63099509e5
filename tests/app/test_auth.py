"""Failed logins are slowed down: after five wrong passwords for a name, every attempt for it,
even with the right password, is refused for a time that doubles with each further failure."""

import time
from types import SimpleNamespace

import httpx
import pytest

from annotations import store
from app import auth
from app.auth import ADDRESS_FREE_FAILURES, FREE_FAILURES, MAX_BACKOFF_SECONDS, MAX_TRACKED, Authenticator, LockedOut
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
    with pytest.raises(LockedOut, match="try again in 1 s"):
        authenticator.check_login("carol", "carol-password")
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
    with pytest.raises(LockedOut):
        authenticator.check_login("carol", "anything")
    assert checked == []  # refused at once: no Argon2 work for an attacker to spend


def test_one_name_under_attack_does_not_lock_out_another(authenticator, db, clock):
    store.add_user(db, "dave", "annotator", "dave-password")
    fail(authenticator, FREE_FAILURES)
    assert authenticator.locked_for("carol") > 0
    assert authenticator.check_login("dave", "dave-password")


def test_failures_from_elsewhere_do_not_lock_the_owner_out(authenticator, clock):
    for _ in range(FREE_FAILURES):  # someone at another desk keeps guessing carol's password
        assert not authenticator.check_login("carol", "wrong password", address="10.0.0.66")
    assert authenticator.check_login("carol", "carol-password", address="10.0.0.7")
    with pytest.raises(LockedOut):
        authenticator.check_login("carol", "carol-password", address="10.0.0.66")


def test_an_address_trying_many_names_is_slowed_down(authenticator, db, clock):
    for i in range(ADDRESS_FREE_FAILURES):
        assert not authenticator.check_login(f"user{i}", "guess", address="10.0.0.66")
    with pytest.raises(LockedOut):
        authenticator.check_login("carol", "carol-password", address="10.0.0.66")
    assert authenticator.check_login("carol", "carol-password", address="10.0.0.7")


def test_the_failure_table_stays_bounded(authenticator, clock, monkeypatch):
    monkeypatch.setattr(store, "authenticate", lambda *args: None)  # no Argon2: this is about the table
    for i in range(MAX_TRACKED + 50):
        authenticator.check_login(f"name{i}", "x", address=f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
    assert len(authenticator._failures) <= MAX_TRACKED + 1


def test_password_checks_run_one_at_a_time(authenticator, monkeypatch):
    import threading

    running, most = [0], [0]
    lock = threading.Lock()
    real = store.authenticate

    def counting(*args):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            return real(*args)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(store, "authenticate", counting)
    threads = [threading.Thread(target=authenticator.check_login, args=("carol", "wrong", f"10.1.1.{i}"))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1  # eight at once queue for the cores instead of taking both from everyone


def test_login_over_http_is_refused_after_five_wrong_passwords_then_allowed_again(running_app):
    store.add_user(running_app.db(), "erin", "annotator", "erin-password")
    with httpx.Client(base_url=running_app.url, timeout=30) as client:
        def login(password):
            return client.post("login", data={"username": "erin", "password": password}).status_code

        assert [login("wrong password") for _ in range(FREE_FAILURES)] == [400] * FREE_FAILURES
        refused_at = time.monotonic()
        assert login("erin-password") == 429  # right password, refused during the 1 s wait: locked, not "wrong"
        assert time.monotonic() - refused_at < 1.0
        wait_until(lambda: login("erin-password") == 200, timeout=10, interval=0.3, message="the wait to pass")
