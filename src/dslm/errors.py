"""User-facing errors: one line, no traceback (see ``dslm.cli.main``)."""
from __future__ import annotations

import re

_FIELD = re.compile(r"\{([a-z][a-z0-9_]*)\}")


class UsageError(Exception):
    """A user mistake (bad flag, missing or malformed file). The message names the flag or file and
    what was expected; the CLI prints it on one line and exits with status 2."""


class ConfigError(UsageError):
    """An impossible value of a configuration field, raised by the library. The message names fields
    as ``{field_name}`` placeholders: ``str()`` shows the field (``micro_batch``, what a Python user
    set) and :meth:`for_cli` the command-line flag (``--micro-batch``, what a CLI user typed)."""

    def __init__(self, template: str):
        self.template = template
        super().__init__(_FIELD.sub(lambda m: m.group(1), template))

    def for_cli(self) -> str:
        return _FIELD.sub(lambda m: "--" + m.group(1).replace("_", "-"), self.template)
