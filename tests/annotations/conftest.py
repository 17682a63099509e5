"""Fixtures shared by the store tests."""

import pytest

from annotations import open_db
from annotations.store import add_user

PASSWORD = "correct horse battery"
ANNOTATORS = ("ann", "bob", "cat")


@pytest.fixture(scope="session")
def users_template(tmp_path_factory):
    """A store holding three annotators, made once: Argon2 hashing is slow on purpose."""
    db = open_db(tmp_path_factory.mktemp("users") / "users.db")
    for name in ANNOTATORS:
        add_user(db, name, "annotator", PASSWORD)
    yield db
    db.close()


@pytest.fixture
def users(db, users_template):
    """{name: id} for three annotators in the test's own store (a copy of the template)."""
    users_template.conn.backup(db.conn)
    return {name: id_ for id_, name in db.execute("SELECT id, name FROM users").fetchall()}
