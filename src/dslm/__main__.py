"""`python -m dslm` is the `dslm` command."""
import sys

from dslm.cli import main

sys.exit(main())
