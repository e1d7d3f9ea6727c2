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
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"smollm2-135m batch 1": 0.8, "gemma3-270m": 0.5}


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
    from _speed import measure, ours, parse_runs, ratios, transformers_greedy

    from earlyexit import load_model
    from earlyexit.core.batching import pad_id
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
        contestants = [("hf", transformers_greedy(model, tok, pad_id(tok)))] + [
            (_variant(d), ours(model, tok, "sled", method_settings={**settings, "premature_dtype": d},
                               repetition_penalty=args.repetition_penalty)) for d in args.premature_dtype]
        for _, B in [r for r in runs if r[0] == name]:
            measured = measure(f"{name} B={B}", contestants, prompts_all[:B], tok, n_short=n_short, n_long=n_long,
                               repeats=args.repeats)
            entry = {}
            for dtype in args.premature_dtype:
                suffix = "" if dtype == "float32" else f"_{dtype}"
                entry.update({k + suffix: v for k, v in ratios(measured, _variant(dtype)).items()})
            entry.update(measured)
            results.setdefault(name, {})[str(B)] = entry
            write_report(args, results)  # after each entry, so an interrupted run keeps what it measured
            figs = "  ".join(f"{k} {v:.3f}" for k, v in entry.items() if k.startswith("ratio"))
            print(f"==> {name} batch {B}: {figs} | decode tok/s "
                  + " ".join(f"{k} {v:.2f}" for k, v in entry["decode_tokens_per_s"].items())
                  + f" | load {entry['load_average_at_start']} → {entry['load_average_at_end']}", flush=True)
        del model
    report = write_report(args, results)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "bench"))
    main()
