"""Benchmark: per-layer entropy and top-k over all layers and positions, ours vs the naive way.

The naive way (the original notebooks): the head applied to every layer's hidden states at every
position, the full softmax kept for all layers, then entropy and top-k from those tensors.
Ours: :func:`earlyexit.lens_stats` with ``positions="all"`` (chunked, nothing vocabulary-sized kept).

Both run on the same TruthfulQA prompts (6-shot primer), each in a fresh subprocess so that peak
memory (ru_maxrss) is its own; the order alternates over repeats and medians are reported.

    python bench/lens.py [--prompts 4] [--repeats 3] [--threads 2]
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


def _worker(method: str, n_prompts: int, threads: int, top_k: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from earlyexit import load_model, load_truthfulqa, lens_stats
    from earlyexit.core.batching import encode_prompts, pad_id
    from earlyexit.core.prefix import prefill
    from earlyexit.core.lenses import get_unembed
    from earlyexit.studies.prompts import truthfulqa_prompt

    model, tok = load_model("smollm2-135m", device="cpu")
    prompts = [truthfulqa_prompt(q.question) for q in load_truthfulqa(limit=n_prompts)]
    unembed = get_unembed(model)
    L = unembed.n_layers
    with torch.no_grad():  # warm-up: one small pass of each kind
        lens_stats(model, tok, prompts[:1], positions="last")
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if method == "ours":
        r = lens_stats(model, tok, prompts, positions="all", top_k=top_k, batch_size=len(prompts))
        last = int(r.valid[0].sum()) - 1  # prompt 0's last real position
        entropy, top_ids = r.entropy[:, :, : last + 1], r.top_ids[:, :, : last + 1]
        n_positions = int(r.valid.sum())
    else:
        with torch.no_grad():
            batch = prefill(model, encode_prompts(tok, prompts, model), pad_id(tok), share_prefix=False,
                            output_hidden_states=True, keep_suffix=True, suffix_logits=False)
            hs = batch.suffix_hidden
            probs = []
            for e in range(L + 1):  # head per layer on every position, full softmax kept
                logits = unembed(hs[e], normed=e < L)
                probs.append(torch.softmax(logits, dim=-1))
            probs = torch.stack(probs, dim=1)  # [B, L+1, T, V]
            entropy = -(probs * torch.log(probs.clamp_min(1e-45))).sum(-1)
            top_ids = probs.topk(top_k, dim=-1).indices
            n_positions = int(sum(batch.lengths))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"method": method, "seconds": seconds, "peak_rss_mb": peak / 1024, "base_rss_mb": base_rss / 1024,
            "extra_peak_mb": (peak - base_rss) / 1024, "positions": n_positions, "layers": L + 1,
            "checksum_entropy_last": float(entropy[0, -1, -1]), "top1_last": int(top_ids[0, -1, -1, 0])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4, help="the naive way needs ~4 GB per prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "results" / "bench_lens.json"))
    parser.add_argument("--worker", choices=["ours", "naive"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.prompts, args.threads, args.top_k)))
        return 0

    runs: dict[str, list[dict]] = {"ours": [], "naive": []}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for rep in range(args.repeats):
        for method in (("ours", "naive") if rep % 2 == 0 else ("naive", "ours")):
            cmd = [sys.executable, __file__, "--worker", method, "--prompts", str(args.prompts),
                   "--threads", str(args.threads), "--top-k", str(args.top_k)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            runs[method].append(res)
            print(f"repeat {rep}: {method:5s} {res['seconds']:7.2f} s, extra peak {res['extra_peak_mb']:8.0f} MB",
                  flush=True)
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "extra_peak_mb", "peak_rss_mb")}
           for m, rs in runs.items()}
    agree = all(abs(a["checksum_entropy_last"] - b["checksum_entropy_last"]) < 1e-3 and a["top1_last"] == b["top1_last"]
                for a, b in zip(runs["ours"], runs["naive"]))
    speedup = med["naive"]["seconds"] / med["ours"]["seconds"]
    memory_ratio = med["naive"]["extra_peak_mb"] / med["ours"]["extra_peak_mb"]
    from earlyexit.core.atomic import write_json
    from earlyexit.core.meta import run_metadata

    result = {
        "speedup": speedup,
        "memory_ratio": memory_ratio,
        "memory_ratio_total_rss": med["naive"]["peak_rss_mb"] / med["ours"]["peak_rss_mb"],
        "median": med,
        "runs": runs,
        "results_agree": agree,
        "meta": run_metadata("smollm2-135m", args.prompts, threads=args.threads, repeats=args.repeats,
                             top_k=args.top_k, positions=runs["ours"][0]["positions"],
                             layers=runs["ours"][0]["layers"],
                             memory="extra_peak_mb = ru_maxrss after the lens minus ru_maxrss after model load "
                                    "and warm-up, in a fresh process per run"),
    }
    write_json(args.out, result)
    print(f"speedup (naive time / ours): {speedup:.2f}x")
    print(f"peak-memory ratio (naive / ours, memory added by the lens): {memory_ratio:.1f}x "
          f"(total RSS: {result['memory_ratio_total_rss']:.1f}x)")
    print(f"results agree: {agree}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
