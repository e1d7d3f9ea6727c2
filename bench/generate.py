"""Benchmark: TruthfulQA generation with per-token lens statistics, batch 16 vs batch 1, side by side.

    python bench/generate.py                      # 16 questions, 2 threads → results/bench_generate.json
    python bench/generate.py --n 32 --threads 2

Batch 16 is the project's way (left padding, the 6-shot primer prefilled once and reused, per-sequence
stop). Batch 1 is the original's way: one question at a time with the whole prompt. Both record the
lens entropy / top-1 / token probability of every generated token at every layer, on the same questions.
Each side runs in its own subprocess, so its peak resident memory (``ru_maxrss``, which sees torch's
allocations) is its own; the model's RSS right after loading is reported beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from earlyexit import generate_with_lens, load_model, load_truthfulqa
    from earlyexit.prompts import truthfulqa_prompt

    model, tok = load_model(args.model)
    prompts = [truthfulqa_prompt(it.question) for it in load_truthfulqa(args.data_dir, args.n)]
    rss_loaded = _rss_mib()
    t0 = time.perf_counter()
    gens = generate_with_lens(model, tok, prompts, max_new_tokens=args.max_new_tokens, stop=("\nQ:",),
                              batch_size=args.batch_size, share_prefix=args.share_prefix, top_k=5)
    wall = time.perf_counter() - t0
    tokens = sum(len(g.token_ids) for g in gens)
    print(json.dumps({
        "batch_size": args.batch_size, "share_prefix": args.share_prefix, "threads": torch.get_num_threads(),
        "seconds": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
        "rss_after_load_mib": rss_loaded,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "token_ids": [g.token_ids for g in gens],
    }))


def run_side(args: argparse.Namespace, batch_size: int, share_prefix: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--n", str(args.n), "--threads",
           str(args.threads), "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(batch_size)]
    if share_prefix:
        cmd.append("--share-prefix")
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    load = os.getloadavg()[0]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark worker failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["load_average_1min_before"] = load
    res["load_average_1min_after"] = os.getloadavg()[0]
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n", type=int, default=16, help="questions (the first n of TruthfulQA)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=120)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=str(REPO / "results" / "bench_generate.json"))
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. other jobs running)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--share-prefix", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.n < 1:
        raise SystemExit("--n must be ≥ 1")

    from earlyexit.atomic import write_json
    from earlyexit.meta import run_metadata

    batched = run_side(args, 16, share_prefix=True)
    single = run_side(args, 1, share_prefix=False)
    same = sum(a == b for a, b in zip(batched.pop("token_ids"), single.pop("token_ids")))
    speedup = batched["tokens_per_s"] / single["tokens_per_s"]
    result = {
        "speedup": speedup,
        "same_tokens": f"{same} of {args.n} answers token-for-token identical",
        "batch16": batched,
        "batch1_original_way": single,
        "cpu_count": os.cpu_count(),
        "note": args.note or "load averages show other processes sharing the CPUs during each side",
        "meta": run_metadata(args.model, args.n, threads=args.threads, max_new_tokens=args.max_new_tokens,
                             stop="\\nQ:", lens="normed", top_k=5,
                             sides="batch 16 with the shared primer prefilled once vs batch 1, whole prompt each"),
    }
    write_json(args.out, result)
    for name, r in (("batch 16", batched), ("batch 1 ", single)):
        print(f"{name}: {r['tokens']} tokens in {r['seconds']:.1f} s = {r['tokens_per_s']:.2f} tokens/s, "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB (after load {r['rss_after_load_mib']:.0f} MiB), "
              f"load avg {r['load_average_1min_before']:.1f}")
    print(f"speedup (tokens/s, batch 16 / batch 1): {speedup:.2f}x; {result['same_tokens']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
