"""``early_exit.ipynb``: compute the exit-strategy analysis into ``early_exit_<model>.json``, or read it, and
draw every figure and table from it (see :mod:`earlyexit.studies.exit_analysis`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from earlyexit.core.results import ExitResults, model_tag
from earlyexit.plotting import save_figure
from earlyexit.reports import load_or_compute as _load_or_compute

DECODER_CONFIGS = (  # early-exit settings compared with greedy besides the calibrated ones
    {"confidence": "margin", "threshold": 0.99},  # the decoder's default: a few entries (from L/2, every L/8)
)


def compute(model: str = "smollm2-135m", *, limit: int | None = None, data_dir=None,
            lenses: Sequence[str] = ("normed", "tuned"), threshold: float = 0.85, scorer: str = "minilm",
            batch_size: int = 16, max_new_tokens: int = 120, n_boot: int = 2000, n_perm: int = 5000,
            targets: Sequence[float] = (0.9, 0.95, 0.99), decoder_limit: int = 20,
            decoder_configs: Sequence[dict] = DECODER_CONFIGS, cache_dir=None, progress: bool = True
            ) -> ExitResults:
    """Greedy answers, their lens readings at every entry (one pass per lens), BERTScore labels, the
    analysis per lens, and the early-exit decoder against greedy on the first ``decoder_limit`` questions.
    A tuned lens is used only where one is stored (``lenses`` lists it)."""
    from earlyexit.core import parallel
    from earlyexit.core.meta import run_metadata
    from earlyexit.core.models import load_model
    from earlyexit.studies import exit_analysis as xa
    from earlyexit.studies.bertscore import check_scorer
    from earlyexit.studies.data import load_truthfulqa
    from earlyexit.studies.entropy_labels import LABEL_METHODS, check_threshold, label_answers, label_description, \
        score_answers

    check_threshold(threshold)
    check_scorer(scorer)
    items = load_truthfulqa(data_dir, limit)
    llm, tok = load_model(model)
    usable, skipped = xa.available_lenses(llm, lenses)
    per_lens: dict[str, Any] = {}
    labels = scores = shards = None
    for name in usable:
        tokens = xa.collect_tokens(llm, tok, items, lens=name, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   cache_dir=cache_dir, progress=progress)
        shards = shards or tokens.parallel  # the questions each process answered (the same for every lens)
        if scores is None:  # greedy answers do not depend on the lens: score them once, on the main process
            scores = parallel.broadcast(score_answers(tokens.texts, items, scorer=scorer)
                                        if parallel.is_main_process() else None)
            labels = {m: label_answers(scores, m, threshold) for m in LABEL_METHODS}
        per_lens[name] = xa.analyse(tokens, labels, targets=targets, n_boot=n_boot, n_perm=n_perm)
    decoders = None
    if decoder_limit:  # the calibrated policies (normed lens, target 0.95) decoded for real, and the defaults
        # on the main process only (it times the decoders: the others wait rather than compete for the cores)
        configs = xa.calibrated_configs(per_lens["normed"]) if "normed" in per_lens else []
        compared = xa.compare_decoders(llm, tok, items[:decoder_limit], [*configs, *decoder_configs],
                                       max_new_tokens=max_new_tokens) if parallel.is_main_process() else None
        decoders = parallel.broadcast(compared)
    parameters = {"model": model, "limit": limit, "lenses": list(lenses), "threshold": threshold, "scorer": scorer,
                  "max_new_tokens": max_new_tokens, "n_boot": n_boot, "n_perm": n_perm, "targets": list(targets),
                  "decoder_limit": decoder_limit}
    settings = {"lenses": usable, "lenses_skipped": skipped, "threshold": threshold, "bertscore_model": scorer,
                "label_methods": {m: label_description(m, threshold) for m in LABEL_METHODS},
                "max_new_tokens": max_new_tokens, "stop": list(xa.ENTROPY_STOP), "decoding": "greedy",
                "prompt": "TruthfulQA 6-shot QA primer", "n_boot": n_boot, "n_permutations": n_perm,
                "ci_level": 0.95, "policy_entries": "every entry 1..L-1 checked (offline: the head's cost is not counted)",
                "calibration_split": "half of the questions (seeded), thresholds reported on the other half"}
    payload = {"n": len(items), "lenses": per_lens, "decoders": decoders, "parameters": parameters,
               "labels": {m: [None if not np.isfinite(v) else int(v) for v in lab] for m, lab in (labels or {}).items()}}
    return ExitResults(meta=run_metadata(llm, len(items), data=items, parallel=shards, **settings), payload=payload)


def load_or_compute(results_dir="results", *, recompute: bool = False, model: str = "smollm2-135m",
                    limit: int | None = None, data_dir=None, lenses: Sequence[str] = ("normed", "tuned"),
                    threshold: float = 0.85, scorer: str = "minilm", batch_size: int = 16, max_new_tokens: int = 120,
                    n_boot: int = 2000, n_perm: int = 5000, decoder_limit: int = 20, cache_dir=None,
                    progress: bool = True) -> ExitResults:
    """``results_dir/early_exit_<model>.json``: read it (``recompute=False`` and present), else compute it."""
    path = ExitResults.path(results_dir, model)
    wanted = {"model": model, "limit": limit, "lenses": list(lenses), "threshold": threshold, "scorer": scorer,
              "max_new_tokens": max_new_tokens, "n_boot": n_boot, "n_perm": n_perm, "decoder_limit": decoder_limit}

    def run():
        res = compute(model, limit=limit, data_dir=data_dir, lenses=lenses, threshold=threshold, scorer=scorer,
                      batch_size=batch_size, max_new_tokens=max_new_tokens, n_boot=n_boot, n_perm=n_perm,
                      decoder_limit=decoder_limit, cache_dir=cache_dir, progress=progress)
        res.save(path)
        return ExitResults.load(path)

    return _load_or_compute({"json": path}, lambda: ExitResults.load(path), run, recompute=recompute,
                            parameters=wanted, what="early exit")


# --- tables ---------------------------------------------------------------------------------------

def _name(res, figure: str) -> str:
    return f"{figure}_{model_tag(res.parameters.get('model') or res.model)}"


def _ci(d: dict | None, digits: int = 2, scale: float = 1.0) -> str:
    if not d or d.get("estimate") is None:
        return "–"
    f = f"{{:.{digits}f}}"
    return f"{f.format(d['estimate'] * scale)} [{f.format(d['low'] * scale)}, {f.format(d['high'] * scale)}]"


def summary(res) -> str:
    lines = []
    for name, a in res["lenses"].items():
        s = a["settling"]
        lines.append(f"{res.model}, {name} lens: n = {a['n_answers']} answers, {a['n_tokens']} tokens, L = {a['L']}. "
                     f"Mean settling entry {_ci(s['mean_entry'])}; oracle saving {_ci(s['oracle_saving'], 1, 100)} % "
                     "of layer computations.")
    skipped = res.meta.get("settings", {}).get("lenses_skipped")
    if skipped:
        lines.append(f"Not run: {', '.join(skipped)} lens (none stored for this model).")
    return "\n".join(lines)


def table_labels(res) -> str:
    """Markdown: settling entries of correct vs wrong answers, per lens and label method."""
    rows = ["| lens | labels | correct: mean entry (answers) | wrong: mean entry (answers) | wrong − correct | "
            "Mann–Whitney p | permutation p |", "|---|---|---|---|---|---|---|"]
    for lens, a in res["lenses"].items():
        for method, b in a["by_label"].items():
            t = b["tests"] or {}
            p = lambda x: "–" if x is None else f"{x:.3g}"  # noqa: E731
            rows.append(f"| {lens} | {method} | {_ci(b['correct']['mean_entry'])} ({b['correct']['n_answers']}) | "
                        f"{_ci(b['wrong']['mean_entry'])} ({b['wrong']['n_answers']}) | "
                        f"{_ci(b['difference_wrong_minus_correct'])} | {p(t.get('mannwhitney_p'))} | "
                        f"{p(t.get('permutation_p'))} |")
    return "\n".join(rows)


def table_positions(res) -> str:
    lenses = list(res["lenses"])
    rows = ["| positions | tokens | " + " | ".join(f"{l}: mean settling entry" for l in lenses) + " |",
            "|---|---|" + "---|" * len(lenses)]
    first = res["lenses"][lenses[0]]["by_position"]
    for i, b in enumerate(first):
        cells = [_ci(res["lenses"][l]["by_position"][i]) for l in lenses]
        rows.append(f"| {b['positions']} | {b['n_tokens']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def table_calibrated(res) -> str:
    """Markdown: per measure and target, λ from the calibration half and the test half's outcome."""
    rows = ["| lens | measure | target agreement | λ (calibration) | test: mean layers | test: saving | "
            "test: agreement |", "|---|---|---|---|---|---|---|"]
    for lens, a in res["lenses"].items():
        c = a["calibrated"]
        L = a["L"]
        o = c["oracle"]["mean_layers"]
        saving = "–" if o["estimate"] is None else f"{100 * (1 - o['estimate'] / L):.1f} %"
        rows.append(f"| {lens} | oracle (settling entry) | 1 | – | {_ci(o)} | {saving} | 1.000 |")
        for p in c["policies"]:
            t = p["test"]
            sv = "–" if t["saving"] is None else f"{100 * t['saving']:.1f} %"
            rows.append(f"| {lens} | {p['measure']} | {p['target_agreement']} | {p['threshold']:.4g} | "
                        f"{_ci(t['mean_layers'])} | {sv} | {_ci(t['agreement'], 3)} |")
    first = next(iter(res["lenses"].values()))["calibrated"]
    rows.append(f"\nCalibration: {first['calibration_answers']} answers ({first['calibration_tokens']} tokens); "
                f"test: {first['test_answers']} answers ({first['test_tokens']} tokens).")
    return "\n".join(rows)


def table_decoders(res) -> str:
    d = res.get("decoders") if hasattr(res, "get") else None
    if not d:
        return "(the decoders were not run: decoder_limit = 0)"
    rows = ["| decoding | settings | tokens / answer | tokens/s | mean layers / token | token agreement | "
            "identical answers | ROUGE-L vs greedy |", "|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        st = dict(r["settings"])
        entries = st.pop("exit_entries", None)
        s = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in st.items()) or "–"
        if entries is not None:
            s += f", exits checked at {entries[0]}..{entries[-1]}"
        ml = "–" if r["mean_layers"] is None else f"{r['mean_layers']:.2f}"
        rows.append(f"| {r['name']} | {s} | {r.get('tokens_per_answer', float('nan')):.1f} | {r['tokens_per_s']:.1f} | "
                    f"{ml} | {r['token_agreement']:.3f} | {r['identical']:.2f} | {r['rouge_l']:.3f} |")
    rows.append(f"\n{d['n_questions']} questions, batch 1, at most {d['max_new_tokens']} new tokens; {d['note']}.")
    return "\n".join(rows)


# --- figures --------------------------------------------------------------------------------------

def plot_settling(res, figures_dir="figures"):
    """Histogram of settling entries per lens, and the correct / wrong shares (threshold labels)."""
    import matplotlib.pyplot as plt

    lenses = list(res["lenses"])
    fig, axes = plt.subplots(1, len(lenses), figsize=(6 * len(lenses), 3.6), squeeze=False)
    for ax, name in zip(axes[0], lenses):
        a = res["lenses"][name]
        h = np.asarray(a["settling"]["histogram"], dtype=float)
        x = np.arange(len(h))
        ax.bar(x, h / max(h.sum(), 1), color="lightgray", label="all tokens")
        b = a["by_label"].get("threshold")  # the entropy study's BERTScore-threshold labels
        if b:
            ax.step(x, b["correct"]["histogram_share"], where="mid", color="tab:green", label="correct answers")
            ax.step(x, b["wrong"]["histogram_share"], where="mid", color="tab:red", label="wrong answers")
        ax.set_xlabel("settling entry (0 = embeddings, L = output)")
        ax.set_ylabel("share of tokens")
        ax.set_title(f"{res.model}, {name} lens (n = {a['n_answers']}, {a['n_tokens']} tokens)", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, _name(res, "early_exit_settling"), figures_dir)
    return fig


def plot_positions(res, figures_dir="figures"):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    for name, a in res["lenses"].items():
        bins = [b for b in a["by_position"] if b["estimate"] is not None]
        x = np.arange(len(bins))
        est = np.array([b["estimate"] for b in bins])
        ax.errorbar(x, est, yerr=[est - [b["low"] for b in bins], [b["high"] for b in bins] - est], marker="o",
                    capsize=3, label=f"{name} lens")
        ax.set_xticks(x, [b["positions"] for b in bins])
    ax.set_xlabel("token position in the answer")
    ax.set_ylabel("mean settling entry (95% CI)")
    ax.set_title(f"{res.model}: settling by position (n = {res['n']})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, _name(res, "early_exit_positions"), figures_dir)
    return fig


def plot_policies(res, figures_dir="figures"):
    """Mean layers used against agreement with the full model, per measure, beside the oracle."""
    import matplotlib.pyplot as plt

    lenses = list(res["lenses"])
    fig, axes = plt.subplots(1, len(lenses), figsize=(6 * len(lenses), 4), squeeze=False)
    for ax, name in zip(axes[0], lenses):
        a = res["lenses"][name]
        for measure, curve in a["curves"].items():
            ax.plot(curve["mean_layers"], curve["agreement"], marker=".", ms=3, label=measure)
        o = a["settling"]["mean_entry"]["estimate"]
        if o is not None:
            ax.plot([o], [1.0], "k*", ms=12, label="oracle (settling entry)")
        for p in a["calibrated"]["policies"]:
            t = p["test"]
            if t["mean_layers"]["estimate"] is not None:
                ax.plot(t["mean_layers"]["estimate"], t["agreement"]["estimate"], "kx", ms=6)
        ax.set_xlabel(f"mean layers used per token (of {a['L']})")
        ax.set_ylabel("agreement with the full model's token")
        ax.set_title(f"{res.model}, {name} lens: exit policies (× = λ from calibration, on the test half)",
                     fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, _name(res, "early_exit_policies"), figures_dir)
    return fig


def draw_all(res, figures_dir="figures") -> list:
    return [plot_settling(res, figures_dir), plot_positions(res, figures_dir), plot_policies(res, figures_dir)]
