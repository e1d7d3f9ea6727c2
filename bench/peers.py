"""Benchmark: the normed logit lens, ours vs what a user would pick instead (nnsight, TransformerLens).

The same work for every method: per-layer entropy and top-k tokens at every hidden-state entry 0..L
(entry 0 = embeddings, 1..L-1 = residual stream after each decoder layer, the final norm applied to
all of those; entry L = the model's own output) and every position of the first ``--prompts``
TruthfulQA questions with the 6-shot primer, on SmolLM2-135M.

    ours            earlyexit.lens_stats(model, tok, prompts, positions="all", top_k=k)
    nnsight_reduce  nnsight: entropy and top-k computed inside ``model.trace(...)`` per layer, only the
                    reductions ``.save()``d
    nnsight_saved   nnsight's documented pattern: ``softmax(lm_head(norm(layers[i].output))).save()``
                    for every layer (the full [L+1, B, T, V] distribution), reduced after the trace.
                    Memory-hungry (~6 GB per saved copy for 4 prompts): a guard runs it on fewer
                    prompts, or skips it, when free memory is short; the output says so.
    transformerlens TransformerBridge.boot_transformers(..., hf_model=model, tokenizer=tok),
                    run_with_cache, cache.accumulated_resid(apply_ln=True) -> [L+1, B, T, d], then
                    bridge.unembed per layer.

Each method runs in its own fresh process (this script with ``--method``), with ``--threads`` torch
threads. Timed: the lens work only (tokenising included; model loading and the peer's wrapper setup
are reported apart, and one small warm-up pass of the method on a short prompt precedes the timing).
Memory: the peak RSS added by the work = VmHWM after it minus VmRSS before it, read from
/proc/self/status after resetting the high-water mark (``echo 5 > /proc/self/clear_refs``) just
before the work; where that reset is refused, ru_maxrss after minus ru_maxrss before (which can
under-count). Results are checked equal across methods: entropy sums to 4 significant digits and
top-1 ids on >= 99.9 % of cells. Ratios are peer / ours (time and added peak memory).

The peers are not dependencies of earlyexit: they live in a separate venv (``make bench-peers``).

    .venv-bench/bin/python bench/peers.py [--prompts 4] [--repeats 1] [--threads 2] [--methods ...]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
METHODS = ("ours", "nnsight_reduce", "transformerlens", "nnsight_saved")
PEER_PACKAGES = {"nnsight_reduce": "nnsight", "nnsight_saved": "nnsight", "transformerlens": "transformer_lens"}
MODEL = "smollm2-135m"
TL_NAME = "HuggingFaceTB/SmolLM2-135M"  # only names the architecture: the weights are the hf_model passed
WARMUP_PROMPT = "The capital of France is"
TOP1_MIN_AGREE = 0.999
SIG_DIGITS = 4


# ---------------------------------------------------------------- memory helpers (worker side)

def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{key}:\s+(\d+)\s*kB", f.read(), re.M)
    return int(m.group(1)) if m else 0


def _mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        m = re.search(r"^MemAvailable:\s+(\d+)\s*kB", f.read(), re.M)
    return int(m.group(1)) / 1024 if m else float("nan")


class PeakMeter:
    """Peak RSS added by a block: VmHWM after minus VmRSS before, the high-water mark reset first."""

    def __enter__(self):
        import resource

        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (and ru_maxrss) to the current RSS
            self.how = "VmHWM after minus VmRSS before, high-water mark reset by writing 5 to the process's clear_refs file"
        except OSError:
            self.how = "ru_maxrss after minus ru_maxrss before (no reset possible: can under-count)"
        self.rss0_kb = _status_kb("VmRSS")
        self.maxrss0_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import resource

        self.seconds = time.perf_counter() - self.t0
        self.hwm_kb = _status_kb("VmHWM")
        self.maxrss1_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return False

    def report(self) -> dict:
        reset = self.how.startswith("VmHWM")
        added = (self.hwm_kb - self.rss0_kb) if reset else (self.maxrss1_kb - self.maxrss0_kb)
        return {"seconds": self.seconds, "added_peak_mb": added / 1024, "rss_before_mb": self.rss0_kb / 1024,
                "peak_rss_mb": self.hwm_kb / 1024, "ru_maxrss_added_mb": (self.maxrss1_kb - self.maxrss0_kb) / 1024,
                "memory_measure": self.how}


# ---------------------------------------------------------------- the four methods (worker side)
# Each returns per-prompt lists: entropy [n_i, E] and top-k ids [n_i, E, k], positions 0..n_i-1.

def _run_ours(model, tok, prompts, top_k):
    from earlyexit import lens_stats

    r = lens_stats(model, tok, prompts, positions="all", top_k=top_k)
    n = r.valid.sum(1).tolist()
    return ([r.entropy[i, :, : n[i]].T for i in range(len(prompts))],
            [r.top_ids[i, :, : n[i]].transpose(0, 1) for i in range(len(prompts))])


def _entropy_topk(logits, top_k):
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1), logp.topk(top_k, dim=-1).indices


def _per_prompt(stacked_ent, stacked_ids, lengths):
    """[E, B, T] (left-padded) → per prompt [n_i, E] / [n_i, E, k]."""
    T = stacked_ent.shape[-1]
    return ([stacked_ent[:, i, T - n:].T for i, n in enumerate(lengths)],
            [stacked_ids[:, i, T - n:].transpose(0, 1) for i, n in enumerate(lengths)])


def _nnsight_hidden(lm, e, L):
    """Hidden-state entry e (0..L-1) as a proxy inside the trace."""
    h = lm.model.embed_tokens.output if e == 0 else lm.model.layers[e - 1].output
    return h[0] if isinstance(h, tuple) else h


def _run_nnsight_reduce(lm, tok, prompts, top_k, L):
    import torch

    ents, ids = [], []
    with lm.trace(prompts):
        for e in range(L + 1):
            logits = lm.lm_head(lm.model.norm(_nnsight_hidden(lm, e, L))) if e < L else lm.lm_head.output
            ent, top = _entropy_topk(logits, top_k)
            ents.append(ent.save())
            ids.append(top.save())
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    return _per_prompt(torch.stack(ents), torch.stack(ids), lengths)


def _run_nnsight_saved(lm, tok, prompts, top_k, L):
    import torch

    saved = []
    with lm.trace(prompts):
        for e in range(L + 1):
            logits = lm.lm_head(lm.model.norm(_nnsight_hidden(lm, e, L))) if e < L else lm.lm_head.output
            saved.append(torch.softmax(logits, dim=-1).save())
    probs = torch.stack(saved)  # [E, B, T, V]
    del saved
    entropy = torch.special.entr(probs).sum(-1)  # 0·log 0 = 0 where a probability underflowed
    top = probs.topk(top_k, dim=-1).indices
    del probs
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    return _per_prompt(entropy, top, lengths)


def _run_transformerlens(bridge, tok, prompts, top_k, L):
    import torch

    enc = tok(prompts, return_tensors="pt", padding=True)  # left-padded: the bridge derives position ids
    _, cache = bridge.run_with_cache(enc["input_ids"], attention_mask=enc["attention_mask"])
    resid = cache.accumulated_resid(apply_ln=True)  # [E, B, T, d]
    del cache
    ents, ids = [], []
    for e in range(L + 1):
        ent, top = _entropy_topk(bridge.unembed(resid[e]), top_k)
        ents.append(ent)
        ids.append(top)
    lengths = enc["attention_mask"].sum(1).tolist()
    return _per_prompt(torch.stack(ents), torch.stack(ids), lengths)


def _saved_bytes(tok, prompts, L, V) -> int:
    """Size of one [L+1, B, T, V] float32 copy for these prompts (T = the longest)."""
    T = max(len(tok(p)["input_ids"]) for p in prompts)
    return (L + 1) * len(prompts) * T * V * 4


def _worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from earlyexit import load_model, load_truthfulqa
    from earlyexit.core.lens import get_unembed
    from earlyexit.studies.prompts import truthfulqa_prompt

    method = args.method
    out: dict = {"method": method, "threads": torch.get_num_threads(), "pid": os.getpid()}
    t0 = time.perf_counter()
    model, tok = load_model(MODEL, device="cpu")
    out["load_seconds"] = time.perf_counter() - t0
    prompts = [truthfulqa_prompt(q.question) for q in load_truthfulqa(None, args.prompts)]
    unembed = get_unembed(model)
    L, V = unembed.n_layers, unembed.vocab_size

    t0 = time.perf_counter()
    if method == "ours":
        run = lambda ps: _run_ours(model, tok, ps, args.top_k)  # noqa: E731
    elif method in ("nnsight_reduce", "nnsight_saved"):
        from nnsight.modeling.transformers import TransformersModel

        lm = TransformersModel(model, tokenizer=tok, task="text-generation")
        fn = _run_nnsight_reduce if method == "nnsight_reduce" else _run_nnsight_saved
        run = lambda ps: fn(lm, tok, ps, args.top_k, L)  # noqa: E731
    elif method == "transformerlens":
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(TL_NAME, hf_model=model, tokenizer=tok, device="cpu")
        run = lambda ps: _run_transformerlens(bridge, tok, ps, args.top_k, L)  # noqa: E731
    else:
        raise ValueError(method)
    out["setup_seconds"] = time.perf_counter() - t0

    if method == "nnsight_saved":  # the guard: keep the saved distributions within free memory
        avail = _mem_available_mb()
        budget = avail - args.mem_margin_mb
        need = lambda ps: args.saved_factor * _saved_bytes(tok, ps, L, V) / 2**20 + 300  # noqa: E731
        n = len(prompts)
        while n > 0 and need(prompts[:n]) > budget:
            n -= 1
        out["guard"] = {"mem_available_mb": avail, "margin_mb": args.mem_margin_mb, "factor": args.saved_factor,
                        "need_full_mb": need(prompts), "prompts_run": n}
        if n == 0:
            out["skipped"] = (f"needs ~{need(prompts[:1]):.0f} MB even for 1 prompt; {avail:.0f} MB available "
                              f"minus a {args.mem_margin_mb} MB margin")
            return out
        if n < len(prompts):
            out["reduced"] = (f"ran on {n} of {len(prompts)} prompts: {len(prompts)} would need "
                              f"~{need(prompts):.0f} MB, "
                              f"{avail:.0f} MB available minus a {args.mem_margin_mb} MB margin")
        prompts = prompts[:n]

    with torch.no_grad():
        run([WARMUP_PROMPT])  # one small pass: lazy initialisation out of the timing
        with PeakMeter() as meter:
            entropy, top_ids = run(prompts)
    out.update(meter.report())
    out["prompts_run"] = len(prompts)
    out["positions"] = sum(int(e.shape[0]) for e in entropy)
    out["entries"] = L + 1
    out["entropy_sum"] = float(sum(e.double().sum() for e in entropy))
    if args.dump:
        torch.save({"entropy": [e.float().contiguous() for e in entropy],
                    "top_ids": [t.to(torch.int32).contiguous() for t in top_ids]}, args.dump)
    return out


# ---------------------------------------------------------------- the driver

def _versions() -> dict:
    from earlyexit.core.meta import library_versions

    v = library_versions()
    for name in ("nnsight", "transformer-lens", "gguf", "accelerate"):
        try:
            v[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            v[name] = None
    return v


def _load_dump(path):
    import torch

    return torch.load(path, weights_only=True)


def _compare(ref: dict, other: dict) -> dict:
    """Agreement of ``other`` with ``ref`` over the prompts both ran."""
    import torch

    n = min(len(ref["entropy"]), len(other["entropy"]))
    if any(ref["entropy"][i].shape != other["entropy"][i].shape for i in range(n)):
        return {"prompts_compared": n, "shapes_equal": False, "agree": False}
    e_ref = torch.cat([x.double().flatten() for x in ref["entropy"][:n]])
    e_oth = torch.cat([x.double().flatten() for x in other["entropy"][:n]])
    t_ref = torch.cat([x.reshape(-1, x.shape[-1]) for x in ref["top_ids"][:n]])
    t_oth = torch.cat([x.reshape(-1, x.shape[-1]) for x in other["top_ids"][:n]])
    s_ref, s_oth = float(e_ref.sum()), float(e_oth.sum())
    top1 = float((t_ref[:, 0] == t_oth[:, 0]).double().mean())
    sums_equal = f"{s_ref:.{SIG_DIGITS - 1}e}" == f"{s_oth:.{SIG_DIGITS - 1}e}" or abs(s_ref - s_oth) <= (
        0.5 * 10 ** (1 - SIG_DIGITS) * abs(s_ref))
    return {
        "prompts_compared": n, "cells": int(e_ref.numel()), "shapes_equal": True,
        "entropy_sum_ours": s_ref, "entropy_sum_peer": s_oth, "entropy_sum_rel_diff": abs(s_ref - s_oth) / abs(s_ref),
        "entropy_max_abs_diff": float((e_ref - e_oth).abs().max()),
        "entropy_sums_equal_4_digits": bool(sums_equal),
        "top1_agree": top1, "top5_identical": float((t_ref == t_oth).all(-1).double().mean()),
        "agree": bool(sums_equal and top1 >= TOP1_MIN_AGREE),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--mem-margin-mb", type=int, default=4000,
                        help="nnsight_saved guard: MB of available memory left to the rest of the machine")
    parser.add_argument("--saved-factor", type=float, default=3.0,
                        help="nnsight_saved guard: expected peak in copies of the [L+1,B,T,V] distribution")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per worker process")
    parser.add_argument("--out", default=str(REPO / "results" / "bench_peers.json"))
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--dump", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.method:
        print(json.dumps(_worker(args)))
        return 0

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or "ours" not in methods:
        parser.error(f"--methods must include 'ours' and name only {', '.join(METHODS)}; got {bad or methods}")
    missing = {}
    for m in methods:
        pkg = PEER_PACKAGES.get(m)
        if pkg is not None:
            import importlib.util

            if importlib.util.find_spec(pkg) is None:
                missing[m] = f"{pkg} is not installed in {sys.prefix}: run `make bench-peers` (.venv-bench)"
    if missing and len(missing) == len(methods) - 1:  # e.g. `make bench` in the main venv: leave the results be
        print(f"bench/peers.py: no peer library in {sys.prefix}; run `make bench-peers` (builds .venv-bench). "
              f"Nothing run, {args.out} left as it is.")
        return 0
    load_start = os.getloadavg()
    print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} "
          f"({os.cpu_count()} CPUs); {args.prompts} prompts, {args.threads} threads, {args.repeats} repeat(s)",
          flush=True)
    for m, why in missing.items():
        print(f"skipping {m}: {why}", flush=True)
    methods_run = [m for m in methods if m not in missing]

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    if "EARLYEXIT_DATA_DIR" not in env and not (REPO / "data" / "truthfulqa" / "TruthfulQA.csv").exists():
        env["EARLYEXIT_DATA_DIR"] = str(REPO.parent / "shared" / "data")  # as the Makefile does
    tmp = Path(tempfile.mkdtemp(prefix="bench_peers."))
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    dumps: dict[str, Path] = {}
    try:
        for rep in range(args.repeats):
            order = methods_run[rep % len(methods_run):] + methods_run[: rep % len(methods_run)]
            for m in order:
                dump = tmp / f"{m}.{rep}.pt"
                cmd = [sys.executable, str(Path(__file__).resolve()), "--method", m, "--prompts", str(args.prompts),
                       "--threads", str(args.threads), "--top-k", str(args.top_k), "--dump", str(dump),
                       "--mem-margin-mb", str(args.mem_margin_mb), "--saved-factor", str(args.saved_factor)]
                la = os.getloadavg()[0]
                try:
                    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
                    lines = proc.stdout.strip().splitlines()
                    if proc.returncode != 0 or not lines:
                        res = {"method": m, "failed": f"exit status {proc.returncode}",
                               "stderr_tail": proc.stderr[-2000:]}
                    else:
                        res = json.loads(lines[-1])
                except subprocess.TimeoutExpired:
                    res = {"method": m, "failed": f"timed out after {args.timeout} s"}
                res["repeat"], res["load_avg_1min_before"] = rep, la
                runs[m].append(res)
                if "seconds" in res:
                    dumps.setdefault(m, dump)
                    extra = f"  [{res['reduced']}]" if "reduced" in res else ""
                    print(f"repeat {rep}: {m:16s} {res['seconds']:8.2f} s  added peak {res['added_peak_mb']:9.0f} MB"
                          f"  (load {res['load_seconds']:.1f} s + setup {res['setup_seconds']:.1f} s, "
                          f"{res['prompts_run']} prompts, {res['positions']} positions){extra}", flush=True)
                else:
                    why = res.get("skipped") or res.get("failed")
                    print(f"repeat {rep}: {m:16s} skipped: {why}", flush=True)
                    if res.get("stderr_tail"):
                        print(res["stderr_tail"], file=sys.stderr)
        checks = {}
        if "ours" in dumps:
            ref = _load_dump(dumps["ours"])
            checks = {m: _compare(ref, _load_dump(p)) for m, p in dumps.items() if m != "ours"}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_end = os.getloadavg()

    ok = {m: [r for r in rs if "seconds" in r] for m, rs in runs.items()}
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "added_peak_mb", "peak_rss_mb",
                                                                  "load_seconds", "setup_seconds")}
           | {"prompts_run": min(r["prompts_run"] for r in rs), "positions": min(r["positions"] for r in rs)}
           for m, rs in ok.items() if rs}
    if "ours" not in med:
        print("lens_stats did not run: nothing to compare", file=sys.stderr)
        return 1
    ours = med["ours"]
    ratios = {}
    for m, s in med.items():
        if m == "ours":
            continue
        full = s["prompts_run"] == ours["prompts_run"]
        ratios[m] = {"time": s["seconds"] / ours["seconds"], "added_memory": s["added_peak_mb"] / ours["added_peak_mb"],
                     "full_work": full,
                     "note": None if full else (f"ran on {s['prompts_run']} of {ours['prompts_run']} prompts: "
                                                "its ratios are lower bounds of the full-work ratios")}
    best_time = min((r["time"] for r in ratios.values()), default=None)
    best_mem = min((r["added_memory"] for r in ratios.values()), default=None)
    target = {"time_ratio_min": 3.0, "memory_ratio_min": 10.0,
              "best_peer_time_ratio": best_time, "best_peer_memory_ratio": best_mem,
              "time_met": best_time is not None and best_time >= 3.0,
              "memory_met": best_mem is not None and best_mem >= 10.0,
              "lower_bounds_included": [m for m, r in ratios.items() if not r["full_work"]]}

    # the table
    print()
    print(f"{'method':16s} {'prompts':>7s} {'seconds':>9s} {'added MB':>10s} {'time/ours':>10s} {'mem/ours':>9s}"
          f" {'entropy sum':>13s} {'top-1 agree':>12s}")
    for m in methods:
        if m not in med:
            why = next((r.get("skipped") or r.get("failed") for r in runs[m]), missing.get(m))
            print(f"{m:16s} skipped: {why}")
            continue
        s = med[m]
        if m == "ours":
            esum = ok["ours"][0]["entropy_sum"]
            print(f"{m:16s} {s['prompts_run']:7d} {s['seconds']:9.2f} {s['added_peak_mb']:10.0f} {1:10.2f} {1:9.1f}"
                  f" {esum:13.6g} {'—':>12s}")
            continue
        c, r = checks.get(m, {}), ratios[m]
        star = "" if r["full_work"] else " *"
        print(f"{m:16s} {s['prompts_run']:7d} {s['seconds']:9.2f} {s['added_peak_mb']:10.0f} {r['time']:10.2f}"
              f" {r['added_memory']:9.1f} {c.get('entropy_sum_peer', float('nan')):13.6g}"
              f" {100 * c.get('top1_agree', float('nan')):11.2f}%{star}")
    for m, r in ratios.items():
        if r["note"]:
            print(f"* {m}: {r['note']}")
    for m, c in checks.items():
        print(f"check {m}: entropy sums {c.get('entropy_sum_ours', float('nan')):.6g} vs "
              f"{c.get('entropy_sum_peer', float('nan')):.6g} over {c.get('prompts_compared')} prompt(s) "
              f"(equal to 4 digits: {c.get('entropy_sums_equal_4_digits')}, max |Δ| per cell "
              f"{c.get('entropy_max_abs_diff', float('nan')):.2e}); top-1 {100 * c.get('top1_agree', 0):.3f}%, "
              f"top-5 identical {100 * c.get('top5_identical', 0):.2f}% → {'agree' if c.get('agree') else 'DISAGREE'}")
    if best_time is not None:
        print(f"best peer: {best_time:.2f}x the time (target >= 3x: {'met' if target['time_met'] else 'NOT met'}), "
              f"{best_mem:.1f}x the added memory (target >= 10x: {'met' if target['memory_met'] else 'NOT met'})"
              + (f"; lower bounds for {', '.join(target['lower_bounds_included'])}" if target["lower_bounds_included"]
                 else ""))
    print(f"load average at end: {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f} "
          f"(a shared {os.cpu_count()}-CPU machine: timings are noisy under load)")

    from earlyexit.core.atomic import write_json

    result = {
        "model": MODEL, "n_prompts": args.prompts, "positions": "all", "positions_total": ours["positions"],
        "entries": ok["ours"][0]["entries"], "top_k": args.top_k, "threads": args.threads, "repeats": args.repeats,
        "methods": methods, "median": med, "ratios_peer_over_ours": ratios, "target": target, "checks": checks,
        "results_agree": bool(checks) and all(c.get("agree") for c in checks.values()),
        "skipped": {m: missing.get(m) or next((r.get("skipped") or r.get("failed") for r in runs[m]), None)
                    for m in methods if m not in med},
        "runs": runs,
        "memory_measure": ok["ours"][0]["memory_measure"],
        "timing": "wall time of the lens work alone (tokenising included), after model load, peer setup and one "
                  "warm-up pass on a short prompt; load_seconds and setup_seconds reported apart",
        "load_average": {"start": list(load_start), "end": list(load_end), "cpus": os.cpu_count()},
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, "bench/peers.py", *(argv or sys.argv[1:])]),
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
