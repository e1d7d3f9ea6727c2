"""``earlyexit lens``: per-layer top tokens and entropy at the last prompt position; the lens viewer."""
from __future__ import annotations

import argparse
import os

from earlyexit.cli.common import (LENS_CHOICES, cli_lens, layer_list, lens_record, nonnegative_int, out_file,
                                  parse_layers, positive_int)
from earlyexit.core.errors import BadInput, OutputPathError
from earlyexit.core.results import LensTable, write_result


def parse_lenses(text: str) -> list[str]:
    """``--lens`` value: one lens or a comma list, each in :data:`LENS_CHOICES`."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in LENS_CHOICES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"--lens takes {', '.join(LENS_CHOICES)} (or a comma list), got {text!r}")
    return names


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lens", help="per-layer top tokens and entropy at the last prompt position")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompt", required=True)
    p.add_argument("--layers", type=layer_list, default=None,
                   help="comma-separated hidden-state entries (default: all 0..L)")
    p.add_argument("--top-k", type=positive_int, default=5)
    p.add_argument("--raw", action="store_true", help="raw lens: head without the final norm (= --lens raw)")
    p.add_argument("--lens", type=parse_lenses, action="append", default=None, metavar="LENS",
                   help=f"lens(es) to compute: {', '.join(LENS_CHOICES)} (tuned: the model's stored tuned lens, "
                        "trained on first use for the embedded models; else `earlyexit tuned-lens train` first); "
                        "repeat or comma-separate for a lens switch in --html (the table, JSON and --png show the first)")
    p.add_argument("--json", default=None, help="write the table as JSON to this file")
    p.add_argument("--html", default=None, metavar="OUT",
                   help="write the interactive, self-contained lens viewer (tokens × layers) to this file")
    p.add_argument("--png", default=None, metavar="OUT",
                   help="write the static grid figure to OUT (.png) and beside it as .pdf")
    p.add_argument("--generate", type=nonnegative_int, default=0, metavar="N",
                   help="extend the prompt by N greedy tokens before reading the lens (viewer and figure)")
    p.set_defaults(func=_run_lens)


def _run_lens(args: argparse.Namespace) -> int:
    from earlyexit.core.lens import lens_stats
    from earlyexit.core.meta import run_metadata
    from earlyexit.core.models import load_model

    layers = parse_layers(args.layers)
    lenses = [x for group in (args.lens or []) for x in group]
    if args.raw or not lenses:
        lenses.append("raw" if args.raw else "normed")
    lenses = list(dict.fromkeys(lenses))
    if not args.prompt.strip():
        raise BadInput("--prompt is empty: give some text to read the lens on.")
    outs = [(o, v) for o, v in (("--json", args.json), ("--html", args.html), ("--png", args.png)) if v]
    for option, path in outs:  # before the model loads
        out_file(path, option=option, kind=LensTable.KIND if option == "--json" else None)
    if len({os.path.realpath(v) for _, v in outs}) < len(outs):
        raise OutputPathError(f"{' and '.join(o for o, _ in outs)} name the same file: give each its own.")
    model, tok = load_model(args.model)
    resolved = {name: cli_lens(model, name) for name in lenses}  # a missing tuned lens fails here, before the work
    if args.html or args.png or args.generate:
        from earlyexit.view import lens_view

        view = lens_view(model, tok, args.prompt, lens=lenses, max_new_tokens=args.generate, layers=layers,
                         top_k=args.top_k)
        results, pos = view.results, view.data["generated_from"] - 1  # the last prompt position
        if args.generate:
            n = view.data["generated_from"]
            print(f"generated: {tok.decode(view.data['token_ids'][n:])!r}")
        if args.html:
            view.save(args.html)
            print(f"wrote {args.html} ({len(view.html.encode()) / 1024:.0f} KiB)")
        if args.png:
            for path in view.save_figure(args.png):
                print(f"wrote {path}")
    else:
        results = {name: lens_stats(model, tok, [args.prompt], layers=layers, lens=name, top_k=args.top_k)
                   for name in lenses}
        pos = 0
    by_lens = {name: _table_rows(r, tok, pos) for name, r in results.items()}
    lens, rows = next(iter(by_lens.items()))
    if args.json:
        out = {"prompt": args.prompt, "lens": lens,
               "meta": run_metadata(model, 1, **lens_record(resolved[lens]), top_k=args.top_k,
                                    **({"lenses": {n: lens_record(x) for n, x in resolved.items()}}
                                       if len(resolved) > 1 else {})),
               "layers": rows}
        if len(by_lens) > 1:
            out["lenses"] = by_lens
        write_result(args.json, LensTable.KIND, out)
        print(f"wrote {args.json}")
    elif not (args.html or args.png):
        for name, rows in by_lens.items():
            if len(by_lens) > 1:
                print(f"lens: {name}")
            print(f"{'layer':>5}  {'entropy':>7}  top-{args.top_k} tokens (probability)")
            for row in rows:
                toks = "  ".join(f"{t!r} {p:.3f}" for t, p in zip(row["top_tokens"], row["top_probs"]))
                print(f"{row['layer']:>5}  {row['entropy']:7.3f}  {toks}")
    return 0


def _table_rows(r, tok, pos: int) -> list[dict]:
    """One row per hidden-state entry of ``r`` (one prompt) at position index ``pos``."""
    rows = []
    for e_i, entry in enumerate(r.layers):
        ids = r.top_ids[0, e_i, pos].tolist()
        rows.append({
            "layer": entry,
            "entropy": float(r.entropy[0, e_i, pos]),
            "top_tokens": [tok.decode([t]) for t in ids],
            "top_ids": ids,
            "top_probs": [float(p) for p in r.top_probs[0, e_i, pos]],
        })
    return rows
