"""Cleaning up after workers that died mid-round."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from align.models import VersionDir

logger = logging.getLogger(__name__)

def recover_interrupted(db, home: Path) -> dict:
    """Clean up after processes that died mid-round: fail their rounds, delete their staging
    folders, and delete version folders that were renamed into place but never registered.
    Folders of rounds running now (in live processes) are left alone."""
    from annotations.model_versions import list_versions
    from annotations.round_records import fail_stale_rounds, running_versions

    versions = VersionDir(Path(home) / "versions")
    failed = fail_stale_rounds(db)
    busy = running_versions(db)
    swept = versions.sweep_staging(keep=busy)
    registered = {v["version"] for v in list_versions(db)}
    orphans = []
    if versions.root.exists():
        import re

        for path in versions.root.iterdir():
            name = path.name
            if path.is_dir() and re.fullmatch(r"(v|rm)\d+", name) and name not in registered and name not in busy:
                shutil.rmtree(path, ignore_errors=True)
                orphans.append(path)
    for what, items in (("failed stale rounds", failed), ("removed staging folders", swept),
                        ("removed unregistered version folders", orphans)):
        if items:
            logger.warning("%s: %s", what, ", ".join(map(str, items)))
    return {"failed_rounds": failed, "swept": swept, "orphans": orphans}
