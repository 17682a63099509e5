"""The store is the innermost layer: importing it must not pull in the ML or web stacks."""

import json
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
