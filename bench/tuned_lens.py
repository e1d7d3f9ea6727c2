"""Benchmark: training the tuned lens of SmolLM2 on 2 threads, and its cost when reading.

1. **Training to convergence.** SmolLM2's recipe (:func:`earlyexit.core.tuned_lens.default_settings`) at
   its token budget N and the same recipe at 4×N (every token count ×4: KL steps and the least-squares
   start), each from scratch in a fresh process; both evaluated on the same held-out windows. Reported:
   the wall time of the N run and its held-out KL (mean over entries 0..L−1) against the 4×N run's.
   Target: within 5% of the 4×N KL in ≤ 15 minutes.
2. **Reading.** :func:`earlyexit.lens_stats` over every position and layer of the same TruthfulQA prompts
   (6-shot primer) with the tuned lens and with the logit lens, alternating over repeats, medians.
   Target: ≤ 1.25× the logit lens's time (one d×d product per layer against a d×V head).

    python bench/tuned_lens.py [--threads 2] [--tokens N] [--windows 16] [--repeats 3]
    python bench/tuned_lens.py --reference-only --threads 1   # only the 4×N run, stored in the results file
    python bench/tuned_lens.py --skip-reference     # reuse the 4×N run stored in the results file

Writes ``results/bench_tuned_lens.json``. The 4×N run takes about four times as long as the N run: run
it on an idle machine — or run it alone first with ``--reference-only`` (its wall time is not a reading,
only its KL is, so it may run on fewer threads beside other work) and then the N run with
``--skip-reference``; every run records its threads and held-out windows, and a stored reference
evaluated on other windows is refused.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _train_worker(scale: int, threads: int, windows: int, tokens: int | None, out_dir: str) -> dict:
    import resource

    import torch

    torch.set_num_threads(threads)
    from earlyexit import load_model
    from earlyexit.core.tuned_lens import default_settings, evaluate_lenses, heldout_windows, train_tuned_lens

    model, tok = load_model("smollm2-135m", device="cpu")
    base = default_settings("smollm2-135m")
    n = tokens or base.tokens
    s = dataclasses.replace(base, tokens=n * scale, init_tokens=base.init_tokens * scale)
    held = heldout_windows(tok, seq_len=512, limit=windows)
    # the corpus and its tokens are read (and cached) before the clock starts: they are not training
    from earlyexit.core.tuned_lens import text_windows

    text_windows(tok, "train", seq_len=s.seq_len)
    log: list = []
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    lens = train_tuned_lens(model, tok, s, progress=False, log=log)
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    ev = evaluate_lenses(model, {"tuned": lens}, held)["tuned"]
    kl = ev.mean("kl")
    L = lens.n_layers
    lens.save(Path(out_dir) / f"lens-x{scale}")
    return {"scale": scale, "threads": threads, "windows": windows, "settings": dataclasses.asdict(s),
            "seconds": seconds, "cpu_seconds": cpu,
            "heldout_kl_per_entry": kl.tolist(), "heldout_kl_mean": float(kl[:L].mean()),
            "heldout_positions": ev.tokens, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "log": [{k: h[k] for k in ("step", "tokens", "kl", "seconds")} for h in log]}


def _read_worker(threads: int, prompts: int, repeats: int, lens_dir: str | None) -> dict:
    import torch

    torch.set_num_threads(threads)
    from earlyexit import lens_stats, load_model, load_truthfulqa
    from earlyexit.core.lenses import resolve_lens
    from earlyexit.core.tuned_lens import TunedLens, tuned_lens_for
    from earlyexit.studies.prompts import truthfulqa_prompt

    model, tok = load_model("smollm2-135m", device="cpu")
    tuned = TunedLens.load(lens_dir, model) if lens_dir else tuned_lens_for(model, tok, train=False)
    lenses = {"normed": resolve_lens(model, "normed"), "tuned": tuned}
    texts = [truthfulqa_prompt(q.question) for q in load_truthfulqa(limit=prompts)]
    for lens in lenses.values():  # warm-up
        lens_stats(model, tok, texts[:1], positions="last", lens=lens)
    times: dict[str, list[float]] = {k: [] for k in lenses}
    positions = 0
    for r in range(repeats):
        order = list(lenses) if r % 2 == 0 else list(lenses)[::-1]
        for name in order:
            t0 = time.perf_counter()
            res = lens_stats(model, tok, texts, positions="all", lens=lenses[name], top_k=5, kl=True,
                             batch_size=len(texts))
            times[name].append(time.perf_counter() - t0)
            positions = int(res.valid.sum())
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"seconds": times, "median_seconds": med, "ratio_tuned_over_logit": med["tuned"] / med["normed"],
            "prompts": prompts, "positions": positions, "entries": tuned.n_layers + 1}


def _run(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=None, help="KL-step tokens of the N run (default: the recipe's)")
    parser.add_argument("--windows", type=int, default=16, help="held-out windows of 512 tokens to evaluate on")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-reference", action="store_true", help="reuse the stored 4×N run")
    parser.add_argument("--reference-only", action="store_true", help="only the 4×N run, stored for --skip-reference")
    parser.add_argument("--skip-training", action="store_true", help="only the reading benchmark")
    parser.add_argument("--out", default=str(REPO / "results" / "bench_tuned_lens.json"))
    parser.add_argument("--worker", choices=["train", "read"], help=argparse.SUPPRESS)
    parser.add_argument("--scale", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--lens-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "bench-tuned-lens"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "train":
        print(json.dumps(_train_worker(args.scale, args.threads, args.windows, args.tokens, args.work_dir)))
        return 0
    if args.worker == "read":
        print(json.dumps(_read_worker(args.threads, args.prompts, args.repeats, args.lens_dir)))
        return 0

    from earlyexit.core.atomic import write_json
    from earlyexit.core.meta import library_versions

    out_path = Path(args.out)
    old = json.loads(out_path.read_text()) if out_path.exists() else {}
    common = ["--threads", str(args.threads), "--windows", str(args.windows), "--work-dir", args.work_dir]
    if args.tokens:
        common += ["--tokens", str(args.tokens)]
    doc = {"threads": args.threads, "versions": library_versions(),
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if args.reference_only:
        print("training the recipe at 4×N tokens (the reference) ...", flush=True)
        ref = _run(["--worker", "train", "--scale", "4", *common])
        write_json(out_path, {**old, "training": {**old.get("training", {}), "reference": ref}})
        print(f"4×N run: {ref['seconds'] / 60:.1f} min on {args.threads} thread(s), held-out KL "
              f"{ref['heldout_kl_mean']:.3f} nats over {ref['heldout_positions']} positions; wrote {out_path}")
        return 0
    lens_dir = None
    if not args.skip_training:
        print("training the recipe at N tokens ...", flush=True)
        n_run = _run(["--worker", "train", "--scale", "1", *common])
        if args.skip_reference and old.get("training", {}).get("reference"):
            ref = old["training"]["reference"]
            if ref.get("windows") != args.windows:
                raise SystemExit(f"the stored 4×N run was evaluated on {ref.get('windows')} held-out windows, this "
                                 f"run on {args.windows}: pass --windows {ref.get('windows')} or drop --skip-reference")
        else:
            print("training the same recipe at 4×N tokens (the reference) ...", flush=True)
            ref = _run(["--worker", "train", "--scale", "4", *common])
        ratio = n_run["heldout_kl_mean"] / ref["heldout_kl_mean"]
        doc["training"] = {"run": n_run, "reference": ref, "kl_ratio_to_4x": ratio,
                           "within_5_percent": ratio <= 1.05, "minutes": n_run["seconds"] / 60,
                           "within_15_minutes": n_run["seconds"] <= 900}
        lens_dir = str(Path(args.work_dir) / "lens-x1")
    print("reading: lens_stats with the tuned lens vs the logit lens ...", flush=True)
    read = _run(["--worker", "read", "--threads", str(args.threads), "--prompts", str(args.prompts),
                 "--repeats", str(args.repeats), *(["--lens-dir", lens_dir] if lens_dir else [])])
    doc["reading"] = read
    write_json(out_path, doc)

    print(f"{'':34s} {'ours':>12s} {'target':>10s}")
    if "training" in doc:
        t = doc["training"]
        print(f"{'train time (N tokens, min)':34s} {t['minutes']:12.1f} {'≤ 15':>10s}")
        print(f"{'held-out KL: N run / 4×N run':34s} {t['kl_ratio_to_4x']:12.3f} {'≤ 1.05':>10s}")
        print(f"{'  KL (N) / KL (4×N), nats':34s} {t['run']['heldout_kl_mean']:6.3f} / {t['reference']['heldout_kl_mean']:.3f}")
    print(f"{'lens_stats time: tuned / logit':34s} {read['ratio_tuned_over_logit']:12.2f} {'≤ 1.25':>10s}")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
