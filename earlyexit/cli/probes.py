"""``earlyexit probes``: truthfulness probes of every layer on the true/false statements.

    earlyexit probes --model smollm2-135m --condition prompted --limit 60 --out results

Writes ``probes_<model>.json``, the same file (same function, same layout) as ``classifier.ipynb``.
"""
from __future__ import annotations

import argparse

from earlyexit.cli.common import LENS_CHOICES, layer_list, out_dir, positive_int


def _conditions(text: str) -> list[str]:
    from earlyexit.reports.probes import CONDITIONS

    out = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in out if c not in CONDITIONS]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"--condition takes some of {', '.join(CONDITIONS)} (comma-separated), "
                                         f"got {text!r}")
    return out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probes", help="train per-layer truthfulness probes (hidden states and lens features)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--condition", type=_conditions, default=["prompted", "bare"],
                   help="prompted (the original's 2-shot prompt), bare (the statement alone), or both: "
                        "prompted,bare (the default, as classifier.ipynb)")
    p.add_argument("--limit", type=int, default=None, help="statements per topic (default: all)")
    p.add_argument("--kinds", default="hidden,lens", help="comma-separated feature kinds: hidden, lens")
    p.add_argument("--loto-kinds", default="hidden", help="feature kinds of leave-one-topic-out (default: hidden)")
    p.add_argument("--taps", type=layer_list, default=None, help="comma-separated tap layers (default: 1/2, 5/8, 3/4 of the depth)")
    p.add_argument("--no-loto", action="store_true", help="skip leave-one-topic-out")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--cache-dir", default=None, help="feature cache (default: ~/.cache/earlyexit/features)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lens", choices=LENS_CHOICES, default="normed",
                   help="the lens of the 'lens' feature (default normed; tuned: the model's stored tuned lens)")
    p.add_argument("--out", required=True, help="folder for probes_<model>.json")
    p.set_defaults(func=_run_probes)


def _run_probes(args: argparse.Namespace) -> int:
    from earlyexit.cli.common import parse_layers
    from earlyexit.core.results import ProbesResults
    from earlyexit.reports import display_path
    from earlyexit.reports.probes import compute, print_table
    from earlyexit.studies.features import check_kinds

    kinds = check_kinds([k.strip() for k in args.kinds.split(",") if k.strip()])
    loto_kinds = check_kinds([k.strip() for k in args.loto_kinds.split(",") if k.strip()])
    out_dir(args.out, files=[(ProbesResults.path(args.out, args.model), ProbesResults.KIND)])  # before the model
    res = compute(args.model, limit=args.limit, data_dir=args.data_dir, conditions=args.condition, kinds=kinds,
                  loto=not args.no_loto, loto_kinds=loto_kinds, taps=parse_layers(args.taps),
                  batch_size=args.batch_size, cache_dir=args.cache_dir, seed=args.seed, lens=args.lens,
                  progress=True)
    out = res.save(ProbesResults.path(args.out, args.model))
    from earlyexit.core.parallel import is_main_process

    if not is_main_process():  # under accelerate launch the main process wrote the file and reports
        return 0
    for condition in res["conditions"]:
        print(f"\n{condition} statements, original split (test on cities):")
        print(print_table(res, condition))
    print(f"wrote {display_path(out)}")
    return 0
