"""An import killed outright (SIGKILL) while it writes leaves all of the file or none of it."""

import json
import os
import signal
import subprocess
import sys
import time

from annotations import open_db, store
from annotations.db import check_db
from tests.conftest import REPO

ROWS = 30_000


def test_import_killed_while_writing_leaves_the_store_as_it_was(tmp_path):
    db_path = tmp_path / "rankloop.db"
    db = open_db(db_path)
    store.add_prompt(db, "already here")
    db.close()
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"prompt number {i}"}) + "\n" for i in range(ROWS)))

    process = subprocess.Popen([sys.executable, "-m", "annotations", "--db", str(db_path), "import", str(source),
                                "--format", "prompts"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wal = tmp_path / "rankloop.db-wal"
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if wal.exists() and wal.stat().st_size > 1_000_000:  # well into the write transaction
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    process.wait(30)
    assert process.returncode == -signal.SIGKILL, "the import finished before it could be killed"

    db = open_db(db_path)
    assert store.count_rows(db, "prompts") == 1 and store.count_rows(db, "items") == 0
    assert check_db(db) == []
    db.close()
