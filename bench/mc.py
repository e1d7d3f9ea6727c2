"""TruthfulQA MC scoring with the shared prompt cache against one full forward per answer, side by side.

Same questions, same outputs (checked): the shared arm runs the 6-shot primer once for all questions,
each question's own tokens once, and all its answers as one batch on that KV cache
(:func:`earlyexit.studies.mc.mc_raw`); the baseline runs prompt + answer as one full forward per answer
(``shared=False``). Both read the same lens rows. Arms alternate, after a warm-up question.

Two figures:
- ``speedup``: vanilla scoring (the final layer's log-probabilities only, what the forward passes cost);
- ``speedup_dola_all_layers``: scoring with every DoLa candidate layer (high ∪ low buckets) — the
  output-head products at the answer positions are the same work in both arms, so this ratio is lower.

    python bench/mc.py                  # SmolLM2, 4 questions, 2 threads
    python bench/mc.py --questions 8 --repeats 2
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "results" / "bench_mc.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from earlyexit import load_model, load_truthfulqa
    from earlyexit.core.atomic import write_json
    from earlyexit.studies.mc import mc_layers, mc_raw
    from earlyexit.core.meta import run_metadata

    model, tok = load_model(args.model)
    items = load_truthfulqa(limit=args.questions + 1)
    warm, items = items[:1], items[1:]
    configs = {"vanilla": [], "dola_all_layers": mc_layers(model)["all"]}
    figures: dict = {}
    for name, layers in configs.items():
        mc_raw(model, tok, warm, layers=layers, shared=True)
        mc_raw(model, tok, warm, layers=layers, shared=False)
        times = {"shared": [], "per_answer": []}
        for _ in range(args.repeats):
            for arm, shared in (("shared", True), ("per_answer", False)):
                t0 = time.perf_counter()
                raws = mc_raw(model, tok, items, layers=layers, shared=shared)
                times[arm].append(time.perf_counter() - t0)
                if arm == "shared":
                    ref = raws
                else:
                    err = max(float((a.final - b.final).abs().max()) for a, b in zip(ref, raws))
                    if err > 1e-3:
                        raise AssertionError(f"the two arms disagree by {err}")
        n_answers = sum(len(r.question.answers) for r in ref)
        n_tokens = sum(r.offsets[-1] for r in ref)
        best = {arm: min(v) for arm, v in times.items()}
        figures[name] = {"layers": layers, "seconds": times, "best_seconds": best,
                         "speedup": best["per_answer"] / best["shared"], "questions": len(items),
                         "answers": n_answers, "answer_tokens": n_tokens,
                         "questions_per_s": {arm: len(items) / s for arm, s in best.items()}}
        print(f"{name:>16}: shared {best['shared']:.2f} s, one forward per answer {best['per_answer']:.2f} s "
              f"-> speedup {figures[name]['speedup']:.2f}x ({len(items)} questions, {n_answers} answers)", flush=True)
    doc = {"meta": run_metadata(model, len(items), threads=args.threads, repeats=args.repeats,
                                load_average=os.getloadavg()),
           "speedup": figures["vanilla"]["speedup"],
           "speedup_dola_all_layers": figures["dola_all_layers"]["speedup"], "raw": figures}
    write_json(args.out, doc)
    print(f"wrote {args.out}")
    return doc


if __name__ == "__main__":
    main()
