"""``Entropy.ipynb`` / ``earlyexit entropy``: per-layer lens entropy of correct vs wrong TruthfulQA answers.

Results: ``entropy_<model>.json`` (curves, CIs, tests, each answer's BERTScore, the conclusion) and
``entropy_per_question_<model>.csv`` beside it. Every figure is drawn from the JSON alone.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from earlyexit.core.results import EntropyResults, model_tag
from earlyexit.plotting import save_figure
from earlyexit.reports import load_or_compute as _load_or_compute

# parameters that decide the numbers (stored in the file and checked when it is reused)
PARAMETERS = ("model", "limit", "lens", "threshold", "scorer", "batch_size", "max_new_tokens", "n_boot", "n_perm")


def _float_list(a) -> list:
    return [None if not np.isfinite(x) else float(x) for x in np.asarray(a, dtype=float)]


def to_results(study, parameters: dict[str, Any] | None = None) -> EntropyResults:
    """An :class:`~earlyexit.studies.entropy.EntropyStudy` as its results file."""
    from earlyexit.studies.entropy import study_summary

    summary = study_summary(study)
    meta = summary.pop("meta")
    s, a = study.scores, study.answers
    summary["answers"] = {  # what the histograms need, per answer (the CSV has the full table)
        "index": [int(i) for i in a.indices], "n_tokens": [int(n) for n in a.n_tokens],
        "valid": [bool(v) for v in s.valid], "f1_best": _float_list(s.f1_best),
        "max_f1_true": _float_list(s.max_true), "max_f1_false": _float_list(s.max_false),
    }
    summary["parameters"] = dict(parameters or {"model": study.model})
    return EntropyResults(meta=meta, payload=summary)


def save(study, results_dir="results", parameters: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``entropy_<model>.json`` and ``entropy_per_question_<model>.csv`` (atomically)."""
    from earlyexit.core.atomic import write_text
    from earlyexit.studies.entropy import per_question_rows

    res = to_results(study, parameters)
    js = res.save(EntropyResults.path(results_dir, study.model))
    rows = per_question_rows(study)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    cs = EntropyResults.csv_path(results_dir, study.model)
    from earlyexit.core.parallel import is_main_process

    if is_main_process():  # one writer in an accelerate launch group (the JSON's save checks the same)
        write_text(cs, buf.getvalue())
    return js, cs


def compute(model: str = "smollm2-135m", *, limit: int | None = None, data_dir=None, lens: str = "normed",
            threshold: float = 0.85, scorer: str = "minilm", batch_size: int = 16, max_new_tokens: int = 120,
            n_boot: int = 2000, n_perm: int = 5000, cache_dir=None, progress: bool = True):
    """Generate, score, label and analyse (:func:`~earlyexit.studies.entropy.run_entropy_study`); returns
    ``(study, parameters)``. Cheap inputs are checked before the model is loaded."""
    from earlyexit.core.models import load_model
    from earlyexit.studies.bertscore import check_scorer
    from earlyexit.studies.data import load_truthfulqa
    from earlyexit.studies.entropy import run_entropy_study
    from earlyexit.studies.entropy_labels import check_threshold

    check_threshold(threshold)
    check_scorer(scorer)
    items = load_truthfulqa(data_dir, limit)
    llm, tok = load_model(model)
    study = run_entropy_study(llm, tok, items, lens=lens, threshold=threshold, scorer=scorer, batch_size=batch_size,
                              max_new_tokens=max_new_tokens, n_boot=n_boot, n_perm=n_perm, cache_dir=cache_dir,
                              progress=progress)
    parameters = {"model": model, "limit": limit, "lens": lens, "threshold": threshold, "scorer": scorer,
                  "batch_size": batch_size, "max_new_tokens": max_new_tokens, "n_boot": n_boot, "n_perm": n_perm}
    return study, parameters


def load_or_compute(results_dir="results", *, recompute: bool = False, model: str = "smollm2-135m",
                    limit: int | None = None, data_dir=None, lens: str = "normed", threshold: float = 0.85,
                    scorer: str = "minilm", batch_size: int = 16, max_new_tokens: int = 120, n_boot: int = 2000,
                    n_perm: int = 5000, cache_dir=None, progress: bool = True) -> EntropyResults:
    """``results_dir/entropy_<model>.json``: read it (``recompute=False`` and present), else run the study
    and write it with its CSV."""
    paths = {"json": EntropyResults.path(results_dir, model), "csv": EntropyResults.csv_path(results_dir, model)}
    wanted = {"model": model, "limit": limit, "lens": lens, "threshold": threshold, "scorer": scorer,
              "max_new_tokens": max_new_tokens, "n_boot": n_boot, "n_perm": n_perm}

    def run():
        study, parameters = compute(model, limit=limit, data_dir=data_dir, lens=lens, threshold=threshold,
                                    scorer=scorer, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                    n_boot=n_boot, n_perm=n_perm, cache_dir=cache_dir, progress=progress)
        save(study, results_dir, parameters)
        return EntropyResults.load(paths["json"])  # what a redraw reads, so both draw the same

    return _load_or_compute(paths, lambda: EntropyResults.load(paths["json"]), run, recompute=recompute,
                            parameters=wanted, what="entropy")


# --- tables and figures ----------------------------------------------------------------------------

def _arr(x) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in x], dtype=float)


def _ci(d: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    return _arr(d["estimate"]), _arr(d["low"]), _arr(d["high"]), d["n"]


def _settings(res) -> dict:
    return res.meta.get("settings", {})


def _tag(res) -> str:
    return f"{res.model}, n = {res['n']}, {_settings(res).get('lens', 'normed')} lens"


def _name(res, figure: str) -> str:
    return f"{figure}_{model_tag(res.parameters.get('model') or res.model)}"


def summary(res) -> str:
    c = res["counts"]
    return (f"{res.model}: n = {res['n']} questions, {c['tokens']} answer tokens, {c['zero_token_answers']} answers "
            f"with no tokens, {c['blank_answers']} blank answers\nBERTScore: {res['bertscore_model']}")


def plot_all_answers(res, figures_dir="figures"):
    """Mean lens entropy per layer over all answers, with its 95% bootstrap band."""
    import matplotlib.pyplot as plt

    layers, early = np.array(res["layers"]), res["early_layers"]
    est, low, high, n = _ci(res["mean_entropy_all_answers"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(layers, est, marker=".", label=f"all answers ({n})")
    ax.fill_between(layers, low, high, alpha=0.3, label="95% bootstrap CI")
    ax.axvspan(min(early) - 0.5, max(early) + 0.5, color="grey", alpha=0.1, label="early layers")
    ax.set(xlabel="layer (hidden-state entry)", ylabel="mean lens entropy (nats)",
           title=f"Per-token lens entropy, token-weighted mean\n{_tag(res)}")
    ax.legend()
    save_figure(fig, _name(res, "entropy_all_answers"), figures_dir)
    return fig


def plot_bertscore(res, figures_dir="figures"):
    """Histograms of the two labels' inputs: F1 vs the Best Answer, and the true − false margin."""
    import matplotlib.pyplot as plt

    a = res["answers"]
    valid = np.array(a["valid"], dtype=bool)
    threshold = _settings(res).get("threshold", 0.85)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    axes[0].hist(_arr(a["f1_best"])[valid], bins=np.linspace(0, 1, 41), color="C0")
    axes[0].axvline(threshold, color="k", ls="--", label=f"threshold {threshold:g}")
    axes[0].set(xlabel="BERTScore F1 vs Best Answer", ylabel="answers", title="Original label: F1 ≥ threshold")
    axes[0].legend()
    max_false = _arr(a["max_f1_false"])
    margin = (_arr(a["max_f1_true"]) - np.where(np.isnan(max_false), -np.inf, max_false))[valid]
    axes[1].hist(margin[np.isfinite(margin)], bins=40, color="C1")
    axes[1].axvline(0, color="k", ls="--", label="0: equally close")
    axes[1].set(xlabel="max F1 to a true reference − max F1 to a false one", ylabel="answers",
                title="Strict label: closer to a true reference")
    axes[1].legend()
    fig.suptitle(f"{_tag(res)}; BERTScore: {res['bertscore_model']}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, _name(res, "entropy_bertscore_hist"), figures_dir)
    return fig


def label_counts(res) -> str:
    return "\n".join(f"{g['description']}: {g['n_correct']} correct, {g['n_wrong']} wrong, {g['n_unlabelled']} "
                     "unlabelled" for g in res["groups"].values())


def plot_correct_vs_wrong(res, figures_dir="figures"):
    """Per labelling: both groups' curves (top) and the wrong − correct difference (bottom, Holm p < 0.05 dots)."""
    import matplotlib.pyplot as plt

    layers, groups = np.array(res["layers"]), res["groups"]
    fig, axes = plt.subplots(2, len(groups), figsize=(6 * len(groups), 7), sharex=True, squeeze=False)
    for col, g in enumerate(groups.values()):
        ax = axes[0, col]
        for key, name, color in (("correct", "correct", "C2"), ("wrong", "wrong", "C3")):
            est, low, high, n = _ci(g[key])
            ax.plot(layers, est, color=color, marker=".", label=f"{name} ({n})")
            ax.fill_between(layers, low, high, color=color, alpha=0.25)
        ax.set(ylabel="mean lens entropy (nats)", title=g["description"])
        ax.legend()
        ax = axes[1, col]
        est, low, high, _ = _ci(g["difference_wrong_minus_correct"])
        ax.plot(layers, est, color="C0", marker=".", label="wrong − correct")
        ax.fill_between(layers, low, high, color="C0", alpha=0.25, label="95% bootstrap CI")
        ax.axhline(0, color="k", lw=0.8)
        with np.errstate(invalid="ignore"):
            sig = _arr(g["tests"]["mannwhitney_p_adjusted"]) < 0.05
        if sig.any():
            ax.scatter(layers[sig], est[sig], color="k", zorder=3, label="Holm p < 0.05")
        ax.set(xlabel="layer (hidden-state entry)", ylabel="difference (nats)")
        ax.legend()
    fig.suptitle(_tag(res))
    fig.tight_layout()
    save_figure(fig, _name(res, "entropy_correct_vs_wrong"), figures_dir)
    return fig


def plot_original_vs_corrected(res, figures_dir="figures", method: str = "threshold"):
    """The original's weighting (each group's curve × its token share) beside the within-group curves."""
    import matplotlib.pyplot as plt

    layers, g = np.array(res["layers"]), res["groups"][method]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    share = g["token_share"]
    share_c, share_w = (np.nan if share[k] is None else share[k] for k in ("correct", "wrong"))
    axes[0].plot(layers, _arr(g["original_weighting"]["correct"]), color="C2", marker=".",
                 label=f"correct (× token share {share_c:.2f})")
    axes[0].plot(layers, _arr(g["original_weighting"]["wrong"]), color="C3", marker=".",
                 label=f"wrong (× token share {share_w:.2f})")
    axes[0].set(title="Original weighting (normalised over all answers)", xlabel="layer", ylabel="entropy (nats)")
    for key, color in (("correct", "C2"), ("wrong", "C3")):
        est, low, high, n = _ci(g[key])
        axes[1].plot(layers, est, color=color, marker=".", label=f"{key} ({n})")
        axes[1].fill_between(layers, low, high, color=color, alpha=0.25)
    axes[1].set(title="Corrected (normalised within each group)", xlabel="layer")
    for ax in axes:
        ax.legend()
    fig.suptitle(f"{g['description']}; {_tag(res)}")
    fig.tight_layout()
    save_figure(fig, _name(res, "entropy_original_vs_corrected"), figures_dir)
    return fig


def conclusion(res) -> str:
    """The markdown conclusion computed with the study (stored in the results)."""
    return res["conclusion"]


def draw_all(res, figures_dir="figures") -> list:
    return [plot_all_answers(res, figures_dir), plot_bertscore(res, figures_dir),
            plot_correct_vs_wrong(res, figures_dir), plot_original_vs_corrected(res, figures_dir)]
