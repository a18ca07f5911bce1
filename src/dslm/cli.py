"""The ``dslm`` command: one subcommand per job.

Each job lives in its own module that defines ``add_arguments(parser)`` and ``run(args) -> int``
(its docstring is the subcommand's description); this file only lists them with a one-line help. A :class:`dslm.errors.UsageError` (or an argparse
error) becomes a single ``dslm <job>: error: ...`` line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from dslm.errors import ConfigError, UsageError

# subcommand -> (module implementing it, one-line help); a module is imported only when its
# subcommand runs, so a slow or broken import never affects another job.
COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("dslm.sim.command", "simulate transformer components and compare their moments with the theory"),
    "approximations": ("dslm.sim.approximations", "plot the exact ReLU / FFN correlation maps against their approximations"),
    "prepare-data": ("dslm.data.command", "prepare a pretraining dataset: text source -> WordPiece vocab -> token store"),
    "figures": ("dslm.figures", "signal-propagation figures: probe a deep BERT at init and overlay the theory's prediction"),
    "pretrain": ("dslm.pretrain.command", "pretrain BERT (MLM + binary head) or a GPT decoder (next-token LM) "
                                          "with the dslm training engine"),
    "finetune": ("dslm.finetune.command", "finetune a pretrained BERT on MNLI, QQP, RACE or the shipped demo task"),
    "finetune-sweep": ("dslm.finetune.sweep", "run a finetuning lr x seed sweep and write its results table"),
    "study": ("dslm.study.command", "run a pretraining study (shapes x schemes x lrs x seeds) and its results"),
}


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints the usage block before an error; we print one line (exit 2)."""

    def error(self, message: str):  # noqa: D102 - argparse hook
        raise UsageError(message)


def _build(argv: list[str]) -> tuple[argparse.ArgumentParser, str | None]:
    parser = _OneLineParser(prog="dslm", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineParser)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        if name == chosen:
            module = importlib.import_module(module_name)
            p = sub.add_parser(name, help=help_text, description=module.__doc__,
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
        else:
            sub.add_parser(name, help=help_text)
    return parser, chosen


def _version() -> str:
    from dslm import __version__

    return f"dslm {__version__}"


# OS errors that name a path a command was given: one line, not a traceback
_PATH_ERRORS = (PermissionError, FileExistsError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def _user_error(e: BaseException) -> str | None:
    """The one line for an error a user's input causes (a path that cannot be read or written, sizes
    beyond memory), or None for anything else (a bug: its traceback is shown)."""
    if isinstance(e, _PATH_ERRORS):
        return f"{e.strerror or e}: {e.filename}" if e.filename else str(e)
    oom = isinstance(e, MemoryError) or "can't allocate memory" in str(e) or type(e).__name__ == "OutOfMemoryError"
    if oom:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "MemoryError"
        return f"out of memory ({first[:160]}); choose smaller sizes (layers, width, batch or micro-batch)"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "dslm"
    try:
        parser, chosen = _build(argv)
        if chosen is not None and chosen in COMMANDS:
            prog = f"dslm {chosen}"
        args = parser.parse_args(argv)
        if getattr(args, "_run", None) is None:
            parser.print_help()
            return 0 if not argv else 2
        return int(args._run(args) or 0)
    except UsageError as e:
        print(f"{prog}: error: {e.for_cli() if isinstance(e, ConfigError) else e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (OSError, MemoryError, RuntimeError) as e:
        message = None if os.environ.get("DSLM_DEBUG") else _user_error(e)
        if message is None:
            raise
        print(f"{prog}: error: {message} (DSLM_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


def entry() -> None:
    """The console script and ``python -m dslm``: :func:`main`, then exit (see
    :func:`dslm.train.distributed.exit_process` for runs under torchrun)."""
    code = main()
    if "dslm.train.distributed" in sys.modules:
        from dslm.train.distributed import exit_process

        code = exit_process(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
