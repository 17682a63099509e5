"""Folders written whole or not at all: what the exports (a dataset, a model version) write into.

`write_folder(out)` hands out a temporary folder beside `out` (same filesystem, so the final
rename is atomic); when the block ends without an error the folder is renamed to `out`, and on
any error it is removed. A reader of `out` therefore sees nothing, the old folder, or the new
one whole, never half an export. An existing non-empty `out` is refused unless `force`; then
the old folder is moved aside, the new one renamed into place, and only then the old removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from annotations.errors import InvalidInput


def check_target(out: Path, force: bool = False) -> Path:
    """`out` resolved, or InvalidInput if it is a file, or a non-empty folder and not `force`."""
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise InvalidInput(f"{out} is a file, not a folder: choose a folder to export into")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InvalidInput(f"{out} is not empty: choose a new folder, or pass --force to replace it")
    return out


@contextlib.contextmanager
def write_folder(out, force: bool = False) -> Iterator[Path]:
    """A temporary folder to fill; it becomes `out` when the block ends without error."""
    out = check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        old = None
        if out.is_dir() and any(out.iterdir()):
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        try:
            os.replace(staging, out)  # onto an empty folder or no folder: atomic
        except BaseException:
            if old is not None:
                os.replace(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
