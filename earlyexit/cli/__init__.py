"""The ``earlyexit`` command line: one module per command, listed in :data:`COMMANDS`."""
from __future__ import annotations

import argparse
import csv
import importlib
import os
import sys
from typing import Sequence

from earlyexit.core.errors import EarlyexitError

# Each module has ``register(subparsers)``, which adds its subcommand and sets ``func``.
COMMANDS = ("earlyexit.cli.lens", "earlyexit.cli.entropy", "earlyexit.cli.probes", "earlyexit.cli.truthfulqa",
            "earlyexit.cli.tuned_lens")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="earlyexit",
        description="Look inside a language model's layers: logit lens, entropy study, probes, DoLa and TruthfulQA.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


# ordinary mistakes that surface as builtin errors (a file that is a folder, a bad JSON file, a missing key):
# one line and exit code 2 like an EarlyexitError, not a traceback
ORDINARY = (ValueError, TypeError, IndexError, KeyError, OSError, ImportError, csv.Error)


def error_line(err: BaseException) -> str:
    """The one line an error is printed as: its message, with the kind of error where the message alone
    would not say it (a ``KeyError``'s bare key, an ``OSError`` without its text)."""
    if isinstance(err, EarlyexitError):
        return str(err)
    text = str(err).strip()
    if isinstance(err, KeyError):
        return f"missing key {text} (a file or a setting lacks a field it needs)"
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror}" + (f" (and {err.filename2})" if err.filename2 else "")
    text = " ".join(text.split())  # one line
    return text if text and not isinstance(err, (TypeError, ImportError)) else f"{type(err).__name__}: {text}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Bad input (an :class:`~earlyexit.core.errors.EarlyexitError`, or an ordinary
    ``OSError``/``ValueError``/``KeyError``…) prints ONE line on stderr and returns 2; Ctrl-C prints one line
    and returns 130; anything else (a bug) prints one line naming it and returns 1. Set
    ``EARLYEXIT_DEBUG=1`` for the traceback. Argument errors exit through argparse (code 2, usage line)."""
    try:
        parser = build_parser()  # imports torch: Ctrl-C may come here too
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("\nearlyexit: interrupted", file=sys.stderr)
        return 130
    where = " ".join(x for x in (args.command, getattr(args, "truthfulqa_command", None),
                                 getattr(args, "tuned_command", None)) if x)
    debug = os.environ.get("EARLYEXIT_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"\nearlyexit {where}: interrupted (nothing half-written is left behind; rerun to resume)",
              file=sys.stderr)
        return 130
    except (EarlyexitError, *ORDINARY) as err:
        if debug:
            raise
        print(f"earlyexit {where}: error: {error_line(err)}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except Exception as err:  # a bug, not a bad input: still one line, and how to see more
        if debug:
            raise
        print(f"earlyexit {where}: internal error: {type(err).__name__}: {' '.join(str(err).split())} "
              "(rerun with EARLYEXIT_DEBUG=1 for the traceback, and report it)", file=sys.stderr)
        return 1
