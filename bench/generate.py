"""Benchmark: TruthfulQA generation with per-token lens statistics, batch 16 vs batch 1, side by side.

    python bench/generate.py                      # 16 questions, 2 threads, 3 repeats → results/bench_generate.json
    python bench/generate.py --n 32 --threads 2 --repeats 5

Batch 16 is the project's way (left padding, the 6-shot primer prefilled once and reused, per-sequence
stop). Batch 1 is the original's way: one question at a time with the whole prompt. Both record the
lens entropy / top-1 / token probability of every generated token at every layer, on the same questions.
Each side runs in its own subprocess, so its peak resident memory (``ru_maxrss``, which sees torch's
allocations) is its own; the model's RSS right after loading is reported beside it. The sides alternate
over ``--repeats`` runs and the speedup is the ratio of their median tokens/s.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
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
    from earlyexit.studies.prompts import truthfulqa_prompt

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
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each side (medians are reported)")
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
    if args.n < 1 or args.repeats < 1:
        raise SystemExit("--n and --repeats must be ≥ 1")

    from earlyexit.core.atomic import write_json
    from earlyexit.core.meta import run_metadata

    runs: dict[str, list[dict]] = {"batch16": [], "batch1": []}
    sides = [("batch16", 16, True), ("batch1", 1, False)]
    for r in range(args.repeats):  # alternate the order: a machine whose speed drifts favours neither side
        for name, bs, share in (sides if r % 2 == 0 else sides[::-1]):
            res = run_side(args, bs, share_prefix=share)
            runs[name].append(res)
            print(f"repeat {r + 1}/{args.repeats} {name}: {res['tokens']} tokens in {res['seconds']:.1f} s = "
                  f"{res['tokens_per_s']:.2f} tokens/s (load avg {res['load_average_1min_before']:.1f})", flush=True)
    ids = {name: [rr.pop("token_ids") for rr in rs] for name, rs in runs.items()}
    same = sum(a == b for a, b in zip(ids["batch16"][0], ids["batch1"][0]))
    med = {name: statistics.median(rr["tokens_per_s"] for rr in rs) for name, rs in runs.items()}
    speedup = med["batch16"] / med["batch1"]
    per_repeat = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs["batch16"], runs["batch1"])]
    batched, single = runs["batch16"][0], runs["batch1"][0]
    result = {
        "speedup": speedup,
        "speedup_per_repeat": per_repeat,
        "median_tokens_per_s": med,
        "same_tokens": f"{same} of {args.n} answers token-for-token identical",
        "batch16": runs["batch16"],
        "batch1_original_way": runs["batch1"],
        "cpu_count": os.cpu_count(),
        "note": args.note or "load averages show other processes sharing the CPUs during each side",
        "meta": run_metadata(args.model, args.n, threads=args.threads, max_new_tokens=args.max_new_tokens,
                             stop="\\nQ:", lens="normed", top_k=5, repeats=args.repeats,
                             sides="batch 16 with the shared primer prefilled once vs batch 1, whole prompt each"),
    }
    write_json(args.out, result)
    for name, r in (("batch 16", batched), ("batch 1 ", single)):
        print(f"{name}: peak RSS {r['peak_rss_mib']:.0f} MiB (after load {r['rss_after_load_mib']:.0f} MiB)")
    print(f"speedup (median tokens/s, batch 16 / batch 1, {args.repeats} alternating repeats): {speedup:.2f}x "
          f"(per repeat {', '.join(f'{x:.2f}' for x in per_repeat)}); {result['same_tokens']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
