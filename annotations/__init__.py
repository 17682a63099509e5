"""The rankloop store: SQLite through sqlite-utils. Imports neither torch, transformers nor gradio."""

from annotations.db import default_db_path, open_db
from annotations.errors import (
    AnnotationsError,
    ImportFormatError,
    InvalidInput,
    NotFound,
    PermissionDenied,
)

__all__ = [
    "AnnotationsError",
    "ImportFormatError",
    "InvalidInput",
    "NotFound",
    "PermissionDenied",
    "default_db_path",
    "open_db",
]
