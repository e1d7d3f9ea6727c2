"""DoLa decoding speed against transformers' own greedy ``generate(do_sample=False)``, side by side.

Same prompts (TruthfulQA, 6-shot primer), same batch, same token counts: transformers runs with
``min_new_tokens = max_new_tokens``, ``earlyexit.methods.dola.generate`` with no stop string and
``ignore_eos=True``; the primer is NOT shared or cached for DoLa here (``share_prefix=False``), so
both sides prefill the whole prompt every call. Runs alternate between the two, after a warm-up.

Two figures per model and batch size:
- ``ratio``: DoLa tokens/s ÷ greedy tokens/s of the decoding steps alone, from the time difference
  between a long and a short generation (prefill cancels out) — the per-step cost of DoLa;
- ``ratio_end_to_end``: the same for whole calls of ``--new-tokens`` tokens, prefill included;
- ``ratio_cpu_time``: as ``ratio`` from process CPU time (steadier than wall time on a shared machine
  with ``--threads 1``; with more threads it counts their spinning too).

    python bench/dola.py                      # SmolLM2 batch 1 and 8, Gemma-3-270M batch 1
    python bench/dola.py --runs smollm2-135m:1 --repeats 3
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def parse_runs(spec: str) -> list[tuple[str, int]]:
    """``"smollm2-135m:1,8;gemma3-270m:1"`` → ``[("smollm2-135m", 1), ("smollm2-135m", 8), ...]``."""
    out = []
    for part in spec.split(";"):
        name, sizes = part.split(":")
        out += [(name.strip(), int(b)) for b in sizes.split(",")]
    return out


def write_report(args, results: dict) -> dict:
    from earlyexit.core.atomic import write_json
    from earlyexit.core.meta import run_metadata

    report = {
        "ratio": {m: {b: e["ratio"] for b, e in d.items()} for m, d in results.items()},
        "ratio_end_to_end": {m: {b: e["ratio_end_to_end"] for b, e in d.items()} for m, d in results.items()},
        "ratio_cpu_time": {m: {b: e["ratio_cpu_time"] for b, e in d.items()} for m, d in results.items()},
        "targets": {"smollm2-135m batch 1": 0.85, "gemma3-270m": 0.6},
        "results": results,
        "meta": run_metadata(None, None, runs=args.runs, new_tokens=args.new_tokens, short_tokens=args.short_tokens,
                             repeats=args.repeats, threads=args.threads, dola_layers=args.dola_layers,
                             repetition_penalty=args.repetition_penalty, share_prefix=False, note=args.note,
                             baseline="transformers generate(do_sample=False, min_new_tokens=max_new_tokens)"),
    }
    write_json(args.out, report)
    return report


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="smollm2-135m:1,8;gemma3-270m:1", help="model:batch,batch;model:batch")
    ap.add_argument("--new-tokens", type=int, default=48, help="tokens per sequence of the long run")
    ap.add_argument("--short-tokens", type=int, default=8, help="tokens per sequence of the short run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dola-layers", default="high")
    ap.add_argument("--repetition-penalty", type=float, default=1.2)
    ap.add_argument("--out", default=str(REPO / "results" / "bench_dola.json"))
    ap.add_argument("--note", default=None, help="free text stored with the settings (e.g. machine load)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from earlyexit import load_model
    from earlyexit.core.batching import pad_id
    from earlyexit.studies.data import load_truthfulqa
    from earlyexit.methods.dola import generate
    from earlyexit.studies.prompts import truthfulqa_prompt

    runs = parse_runs(args.runs)
    max_b = max(b for _, b in runs)
    prompts_all = [truthfulqa_prompt(it.question) for it in load_truthfulqa(limit=max_b)]
    n_long, n_short = args.new_tokens, args.short_tokens
    if not 0 < n_short < n_long:
        raise SystemExit("--short-tokens must be between 0 and --new-tokens")
    results: dict[str, dict] = {}
    for name in dict.fromkeys(n for n, _ in runs):
        model, tok = load_model(name)
        tok.padding_side = "left"
        pad = pad_id(tok)

        @torch.no_grad()
        def hf(prompts, n):
            enc = tok(prompts, return_tensors="pt", padding=True)
            t0, c0 = time.perf_counter(), time.process_time()
            seq = model.generate(**enc, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=pad)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            assert seq.shape[1] - enc["input_ids"].shape[1] == n, "transformers generated a different length"
            return dt, dc

        def dola(prompts, n):
            t0, c0 = time.perf_counter(), time.process_time()
            outs = generate(model, tok, prompts, decoding="dola", dola_layers=args.dola_layers,
                            repetition_penalty=args.repetition_penalty, max_new_tokens=n, stop=(),
                            batch_size=len(prompts), share_prefix=False, ignore_eos=True)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            assert all(len(o.token_ids) == n for o in outs), "DoLa generated a different length"
            return dt, dc

        for model_name, B in [r for r in runs if r[0] == name]:
            prompts = prompts_all[:B]
            hf(prompts, n_short), dola(prompts, n_short)  # warm-up
            uptime = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else None
            keys = [("hf", n_short), ("hf", n_long), ("dola", n_short), ("dola", n_long)]
            times = {k: [] for k in keys}
            cpu = {k: [] for k in keys}
            for r in range(args.repeats):
                order = [("hf", hf), ("dola", dola)] if r % 2 == 0 else [("dola", dola), ("hf", hf)]
                for n in (n_short, n_long):
                    for key, fn in order:
                        wall, proc = fn(prompts, n)
                        times[(key, n)].append(wall)
                        cpu[(key, n)].append(proc)
                print(f"{name} B={B} repeat {r + 1}/{args.repeats}: "
                      + ", ".join(f"{k}@{n}={v[-1]:.2f}s" for (k, n), v in times.items()), flush=True)
            med = {k: statistics.median(v) for k, v in times.items()}
            decode, decode_cpu = {}, {}
            for key in ("hf", "dola"):
                diffs = [b - a for a, b in zip(times[(key, n_short)], times[(key, n_long)])]
                decode[key] = B * (n_long - n_short) / statistics.median(diffs)
                diffs = [b - a for a, b in zip(cpu[(key, n_short)], cpu[(key, n_long)])]
                decode_cpu[key] = B * (n_long - n_short) / statistics.median(diffs)
            e2e = {key: B * n_long / med[(key, n_long)] for key in ("hf", "dola")}
            entry = {
                "ratio": decode["dola"] / decode["hf"],
                "ratio_end_to_end": e2e["dola"] / e2e["hf"],
                "ratio_cpu_time": decode_cpu["dola"] / decode_cpu["hf"],
                "decode_tokens_per_s": decode,
                "decode_tokens_per_cpu_s": decode_cpu,
                "end_to_end_tokens_per_s": e2e,
                "median_seconds": {f"{k}@{n}": v for (k, n), v in med.items()},
                "all_seconds": {f"{k}@{n}": v for (k, n), v in times.items()},
                "all_cpu_seconds": {f"{k}@{n}": v for (k, n), v in cpu.items()},
                "batch_size": B,
                "prompt_tokens": [len(tok(p)["input_ids"]) for p in prompts],
                "load_average_at_start": uptime,
            }
            results.setdefault(name, {})[str(B)] = entry
            write_report(args, results)  # after each entry, so an interrupted run keeps what it measured
            print(f"==> {name} batch {B}: ratio (decode) {entry['ratio']:.3f}  end-to-end "
                  f"{entry['ratio_end_to_end']:.3f}  cpu-time {entry['ratio_cpu_time']:.3f} | decode tok/s "
                  f"hf {decode['hf']:.2f} dola {decode['dola']:.2f}", flush=True)
        del model
    report = write_report(args, results)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
