"""The ``earlyexit`` command line: one module per command, listed in :data:`COMMANDS`."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

# Each module has ``register(subparsers)``, which adds its subcommand and sets ``func``.
COMMANDS = ("earlyexit.cli.lens", "earlyexit.cli.entropy", "earlyexit.cli.probes", "earlyexit.cli.truthfulqa")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="earlyexit",
        description="Look inside a language model's layers: logit lens, entropy study, probes, DoLa and TruthfulQA.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, IndexError, FileNotFoundError, ModuleNotFoundError) as err:
        print(f"earlyexit {args.command}: error: {err}", file=sys.stderr)
        return 2
