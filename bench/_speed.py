"""The decoding-speed harness shared by ``bench/dola.py`` and ``bench/sled.py``: our ``generate`` against
transformers' greedy ``generate(do_sample=False)`` on the same prompts, batch and token counts.

Each contestant is a function ``(prompts, n) -> (wall seconds, process CPU seconds)`` that generates exactly
``n`` tokens per prompt. :func:`measure` warms every contestant up, then alternates their order over the
repeats (short and long runs), and derives per contestant: decode tokens/s from the time difference between
a long and a short generation (prefill cancels out), the same from CPU time and from the fastest calls, and
end-to-end tokens/s of the long calls.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

Timed = Callable[[list[str], int], "tuple[float, float]"]


def parse_runs(spec: str) -> list[tuple[str, int]]:
    """``"smollm2-135m:1,8;gemma3-270m:1"`` → ``[("smollm2-135m", 1), ("smollm2-135m", 8), ...]``."""
    out = []
    for part in spec.split(";"):
        name, sizes = part.split(":")
        out += [(name.strip(), int(b)) for b in sizes.split(",")]
    return out


def load_average() -> str | None:
    p = Path("/proc/loadavg")
    return " ".join(p.read_text().split()[:3]) if p.exists() else None


def transformers_greedy(model, tok, pad: int) -> Timed:
    """transformers' greedy ``generate`` with ``min_new_tokens = max_new_tokens = n``."""
    import torch

    @torch.no_grad()
    def hf(prompts, n):
        enc = tok(prompts, return_tensors="pt", padding=True)
        t0, c0 = time.perf_counter(), time.process_time()
        seq = model.generate(**enc, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=pad)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        assert seq.shape[1] - enc["input_ids"].shape[1] == n, "transformers generated a different length"
        return dt, dc
    return hf


def ours(model, tok, decoding: str, **settings) -> Timed:
    """``earlyexit.methods.dola.generate`` with ``decoding``: no stop string, ``ignore_eos``, the primer not
    shared (both sides prefill the whole prompt every call), the whole batch at once."""
    from earlyexit.methods.dola import generate

    def run(prompts, n):
        t0, c0 = time.perf_counter(), time.process_time()
        outs = generate(model, tok, prompts, decoding=decoding, max_new_tokens=n, stop=(), batch_size=len(prompts),
                        share_prefix=False, ignore_eos=True, **settings)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        assert all(len(o.token_ids) == n for o in outs), f"{decoding} generated a different length"
        return dt, dc
    return run


def measure(label: str, contestants: list[tuple[str, Timed]], prompts: list[str], tok, *, n_short: int,
            n_long: int, repeats: int) -> dict:
    """Time every contestant (name, function) on ``prompts``; the figures of one model and batch size, with
    per-contestant tokens/s (``decode_tokens_per_s`` etc.; ratios are for the caller to take)."""
    B = len(prompts)
    for _, fn in contestants:  # warm-up
        fn(prompts, n_short)
    load_start = load_average()
    keys = [(c, n) for c, _ in contestants for n in (n_short, n_long)]
    times: dict = {k: [] for k in keys}
    cpu: dict = {k: [] for k in keys}
    for r in range(repeats):
        order = contestants if r % 2 == 0 else contestants[::-1]
        for n in (n_short, n_long):
            for key, fn in order:
                wall, proc = fn(prompts, n)
                times[(key, n)].append(wall)
                cpu[(key, n)].append(proc)
        print(f"{label} repeat {r + 1}/{repeats}: "
              + ", ".join(f"{k}@{n}={v[-1]:.2f}s" for (k, n), v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    decode, decode_cpu = {}, {}
    for key, _ in contestants:
        diffs = [b - a for a, b in zip(times[(key, n_short)], times[(key, n_long)])]
        decode[key] = B * (n_long - n_short) / statistics.median(diffs)
        diffs = [b - a for a, b in zip(cpu[(key, n_short)], cpu[(key, n_long)])]
        decode_cpu[key] = B * (n_long - n_short) / statistics.median(diffs)
    return {
        "decode_tokens_per_s": decode,
        "decode_tokens_per_s_fastest": {key: B * (n_long - n_short) / (min(times[(key, n_long)]) - min(times[(key, n_short)]))
                                        for key, _ in contestants},
        "decode_tokens_per_cpu_s": decode_cpu,
        "end_to_end_tokens_per_s": {key: B * n_long / med[(key, n_long)] for key, _ in contestants},
        "median_seconds": {f"{k}@{n}": v for (k, n), v in med.items()},
        "all_seconds": {f"{k}@{n}": v for (k, n), v in times.items()},
        "all_cpu_seconds": {f"{k}@{n}": v for (k, n), v in cpu.items()},
        "batch_size": B,
        "prompt_tokens": [len(tok(p)["input_ids"]) for p in prompts],
        "load_average_at_start": load_start,
        "load_average_at_end": load_average(),
    }


def ratios(entry: dict, name: str, baseline: str = "hf") -> dict[str, float]:
    """``name``'s figures ÷ the baseline's: ``ratio`` (decode steps), ``ratio_end_to_end``, ``ratio_cpu_time``,
    ``ratio_min`` (from the fastest calls)."""
    pairs = {"ratio": "decode_tokens_per_s", "ratio_end_to_end": "end_to_end_tokens_per_s",
             "ratio_cpu_time": "decode_tokens_per_cpu_s", "ratio_min": "decode_tokens_per_s_fastest"}
    return {k: entry[f][name] / entry[f][baseline] for k, f in pairs.items()}
