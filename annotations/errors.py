"""Domain errors of the store. Each message says what is wrong and, where it can, how to fix it."""


class AnnotationsError(Exception):
    """Base class: anything the store refuses, with a message a user can act on."""


class ImportFormatError(AnnotationsError):
    """An import file is malformed. The message names the file, the line and the field."""

    def __init__(self, path, line, message, field=None):
        self.path, self.line, self.field = str(path), line, field
        where = f"{path}" + (f", line {line}" if line else "") + (f", field '{field}'" if field else "")
        super().__init__(f"{where}: {message}")


class PermissionDenied(AnnotationsError):
    """The acting user's role does not allow this operation."""


class NotFound(AnnotationsError):
    """A referenced row (user, item, candidate, version) does not exist."""


class InvalidInput(AnnotationsError):
    """A value is out of range or malformed (empty prompt, bad ranking, unknown role...)."""
