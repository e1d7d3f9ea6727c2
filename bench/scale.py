"""Data parallelism on this machine: TruthfulQA MC, 2 processes × 1 thread against 1 process × 2 threads
(and 1 process × 1 thread, the same work per process as the 2-process arm).

Every arm scores the same questions with the same code (what ``earlyexit truthfulqa mc`` runs:
:func:`~earlyexit.studies.mc.mc_raw_sharded`, :func:`~earlyexit.studies.mc.evaluate`, one results file
written by the main process). The 2-process arm is started by accelerate's own launcher (``accelerate
launch --multi_gpu --num_processes 2``: torchrun; the group runs on CPU over gloo); the others are a plain
``python``. Checked: 2 processes × 1 thread give exactly the results of 1 process × 1 thread (sharding
changes nothing); 1 process × 2 threads differs from them only by float rounding (BLAS splits its sums
differently with two threads), reported as the largest score difference. Each process records when it
started, when its imports, process group and model load were done, how long its share of the questions
took and how long the gather took, so the report splits each arm's wall time into work, load imbalance
(the faster process waiting in the gather) and per-process overhead (launcher, imports, model load,
gather of the last process to arrive, exit).

On a 2-core machine the arms share the same two cores: 2 × 1 against 1 × 2 measures what data parallelism
costs (the launcher, a second import and model load, the gather), not what it gains. On N GPUs the work
part divides by N and the overhead stays about what is measured here per process (plus loading the
weights from disk, N copies at once).

    python bench/scale.py                       # SmolLM2, 40 questions, DoLa (high bucket)
    python bench/scale.py --questions 8 --decoding vanilla
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _worker(args: argparse.Namespace) -> None:
    """One process of an arm: the CLI's MC path, with a timestamp after each phase."""
    import psutil

    # the process's start from /proc: about ±1 s (counted from a boot time in whole seconds), so the launcher's
    # share (launch_to_process_s) is that coarse; every other mark is time.time()
    marks = {"created": psutil.Process().create_time()}
    import torch

    from earlyexit.core import parallel
    from earlyexit.core.meta import run_metadata
    from earlyexit.core.models import load_model
    from earlyexit.core.results import MCResults, write_result
    from earlyexit.studies.data import load_truthfulqa
    from earlyexit.studies.mc import evaluate, mc_layers, mc_raw_sharded

    marks["imported"] = time.time()
    parallel.state()  # the process group (none in the 1-process arm)
    parallel.barrier()
    marks["group"] = time.time()
    items = load_truthfulqa(limit=args.questions)
    model, tok = load_model(args.model)
    marks["model"] = time.time()
    layers = mc_layers(model)["high"] if args.decoding == "dola" else []
    plan = parallel.assignment(len(items))[parallel.process_index()]
    # the share of this process, timed on its own, then the gather (mc_raw_sharded does both)
    real_gather = parallel.gather
    timing = {}

    def timed_gather(obj):
        timing["work"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        out = real_gather(obj)
        timing["gather"] = time.perf_counter() - t1
        return out

    parallel.gather = timed_gather
    t0 = time.perf_counter()
    try:
        raws, info = mc_raw_sharded(model, tok, items, layers=layers, lens="raw")
    finally:
        parallel.gather = real_gather
    timing.setdefault("work", time.perf_counter() - t0)
    timing.setdefault("gather", 0.0)
    kw = {"candidates": layers} if args.decoding == "dola" else {}
    res = evaluate(raws, args.decoding, n_boot=200, **kw)
    write_result(args.out, MCResults.KIND, {"meta": run_metadata(model, len(items), parallel=info,
                                                                 decoding=args.decoding, candidates=layers),
                                            "decodings": {args.decoding: res.as_dict()}})
    marks["end"] = time.time()
    rank = parallel.process_index()
    Path(f"{args.out}.rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "threads": torch.get_num_threads(), "questions": len(plan), "marks": marks, **timing}))


def shown(cmd: list[str], out: Path) -> list[str]:
    """``cmd`` as the results file records it: no path of this machine (the interpreter and the venv's
    launcher by name, the repository's files relative to it, the temporary results folder as ``<tmp>``)."""
    def one(arg: str) -> str:
        p = Path(arg)
        if not p.is_absolute():
            return arg
        if p.parent == Path(sys.executable).parent:
            return p.name  # python, accelerate
        if p.is_relative_to(REPO):
            return str(p.relative_to(REPO))
        if p.is_relative_to(out.parent):
            return str(Path("<tmp>") / p.relative_to(out.parent))
        return p.name
    return [one(a) for a in cmd]


def _arm(name: str, cmd: list[str], threads: int, out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1")
    load_before = os.getloadavg()
    start = time.time()
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - start
    if run.returncode:
        raise RuntimeError(f"{name} failed:\n{run.stderr[-4000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted(out.parent.glob(out.name + ".rank*.json"))]
    per = []
    for r in ranks:
        m = r["marks"]
        per.append({"rank": r["rank"], "threads": r["threads"], "questions": r["questions"],
                    "launch_to_process_s": m["created"] - start,  # the launcher (and torchrun) before this process
                    "imports_s": m["imported"] - m["created"], "process_group_s": m["group"] - m["imported"],
                    "model_load_s": m["model"] - m["group"], "work_s": r["work"], "gather_s": r["gather"],
                    "evaluate_and_write_s": m["end"] - m["model"] - r["work"] - r["gather"],
                    "exit_s": start + wall - m["end"]})
    comm = min(p["gather_s"] for p in per)  # the last process to arrive waits for nobody: the transfer itself
    for p in per:
        p["imbalance_s"] = p["gather_s"] - comm
        p["overhead_s"] = p["launch_to_process_s"] + p["imports_s"] + p["process_group_s"] + p["model_load_s"] + \
            comm + p["exit_s"]
    return {"arm": name, "command": shown(cmd, out), "threads_per_process": threads, "wall_s": wall, "processes": per,
            "work_s": max(p["work_s"] for p in per), "load_average_before": load_before,
            "load_average_after": os.getloadavg()}


def _max_score_difference(a: dict, b: dict) -> float:
    out = 0.0
    for da, db in zip(a["decodings"].values(), b["decodings"].values()):
        for x, y in zip(da["items"], db["items"]):
            for k in ("scores_true", "scores_false"):
                out = max([out] + [abs(u - v) for u, v in zip(x[k], y[k])])
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--questions", type=int, default=40)
    ap.add_argument("--decoding", choices=("dola", "vanilla"), default="dola")
    ap.add_argument("--out", default=str(REPO / "results" / "bench_scale.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args)
        return {}

    from earlyexit.core.atomic import write_json
    from earlyexit.core.meta import library_versions

    accelerate = str(Path(sys.executable).parent / "accelerate")
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    me = [str(Path(__file__).resolve()), "--worker", "--model", args.model, "--questions", str(args.questions),
          "--decoding", args.decoding]
    arms = {}
    load_before = os.getloadavg()
    for name, threads, launcher in (
            ("1 process x 2 threads", 2, [sys.executable]),
            ("2 processes x 1 thread", 1, [accelerate, "launch", "--multi_gpu", "--num_processes", "2",
                                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                                           "--main_process_port", "0"]),
            ("1 process x 1 thread", 1, [sys.executable])):
        out = tmp / f"{len(arms)}.json"
        arms[name] = _arm(name, launcher + me + ["--out", str(out)], threads, out)
        arms[name]["result"] = json.loads(out.read_text())
        a = arms[name]
        print(f"{name}: wall {a['wall_s']:.1f} s, work {a['work_s']:.1f} s, overhead per process "
              + ", ".join(f"{p['overhead_s']:.1f} s" for p in a["processes"]), flush=True)
    one, two, single = arms["1 process x 2 threads"], arms["2 processes x 1 thread"], arms["1 process x 1 thread"]
    strip = lambda doc: {k: v for k, v in doc.items() if k != "meta"}  # noqa: E731
    identical = strip(two["result"]) == strip(single["result"])
    if not identical:
        raise AssertionError("2 processes x 1 thread and 1 process x 1 thread gave different MC results")
    o1, o2 = single["processes"][0]["overhead_s"], [p["overhead_s"] for p in two["processes"]]
    doc = {
        "machine": {"cpus": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "questions": args.questions, "decoding": args.decoding, "model": args.model,
        "results_identical_2x1_vs_1x1": identical,
        "max_score_difference_1x2_vs_1x1": _max_score_difference(strip(one["result"]), strip(single["result"])),
        "mc_equal_1x2_vs_1x1": {k: one["result"]["decodings"][args.decoding][k] ==
                                single["result"]["decodings"][args.decoding][k] for k in ("mc1", "mc2", "mc3")},
        "wall_ratio_1x2_over_2x1": one["wall_s"] / two["wall_s"],
        "work_ratio_1x2_over_2x1": one["work_s"] / two["work_s"],
        "wall_ratio_1x1_over_2x1": single["wall_s"] / two["wall_s"],
        "overhead_s": {"1 process x 2 threads": one["processes"][0]["overhead_s"], "1 process x 1 thread": o1,
                       "2 processes x 1 thread": o2, "extra_per_process_s": sum(o2) / len(o2) - o1},
        "imbalance_s": max(p["imbalance_s"] for p in two["processes"]),
        "arms": {k: {kk: vv for kk, vv in v.items() if kk != "result"} for k, v in arms.items()},
        "versions": library_versions(),
        "note": "all arms share the same 2 CPU cores (and the machine with other jobs: see the load averages): "
                "2x1 against 1x2 measures the overhead of data parallelism, not its gain",
    }
    write_json(args.out, doc)
    print(f"wall 1x2 / 2x1 = {doc['wall_ratio_1x2_over_2x1']:.2f}, 1x1 / 2x1 = {doc['wall_ratio_1x1_over_2x1']:.2f}; "
          f"work 1x2 / 2x1 = {doc['work_ratio_1x2_over_2x1']:.2f}; overhead per process {doc['overhead_s']}; "
          f"imbalance {doc['imbalance_s']:.1f} s; 2x1 == 1x1: {identical}; 1x2 vs 1x1 max score difference "
          f"{doc['max_score_difference_1x2_vs_1x1']:.2g}\nwrote {args.out}")
    return doc


if __name__ == "__main__":
    main()
