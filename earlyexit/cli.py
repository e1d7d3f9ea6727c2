"""The ``earlyexit`` command line. Each subcommand lives in its own ``register_*`` function."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from earlyexit.atomic import write_json

# Other modules add subcommands by appending a ``register(subparsers)`` function here.
REGISTRY: list[Callable[[argparse._SubParsersAction], None]] = []


def subcommand(register: Callable[[argparse._SubParsersAction], None]):
    REGISTRY.append(register)
    return register


def _parse_layers(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated integers, got {text!r}") from None


@subcommand
def _register_lens(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lens", help="per-layer top tokens and entropy at the last prompt position")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompt", required=True)
    p.add_argument("--layers", default=None, help="comma-separated hidden-state entries (default: all 0..L)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--raw", action="store_true", help="raw lens: head without the final norm")
    p.add_argument("--json", default=None, help="write the table as JSON to this file")
    p.set_defaults(func=_run_lens)


def _run_lens(args: argparse.Namespace) -> int:
    from earlyexit.lens import lens_stats
    from earlyexit.meta import run_metadata
    from earlyexit.models import load_model

    layers = _parse_layers(args.layers)
    model, tok = load_model(args.model)
    lens = "raw" if args.raw else "normed"
    r = lens_stats(model, tok, [args.prompt], layers=layers, lens=lens, top_k=args.top_k)
    rows = []
    for e_i, entry in enumerate(r.layers):
        ids = r.top_ids[0, e_i, 0].tolist()
        rows.append({
            "layer": entry,
            "entropy": float(r.entropy[0, e_i, 0]),
            "top_tokens": [tok.decode([t]) for t in ids],
            "top_ids": ids,
            "top_probs": [float(p) for p in r.top_probs[0, e_i, 0]],
        })
    if args.json:
        write_json(args.json, {"prompt": args.prompt, "lens": lens,
                               "meta": run_metadata(model, 1, lens=lens, top_k=args.top_k), "layers": rows})
        print(f"wrote {args.json}")
    else:
        print(f"{'layer':>5}  {'entropy':>7}  top-{args.top_k} tokens (probability)")
        for row in rows:
            toks = "  ".join(f"{t!r} {p:.3f}" for t, p in zip(row["top_tokens"], row["top_probs"]))
            print(f"{row['layer']:>5}  {row['entropy']:7.3f}  {toks}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    parser = argparse.ArgumentParser(
        prog="earlyexit",
        description="Look inside a language model's layers: logit lens, entropy study, probes, DoLa and TruthfulQA.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for register in REGISTRY:
        register(sub)
    return parser


def _load_plugins() -> None:
    """Import the modules that register further subcommands (they are optional while in progress)."""
    import importlib

    for name in ("earlyexit.entropy_cli", "earlyexit.probes_cli", "earlyexit.truthfulqa_cli"):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, IndexError, FileNotFoundError, ModuleNotFoundError) as err:
        print(f"earlyexit {args.command}: error: {err}", file=sys.stderr)
        return 2
