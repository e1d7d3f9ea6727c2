"""The exit-strategy analysis: when does each token of a greedy answer settle, and what would an exit policy save?

For every token of the greedy TruthfulQA answers (the entropy study's protocol: 6-shot primer, stop at
``"\\nQ:"``, at most 120 new tokens) and every hidden-state entry e = 0..L, the lens's top-1 token, top-1
and top-2 probabilities and entropy at the position that predicted the token
(:func:`~earlyexit.core.generation.generate_with_lens`). From them:

- the **settling entry** of a token: the earliest entry from which the lens's top-1 equals the emitted token
  and stays equal up to L (:func:`settling_entries`); entry L always agrees (greedy);
- the **oracle saving**: the share of the L layer computations an all-knowing exit at the settling entry
  would skip, ``1 − Σ settle / (L · tokens)``;
- both split by correct vs wrong answers (the entropy study's two BERTScore labels) — token-weighted means
  with 95% bootstrap intervals over questions, the wrong − correct difference with a stratified bootstrap
  interval, and a two-sided Mann–Whitney test and permutation test on the per-answer means
  (:mod:`earlyexit.studies.entropy_stats`) — and by token position in the answer;
- **exit policies**: exit at the first entry whose lens confidence passes λ — top-1 probability ≥ λ,
  top-1 − top-2 margin ≥ λ (CALM's best measure), entropy ≤ λ — as curves of mean layers used against
  agreement with the full model's token; λ chosen on a calibration half of the questions for a target
  agreement and reported on the other half (:func:`calibrate_policies`).

The policies are simulated on the full model's hidden states: a decoder that really exits
(``earlyexit.methods.early_exit``, ``decoding="early-exit"``) feeds later tokens KV propagated from the exit
state, which the simulation does not see, and pays the head at every checked entry.

>>> import numpy as np
>>> agree = np.array([[0, 1, 0, 1], [1, 1, 0, 1], [1, 1, 1, 1]], dtype=bool)   # [E = 3 entries, T = 4 tokens]
>>> settling_entries(agree, [0, 1, 2]).tolist()
[1, 0, 2, 0]
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from earlyexit.core import store
from earlyexit.core.lenses import LensLike, lens_record, resolve_lens
from earlyexit.studies.bootstrap import bootstrap_ci
from earlyexit.studies.data import TruthfulQAItem
from earlyexit.studies.prompts import ENTROPY_MAX_NEW_TOKENS, ENTROPY_STOP

MEASURES = ("prob", "margin", "entropy")
MEASURE_TEXT = {"prob": "top-1 probability ≥ λ", "margin": "top-1 − top-2 margin ≥ λ", "entropy": "entropy ≤ λ (nats)"}
POSITION_BINS = (0, 1, 2, 4, 8, 16, 32, 64)  # left edges: tokens 0, 1, 2–3, 4–7, …, 64+
TARGETS = (0.9, 0.95, 0.99)
CACHE_VERSION = 1


# --- per-token data -------------------------------------------------------------------------------

@dataclass
class ExitTokens:
    """Per-token lens readings of greedy answers.

    Per answer ``[N]``: indices (TruthfulQA rows), texts, n_tokens. Per token ``[T]``: answer (row in
    0..N−1), position (0 = the answer's first token). Per entry and token ``[E, T]``: agree (the lens's
    top-1 is the emitted token), prob (top-1 probability), margin (top-1 − top-2), entropy (nats).
    layers: the E entries (0..L); lens: its name. parallel: in an ``accelerate launch`` run, how the
    questions were sharded and which TruthfulQA rows each process answered (for the metadata; not kept by
    :meth:`concat` or :meth:`subset`).
    """

    indices: np.ndarray
    texts: list[str]
    n_tokens: np.ndarray
    answer: np.ndarray
    position: np.ndarray
    agree: np.ndarray
    prob: np.ndarray
    margin: np.ndarray
    entropy: np.ndarray
    layers: list[int]
    lens: str
    parallel: dict | None = field(default=None, compare=False)

    @property
    def L(self) -> int:
        return int(self.layers[-1])

    @property
    def n(self) -> int:
        return len(self.texts)

    @property
    def settle(self) -> np.ndarray:
        """``[T]`` settling entry of each token."""
        return settling_entries(self.agree, self.layers)

    def measure(self, name: str) -> np.ndarray:
        if name not in MEASURES:
            raise ValueError(f"Unknown confidence measure {name!r}; use one of {MEASURES}.")
        return getattr(self, name)

    @classmethod
    def concat(cls, parts: Sequence["ExitTokens"]) -> "ExitTokens":
        offsets = np.cumsum([0] + [p.n for p in parts[:-1]])
        return cls(np.concatenate([p.indices for p in parts]), [t for p in parts for t in p.texts],
                   np.concatenate([p.n_tokens for p in parts]),
                   np.concatenate([p.answer + o for p, o in zip(parts, offsets)]),
                   np.concatenate([p.position for p in parts]),
                   *(np.concatenate([getattr(p, k) for p in parts], axis=1) for k in ("agree", "prob", "margin",
                                                                                      "entropy")),
                   parts[0].layers, parts[0].lens)

    def subset(self, rows: np.ndarray) -> "ExitTokens":
        """The answers ``rows`` (indices into 0..N−1), their tokens renumbered."""
        rows = np.asarray(rows, dtype=int)
        remap = np.full(self.n, -1)
        remap[rows] = np.arange(len(rows))
        keep = np.isin(self.answer, rows)
        return ExitTokens(self.indices[rows], [self.texts[i] for i in rows], self.n_tokens[rows],
                          remap[self.answer[keep]], self.position[keep], self.agree[:, keep], self.prob[:, keep],
                          self.margin[:, keep], self.entropy[:, keep], self.layers, self.lens)


def settling_entries(agree: np.ndarray, layers: Sequence[int]) -> np.ndarray:
    """``[T]``: for each token (column of ``agree [E, T]``), the earliest entry of ``layers`` from which the
    lens's top-1 agrees with the emitted token at every later entry; the last entry when it does not agree
    even there (a tie at L)."""
    agree = np.asarray(agree, dtype=bool)
    if agree.ndim != 2 or agree.shape[0] != len(layers):
        raise ValueError(f"agree must be [E={len(layers)}, T], got {agree.shape}")
    stays = np.flip(np.logical_and.accumulate(np.flip(agree, 0), axis=0), 0)  # agrees here and at every later entry
    first = np.where(stays.any(0), stays.argmax(0), len(layers) - 1)
    return np.asarray(layers)[first]


def _from_generations(gens, items: Sequence[TruthfulQAItem], lens_name: str) -> ExitTokens:
    layers = list(gens[0].layers)
    answer, position, agree, prob, margin, entropy = [], [], [], [], [], []
    for i, g in enumerate(gens):
        n = len(g.token_ids)
        if not n:
            continue
        answer.append(np.full(n, i))
        position.append(np.arange(n))
        agree.append((g.token_ranks == 0).numpy())
        tp = g.top_probs.numpy()
        prob.append(tp[..., 0])
        margin.append(tp[..., 0] - tp[..., 1])
        entropy.append(g.entropy.numpy())
    E = len(layers)

    def cat(parts, dtype):
        return np.concatenate(parts, axis=-1).astype(dtype) if parts else np.zeros((E, 0), dtype)

    return ExitTokens(np.array([it.index for it in items], dtype=int), [g.text for g in gens],
                      np.array([len(g.token_ids) for g in gens], dtype=int),
                      np.concatenate(answer) if answer else np.zeros(0, int),
                      np.concatenate(position) if position else np.zeros(0, int),
                      cat(agree, bool), cat(prob, np.float32), cat(margin, np.float32), cat(entropy, np.float32),
                      layers, lens_name)


_FIELDS = ("indices", "n_tokens", "answer", "position", "agree", "prob", "margin", "entropy")


def collect_tokens(model, tokenizer, items: Sequence[TruthfulQAItem], *, lens: LensLike = "normed",
                   max_new_tokens: int = ENTROPY_MAX_NEW_TOKENS, batch_size: int = 16, chunk_size: int = 128,
                   cache_dir: str | Path | None | bool = None, progress: bool = False) -> ExitTokens:
    """Greedy answers to ``items`` (N questions) and every token's lens readings at every entry, as
    :class:`ExitTokens` (``[N]`` per answer, ``[E, T]`` per entry and token), cached on disk per chunk of
    questions in the store's ``exit`` area (``cache_dir``: another folder, ``False``: no cache), keyed by
    the weights, lens and settings.

    In an ``accelerate launch`` group (every process calls it) the main process reads the cache, the
    chunks still to compute are sharded over the processes in whole chunks
    (:func:`earlyexit.core.parallel.map_cached`, contiguous), each process writes its own chunks' cache
    files, and the parts are gathered in question order: every process returns the tokens one process
    would, identical (each chunk runs the same batches), with ``parallel`` saying who answered what."""
    from earlyexit.core import parallel
    from earlyexit.core.generation import generate_with_lens
    from earlyexit.core.models import model_name
    from earlyexit.studies.prompts import truthfulqa_prompt

    if not items:
        raise ValueError("No questions given: pass at least one TruthfulQA item.")
    lens = resolve_lens(model, lens)
    settings = {"model": model_name(model), "weights": store.model_fingerprint(model), **lens_record(lens),
                "max_new_tokens": int(max_new_tokens), "stop": list(ENTROPY_STOP), "batch_size": int(batch_size),
                "v": CACHE_VERSION}
    cache = None if cache_dir is False else Path(cache_dir) if cache_dir not in (None, True) else store.area("exit")
    chunk = max(batch_size, chunk_size // batch_size * batch_size)
    groups = [items[start:start + chunk] for start in range(0, len(items), chunk)]

    def entry(group) -> tuple[Path | None, str]:
        idx = [it.index for it in group]
        key = store.make_key("exit-tokens", {**settings, "indices": idx})
        path = None if cache is None else \
            cache / f"tokens-{store.slug(settings['model'])}-{lens.name}-{idx[0]}-{idx[-1]}-{key[:16]}.npz"
        return path, key

    def load(path: Path | None, key: str) -> ExitTokens | None:
        z = store.read_npz(path, key) if path is not None and path.exists() else None
        if z is None:
            return None
        return ExitTokens(z["indices"], [str(t) for t in z["texts"]], z["n_tokens"], z["answer"], z["position"],
                          z["agree"], z["prob"], z["margin"], z["entropy"], [int(x) for x in z["layers"]],
                          str(z["lens"]))

    entries = [entry(g) for g in groups]

    def compute(j: int) -> ExitTokens:
        group = groups[j]
        gens = generate_with_lens(model, tokenizer, [truthfulqa_prompt(it.question) for it in group],
                                  max_new_tokens=max_new_tokens, stop=ENTROPY_STOP, layers=None, lens=lens,
                                  top_k=2, batch_size=batch_size, share_prefix=True,
                                  progress=progress and parallel.is_main_process())
        part = _from_generations(gens, group, lens.name)
        path, key = entries[j]
        if path is not None:
            store.write_npz(path, key, {**{k: getattr(part, k) for k in _FIELDS},
                                        "texts": np.array(part.texts, dtype=str),
                                        "layers": np.array(part.layers, dtype=int), "lens": np.array(part.lens)})
        return part

    parts, meta = parallel.map_cached(len(groups), lambda j: load(*entries[j]), compute,
                                      ids=lambda j: [it.index for it in groups[j]], unit=chunk,
                                      desc="exit chunks", progress=progress)
    tokens = ExitTokens.concat(parts)
    tokens.parallel = meta
    return tokens


# --- settling entries -----------------------------------------------------------------------------

def per_answer_means(tokens: ExitTokens, values: np.ndarray) -> np.ndarray:
    """``[N]`` each answer's mean of per-token ``values [T]`` (NaN for an answer without tokens)."""
    sums = np.bincount(tokens.answer, weights=np.asarray(values, dtype=float), minlength=tokens.n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tokens.n_tokens > 0, sums / np.maximum(tokens.n_tokens, 1), np.nan)


def _ratio_ci(tokens: ExitTokens, values: np.ndarray, rows: np.ndarray | None = None, *, n_boot: int,
              seed: int) -> dict[str, float]:
    """Token-weighted mean of ``values [T]`` over the answers ``rows`` with a bootstrap CI over answers."""
    rows = np.arange(tokens.n) if rows is None else np.asarray(rows, dtype=int)
    sums = np.bincount(tokens.answer, weights=np.asarray(values, dtype=float), minlength=tokens.n)[rows]
    counts = tokens.n_tokens[rows].astype(float)
    ok = counts > 0
    if not ok.any():
        return {"estimate": None, "low": None, "high": None, "n_answers": 0, "n_tokens": 0}
    pairs = np.stack([sums[ok], counts[ok]], 1)
    ci = bootstrap_ci(pairs, lambda a: a[:, 0].sum() / a[:, 1].sum(), n_boot=n_boot, seed=seed)
    return {**ci.as_dict(), "n_answers": int(ok.sum()), "n_tokens": int(counts.sum())}


def histogram(settle: np.ndarray, L: int) -> list[int]:
    """Tokens per settling entry 0..L."""
    return np.bincount(np.asarray(settle, dtype=int), minlength=L + 1)[:L + 1].tolist()


def settling_summary(tokens: ExitTokens, *, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Histogram of settling entries, their token-weighted mean and the oracle saving, with CIs."""
    settle = tokens.settle
    L = tokens.L
    mean = _ratio_ci(tokens, settle, n_boot=n_boot, seed=seed)
    saving = {k: (None if v is None else 1 - v / L) if k in ("estimate", "low", "high") else v
              for k, v in mean.items()}
    saving["low"], saving["high"] = saving["high"], saving["low"]  # 1 − x reverses the interval
    return {"histogram": histogram(settle, L), "mean_entry": mean, "oracle_saving": saving,
            "share_settled_by": {str(e): float((settle <= e).mean()) if len(settle) else None for e in tokens.layers}}


def by_label(tokens: ExitTokens, labels: np.ndarray, *, n_boot: int = 2000, n_perm: int = 5000,
             seed: int = 0) -> dict[str, Any]:
    """Settling entries of correct (label 1) vs wrong (label 0) answers: token-weighted means with CIs,
    histograms (share of the group's tokens), the wrong − correct difference with a stratified bootstrap
    CI, and two-sided Mann–Whitney and permutation tests on the per-answer means. Unlabelled answers and
    answers without tokens are left out."""
    from earlyexit.studies.entropy_stats import bootstrap_difference, layer_tests

    labels = np.asarray(labels, dtype=float)
    if labels.shape != (tokens.n,):
        raise ValueError(f"{labels.shape[0]} labels for {tokens.n} answers")
    settle = tokens.settle
    L = tokens.L
    use = np.isfinite(labels) & (tokens.n_tokens > 0)
    rows = np.flatnonzero(use)
    means = per_answer_means(tokens, settle)[rows][:, None]
    n_tok = tokens.n_tokens[rows].astype(float)
    groups = labels[rows] == 1
    out: dict[str, Any] = {}
    for name, want in (("correct", True), ("wrong", False)):
        g = rows[groups == want]
        mask = np.isin(tokens.answer, g)
        h = np.bincount(settle[mask].astype(int), minlength=L + 1)[:L + 1]
        out[name] = {"mean_entry": _ratio_ci(tokens, settle, g, n_boot=n_boot, seed=seed),
                     "histogram_share": (h / max(h.sum(), 1)).tolist(), "n_answers": int(len(g)),
                     "n_tokens": int(mask.sum())}
    diff = bootstrap_difference(means, n_tok, groups, n_boot=n_boot, seed=seed)
    tests = layer_tests(means, n_tok, groups, n_perm=n_perm, seed=seed) if len(rows) else None
    out["difference_wrong_minus_correct"] = {"estimate": _num(diff.estimate[0]), "low": _num(diff.low[0]),
                                             "high": _num(diff.high[0])}
    out["tests"] = None if tests is None else {
        "mannwhitney_p": _num(tests.mannwhitney_p[0]), "auroc_wrong_later": _num(tests.auroc[0]),
        "permutation_p": _num(tests.permutation_p[0]), "n_permutations": n_perm,
        "statistic": "per-answer mean settling entry; permutation of the token-weighted difference"}
    return out


def by_position(tokens: ExitTokens, bins: Sequence[int] = POSITION_BINS, *, n_boot: int = 2000,
                seed: int = 0) -> list[dict[str, Any]]:
    """Mean settling entry of the tokens at each position bin of the answer (left edges ``bins``), with a
    bootstrap CI over answers."""
    settle = tokens.settle.astype(float)
    edges = list(bins) + [np.inf]
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (tokens.position >= lo) & (tokens.position < hi)
        label = f"{lo}" if hi == lo + 1 else (f"{lo}+" if not np.isfinite(hi) else f"{lo}–{int(hi) - 1}")
        values = np.where(mask, settle, 0.0)
        sums = np.bincount(tokens.answer, weights=values, minlength=tokens.n)
        counts = np.bincount(tokens.answer, weights=mask.astype(float), minlength=tokens.n)
        ok = counts > 0
        if not ok.any():
            out.append({"positions": label, "n_tokens": 0, "estimate": None, "low": None, "high": None})
            continue
        ci = bootstrap_ci(np.stack([sums[ok], counts[ok]], 1), lambda a: a[:, 0].sum() / a[:, 1].sum(),
                          n_boot=n_boot, seed=seed)
        out.append({"positions": label, "n_tokens": int(mask.sum()), "n_answers": int(ok.sum()), **ci.as_dict()})
    return out


def _num(x) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


# --- exit policies --------------------------------------------------------------------------------

def exit_entries(tokens: ExitTokens, measure: str, threshold: float, allowed: Sequence[int] | None = None) -> np.ndarray:
    """``[T]``: the entry each token leaves at under "the first allowed entry whose confidence passes λ"
    (L when none does). ``allowed``: entries 1..L−1 where the exit is checked (default all)."""
    L = tokens.L
    allowed = list(range(1, L)) if allowed is None else sorted(allowed)
    rows = [tokens.layers.index(e) for e in allowed]
    values = tokens.measure(measure)[rows]
    ok = values <= threshold if measure == "entropy" else values >= threshold
    first = ok.argmax(0)
    return np.where(ok.any(0), np.asarray(allowed)[first], L)


def policy_outcome(tokens: ExitTokens, exits: np.ndarray) -> tuple[float, float]:
    """(mean layers used, agreement with the full model's token) of exits ``[T]``."""
    idx = np.searchsorted(tokens.layers, exits)
    agree = tokens.agree[idx, np.arange(len(exits))]
    return float(np.mean(exits)), float(np.mean(agree))


def threshold_grid(tokens: ExitTokens, measure: str, n: int = 60, allowed: Sequence[int] | None = None) -> np.ndarray:
    """Thresholds spread over the measure's values at the allowed entries (quantiles), with both ends: one
    that always exits and one that never does."""
    L = tokens.L
    allowed = list(range(1, L)) if allowed is None else allowed
    v = tokens.measure(measure)[[tokens.layers.index(e) for e in allowed]].ravel()
    q = np.quantile(v, np.linspace(0, 1, n)) if v.size else np.zeros(0)
    if measure == "entropy":
        ends = [0.0 - 1e-9, float(v.max()) + 1.0 if v.size else 1.0]
    else:
        ends = [0.0, 1.0 + 1e-9]
    return np.unique(np.concatenate([q, ends]))


def policy_curve(tokens: ExitTokens, measure: str, thresholds: Sequence[float] | None = None,
                 allowed: Sequence[int] | None = None) -> dict[str, list]:
    """Mean layers used and agreement at each threshold (sorted by mean layers)."""
    thresholds = threshold_grid(tokens, measure, allowed=allowed) if thresholds is None else np.asarray(thresholds)
    rows = []
    for t in thresholds:
        m, a = policy_outcome(tokens, exit_entries(tokens, measure, float(t), allowed))
        rows.append((m, a, float(t)))
    rows.sort()
    return {"threshold": [r[2] for r in rows], "mean_layers": [r[0] for r in rows], "agreement": [r[1] for r in rows]}


def choose_threshold(tokens: ExitTokens, measure: str, target: float, allowed: Sequence[int] | None = None
                     ) -> tuple[float, float, float]:
    """The threshold with the fewest mean layers whose agreement on ``tokens`` is ≥ ``target``:
    ``(λ, mean layers, agreement)``."""
    curve = policy_curve(tokens, measure, allowed=allowed)
    ok = [i for i, a in enumerate(curve["agreement"]) if a >= target]
    i = ok[0] if ok else len(curve["threshold"]) - 1
    return curve["threshold"][i], curve["mean_layers"][i], curve["agreement"][i]


def split_answers(n: int, calibration_share: float = 0.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of answer rows into a calibration part and a test part (never the same questions)."""
    if not 0 < calibration_share < 1:
        raise ValueError(f"calibration_share must be in (0, 1), got {calibration_share}")
    perm = np.random.default_rng(seed).permutation(n)
    k = max(1, min(n - 1, int(round(n * calibration_share)))) if n > 1 else n
    return np.sort(perm[:k]), np.sort(perm[k:])


def calibrate_policies(tokens: ExitTokens, *, targets: Sequence[float] = TARGETS, calibration_share: float = 0.5,
                       allowed: Sequence[int] | None = None, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """λ for each measure and target agreement, chosen on the calibration answers; mean layers, layer
    saving and agreement reported on the test answers with bootstrap CIs over them; the oracle (exit at
    the settling entry) on the same test answers."""
    has = np.flatnonzero(tokens.n_tokens > 0)
    cal_rows, test_rows = split_answers(len(has), calibration_share, seed)
    cal, test = tokens.subset(has[cal_rows]), tokens.subset(has[test_rows])
    L = tokens.L
    out: dict[str, Any] = {"calibration_answers": cal.n, "test_answers": test.n, "calibration_tokens": int(len(cal.answer)),
                           "test_tokens": int(len(test.answer)), "seed": seed, "policies": [],
                           "oracle": {"mean_layers": _ratio_ci(test, test.settle, n_boot=n_boot, seed=seed),
                                      "agreement": 1.0}}
    for measure in MEASURES:
        for target in targets:
            lam, m_cal, a_cal = choose_threshold(cal, measure, target, allowed)
            exits = exit_entries(test, measure, lam, allowed)
            idx = np.searchsorted(test.layers, exits)
            agree = test.agree[idx, np.arange(len(exits))].astype(float)
            layers = _ratio_ci(test, exits, n_boot=n_boot, seed=seed)
            out["policies"].append({
                "measure": measure, "target_agreement": target, "threshold": lam,
                "calibration": {"mean_layers": m_cal, "agreement": a_cal},
                "test": {"mean_layers": layers, "agreement": _ratio_ci(test, agree, n_boot=n_boot, seed=seed),
                         "saving": None if layers["estimate"] is None else 1 - layers["estimate"] / L}})
    return out


# --- the whole study ------------------------------------------------------------------------------

def analyse(tokens: ExitTokens, labels: dict[str, np.ndarray] | None = None, *, allowed: Sequence[int] | None = None,
            targets: Sequence[float] = TARGETS, n_boot: int = 2000, n_perm: int = 5000, seed: int = 0
            ) -> dict[str, Any]:
    """Every number of the analysis for one lens (JSON-ready)."""
    out: dict[str, Any] = {
        "lens": tokens.lens, "L": tokens.L, "n_answers": tokens.n, "n_tokens": int(len(tokens.answer)),
        "zero_token_answers": int((tokens.n_tokens == 0).sum()),
        "settling": settling_summary(tokens, n_boot=n_boot, seed=seed),
        "by_position": by_position(tokens, n_boot=n_boot, seed=seed),
        "curves": {m: policy_curve(tokens, m, allowed=allowed) for m in MEASURES},
        "calibrated": calibrate_policies(tokens, targets=targets, allowed=allowed, n_boot=n_boot, seed=seed),
    }
    out["by_label"] = {name: by_label(tokens, lab, n_boot=n_boot, n_perm=n_perm, seed=seed)
                       for name, lab in (labels or {}).items()}
    return out


def available_lenses(model, wanted: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(usable, skipped)``: the tuned lens only where one is stored (it is not trained here)."""
    usable, skipped = [], []
    for name in wanted:
        if name == "tuned":
            try:
                from earlyexit.core.tuned_lens import tuned_lens_for

                tuned_lens_for(model, train=False)
            except (FileNotFoundError, ValueError, ImportError):
                skipped.append(name)
                continue
        resolve_lens(model, name)
        usable.append(name)
    return usable, skipped


@dataclass
class DecoderRun:
    """One decoding of the same questions: its answers, per-token exit entries and time."""

    name: str
    settings: dict[str, Any]
    token_ids: list[list[int]]
    texts: list[str]
    exit_entries: list[list[int]]
    seconds: float


def calibrated_configs(analysis: dict[str, Any], target: float = 0.95) -> list[dict[str, Any]]:
    """``early-exit`` settings that replay the calibrated policies of :func:`calibrate_policies` (one per
    measure, the λ chosen for ``target``, every entry 1..L−1 checked, as in the simulation)."""
    L = analysis["L"]
    out = []
    for p in analysis["calibrated"]["policies"]:
        if p["target_agreement"] == target:
            lam = float(p["threshold"])
            lam = min(max(lam, 0.0), 1.0) if p["measure"] != "entropy" else max(lam, 0.0)
            out.append({"confidence": p["measure"], "threshold": lam, "exit_entries": list(range(1, L))})
    return out


def compare_decoders(model, tokenizer, items: Sequence[TruthfulQAItem], configs: Sequence[dict[str, Any]], *,
                     max_new_tokens: int = ENTROPY_MAX_NEW_TOKENS) -> dict[str, Any]:
    """Greedy and each ``early-exit`` setting in ``configs`` on the same questions (batch 1, the entropy
    study's prompt and stop): token agreement with greedy (position by position over greedy's tokens),
    exact-match share, ROUGE-L F of the answer against greedy's, mean layers per token, tokens/s."""
    import time

    from earlyexit.methods.dola import generate
    from earlyexit.studies.openended import rouge_l
    from earlyexit.studies.prompts import truthfulqa_prompt

    prompts = [truthfulqa_prompt(it.question) for it in items]

    def run(decoding: str, settings: dict[str, Any]):
        t0 = time.perf_counter()
        outs = generate(model, tokenizer, prompts, decoding=decoding, repetition_penalty=1.0, batch_size=1,
                        max_new_tokens=max_new_tokens, stop=ENTROPY_STOP, method_settings=settings or None)
        return outs, time.perf_counter() - t0

    L = resolve_lens(model, "normed").n_layers
    generate(model, tokenizer, prompts[:1], decoding="vanilla", repetition_penalty=1.0, max_new_tokens=2,
             stop=ENTROPY_STOP)  # warm-up; computes the primer's cache that every run then shares
    greedy, t_greedy = run("vanilla", {})
    g_tokens = sum(len(o.token_ids) for o in greedy)
    rows = [{"name": "greedy", "settings": {}, "tokens_per_s": g_tokens / t_greedy, "mean_layers": float(L),
             "tokens_per_answer": g_tokens / max(len(items), 1),
             "token_agreement": 1.0, "identical": 1.0, "rouge_l": 1.0, "n_tokens": g_tokens}]
    for cfg in configs:
        outs, dt = run("early-exit", cfg)
        agree = [np.mean([a == b for a, b in zip(o.token_ids, g.token_ids)]) if g.token_ids else 1.0
                 for o, g in zip(outs, greedy)]
        exits = [e for o in outs for e in o.info.get("exit_entry", [])]
        n_tok = sum(len(o.token_ids) for o in outs)
        rouge = rouge_l([o.text.strip() or "." for o in outs], [g.text.strip() or "." for g in greedy])
        rows.append({"name": "early-exit", "settings": dict(cfg), "tokens_per_s": n_tok / dt,
                     "tokens_per_answer": n_tok / max(len(items), 1),
                     "mean_layers": float(np.mean(exits)) if exits else None,
                     "token_agreement": float(np.mean(agree)),
                     "identical": float(np.mean([o.token_ids == g.token_ids for o, g in zip(outs, greedy)])),
                     "rouge_l": float(np.mean(rouge)), "n_tokens": n_tok})
    return {"n_questions": len(items), "max_new_tokens": max_new_tokens, "rows": rows,
            "note": "token agreement position by position over greedy's tokens; answers differ in length, so "
                    "tokens/s (this machine, prefill included) is no speed comparison: bench/exit.py times equal "
                    "lengths"}
