"""The TruthfulQA evaluation of ``dola.ipynb``: MC and open-ended runs, cached, with their tables.

Raw outputs are cached in ``results_dir`` (MC: per-token log-probs in ``results_dir/cache``; answers:
``dola_generate_<decoding>_<model>.json``, the same files the CLI writes), keyed by model, questions and
settings, so re-running the notebook after the full runs costs only the scoring.

>>> mc = run_mc(model, tok, items, results_dir="results")            # doctest: +SKIP
>>> mc_rows(mc)                                                      # doctest: +SKIP
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from earlyexit.core.results import GenerateResults, MCResults, ScoresResults, write_result
from earlyexit.studies.data import TruthfulQAItem
from earlyexit.studies.mc import METRICS, evaluate, mc_layers, mc_raw_available, mc_raw_cached, static_cross_validation
from earlyexit.studies.openended import generate_answers, generation_settings, score_completions_cached, summarise_rows

# Figures quoted from the literature, shown beside ours with the model they come from.
PAPER_MC = {  # DoLa paper (Chuang et al. 2023), TruthfulQA MC, LLaMA-7B — quoted from the paper
    "model": "LLaMA-7B (quoted from the DoLa paper)",
    "vanilla": {"mc1": 0.256, "mc2": 0.406, "mc3": 0.192},
    "dola": {"mc1": 0.322, "mc2": 0.638, "mc3": 0.321},
}
STUDY_OPEN_ENDED = {  # the original study's table (Llama-7B-class generations), see protocols Part 4
    "model": "Llama-7B-class (the original study's table)",
    "vanilla": {"bleu": 0.2444, "rouge_l": 0.4098, "bertscore": 0.9005},
    "dola": {"bleu": 0.1639, "rouge_l": 0.3470, "bertscore": 0.8919},
    "bertscore_model": "roberta-large",
}


def _mc_raws(model, tokenizer, items, *, layers, lens, allow_partial, progress, sled=None):
    """The cached per-token MC arrays of ``items`` (computing what is missing unless ``allow_partial``
    finds an unfinished run to use as it is) and which questions each process scored."""
    raws = mc_raw_available(model, items, layers=layers, lens=lens, sled=sled) if allow_partial else []
    if len(raws) == len(items) or not raws:
        return mc_raw_cached(model, tokenizer, items, layers=layers, lens=lens, progress=progress, sled=sled,
                             return_info=True)
    return raws, None


DOLA_ROWS = ("vanilla", "dola-high", "dola-low", "dola-static (2-fold CV)")


def saved_dola_rows(results_dir: str | Path, model, items: Sequence[TruthfulQAItem], *, lens: str,
                    layers: dict[str, list[int]], n_boot: int, seed: int) -> dict[str, Any] | None:
    """The MC results file in ``results_dir`` when it holds the vanilla and DoLa rows of this model, these
    questions (same data file, same n) and these settings (lens, buckets, bootstrap), complete; else ``None``.

    Those rows are a function of the DoLa pass's arrays alone, so a run that adds SLED to them may take them
    as they are instead of repeating that pass when its cache is not at hand (another machine, a cleared
    cache): on Gemma-3 the pass takes over an hour on one core."""
    from earlyexit.core.errors import EarlyexitError
    from earlyexit.core.meta import data_files
    from earlyexit.core.models import model_name

    path = MCResults.path(results_dir, model)
    if not path.exists():
        return None
    try:
        doc = MCResults.load(path)
    except (EarlyexitError, OSError, ValueError):  # unreadable or another kind: nothing to reuse, the pass runs
        return None
    meta, settings = doc.get("meta", {}), doc.get("meta", {}).get("settings", {})
    same = (meta.get("model") == model_name(model) and meta.get("n") == len(items)
            and meta.get("data", []) == data_files(items) and settings.get("complete") is True
            and settings.get("lens") == lens and settings.get("buckets") == layers
            and settings.get("n_boot") == n_boot and settings.get("seed") == seed
            and all(k in doc.get("decodings", {}) for k in DOLA_ROWS) and "static" in doc
            and [it["index"] for it in doc["decodings"]["vanilla"]["items"]] == [it.index for it in items])
    return doc.to_dict() if same else None


def run_mc(model, tokenizer, items: Sequence[TruthfulQAItem], *, results_dir: str | Path = "results",
           lens: str = "raw", sled: bool = True, n_boot: int = 2000, seed: int = 0, allow_partial: bool = False,
           progress: bool = False) -> dict[str, Any]:
    """Vanilla, DoLa high, DoLa low and static DoLa (layer chosen by 2-fold cross-validation) from one
    pass over the questions, and with ``sled`` SLED (the authors' MC settings,
    :meth:`~earlyexit.methods.sled.SledSettings.mc`) from a second pass with a cache of its own (so the
    DoLa pass keeps its cache key with or without SLED; the second forward costs little beside SLED's
    head product at every premature entry), scored both by the evolved
    distribution's log-probabilities (the protocol of the other rows) and by the authors' default
    ``post_softmax=False`` (summed evolved logits); writes ``results_dir/dola_mc_<model>.json`` (a
    ``truthfulqa-mc`` results file) and returns its content.

    Adding SLED to a saved run: when the DoLa pass's cache is incomplete but ``results_dir`` holds its rows
    for this model, these questions and settings (:func:`saved_dola_rows`), they are kept as saved (the
    file's ``dola_rows`` setting says so) and only SLED's pass runs.

    ``allow_partial`` evaluates only the questions an unfinished cached run has done (``n`` says how
    many) instead of computing the rest."""
    from earlyexit.core.meta import run_metadata
    from earlyexit.methods.sled import SledSettings

    layers = mc_layers(model)
    saved = None
    if sled and len(mc_raw_available(model, items, layers=layers["all"], lens=lens)) < len(items):
        saved = saved_dola_rows(results_dir, model, items, lens=lens, layers=layers, n_boot=n_boot, seed=seed)
    info = None  # which questions each process of an accelerate launch group scored
    if saved is None:
        raws, info = _mc_raws(model, tokenizer, items, layers=layers["all"], lens=lens, allow_partial=allow_partial,
                              progress=progress)
        results = {
            "vanilla": evaluate(raws, "vanilla", n_boot=n_boot, seed=seed),
            "dola-high": evaluate(raws, "dola", candidates=layers["high"], n_boot=n_boot, seed=seed),
            "dola-low": evaluate(raws, "dola", candidates=layers["low"], n_boot=n_boot, seed=seed),
        }
        cv = static_cross_validation(raws, layers["all"], folds=2, seed=seed, n_boot=n_boot)
        results["dola-static (2-fold CV)"] = cv["cross_fitted"]
        decodings = {k: r.as_dict() for k, r in results.items()}
        static = {"folds": cv["folds"], "in_sample": cv["in_sample"], "criterion": cv["criterion"]}
        selection, n_done, dola_rows = cv["cross_fitted"].settings["selection"], len(raws), "computed"
    else:
        print(f"truthfulqa: the vanilla and DoLa MC rows are those saved in {MCResults.path(results_dir, model)} "
              f"(same model, questions and settings, made {saved['meta'].get('created')}); their pass's cache "
              "is not here, so only SLED's pass runs", flush=True)
        decodings = {k: saved["decodings"][k] for k in DOLA_ROWS}
        static, n_done = saved["static"], saved["meta"]["n"]
        selection = saved["meta"]["settings"]["static_selection"]
        dola_rows = f"reused from the results file made {saved['meta'].get('created')}"
    sled_settings = SledSettings.mc() if sled else None
    sled_raws = _mc_raws(model, tokenizer, items, layers=[], lens=lens, allow_partial=allow_partial,
                         progress=progress, sled=sled_settings)[0] if sled else []
    if sled_raws:
        decodings["sled"] = evaluate(sled_raws, "sled", n_boot=n_boot, seed=seed).as_dict()
        decodings["sled (authors' post_softmax=False)"] = evaluate(sled_raws, "sled", post_softmax=False,
                                                                   n_boot=n_boot, seed=seed).as_dict()
    doc = {
        "meta": run_metadata(model, n_done, data=items, parallel=info if info and info.num_processes > 1 else None,
                             lens=lens, questions_requested=len(items),
                             complete=n_done == len(items) and (not sled or len(sled_raws) == len(items)),
                             sled=sled_settings.as_dict() if sled else None, buckets=layers, plausibility=False,
                             answer_format="' ' + answer, '.' appended when missing",
                             static_selection=selection, n_boot=n_boot, seed=seed, dola_rows=dola_rows),
        "decodings": decodings,
        "static": static,
        "paper": PAPER_MC,
    }
    write_result(MCResults.path(results_dir, model), MCResults.KIND, doc)
    return doc


def mc_rows(doc: dict) -> list[dict]:
    """One row per decoding: estimates with their 95% CIs, n, the candidate layers."""
    rows = []
    for name, r in doc["decodings"].items():
        row: dict[str, Any] = {"decoding": name, "n": r["n"]}
        for k in METRICS:
            ci = r["ci"][k]
            row[k] = f"{ci['estimate']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"
        st = r["settings"]
        row["layers"] = "-" if name == "vanilla" else st["candidates"] if "candidates" in st else \
            f"all {len(st['layers'])} entries below the top" if st.get("layers") is not None else "-"
        rows.append(row)
    for name in ("vanilla", "dola"):
        p = doc["paper"][name]
        rows.append({"decoding": f"{name} — {doc['paper']['model']}", "n": 817,
                     **{k: f"{p[k]:.3f}" for k in ("mc1", "mc2", "mc3")}, "mc2_norm": "-", "layers": "-"})
    return rows


def open_ended_decodings(sled: bool = True) -> tuple[str, ...]:
    """The decodings of the open-ended runs: vanilla, DoLa high and (``sled``) SLED."""
    return ("vanilla", "dola", "sled") if sled else ("vanilla", "dola")


def run_open_ended(model, tokenizer, items: Sequence[TruthfulQAItem], *, results_dir: str | Path = "results",
                   batch_size: int = 16, bertscore: str = "minilm", n_boot: int = 2000, seed: int = 0,
                   sled: bool = True, allow_partial: bool = False, progress: bool = False) -> dict[str, Any]:
    """Vanilla (penalty 1.0), DoLa-high (1.2) and with ``sled`` SLED (the authors' generation settings,
    penalty 1.0) answers (reusing ``dola_generate_<decoding>_<model>.json`` when they hold this model,
    these questions and settings), scored; writes ``dola_scores_<model>.json``
    (``{"decodings": {name: scores}, "study": ...}``).

    ``allow_partial`` scores an unfinished answers file on the questions it has (reported as such)
    instead of finishing it.
    """
    import json

    from earlyexit.core.meta import run_metadata
    from earlyexit.core.models import model_name

    out: dict[str, Any] = {"generations": {}, "scores": {}}
    for decoding in open_ended_decodings(sled):
        settings = generation_settings(decoding, batch_size=batch_size)
        path = GenerateResults.path(results_dir, model, decoding=decoding)
        doc = None
        if allow_partial and path.exists():
            doc = json.loads(path.read_text())
            meta = doc.get("meta", {})
            if meta.get("settings") != settings or meta.get("model") != model_name(model) or not doc.get("items"):
                doc = None
        if doc is None:
            doc = generate_answers(model, tokenizer, items, settings, out=path, progress=progress)
        by_index = {it.index: it for it in items}
        rows = [r for r in doc["items"] if r["index"] in by_index]
        scores = score_completions_cached([by_index[r["index"]] for r in rows], [r["completion"] for r in rows],
                                          bertscore=bertscore, n_boot=n_boot, seed=seed)
        out["generations"][decoding] = doc
        out["scores"][decoding] = {**scores.summary, "settings": settings, "complete": bool(doc.get("complete")),
                                   "items": scores.items}
    sets = {k: {r["index"] for r in v["items"]} for k, v in out["scores"].items()}
    common = set.intersection(*sets.values())
    if any(s != common for s in sets.values()) and common:
        # an unfinished run: also compare both decodings on the questions both answered
        for k in list(out["scores"]):
            v = out["scores"][k]
            rows = [r for r in v["items"] if r["index"] in common]
            out["scores"][f"{k} (the {len(common)} questions both answered)"] = {
                **summarise_rows(rows, n_boot=n_boot, seed=seed), "settings": v["settings"],
                "complete": v["complete"], "items": []}
    write_result(ScoresResults.path(results_dir, model), ScoresResults.KIND,
                 {"meta": run_metadata(model, len(items), data=items, bertscore=bertscore, n_boot=n_boot, seed=seed),
                  "study": STUDY_OPEN_ENDED, "decodings": out["scores"]})
    return out


OPEN_METRICS = ("bleu", "rouge_l", "bertscore", "bleu_diff", "bleu_acc", "rouge_l_diff", "rouge_l_acc",
                "bertscore_diff", "bertscore_acc")


def open_ended_rows(scores: dict[str, dict]) -> list[dict]:
    """One row per decoding (estimate [95% CI]) and the original study's row for each."""
    rows = []
    for name, s in scores.items():
        row: dict[str, Any] = {"decoding": name, "n": s["n"], "complete": s["complete"]}
        for k in OPEN_METRICS:
            ci = s[k]
            row[k] = f"{ci['estimate']:.4f} [{ci['low']:.4f}, {ci['high']:.4f}]"
        rows.append(row)
    for name in ("vanilla", "dola"):
        st = STUDY_OPEN_ENDED[name]
        rows.append({"decoding": f"{name} — {STUDY_OPEN_ENDED['model']}", "n": 817, "complete": True,
                     **{k: f"{st[k]:.4f}" if k in st else "-" for k in OPEN_METRICS}})
    return rows


def _compare(a: dict, b: dict) -> str:
    """How interval ``a`` stands against interval ``b``: 'higher', 'lower' or 'overlapping'."""
    if a["low"] > b["high"]:
        return "higher"
    if a["high"] < b["low"]:
        return "lower"
    return "overlapping"


def open_ended_findings(scores: dict[str, dict], generations: dict[str, dict], *, base: str = "vanilla",
                        other: str = "dola", limit: int = 50) -> list[str]:
    """Sentences (markdown bullets) comparing ``other`` with ``base`` on the open-ended metrics, computed
    from the scores (estimates with 95% CIs) and the generations; empty when either run is missing.

    >>> ci = lambda e: {"estimate": e, "low": e - 0.01, "high": e + 0.01}
    >>> s = {k: {"n": 2, **{m: ci(v) for m in OPEN_METRICS}} for k, v in (("vanilla", 0.5), ("dola", 0.2))}
    >>> g = {k: {"items": [{"token_ids": [1] * 50, "completion": "a"}, {"token_ids": [1], "completion": "b"}]}
    ...      for k in s}
    >>> open_ended_findings(s, g)[0]
    '- BLEU: dola 0.200 [0.190, 0.210] vs vanilla 0.500 [0.490, 0.510] (lower, n = 2)'
    """
    if base not in scores or other not in scores:
        return []
    names = {"bleu": "BLEU", "rouge_l": "ROUGE-L", "bertscore": "BERTScore F1"}
    fmt = lambda ci: f"{ci['estimate']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"
    a, b = scores[other], scores[base]
    out = [f"- {names[k]}: {other} {fmt(a[k])} vs {base} {fmt(b[k])} ({_compare(a[k], b[k])}, n = {a['n']})"
           for k in names]
    out += [f"- closer to a true than to a false reference ({names[k]}): {other} {fmt(a[k + '_acc'])} vs {base} "
            f"{fmt(b[k + '_acc'])}; mean difference {other} {a[k + '_diff']['estimate']:+.3f}, "
            f"{base} {b[k + '_diff']['estimate']:+.3f}" for k in names]
    hit = {k: v["share at the token limit"] for k, v in answer_lengths(generations, limit).items()}
    out.append(f"- answers that ran into the {limit}-token limit: {other} {hit[other]:.1%}, {base} {hit[base]:.1%}")
    return out


def answer_lengths(generations: dict[str, dict], limit: int = 50) -> dict[str, dict]:
    """Per decoding: number of answers, mean new tokens, share of answers that reached ``limit`` new tokens,
    and empty answers."""
    out = {}
    for name, g in generations.items():
        n_tokens = [len(r["token_ids"]) for r in g["items"]]
        out[name] = {"answers": len(n_tokens), "mean new tokens": sum(n_tokens) / max(len(n_tokens), 1),
                     "share at the token limit": sum(n >= limit for n in n_tokens) / max(len(n_tokens), 1),
                     "empty answers": sum(not r["completion"] for r in g["items"])}
    return out


def premature_histograms(mc_doc: dict, generations: dict[str, dict]) -> dict[str, Counter]:
    """Counts of chosen premature layers: MC answer tokens (high, low buckets) and DoLa answer tokens."""
    out = {f"MC tokens, {k}": Counter({int(l): c for l, c in mc_doc["decodings"][k]["premature_counts"].items()})
           for k in ("dola-high", "dola-low")}
    if "dola" in generations:
        out["generated tokens, DoLa high"] = Counter(
            int(l) for r in generations["dola"]["items"] for l in r["premature_layers"] if l is not None)
    return out


def side_by_side(items: Sequence[TruthfulQAItem], generations: dict[str, dict], k: int = 6,
                 seed: int = 0) -> list[dict]:
    """``k`` questions (seeded choice among those answered by both decodings) with the Best Answer
    and both answers."""
    import random

    by = {name: {r["index"]: r["completion"] for r in g["items"]} for name, g in generations.items()}
    common = [it for it in items if all(it.index in d for d in by.values())]
    pick = sorted(random.Random(seed).sample(range(len(common)), min(k, len(common))))
    return [{"question": common[i].question, "best answer": common[i].best_answer,
             **{name: by[name][common[i].index] for name in by}} for i in pick]


def paired_differences(mc_doc: dict, base: str = "vanilla", n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """Per decoding, the mean per-question difference to ``base`` for each metric, with a paired 95%
    bootstrap CI (the same resampled questions for both)."""
    import numpy as np

    from earlyexit.studies.bootstrap import bootstrap_ci

    ref = {it["index"]: it for it in mc_doc["decodings"][base]["items"]}
    rows = []
    for name, r in mc_doc["decodings"].items():
        if name == base:
            continue
        row: dict[str, Any] = {"decoding": f"{name} − {base}"}
        both = [it for it in r["items"] if it["index"] in ref]  # an unfinished run: the questions both have
        row["n"] = len(both)
        for k in METRICS:
            d = np.array([it[k] - ref[it["index"]][k] for it in both])
            ci = bootstrap_ci(d, n_boot=n_boot, seed=seed)
            row[k] = f"{ci.estimate:+.3f} [{ci.low:+.3f}, {ci.high:+.3f}]"
        rows.append(row)
    return rows


def mc2_saturation(mc_doc: dict, tol: float = 1e-3) -> list[dict]:
    """Share of questions whose MC2 is within ``tol`` of 0 or 1, and the correlation of the summed DoLa
    score with answer length (why MC2 of summed contrast scores saturates; see protocols Part 4)."""
    import numpy as np

    rows = []
    for name, r in mc_doc["decodings"].items():
        mc2 = np.array([it["mc2"] for it in r["items"]])
        mc2n = np.array([it["mc2_norm"] for it in r["items"]])
        spread = np.array([max(it["scores_true"] + it["scores_false"]) - min(it["scores_true"] + it["scores_false"])
                           for it in r["items"]])
        rows.append({"decoding": name, "MC2 saturated (≤tol or ≥1−tol)": float(np.mean((mc2 <= tol) | (mc2 >= 1 - tol))),
                     "length-normalised MC2 saturated": float(np.mean((mc2n <= tol) | (mc2n >= 1 - tol))),
                     "median score spread within a question (nats)": float(np.median(spread))})
    return rows
