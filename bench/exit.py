"""Early-exit decoders against transformers' greedy ``generate`` and its ``assistant_early_exit``, side by side.

On ``--prompts`` TruthfulQA prompts (6-shot primer, the first questions), batch 1, ``--new-tokens`` new tokens
(EOS ignored, no stop string: every method makes the same number of tokens), ``--threads`` threads, every
method once per prompt, the methods in a rotating order per prompt (machine load spreads over all of them).
Our methods run with ``share_prefix=False`` (the primer is prefilled every call, as transformers does).

Methods: transformers ``generate(do_sample=False)`` (the baseline), our ``vanilla`` loop, transformers'
``assistant_early_exit=E`` (its LayerSkip integration: defaults ``num_assistant_tokens=20``,
``assistant_confidence_threshold=0.4``), our ``self-speculative`` at the same E (draft up to ``--max-draft``
tokens, stop below ``--draft-threshold``), ``layer-skip`` (the skipped set searched on calibration prompts:
the last TruthfulQA questions, never the bench's) and ``early-exit`` (lossy, for its tokens/s).

Reported per method: tokens/s ÷ greedy's (``ratio``: whole calls, prefill included; ``ratio_decode``: the
measured prefill time of each prompt taken out), share of outputs identical to greedy, and for ours the
acceptance rate and tokens per verify pass. The ``why`` block: per E the lens acceptance on the bench's own
greedy tokens, the measured cost of one draft token and of a verify pass relative to a greedy step, and
the acceptance break-even would need (:class:`earlyexit.methods.early_exit.CostModel`).

    python bench/exit.py                                   # SmolLM2, 20 prompts, 64 tokens, 2 threads
    python bench/exit.py --prompts 4 --exit-entries 20,27  # a quick look
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--exit-entries", default="10,15,20,24,27,29", help="the E values (comma-separated)")
    ap.add_argument("--max-draft", type=int, default=6)
    ap.add_argument("--draft-threshold", type=float, default=0.4, help="stop drafting below this top-1 probability")
    ap.add_argument("--early-exit", default="margin:0.9", help="confidence:λ of the early-exit run ('' = skip)")
    ap.add_argument("--no-layer-skip", action="store_true")
    ap.add_argument("--out", default=str(REPO / "results" / "bench_exit.json"))
    ap.add_argument("--note", default=None, help="free text stored with the settings (e.g. machine load)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from earlyexit import load_model
    from earlyexit.core.atomic import write_json
    from earlyexit.core.batching import pad_id
    from earlyexit.core.decoding import make_scorer
    from earlyexit.core.meta import run_metadata
    from earlyexit.methods import early_exit as ee
    from earlyexit.methods.dola import generate
    from earlyexit.studies.data import load_truthfulqa
    from earlyexit.studies.prompts import truthfulqa_prompt

    model, tok = load_model(args.model)
    tok.padding_side = "left"
    pad = pad_id(tok)
    L = ee.get_stack(model).L
    Es = [int(x) for x in args.exit_entries.split(",") if x]
    for E in Es:
        ee.check_exit_entry(E, L)
    n = args.new_tokens
    prompts = [truthfulqa_prompt(it.question) for it in load_truthfulqa(limit=args.prompts)]
    load_start = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else None

    # --- the methods: each returns (new token ids, seconds, stats) ------------------------------------
    @torch.no_grad()
    def hf(prompt, n_new, **kw):
        enc = tok([prompt], return_tensors="pt")
        t0 = time.perf_counter()
        seq = model.generate(**enc, do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=pad,
                             **kw)
        dt = time.perf_counter() - t0
        return seq[0, enc["input_ids"].shape[1]:].tolist(), dt, {}

    def ours(decoding, settings):
        scorer = None if decoding == "vanilla" else make_scorer(model, decoding, **settings)

        def run(prompt, n_new):
            t0 = time.perf_counter()
            out = generate(model, tok, [prompt], decoding=decoding, repetition_penalty=1.0, max_new_tokens=n_new,
                           stop=(), batch_size=1, share_prefix=False, ignore_eos=True,
                           method_settings=settings or None)[0]
            dt = time.perf_counter() - t0
            return out.token_ids, dt, {**out.stats, **({"exit_entries": out.info["exit_entry"]}
                                                       if "exit_entry" in out.info else {})}
        run.scorer = scorer
        return run

    methods: dict[str, object] = {"greedy (transformers)": lambda p, k: hf(p, k),
                                  "vanilla (ours)": ours("vanilla", {})}
    for E in Es:
        methods[f"assistant_early_exit={E} (transformers)"] = lambda p, k, E=E: hf(p, k, assistant_early_exit=E)
        methods[f"self-speculative E={E}"] = ours("self-speculative", {"exit_entry": E, "max_draft": args.max_draft,
                                                                        "draft_threshold": args.draft_threshold})
    search = None
    if not args.no_layer_skip:
        t0 = time.perf_counter()
        search = ee.search_skip_layers(model, max_draft=args.max_draft)
        search_s = time.perf_counter() - t0
        methods["layer-skip (searched)"] = ours("layer-skip", {"skip_layers": search.skip_layers,
                                                               "max_draft": args.max_draft,
                                                               "draft_threshold": args.draft_threshold})
    if args.early_exit:
        conf, lam = args.early_exit.split(":")
        methods[f"early-exit {conf}≥{lam}" if conf != "entropy" else f"early-exit entropy≤{lam}"] = ours(
            "early-exit", {"confidence": conf, "threshold": float(lam)})

    # warm-up: every method once on a short run
    for fn in methods.values():
        fn(prompts[0], 4)

    # prefill time of each prompt (the whole prompt through the model once)
    prefill = []
    with torch.no_grad():
        for p in prompts:
            ids = tok([p], return_tensors="pt")["input_ids"]
            t0 = time.perf_counter()
            model(input_ids=ids, logits_to_keep=1)
            prefill.append(time.perf_counter() - t0)

    names = list(methods)
    rec = {m: {"seconds": [], "tokens": [], "stats": []} for m in names}
    for i, p in enumerate(prompts):
        order = names[i % len(names):] + names[:i % len(names)]
        for m in order:
            toks, dt, st = methods[m](p, n)
            rec[m]["seconds"].append(dt)
            rec[m]["tokens"].append(toks)
            rec[m]["stats"].append(st)
        print(f"prompt {i + 1}/{len(prompts)} done", file=sys.stderr, flush=True)

    greedy = rec["greedy (transformers)"]
    g_tok = sum(len(t) for t in greedy["tokens"])
    g_s, g_dec = sum(greedy["seconds"]), sum(greedy["seconds"]) - sum(prefill)
    results = {}
    for m in names:
        r = rec[m]
        n_tok = sum(len(t) for t in r["tokens"])
        secs = sum(r["seconds"])
        entry = {
            "tokens_per_s": n_tok / secs,
            "ratio": (n_tok / secs) / (g_tok / g_s),
            "ratio_decode": (n_tok / (secs - sum(prefill))) / (g_tok / g_dec) if secs > sum(prefill) else None,
            "identical_to_greedy": statistics.mean(a == b for a, b in zip(r["tokens"], greedy["tokens"])),
            "seconds": secs, "tokens": n_tok,
        }
        st = [s for s in r["stats"] if "drafts_proposed" in s]
        if st:
            proposed = sum(s["drafts_proposed"] for s in st)
            accepted = sum(s["drafts_accepted"] for s in st)
            passes = sum(s["verify_passes"] for s in st)
            entry.update(acceptance_rate=accepted / proposed if proposed else None,
                         tokens_per_verify=sum(len(t) - 1 for t in r["tokens"]) / passes if passes else None,
                         drafts_proposed=proposed, drafts_accepted=accepted, verify_passes=passes)
        ex = [e for s in r["stats"] for e in s.get("exit_entries", [])]
        if ex:
            entry["mean_layers"] = statistics.mean(ex)
            entry["token_agreement"] = statistics.mean(
                statistics.mean(a == b for a, b in zip(t, g)) for t, g in zip(r["tokens"], greedy["tokens"]))
        results[m] = entry

    # --- why: acceptance per E on the bench's own greedy tokens, measured costs, break-even ------------
    cal = ee.calibrate(model, [tok(p)["input_ids"] for p in prompts], new_tokens=n)
    acc = ee.lens_acceptance(model, cal)
    costs = ee.CostModel.measure(model, args.max_draft)
    why = {"cost_model": {"layer_s": costs.layer, "head_s": costs.head, "greedy_step_s": costs.step,
                          "head_share_of_step": costs.head[0] / costs.step, "source": costs.source},
           "per_entry": {}}
    k = args.max_draft
    for E in Es:
        draft = costs.draft(E) / costs.step
        verify = costs.verify(L - E, k) / costs.step
        why["per_entry"][str(E)] = {
            "lens_acceptance": float(acc[E]), "draft_cost_per_token": draft, "verify_cost": verify,
            "break_even_acceptance": {str(j): costs.break_even(j, E, L - E) for j in range(1, k + 1)},
            "predicted_ratio": max(costs.speedup(acc[E], j, E, L - E) for j in range(1, k + 1)),
        }
    if search is not None:
        why["layer_skip_search"] = {**search.summary(), "seconds": search_s, "path": search.path}

    report = {
        "ratio": {m: e["ratio"] for m, e in results.items()},
        "identical_to_greedy": {m: e["identical_to_greedy"] for m, e in results.items()},
        "results": results, "why": why,
        "targets": "lossless methods identical to greedy on every prompt; ours faster than assistant_early_exit "
                   "at every E; a speed-up over greedy",
        "meta": run_metadata(model, len(prompts), prompts=len(prompts), new_tokens=n, threads=args.threads,
                             exit_entries=Es, max_draft=args.max_draft, draft_threshold=args.draft_threshold,
                             early_exit=args.early_exit, share_prefix=False, repeats=1, note=args.note,
                             loadavg_start=load_start,
                             loadavg_end=Path("/proc/loadavg").read_text().split()[0]
                             if Path("/proc/loadavg").exists() else None,
                             prefill_s=sum(prefill),
                             baseline="transformers generate(do_sample=False, min_new_tokens=max_new_tokens)"),
    }
    write_json(args.out, report)
    for m, e in results.items():
        extra = f"  acceptance {e['acceptance_rate']:.3f}  tokens/verify {e['tokens_per_verify']:.2f}" \
            if e.get("acceptance_rate") is not None else ""
        print(f"{m:40s} ratio {e['ratio']:.3f} (decode {e['ratio_decode'] or float('nan'):.3f})  "
              f"identical {e['identical_to_greedy']:.2f}{extra}")
    return report


if __name__ == "__main__":
    main()
