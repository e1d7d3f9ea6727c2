"""``earlyexit probes``: truthfulness probes of every layer on the true/false statements.

    earlyexit probes --model smollm2-135m --condition prompted --limit 60 --out results/probes_cli
"""
from __future__ import annotations

import argparse
from pathlib import Path

from earlyexit.cli import subcommand


@subcommand
def _register_probes(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probes", help="train per-layer truthfulness probes (hidden states and lens features)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--condition", default="prompted", choices=["prompted", "bare"],
                   help="the original's 2-shot prompt, or the bare statement")
    p.add_argument("--limit", type=int, default=None, help="statements per topic (default: all)")
    p.add_argument("--kinds", default="hidden,lens", help="comma-separated feature kinds: hidden, lens")
    p.add_argument("--taps", default=None, help="comma-separated tap layers (default: 1/2, 5/8, 3/4 of the depth)")
    p.add_argument("--no-loto", action="store_true", help="skip leave-one-topic-out")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cache-dir", default=None, help="feature cache (default: ~/.cache/earlyexit/features)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for probes_<condition>.json")
    p.set_defaults(func=_run_probes)


def _run_probes(args: argparse.Namespace) -> int:
    from earlyexit.atomic import write_json
    from earlyexit.cli import _parse_layers
    from earlyexit.data import load_true_false
    from earlyexit.features import FeatureSettings, check_kinds, extract_features
    from earlyexit.meta import run_metadata
    from earlyexit.models import load_model
    from earlyexit.probes import SIX_TOPICS, condition_report

    kinds = check_kinds([k.strip() for k in args.kinds.split(",") if k.strip()])
    taps = _parse_layers(args.taps)
    statements = load_true_false(SIX_TOPICS, args.data_dir, args.limit)
    model, tok = load_model(args.model)
    settings = FeatureSettings()
    feats = extract_features(model, tok, statements, args.condition, kinds=kinds, settings=settings,
                             batch_size=args.batch_size, cache_dir=args.cache_dir, progress=True)
    report = condition_report(feats, tok, kinds=kinds, taps=taps, loto=not args.no_loto, seed=args.seed,
                              progress=True)
    meta = run_metadata(model, len(statements), condition=args.condition, limit_per_topic=args.limit,
                        kinds=kinds, features=settings.__dict__, seed=args.seed, cache=feats.stats)
    out = Path(args.out) / f"probes_{args.condition}.json"
    write_json(out, {"meta": meta, **report})
    print(f"{'method':<42} {'kind':<7} {'train acc':>9} {'test acc':>8}  95% CI         {'AUROC':>6}")
    for row in report["original"]["table"]:
        print(f"{row['method']:<42} {row['kind']:<7} {row['train_acc']:9.3f} {row['test_acc']:8.3f}  "
              f"[{row['test_acc_low']:.3f}, {row['test_acc_high']:.3f}] {row['test_auroc']:6.3f}")
    print(f"wrote {out}")
    return 0
