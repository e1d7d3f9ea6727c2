"""Feature extraction for the probes: batched against batch 1, and a warm cache against a cold one.

Both sides run in the same process on the same statements (the first ``--n`` city statements),
the same condition and both feature kinds (residual stream and projected lens log-probabilities):

- ``batch_speedup``: seconds per statement at batch 1 ÷ at ``--batch-size``, no cache. Batched
  runs share the 2-shot primer (computed once per batch, see ``earlyexit.core.prefix``); a batch of
  one runs its whole prompt. Target ≥ 3.
- ``warm_fraction``: a second call on a warm cache ÷ the first call on an empty cache (which runs
  the model and writes the chunk files). Target < 0.1.

Each timing is the best of ``--repeats`` runs (the cold run needs a fresh cache each time).

    python bench/features.py                     # writes results/bench_features.json
    python bench/features.py --n 32 --repeats 1
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--condition", default="prompted", choices=["prompted", "bare"])
    ap.add_argument("--n", type=int, default=64, help="statements (city statements, in file order)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    ap.add_argument("--out", default=str(REPO / "results" / "bench_features.json"))
    args = ap.parse_args(argv)

    from earlyexit import load_model, load_true_false
    from earlyexit.core.atomic import write_json
    from earlyexit.studies.features import extract_features
    from earlyexit.core.meta import run_metadata

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    statements = load_true_false(["cities"], limit_per_topic=args.n)

    def run(batch_size: int, cache_dir=None, use_cache=False):
        return extract_features(model, tok, statements, args.condition, batch_size=batch_size,
                                cache_dir=cache_dir, use_cache=use_cache, chunk_size=args.n)

    run(args.batch_size)  # warm-up (weights paged in, the projection matrix built)
    batched, single = [], []
    for _ in range(args.repeats):  # alternate the two sides
        batched.append(_timed(lambda: run(args.batch_size)))
        single.append(_timed(lambda: run(1)))
    cold, warm = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as d:
            cold.append(_timed(lambda: run(args.batch_size, d, True)))
            warm_feats = None

            def read():
                nonlocal warm_feats
                warm_feats = run(args.batch_size, d, True)

            warm.append(_timed(read))
            if warm_feats.stats["misses"] != 0:
                raise RuntimeError(f"the warm run missed the cache: {warm_feats.stats}")
    n = len(statements)
    out = {
        "batch_speedup": min(single) / min(batched),
        "warm_fraction": min(warm) / min(cold),
        "seconds_per_statement": {"batched": min(batched) / n, "batch_1": min(single) / n},
        "raw": {"batched_s": batched, "batch_1_s": single, "cold_s": cold, "warm_s": warm},
        "targets": {"batch_speedup": ">= 3", "warm_fraction": "< 0.1"},
        "meta": run_metadata(model, n, condition=args.condition, batch_size=args.batch_size, repeats=args.repeats,
                             threads=args.threads, kinds=["hidden", "lens"]),
    }
    write_json(args.out, out)
    print(f"{args.model}, {n} {args.condition} statements, {args.threads} thread(s)")
    print(f"batched (batch {args.batch_size}): {out['seconds_per_statement']['batched']:.3f} s/statement; "
          f"batch 1: {out['seconds_per_statement']['batch_1']:.3f} s/statement -> batch_speedup "
          f"{out['batch_speedup']:.2f}x (target >= 3)")
    print(f"cold cache {min(cold):.2f} s, warm cache {min(warm):.3f} s -> warm_fraction {out['warm_fraction']:.4f} "
          "(target < 0.1)")
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
    sys.exit(0)
