"""User-facing errors: one line, exit code 2, no traceback (see ``dslm.cli.main``)."""


class UsageError(Exception):
    """A user mistake (bad flag, missing or malformed file). The message names the flag or file and
    what was expected; the CLI prints it on one line and exits with status 2."""
