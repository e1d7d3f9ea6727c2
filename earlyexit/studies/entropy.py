"""The entropy study: does per-layer lens entropy separate correct from wrong TruthfulQA answers?

Pipeline (see Part 2 of ``../shared/docs/protocols.md``):

1. :func:`generate_answers` — greedy answers to the 6-shot TruthfulQA prompt (stop at ``"\\nQ:"``, at most
   120 new tokens), and for every generated token and every layer the lens entropy (nats) at the position
   that predicted it, reduced at once to each answer's mean over its tokens (``means [N, E]``). Results
   are cached on disk per chunk of questions, so a re-run does not regenerate.
2. :func:`~earlyexit.studies.entropy_labels.score_answers` / ``label_answers`` — BERTScore labels.
3. :func:`analyse` — within-group token-weighted curves, bootstrap CIs over questions, per-layer tests,
   and the original's mis-weighted curves for comparison.
4. :func:`earlyexit.reports.entropy.save` — ``entropy_<model>.json`` and ``entropy_per_question_<model>.csv``;
   :func:`conclusion` — the text.

>>> study = run_entropy_study(model, tok, load_truthfulqa(limit=32))   # doctest: +SKIP
>>> print(conclusion(study))                                           # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from earlyexit.core import store
from earlyexit.core.lenses import LensLike, lens_record, resolve_lens
from earlyexit.studies.data import TruthfulQAItem
from earlyexit.studies.prompts import ENTROPY_MAX_NEW_TOKENS, ENTROPY_STOP
from earlyexit.studies.entropy_labels import (LABEL_METHODS, AnswerScores, check_label_method, check_threshold,
                                      label_answers, label_description, score_answers)
from earlyexit.studies.entropy_stats import (CurveCI, LayerTests, bootstrap_curve, bootstrap_difference, group_curves,
                                     layer_tests)

STOP = ENTROPY_STOP
MAX_NEW_TOKENS = ENTROPY_MAX_NEW_TOKENS
CACHE_VERSION = 1


# --- generation -----------------------------------------------------------------------------------

@dataclass
class AnswerEntropy:
    """Generated answers and their per-layer mean entropy.

    indices ``[N]``: TruthfulQA row of each answer; texts: answers as generated (stop string stripped,
    whitespace kept); n_tokens ``[N]``; means ``[N, E]``: mean lens entropy (nats) over the answer's
    tokens at each layer, NaN for an answer with zero tokens; layers: the E hidden-state entries;
    parallel: in an ``accelerate launch`` run, which questions each process answered (for the metadata).
    """

    indices: np.ndarray
    texts: list[str]
    n_tokens: np.ndarray
    means: np.ndarray
    layers: list[int]
    lens: str
    parallel: dict | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        N, E = len(self.texts), len(self.layers)
        if self.indices.shape != (N,) or self.n_tokens.shape != (N,) or self.means.shape != (N, E):
            raise ValueError(f"AnswerEntropy shapes disagree: indices {self.indices.shape}, n_tokens "
                             f"{self.n_tokens.shape}, means {self.means.shape}, {N} texts, {E} layers")

    @property
    def empty(self) -> np.ndarray:
        """``[N]`` True where the answer has zero tokens (no entropy)."""
        return self.n_tokens == 0

    @classmethod
    def concat(cls, parts: Sequence["AnswerEntropy"]) -> "AnswerEntropy":
        return cls(np.concatenate([p.indices for p in parts]), [t for p in parts for t in p.texts],
                   np.concatenate([p.n_tokens for p in parts]), np.concatenate([p.means for p in parts]),
                   parts[0].layers, parts[0].lens)


def _generate(model, tokenizer, items: Sequence[TruthfulQAItem], *, lens: LensLike, max_new_tokens: int,
              batch_size: int, layers: Sequence[int] | None, progress: bool) -> AnswerEntropy:
    from earlyexit.core.generation import generate_with_lens
    from earlyexit.studies.prompts import truthfulqa_prompt

    gens = generate_with_lens(model, tokenizer, [truthfulqa_prompt(it.question) for it in items],
                              max_new_tokens=max_new_tokens, stop=STOP, layers=layers, lens=lens, top_k=1,
                              batch_size=batch_size, share_prefix=True, progress=progress)
    E = len(gens[0].layers)
    means = np.full((len(gens), E), np.nan)
    for i, g in enumerate(gens):
        if g.entropy.shape != (E, len(g.token_ids)):
            raise RuntimeError(f"answer {i}: entropy shape {tuple(g.entropy.shape)} ≠ [{E}, {len(g.token_ids)}]")
        if len(g.token_ids):
            means[i] = g.entropy.double().mean(-1).numpy()
    return AnswerEntropy(np.array([it.index for it in items], dtype=int), [g.text for g in gens],
                         np.array([len(g.token_ids) for g in gens], dtype=int), means, list(gens[0].layers),
                         resolve_lens(model, lens).name)


def default_cache_dir() -> Path:
    """The store's ``entropy`` area (see :mod:`earlyexit.core.store`)."""
    return store.area("entropy")


def _cache_entry(cache: Path, settings: dict[str, Any], indices: Sequence[int]) -> tuple[Path, str]:
    key = store.make_key("entropy-answers", {**settings, "indices": list(map(int, indices)), "v": CACHE_VERSION})
    name = f"answers-{store.slug(settings['model'])}-{settings['lens']}-{indices[0]}-{indices[-1]}-{key[:16]}.npz"
    return cache / name, key


def _save_part(path: Path, key: str, part: AnswerEntropy) -> None:
    store.write_npz(path, key, {"indices": part.indices, "texts": np.array(part.texts, dtype=str),
                                "n_tokens": part.n_tokens, "means": part.means,
                                "layers": np.array(part.layers, dtype=int), "lens": np.array(part.lens)})


def _load_part(path: Path, key: str) -> AnswerEntropy | None:
    z = store.read_npz(path, key)
    if z is None:
        return None
    return AnswerEntropy(z["indices"], [str(t) for t in z["texts"]], z["n_tokens"], z["means"],
                         [int(x) for x in z["layers"]], str(z["lens"]))


def generate_answers(model, tokenizer, items: Sequence[TruthfulQAItem], *, lens: LensLike = "normed",
                     max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 16,
                     layers: Sequence[int] | None = None, cache_dir: str | Path | None | bool = None,
                     chunk_size: int = 128, progress: bool = True) -> AnswerEntropy:
    """Greedy answers and per-layer mean entropy for ``items`` (batched; one primer prefill, reused).

    ``cache_dir``: folder for per-chunk results (``None`` → the store's ``entropy`` area, ``False`` →
    no cache). Each chunk of ``chunk_size`` questions is keyed by the model's weights fingerprint, lens,
    settings and question indices (verified on read), and written atomically, so an interrupted run
    resumes where it stopped.

    In an ``accelerate launch`` group the chunks still to compute (decided on the main process) are
    sharded over the processes (:func:`earlyexit.core.parallel.map_cached`, whole chunks, contiguous);
    each process writes its own chunks' cache files and the parts are gathered in question order, so
    every process returns the answers one process would.
    """
    from earlyexit.core import parallel
    from earlyexit.core.models import model_name

    if len(items) == 0:
        raise ValueError("No questions given: pass at least one TruthfulQA item.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    lens = resolve_lens(model, lens)
    settings = {"model": model_name(model), "weights": store.model_fingerprint(model), **lens_record(lens),
                "max_new_tokens": max_new_tokens, "stop": list(STOP),
                "batch_size": batch_size, "layers": None if layers is None else list(map(int, layers))}
    cache = None if cache_dir is False else Path(cache_dir) if cache_dir not in (None, True) else default_cache_dir()
    chunk = max(batch_size, chunk_size // batch_size * batch_size)
    groups = [items[start:start + chunk] for start in range(0, len(items), chunk)]
    entries = [_cache_entry(cache, settings, [it.index for it in g]) if cache is not None else (None, "")
               for g in groups]
    def load(j: int) -> AnswerEntropy | None:
        path, key = entries[j]
        return _load_part(path, key) if path is not None else None

    def compute(j: int) -> AnswerEntropy:
        part = _generate(model, tokenizer, groups[j], lens=lens, max_new_tokens=max_new_tokens,
                         batch_size=batch_size, layers=layers, progress=progress and parallel.is_main_process())
        if entries[j][0] is not None:
            _save_part(*entries[j], part)
        return part

    parts, meta = parallel.map_cached(len(groups), load, compute, ids=lambda j: [it.index for it in groups[j]],
                                      unit=chunk, desc="entropy chunks", progress=progress)
    answers = AnswerEntropy.concat(parts)
    answers.parallel = meta
    return answers


# --- analysis -------------------------------------------------------------------------------------

def early_layers(layers: Sequence[int]) -> list[int]:
    """The "early" entries: 1 .. L//4 (at least entry 1), where L is the last entry."""
    L = max(layers)
    return [e for e in layers if 1 <= e <= max(1, L // 4)]


@dataclass
class GroupResult:
    """One labelling's comparison. ``labels [N]``: 1 correct, 0 wrong, NaN unlabelled.

    correct / wrong: within-group token-weighted curves with bootstrap CIs; difference: wrong − correct;
    original: the original study's mis-weighted ``(correct, wrong)`` curves; token_share: the share of the
    compared tokens in each group (``correct``, ``wrong``).
    """

    method: str
    description: str
    labels: np.ndarray
    correct: CurveCI
    wrong: CurveCI
    difference: CurveCI
    original: tuple[np.ndarray, np.ndarray]
    tests: LayerTests
    token_share: tuple[float, float]

    def as_dict(self) -> dict:
        from earlyexit.studies.entropy_stats import _jsonable

        return {"method": self.method, "description": self.description,
                "n_correct": self.tests.n_correct, "n_wrong": self.tests.n_wrong,
                "n_unlabelled": int(np.isnan(self.labels).sum()),
                "token_share": dict(zip(("correct", "wrong"), _jsonable(np.array(self.token_share)))),
                "correct": self.correct.as_dict(), "wrong": self.wrong.as_dict(),
                "difference_wrong_minus_correct": self.difference.as_dict(),
                "original_weighting": {"correct": _jsonable(self.original[0]), "wrong": _jsonable(self.original[1])},
                "tests": self.tests.as_dict()}


@dataclass
class EntropyStudy:
    """Everything the notebook plots and ``entropy_<model>.json`` stores."""

    model: str
    items: list[TruthfulQAItem]
    answers: AnswerEntropy
    scores: AnswerScores
    overall: CurveCI
    groups: dict[str, GroupResult]
    settings: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return self.answers.layers

    @property
    def n(self) -> int:
        return len(self.items)

    @property
    def usable(self) -> np.ndarray:
        """``[N]`` answers with ≥ 1 token and non-blank text (the ones compared)."""
        return ~self.answers.empty & self.scores.valid


def analyse_group(answers: AnswerEntropy, labels: np.ndarray, method: str, threshold: float, *,
                  n_boot: int, n_perm: int, correction: str, seed: int) -> GroupResult:
    """Curves, CIs and tests for one labelling; answers with no tokens or no label are left out."""
    keep = ~answers.empty & ~np.isnan(labels)
    means, n_tok, g = answers.means[keep], answers.n_tokens[keep], labels[keep] == 1
    ci_c = bootstrap_curve(means[g], n_tok[g], n_boot=n_boot, seed=seed)
    ci_w = bootstrap_curve(means[~g], n_tok[~g], n_boot=n_boot, seed=seed + 1)
    diff = bootstrap_difference(means, n_tok, g, n_boot=n_boot, seed=seed + 2)
    original = group_curves(means, n_tok, g, weighting="original")
    tests = layer_tests(means, n_tok, g, n_perm=n_perm, correction=correction, seed=seed + 3)
    total = n_tok.sum()
    share = (float(n_tok[g].sum() / total), float(n_tok[~g].sum() / total)) if total else (float("nan"),) * 2
    return GroupResult(method, label_description(method, threshold), labels, ci_c, ci_w, diff, original, tests, share)


def analyse(answers: AnswerEntropy, scores: AnswerScores, *, threshold: float = 0.85,
            methods: Sequence[str] = LABEL_METHODS, n_boot: int = 2000, n_perm: int = 5000,
            correction: str = "holm", seed: int = 0) -> tuple[CurveCI, dict[str, GroupResult]]:
    """The overall curve (all non-empty answers) and one :class:`GroupResult` per label method."""
    check_threshold(threshold)
    for m in methods:
        check_label_method(m)
    if len(scores.valid) != len(answers.texts):
        raise ValueError(f"{len(scores.valid)} scores but {len(answers.texts)} answers")
    ne = ~answers.empty
    overall = bootstrap_curve(answers.means[ne], answers.n_tokens[ne], n_boot=n_boot, seed=seed)
    groups = {m: analyse_group(answers, label_answers(scores, m, threshold), m, threshold, n_boot=n_boot,
                               n_perm=n_perm, correction=correction, seed=seed) for m in methods}
    return overall, groups


def run_entropy_study(model, tokenizer, items: Sequence[TruthfulQAItem], *, lens: LensLike = "normed",
                      threshold: float = 0.85, scorer: str = "minilm", methods: Sequence[str] = LABEL_METHODS,
                      max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 16, n_boot: int = 2000,
                      n_perm: int = 5000, correction: str = "holm", seed: int = 0,
                      cache_dir: str | Path | None | bool = None, progress: bool = True) -> EntropyStudy:
    """Generate, score, label and analyse: the whole study on ``items``."""
    from earlyexit.studies.bertscore import check_scorer, scorer_description
    from earlyexit.core.meta import data_files, run_metadata
    from earlyexit.core.models import model_name
    check_threshold(threshold)
    check_scorer(scorer)
    lens = resolve_lens(model, lens)
    for m in methods:
        check_label_method(m)
    data = data_files(items)  # the data files' names, row counts and sha256, for the metadata
    items = list(items)
    answers = generate_answers(model, tokenizer, items, lens=lens, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, cache_dir=cache_dir, progress=progress)
    scores = score_answers(answers.texts, items, scorer=scorer)
    overall, groups = analyse(answers, scores, threshold=threshold, methods=methods, n_boot=n_boot,
                              n_perm=n_perm, correction=correction, seed=seed)
    settings = {"lens": lens.name, "threshold": threshold, "label_methods": list(methods), "bertscore_model": scorer,
                "bertscore_description": scorer_description(scorer), "max_new_tokens": max_new_tokens,
                "stop": list(STOP), "batch_size": batch_size, "prompt": "TruthfulQA 6-shot QA primer",
                "decoding": "greedy", "n_boot": n_boot, "ci_level": 0.95, "n_permutations": n_perm,
                "correction": correction, "seed": seed, "aggregation":
                "per-answer mean over its tokens; token-weighted mean normalised within each group"}
    return EntropyStudy(model_name(model), items, answers, scores, overall, groups, settings,
                        run_metadata(model, len(items), data=data, parallel=answers.parallel, **settings))


# --- results --------------------------------------------------------------------------------------

def study_summary(study: EntropyStudy) -> dict[str, Any]:
    """The JSON-ready results: metadata, counts, per-layer curves with CIs, p-values, the conclusion."""
    a = study.answers
    return {
        "meta": study.meta,
        "n": study.n,
        "layers": a.layers,
        "early_layers": early_layers(a.layers),
        "counts": {"questions": study.n, "zero_token_answers": int(a.empty.sum()),
                   "blank_answers": int((~study.scores.valid).sum()), "compared_answers": int(study.usable.sum()),
                   "tokens": int(a.n_tokens.sum()), "hit_max_new_tokens": int((a.n_tokens >= study.settings.get(
                       "max_new_tokens", MAX_NEW_TOKENS)).sum())},
        "bertscore_model": study.scores.description,
        "mean_entropy_all_answers": study.overall.as_dict(),
        "groups": {m: g.as_dict() for m, g in study.groups.items()},
        "conclusion": conclusion(study),
    }


def per_question_rows(study: EntropyStudy) -> list[dict[str, Any]]:
    a, s = study.answers, study.scores
    rows = []
    for i, item in enumerate(study.items):
        row = {"index": int(a.indices[i]), "question": item.question, "answer": a.texts[i].strip(),
               "n_tokens": int(a.n_tokens[i]), "bertscore_f1_best": s.f1_best[i], "max_f1_true": s.max_true[i],
               "max_f1_false": s.max_false[i]}
        for m, g in study.groups.items():
            row[f"correct_{m}"] = "" if np.isnan(g.labels[i]) else int(g.labels[i])
        for e, v in zip(a.layers, a.means[i]):
            row[f"entropy_layer_{e}"] = v
        # 6 decimals: BERTScore varies in the 7th between runs (padding), which would only add noise to diffs
        rows.append({k: ("" if np.isnan(v) else round(float(v), 6)) if isinstance(v, (float, np.floating)) else v
                     for k, v in row.items()})
    return rows


def _fmt_range(x: np.ndarray) -> str:
    return f"{np.nanmin(x):+.3f} to {np.nanmax(x):+.3f}"


def group_verdict(g: GroupResult, layers: Sequence[int], alpha: float = 0.05) -> dict[str, Any]:
    """Whether early-layer entropy separates the groups: ≥ 1 early layer significant after correction."""
    early = early_layers(layers)
    idx = [list(layers).index(e) for e in early]
    t = g.tests
    out: dict[str, Any] = {"early_layers": early, "n_correct": t.n_correct, "n_wrong": t.n_wrong}
    if t.n_correct < 2 or t.n_wrong < 2:
        out["verdict"] = "too few answers"
        return out
    sig_mw = [e for e, p in zip(early, t.mannwhitney_adj[idx]) if p < alpha]
    sig_perm = [e for e, p in zip(early, t.permutation_adj[idx]) if p < alpha]
    sig_all = [e for e, p in zip(layers, t.mannwhitney_adj) if p < alpha]
    auroc = t.auroc[idx]
    strength = float(np.max(np.abs(auroc - 0.5)))
    sig_auroc = [a for e, a in zip(early, auroc) if e in sig_mw]
    direction = ("higher" if all(a > 0.5 for a in sig_auroc) else "lower" if all(a < 0.5 for a in sig_auroc)
                 else "mixed") if sig_mw else None
    out.update({
        "significant_early_layers": sig_mw, "significant_early_layers_permutation": sig_perm,
        "significant_layers": sig_all, "difference_early": [float(x) for x in g.difference.estimate[idx]],
        "auroc_early": [float(x) for x in auroc], "max_abs_auroc_minus_half_early": strength,
        "separates": bool(sig_mw), "wrong_answers_entropy": direction,
        # AUROC within 0.2 of chance is a weak separation, however small the p-value
        "verdict": ("separates" if sig_mw and strength >= 0.2 else "separates only weakly" if sig_mw
                    else "does not separate"),
    })
    return out


_PHRASE = {"separates": "separates correct from wrong answers",
           "separates only weakly": "separates correct from wrong answers only weakly",
           "does not separate": "does not separate correct from wrong answers"}


def conclusion(study: EntropyStudy, alpha: float = 0.05) -> str:
    """A markdown conclusion computed from the study's numbers (model, n, verdict per labelling)."""
    a = study.answers
    layers = a.layers
    early = early_layers(layers)
    lines = [
        f"**{study.model}**, n = {study.n} TruthfulQA questions, {study.settings.get('lens', a.lens)} lens, "
        f"answers scored by BERTScore with {study.scores.description}. "
        f"{int(a.empty.sum())} answers had no tokens and {int((~study.scores.valid).sum())} were blank; "
        f"they are left out of the comparison. Early layers = entries {early[0]}–{early[-1]} of {max(layers)}."
    ]
    for m, g in study.groups.items():
        v = group_verdict(g, layers, alpha)
        head = f"- **{g.description}**: {v['n_correct']} correct vs {v['n_wrong']} wrong answers"
        if v["verdict"] == "too few answers":
            lines.append(f"{head} — too few answers in a group to compare (a subset run); no verdict.")
            continue
        idx = [layers.index(e) for e in early]
        d = g.difference.estimate[idx]
        k = idx[int(np.nanargmax(np.abs(d)))]
        j = int(np.nanargmax(np.abs(g.tests.auroc - 0.5)))
        lines.append(
            f"{head} ({100 * g.token_share[0]:.0f}% / {100 * g.token_share[1]:.0f}% of tokens). "
            f"Wrong − correct mean entropy in the early layers: {_fmt_range(d)} nats (largest at layer "
            f"{layers[k]}: {g.difference.estimate[k]:+.3f}, 95% CI {g.difference.low[k]:+.3f} to "
            f"{g.difference.high[k]:+.3f}); "
            f"{len(v['significant_early_layers'])} of {len(early)} early layers differ significantly "
            f"(Mann–Whitney on per-question means, {g.tests.correction.capitalize()}-corrected over {len(layers)} "
            f"layers, α = {alpha}), {len(v['significant_layers'])} of {len(layers)} layers overall; "
            f"the permutation test of the token-weighted difference finds "
            f"{len(v['significant_early_layers_permutation'])} of {len(early)} early layers; "
            f"early-layer AUROC {np.min(v['auroc_early']):.2f}–{np.max(v['auroc_early']):.2f}"
            + (f" (wrong answers have {v['wrong_answers_entropy']} entropy where the difference is significant)"
               if v["wrong_answers_entropy"] else "") + ". "
            f"Strongest separation at any layer: layer {layers[j]} (AUROC {g.tests.auroc[j]:.2f}, difference "
            f"{g.difference.estimate[j]:+.3f} nats, adjusted p {g.tests.mannwhitney_adj[j]:.2g}). "
            f"**Early-layer entropy {_PHRASE[v['verdict']]}** for this model and n"
            + (f" (with only {min(v['n_correct'], v['n_wrong'])} answers in the smaller group the test has little "
               "power: no evidence either way)." if min(v["n_correct"], v["n_wrong"]) < 30 and not v["separates"]
               else "."))
        oc, ow = g.original
        ratio = np.nanmean(ow[idx]) / np.nanmean(oc[idx]) if np.nanmean(oc[idx]) else float("nan")
        true_ratio = np.nanmean(g.wrong.estimate[idx]) / np.nanmean(g.correct.estimate[idx])
        lines.append(
            f"  With the original's weighting the early-layer wrong/correct ratio would be {ratio:.2f} "
            f"instead of {true_ratio:.2f}: the token-share ratio {g.token_share[1] / g.token_share[0]:.2f} "
            f"times the real one — the scale factor behind the original headline, not a finding.")
    return "\n".join(lines)
