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
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


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
    results: dict[str, dict] = {}
    for name in dict.fromkeys(n for n, _ in runs):
        model, tok = load_model(name)
        tok.padding_side = "left"
        contestants = [("hf", transformers_greedy(model, tok, pad_id(tok))),
                       ("dola", ours(model, tok, "dola", dola_layers=args.dola_layers,
                                     repetition_penalty=args.repetition_penalty))]
        for _, B in [r for r in runs if r[0] == name]:
            entry = measure(f"{name} B={B}", contestants, prompts_all[:B], tok, n_short=n_short, n_long=n_long,
                            repeats=args.repeats)
            entry = {**ratios(entry, "dola"), **entry}
            results.setdefault(name, {})[str(B)] = entry
            write_report(args, results)  # after each entry, so an interrupted run keeps what it measured
            decode = entry["decode_tokens_per_s"]
            print(f"==> {name} batch {B}: ratio (decode) {entry['ratio']:.3f}  end-to-end "
                  f"{entry['ratio_end_to_end']:.3f}  cpu-time {entry['ratio_cpu_time']:.3f} | decode tok/s "
                  f"hf {decode['hf']:.2f} dola {decode['dola']:.2f}", flush=True)
        del model
    report = write_report(args, results)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "bench"))
    main()
