"""SLED decoding speed against transformers' own greedy ``generate(do_sample=False)``, side by side.

The method of ``bench/dola.py``: same prompts (TruthfulQA, 6-shot primer), same batch, same token
counts — transformers runs with ``min_new_tokens = max_new_tokens``, ``earlyexit.methods.dola.generate``
with ``decoding="sled"`` (the authors' settings: every entry 0..L−1 through the raw head, k = 50,
rate 2, one evolution step; penalty 1.0), no stop string and ``ignore_eos=True``; the primer is not
shared (``share_prefix=False``), so both sides prefill the whole prompt every call. Runs alternate
between the two after a warm-up; medians.

- ``ratio``: SLED tokens/s ÷ greedy tokens/s of the decoding steps alone, from the time difference
  between a long and a short generation (prefill cancels out);
- ``ratio_end_to_end``: the same for whole calls of ``--new-tokens`` tokens, prefill included;
- ``ratio_cpu_time``: as ``ratio`` from process CPU time;
- ``ratio_min``: as ``ratio`` from the fastest long and fastest short call of each side (on a shared,
  loaded machine other processes only ever add time, so the minimum is the steadier figure).

``--premature-dtype float32,bfloat16`` also times SLED with the premature head product in bfloat16
(approximate, see :func:`earlyexit.methods.sled.premature_logits`): its figures are reported under
``…_bfloat16``; the plain figures are the exact float32 SLED.

Targets (issue 12): ≥ 0.8 on SmolLM2 at batch 1, ≥ 0.5 on Gemma-3-270M.

    python bench/sled.py                                  # SmolLM2 and Gemma-3-270M, batch 1 and 8
    python bench/sled.py --runs smollm2-135m:1 --repeats 3
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"smollm2-135m batch 1": 0.8, "gemma3-270m": 0.5}


def parse_runs(spec: str) -> list[tuple[str, int]]:
    """``"smollm2-135m:1,8;gemma3-270m:1"`` → ``[("smollm2-135m", 1), ("smollm2-135m", 8), ...]``."""
    out = []
    for part in spec.split(";"):
        name, sizes = part.split(":")
        out += [(name.strip(), int(b)) for b in sizes.split(",")]
    return out


def _load() -> str | None:
    p = Path("/proc/loadavg")
    return " ".join(p.read_text().split()[:3]) if p.exists() else None


def _variant(dtype: str) -> str:
    return "sled" if dtype == "float32" else f"sled_{dtype}"


def write_report(args, results: dict) -> dict:
    from earlyexit.core.atomic import write_json
    from earlyexit.core.meta import run_metadata

    report: dict = {}
    for dtype in args.premature_dtype:
        suffix = "" if dtype == "float32" else f"_{dtype}"
        for fig in ("ratio", "ratio_end_to_end", "ratio_cpu_time", "ratio_min"):
            report[fig + suffix] = {m: {b: e[fig + suffix] for b, e in d.items()} for m, d in results.items()}
    report.update({
        "targets": TARGETS,
        "results": results,
        "meta": run_metadata(None, None, runs=args.runs, new_tokens=args.new_tokens, short_tokens=args.short_tokens,
                             repeats=args.repeats, threads=args.threads, evolution_scale=args.evolution_scale,
                             evolution_rate=args.evolution_rate, repetition_penalty=args.repetition_penalty,
                             premature_dtype=args.premature_dtype, share_prefix=False, note=args.note,
                             baseline="transformers generate(do_sample=False, min_new_tokens=max_new_tokens)"),
    })
    write_json(args.out, report)
    return report


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="smollm2-135m:1,8;gemma3-270m:1,8", help="model:batch,batch;model:batch")
    ap.add_argument("--new-tokens", type=int, default=48, help="tokens per sequence of the long run")
    ap.add_argument("--short-tokens", type=int, default=8, help="tokens per sequence of the short run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--evolution-scale", type=int, default=50)
    ap.add_argument("--evolution-rate", type=float, default=2.0)
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument("--premature-dtype", default="float32",
                    help="comma-separated: float32 (exact SLED), bfloat16 (approximate premature head)")
    ap.add_argument("--out", default=str(REPO / "results" / "bench_sled.json"))
    ap.add_argument("--note", default=None, help="free text stored with the settings (e.g. machine load)")
    args = ap.parse_args(argv)
    args.premature_dtype = [x.strip() for x in args.premature_dtype.split(",")]

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from earlyexit import load_model
    from earlyexit.core.batching import pad_id
    from earlyexit.methods.dola import generate
    from earlyexit.studies.data import load_truthfulqa
    from earlyexit.studies.prompts import truthfulqa_prompt

    runs = parse_runs(args.runs)
    max_b = max(b for _, b in runs)
    prompts_all = [truthfulqa_prompt(it.question) for it in load_truthfulqa(limit=max_b)]
    n_long, n_short = args.new_tokens, args.short_tokens
    if not 0 < n_short < n_long:
        raise SystemExit("--short-tokens must be between 0 and --new-tokens")
    settings = {"evolution_scale": args.evolution_scale, "evolution_rate": args.evolution_rate}
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

        def sled_fn(dtype):
            def sled(prompts, n):
                t0, c0 = time.perf_counter(), time.process_time()
                outs = generate(model, tok, prompts, decoding="sled", method_settings={**settings, "premature_dtype": dtype},
                                repetition_penalty=args.repetition_penalty, max_new_tokens=n, stop=(),
                                batch_size=len(prompts), share_prefix=False, ignore_eos=True)
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                assert all(len(o.token_ids) == n for o in outs), "SLED generated a different length"
                return dt, dc
            return sled

        contestants = [("hf", hf)] + [(_variant(d), sled_fn(d)) for d in args.premature_dtype]
        for _, B in [r for r in runs if r[0] == name]:
            prompts = prompts_all[:B]
            for _, fn in contestants:  # warm-up
                fn(prompts, n_short)
            load_start = _load()
            keys = [(c, n) for c, _ in contestants for n in (n_short, n_long)]
            times = {k: [] for k in keys}
            cpu = {k: [] for k in keys}
            for r in range(args.repeats):
                order = contestants if r % 2 == 0 else contestants[::-1]
                for n in (n_short, n_long):
                    for key, fn in order:
                        wall, proc = fn(prompts, n)
                        times[(key, n)].append(wall)
                        cpu[(key, n)].append(proc)
                print(f"{name} B={B} repeat {r + 1}/{args.repeats}: "
                      + ", ".join(f"{k}@{n}={v[-1]:.2f}s" for (k, n), v in times.items()), flush=True)
            med = {k: statistics.median(v) for k, v in times.items()}
            decode, decode_cpu = {}, {}
            for key, _ in contestants:
                diffs = [b - a for a, b in zip(times[(key, n_short)], times[(key, n_long)])]
                decode[key] = B * (n_long - n_short) / statistics.median(diffs)
                diffs = [b - a for a, b in zip(cpu[(key, n_short)], cpu[(key, n_long)])]
                decode_cpu[key] = B * (n_long - n_short) / statistics.median(diffs)
            e2e = {key: B * n_long / med[(key, n_long)] for key, _ in contestants}
            fastest = {key: B * (n_long - n_short) / (min(times[(key, n_long)]) - min(times[(key, n_short)]))
                       for key, _ in contestants}
            entry = {}
            for dtype in args.premature_dtype:
                v, suffix = _variant(dtype), ("" if dtype == "float32" else f"_{dtype}")
                entry.update({"ratio" + suffix: decode[v] / decode["hf"],
                              "ratio_end_to_end" + suffix: e2e[v] / e2e["hf"],
                              "ratio_cpu_time" + suffix: decode_cpu[v] / decode_cpu["hf"],
                              "ratio_min" + suffix: fastest[v] / fastest["hf"]})
            entry.update({
                "decode_tokens_per_s": decode,
                "decode_tokens_per_s_fastest": fastest,
                "decode_tokens_per_cpu_s": decode_cpu,
                "end_to_end_tokens_per_s": e2e,
                "median_seconds": {f"{k}@{n}": v for (k, n), v in med.items()},
                "all_seconds": {f"{k}@{n}": v for (k, n), v in times.items()},
                "all_cpu_seconds": {f"{k}@{n}": v for (k, n), v in cpu.items()},
                "batch_size": B,
                "prompt_tokens": [len(tok(p)["input_ids"]) for p in prompts],
                "load_average_at_start": load_start,
                "load_average_at_end": _load(),
            })
            results.setdefault(name, {})[str(B)] = entry
            write_report(args, results)  # after each entry, so an interrupted run keeps what it measured
            figs = "  ".join(f"{k} {v:.3f}" for k, v in entry.items() if k.startswith("ratio"))
            print(f"==> {name} batch {B}: {figs} | decode tok/s "
                  + " ".join(f"{k} {v:.2f}" for k, v in decode.items())
                  + f" | load {load_start} → {entry['load_average_at_end']}", flush=True)
        del model
    report = write_report(args, results)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
