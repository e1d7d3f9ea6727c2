"""``vis.ipynb``: per-layer probabilities of the answer choices (logit lens) on BIG-bench general knowledge.

>>> res = load_or_compute("results", recompute=False)      # doctest: +SKIP
>>> plot_showcase(res, "figures")                           # doctest: +SKIP
"""
from __future__ import annotations

from typing import Any

import numpy as np

from earlyexit.core.results import VisResults, model_tag
from earlyexit.plotting import save_figure
from earlyexit.reports import load_or_compute as _load_or_compute

SHOWCASE = "whiskers"  # the original study's hand-added question


def compute(model: str = "smollm2-135m", *, limit: int | None = None, data_dir=None, lens: str = "normed",
            batch_size: int = 8, progress: bool = True) -> VisResults:
    """Read the choices' probabilities at every layer and answer greedily; the result (not yet saved)."""
    import torch

    from earlyexit import depth_layers, load_general_knowledge, load_model
    from earlyexit.studies.choices import answer_questions, choice_probabilities

    torch.manual_seed(0)
    llm, tok = load_model(model)
    pool = load_general_knowledge(data_dir)  # the one-shot example is drawn from the full set
    questions = pool[:limit] if limit else pool
    L = llm.config.num_hidden_layers
    layers = depth_layers(L)
    readings = choice_probabilities(llm, tok, questions, pool=pool, lens=lens, batch_size=batch_size, progress=progress)
    readings = answer_questions(llm, tok, readings, batch_size=batch_size, progress=progress)
    showcase = next((i for i, r in enumerate(readings) if SHOWCASE in r.question.question), 0)
    mean_gold = torch.stack([r.probs[:, r.gold_index] for r in readings]).mean(0)
    payload = {
        "parameters": {"model": model, "limit": limit, "lens": lens, "batch_size": batch_size},
        "accuracy": float(np.mean([r.correct for r in readings])),
        "n_layers": L,
        "layers": list(readings[0].layers),
        "depth_layers": layers,
        "mean_gold_probability_per_layer": mean_gold.tolist(),
        "showcase": showcase,
        "showcase_probs": readings[showcase].probs.tolist(),
        "questions": [
            {"question": r.question.question, "choices": r.question.choices, "gold": r.question.gold,
             "gold_index": r.gold_index, "answer": r.answer, "correct": r.correct,
             "first_layer_gold_on_top": r.first_layer_gold_on_top(), "p_gold_final": float(r.probs[-1, r.gold_index]),
             "choices_share_first_token": r.shared_first_token,
             "probs_at_depth_layers": {str(e): r.probs[r.layers.index(e)].tolist() for e in layers}}
            for r in readings],
    }
    settings = dict(lens=lens, layers=layers, prompt='one-shot, ends with "Answer:"',
                    matching="normalised exact match, first line")
    return VisResults.create(llm, len(readings), payload=payload, settings=settings, data=pool)


def load_or_compute(results_dir="results", *, recompute: bool = False, model: str = "smollm2-135m",
                    limit: int | None = None, data_dir=None, lens: str = "normed", batch_size: int = 8,
                    progress: bool = True) -> VisResults:
    """``results_dir/vis_<model>.json``: read it (``recompute=False`` and present), else compute and save it."""
    path = VisResults.path(results_dir, model)

    def run():
        res = compute(model, limit=limit, data_dir=data_dir, lens=lens, batch_size=batch_size, progress=progress)
        res.save(path)
        return VisResults.load(path)  # what a redraw reads, so both draw the same

    return _load_or_compute({"vis": path}, lambda: VisResults.load(path), run, recompute=recompute,
                            parameters={"model": model, "limit": limit, "lens": lens}, what="vis")


# --- tables and figures ----------------------------------------------------------------------------

def _model(res) -> str:
    return res.parameters.get("model") or res.model


def _lens(res) -> str:
    return res.meta.get("settings", {}).get("lens", "normed")


def summary(res) -> str:
    q = res["questions"]
    return (f"{_model(res)}: {res['n_layers']} layers; {len(q)} questions; figure layers {res['depth_layers']}\n"
            f"accuracy (normalised match): {res['accuracy']:.3f} = {sum(bool(x['correct']) for x in q)}/{len(q)}")


def table(res):
    """One row per question: gold, answer, correctness, p(gold) at the output, first layer gold stays on top."""
    import pandas as pd

    return pd.DataFrame({
        "question": [x["question"] for x in res["questions"]],
        "gold": [" / ".join(x["gold"]) for x in res["questions"]],
        "answer": [x["answer"] for x in res["questions"]],
        "correct": [x["correct"] for x in res["questions"]],
        "p_gold_final": [x["p_gold_final"] for x in res["questions"]],
        "first_layer_gold_on_top": [x["first_layer_gold_on_top"] for x in res["questions"]],
        "choices_share_first_token": [x["choices_share_first_token"] for x in res["questions"]],
    })


def choice_panels(q: dict, layers, axes, title: str | None = None):
    """One bar panel per layer entry: probability of each choice's first sub-token (gold in green)."""
    gold = set(q["gold"])
    colors = ["tab:green" if c in gold else "tab:gray" for c in q["choices"]]
    for ax, entry in zip(axes, layers):
        ax.bar(range(len(q["choices"])), q["probs_at_depth_layers"][str(entry)], color=colors)
        ax.set_xticks(range(len(q["choices"])), q["choices"], rotation=60, fontsize=8)
        ax.set_title(f"layer {entry}", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    axes[0].set_ylabel("p(first sub-token)")
    if title:
        axes[0].figure.suptitle(title, fontsize=10)
    return axes


def plot_showcase(res, figures_dir="figures"):
    import matplotlib.pyplot as plt

    q = res["questions"][res["showcase"]]
    layers = res["depth_layers"]
    fig, axes = plt.subplots(1, len(layers), figsize=(2.6 * len(layers), 2.8))
    choice_panels(q, layers, axes, title=f"{q['question']}  gold: {q['gold'][0]}, model said: {q['answer']!r} "
                  f"({_model(res)}, {_lens(res)} lens)")
    fig.tight_layout()
    save_figure(fig, f"vis_showcase_{model_tag(_model(res))}", figures_dir)
    return fig


def examples(res) -> list[tuple[dict, str]]:
    """Two correct and two wrong answers (the showcase question left out of the wrong ones)."""
    qs = res["questions"]
    correct = [q for q in qs if q["correct"]][:2]
    wrong = [q for i, q in enumerate(qs) if not q["correct"] and i != res["showcase"]][:2]
    return [(q, "correct") for q in correct] + [(q, "wrong") for q in wrong]


def plot_examples(res, figures_dir="figures"):
    import matplotlib.pyplot as plt

    ex = examples(res)
    if not ex:
        return None
    layers = res["depth_layers"]
    fig, axes = plt.subplots(len(ex), len(layers), figsize=(2.6 * len(layers), 3.3 * len(ex)), squeeze=False)
    for row, (q, kind) in zip(axes, ex):
        choice_panels(q, layers, row)
        row[0].text(0, 1.22, f"[{kind}] {q['question']}   gold {q['gold'][0]!r}, model said {q['answer']!r}",
                    transform=row[0].transAxes, fontsize=9, fontweight="bold")
    fig.tight_layout()
    save_figure(fig, f"vis_examples_{model_tag(_model(res))}", figures_dir)
    return fig


def plot_heatmap(res, figures_dir="figures"):
    """Every layer × every choice of the showcase question, log10 probability."""
    import matplotlib.pyplot as plt

    q = res["questions"][res["showcase"]]
    probs = np.asarray(res["showcase_probs"], dtype=float)
    fig, ax = plt.subplots(figsize=(6, 7))
    im = ax.imshow(np.log10(np.clip(probs, 1e-30, None)), aspect="auto", cmap="viridis", origin="lower")
    ax.set_xticks(range(len(q["choices"])), q["choices"], rotation=45)
    ax.set_ylabel("layer (hidden-state entry; L = model output)")
    ax.set_title(f"{q['question']}\n{_model(res)}, {_lens(res)} lens", fontsize=9)
    fig.colorbar(im, ax=ax, label="log10 p(first sub-token)")
    fig.tight_layout()
    save_figure(fig, f"vis_heatmap_{model_tag(_model(res))}", figures_dir)
    return fig


def plot_first_layer(res, figures_dir="figures"):
    """Histogram over questions of the first layer from which the gold choice stays on top."""
    import matplotlib.pyplot as plt

    t = table(res)
    first = t["first_layer_gold_on_top"]
    L = res["n_layers"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bins = np.arange(L + 2) - 0.5
    for ok, color in ((True, "tab:green"), (False, "tab:red")):
        vals = first[(t["correct"] == ok) & first.notna()].astype(int)
        ax.hist(vals, bins=bins, alpha=0.6, color=color,
                label=f"{'correct' if ok else 'wrong'} answers (n={int((t['correct'] == ok).sum())})")
    ax.set_xlabel("first layer from which the gold choice stays on top")
    ax.set_ylabel("questions")
    ax.set_title(f"{_model(res)}, {len(t)} questions; gold not on top at layer L: {never_on_top(res)}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, f"vis_first_layer_{model_tag(_model(res))}", figures_dir)
    return fig


def never_on_top(res) -> int:
    return sum(q["first_layer_gold_on_top"] is None for q in res["questions"])


def findings(res) -> str:
    first = table(res)["first_layer_gold_on_top"].dropna()
    return (f"n = {len(res['questions'])}, accuracy = {res['accuracy']:.3f}; gold not on top at layer L: "
            f"{never_on_top(res)}; median first layer with gold on top: {first.median()}")


def draw_all(res, figures_dir="figures") -> list[Any]:
    """Every figure of the notebook (for a redraw without the notebook)."""
    return [plot_showcase(res, figures_dir), plot_examples(res, figures_dir), plot_heatmap(res, figures_dir),
            plot_first_layer(res, figures_dir)]


__all__ = ["compute", "load_or_compute", "summary", "table", "plot_showcase", "plot_examples", "plot_heatmap",
           "plot_first_layer", "findings", "draw_all"]
