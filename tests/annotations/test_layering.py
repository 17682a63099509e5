"""The store is the innermost layer: importing it must not pull in the ML or web stacks."""

import json
import re
import subprocess
import sys

from tests.conftest import REPO

STORE_MODULES = ("annotations", "annotations.store", "annotations.formats", "annotations.quality", "annotations.__main__")
FORBIDDEN = ("torch", "transformers", "gradio")


def test_import_loads_no_torch_transformers_or_gradio_in_fresh_process():
    script = (
        "import importlib, json, sys\n"
        f"for name in {STORE_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


SQL = re.compile(  # upper case, as the store writes its SQL (prose says "select data from ...")
    r"\b(SELECT\s[^;]{0,400}?\bFROM|INSERT\s+(OR\s+\w+\s+)?INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|"
    r"CREATE\s+(TABLE|INDEX)|ALTER\s+TABLE|PRAGMA)\b")


def sql_strings(path):
    """(line, text) of every string constant in a Python file that reads as SQL."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.search(node.value):
            yield node.lineno, node.value[:80]
        if isinstance(node, ast.Attribute) and node.attr in ("execute", "executemany", "executescript") \
                and not (isinstance(node.value, ast.Name) and node.value.id in ("subprocess", "pool")):
            yield node.lineno, f".{node.attr}(...)"


def test_no_sql_outside_the_store():
    """One door to the store: every query lives in annotations/, behind a function whose name
    says what it returns; app/ and align/ call those."""
    found = [f"{path.relative_to(REPO)}:{line}: {text}"
             for folder in ("app", "align") for path in sorted((REPO / folder).rglob("*.py"))
             for line, text in sql_strings(path)]
    assert found == [], "SQL outside annotations/:\n" + "\n".join(found)


def test_the_sql_finder_finds_sql():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bad.py"
        path.write_text('def f(db):\n    return db.execute("SELECT id FROM users").fetchall()\n')
        assert [line for line, _ in sql_strings(path)] == [2, 2]
