"""`python -m dslm` is the `dslm` command."""
from dslm.cli import entry

entry()
