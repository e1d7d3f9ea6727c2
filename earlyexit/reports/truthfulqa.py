"""``dola.ipynb``: DoLa and SLED on TruthfulQA, multiple choice and open-ended answers.

Results (all in ``results_dir``, the model in every name): ``dola_mc_<model>.json`` (``truthfulqa-mc``),
``dola_generate_<decoding>_<model>.json`` for vanilla, dola and sled (``truthfulqa-generate``, the
answers; a run resumes from them), ``dola_scores_<model>.json`` (``truthfulqa-scores``). Caches of a
run (MC log-probabilities, per-answer scores) go to ``results_dir/cache``, so a subset run with its own
``results_dir`` never touches the full run's files.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from earlyexit.core.results import GenerateResults, MCResults, ScoresResults, model_tag
from earlyexit.plotting import save_figure
from earlyexit.reports import load_or_compute as _load_or_compute
from earlyexit.studies.truthfulqa import (answer_lengths, mc2_saturation, mc_rows, open_ended_decodings,  # noqa: F401
                                          open_ended_findings, open_ended_rows, paired_differences,
                                          premature_histograms)


@dataclass
class TruthfulQAResults:
    """The notebook's four results files."""

    mc: MCResults
    scores: ScoresResults
    generations: dict[str, GenerateResults] = field(default_factory=dict)

    @property
    def model(self) -> str:
        return self.mc.parameters.get("model") or self.mc.model

    def values(self):
        return [self.mc, self.scores, *self.generations.values()]


def paths(results_dir, model, sled: bool = True) -> dict[str, Path]:
    out = {"mc": MCResults.path(results_dir, model), "scores": ScoresResults.path(results_dir, model)}
    out.update({f"generate-{d}": GenerateResults.path(results_dir, model, decoding=d)
                for d in open_ended_decodings(sled)})
    return out


def load(results_dir, model, sled: bool = True) -> TruthfulQAResults:
    p = paths(results_dir, model, sled)
    return TruthfulQAResults(MCResults.load(p["mc"]), ScoresResults.load(p["scores"]),
                             {d: GenerateResults.load(p[f"generate-{d}"]) for d in open_ended_decodings(sled)})


def compute(model: str = "smollm2-135m", *, results_dir="results", limit: int | None = None, data_dir=None,
            bertscore: str = "minilm", n_boot: int = 2000, gen_batch_size: int = 16, sled: bool = True,
            allow_partial: bool = False, progress: bool = True) -> TruthfulQAResults:
    """MC (vanilla, DoLa high / low, static DoLa, and with ``sled`` SLED) and open-ended answers (vanilla,
    DoLa, SLED) with their scores; the files are written into ``results_dir`` as they are made, then
    read back."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from earlyexit.core.models import load_model
    from earlyexit.studies.data import load_truthfulqa
    from earlyexit.studies.truthfulqa import run_mc, run_open_ended

    items = load_truthfulqa(data_dir, limit)
    net, tok = load_model(model)
    print(f"{model}: {len(items)} TruthfulQA questions", flush=True)
    run_mc(net, tok, items, results_dir=results_dir, sled=sled, n_boot=n_boot, allow_partial=allow_partial,
           progress=progress)
    run_open_ended(net, tok, items, results_dir=results_dir, batch_size=gen_batch_size, bertscore=bertscore,
                   n_boot=n_boot, sled=sled, allow_partial=allow_partial, progress=progress)
    parameters = {"model": model, "limit": limit, "bertscore": bertscore, "n_boot": n_boot,
                  "gen_batch_size": gen_batch_size, "sled": sled, "allow_partial": allow_partial}
    res = load(results_dir, model, sled)
    for r in (res.mc, res.scores):  # record how they were asked for (checked when they are reused)
        r.payload["parameters"] = parameters
        r.save(r.source)
    return res


def load_or_compute(results_dir="results", *, recompute: bool = False, model: str = "smollm2-135m",
                    limit: int | None = None, data_dir=None, bertscore: str = "minilm", n_boot: int = 2000,
                    gen_batch_size: int = 16, sled: bool = True, allow_partial: bool = False,
                    progress: bool = True) -> TruthfulQAResults:
    """The files of :func:`paths`: read them (``recompute=False`` and all present), else compute
    (reusing the answer files and caches in ``results_dir`` that match)."""
    def run():
        return compute(model, results_dir=results_dir, limit=limit, data_dir=data_dir, bertscore=bertscore,
                       n_boot=n_boot, gen_batch_size=gen_batch_size, sled=sled, allow_partial=allow_partial,
                       progress=progress)

    without = paths(results_dir, model, sled=False)
    if sled and not recompute and all(p.exists() for p in without.values()) \
            and not paths(results_dir, model)["generate-sled"].exists():
        # results saved before SLED joined the notebook: redraw them as they are, say how to add SLED
        print(f"truthfulqa: no SLED results for {model} in {results_dir}; showing the saved vanilla and DoLa "
              "results (recompute=True adds SLED, reusing the saved answers and caches)", flush=True)
        sled = False
    res = _load_or_compute(paths(results_dir, model, sled), lambda: load(results_dir, model, sled), run,
                           recompute=recompute, parameters=None, what="truthfulqa")
    for r in (res.mc, res.scores):
        r.check_parameters({"model": model, "limit": limit, "bertscore": bertscore, "n_boot": n_boot, "sled": sled})
    return res


# --- tables and figures ----------------------------------------------------------------------------

def mc_summary(res: TruthfulQAResults) -> str:
    m = res.mc.meta
    complete = m.get("settings", {}).get("complete", True)
    return (f"MC on {m['n']} of {m.get('settings', {}).get('questions_requested', m['n'])} questions"
            + ("" if complete else " (UNFINISHED run: a partial subset)"))


def mc_table(res: TruthfulQAResults):
    import pandas as pd

    return pd.DataFrame(mc_rows(res.mc)).set_index("decoding")


def paired_table(res: TruthfulQAResults, n_boot: int | None = None):
    import pandas as pd

    n_boot = n_boot or res.mc.meta.get("settings", {}).get("n_boot", 2000)
    return pd.DataFrame(paired_differences(res.mc, n_boot=n_boot)).set_index("decoding")


def saturation_table(res: TruthfulQAResults):
    import pandas as pd

    return pd.DataFrame(mc2_saturation(res.mc)).set_index("decoding").round(3)


def static_folds(res: TruthfulQAResults):
    import pandas as pd

    return pd.json_normalize(res.mc["static"]["folds"]).set_index("fold").round(3)


def plot_static_layers(res: TruthfulQAResults, figures_dir="figures"):
    """In-sample MC scores of static DoLa by premature layer, vanilla and the cross-validated choices marked."""
    import matplotlib.pyplot as plt
    import pandas as pd

    mc = res.mc
    ins = pd.DataFrame(mc["static"]["in_sample"]).T
    ins.index = ins.index.astype(int)  # JSON object keys are strings
    ins = ins.sort_index()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for k in ("mc1", "mc2", "mc3", "mc2_norm"):
        ax.plot(ins.index, ins[k], marker="o", ms=3, label=k)
    for k, style in (("mc1", ":"), ("mc2", "--"), ("mc3", "-.")):
        ax.axhline(mc["decodings"]["vanilla"][k], color="grey", ls=style, lw=0.8)
    for f in mc["static"]["folds"]:
        ax.axvline(f["layer"], color="k", lw=0.6, alpha=0.5)
    ax.set_xlabel("premature layer (hidden-state entry, raw lens)")
    ax.set_ylabel("score (in-sample, all questions)")
    ax.set_title(f"Static DoLa by premature layer — {res.model}, n = {mc.n}\n"
                 "grey lines: vanilla MC1/MC2/MC3; vertical: layers chosen by cross-validation", fontsize=9)
    ax.legend(fontsize=8, ncol=4)
    save_figure(fig, f"dola_static_layers_{model_tag(res.model)}", figures_dir)
    return fig


def bertscore_encoder(res: TruthfulQAResults) -> str:
    return next((d["bertscore_model"] for d in res.scores["decodings"].values() if "bertscore_model" in d), "?")


def scores_table(res: TruthfulQAResults):
    import pandas as pd

    return pd.DataFrame(open_ended_rows(res.scores["decodings"])).set_index("decoding")


def lengths_table(res: TruthfulQAResults, limit: int = 50):
    import pandas as pd

    return pd.DataFrame(answer_lengths(res.generations, limit=limit)).T.round(3)


def plot_premature_layers(res: TruthfulQAResults, figures_dir="figures"):
    """Share of tokens per chosen premature layer: MC answer tokens (both buckets) and DoLa's answers."""
    import matplotlib.pyplot as plt

    hists = premature_histograms(res.mc, res.generations)
    fig, axes = plt.subplots(1, len(hists), figsize=(4 * len(hists), 3.2), squeeze=False)
    for ax, (name, counts) in zip(axes[0], hists.items()):
        layers = sorted(counts)
        total = sum(counts.values())
        ax.bar(layers, [counts[l] / total for l in layers], width=0.8)
        ax.set_title(f"{name}\n({total} tokens)", fontsize=9)
        ax.set_xlabel("premature layer (hidden-state entry)")
    axes[0, 0].set_ylabel("share of tokens")
    fig.suptitle(f"Chosen premature layers — {res.model}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, f"dola_premature_layers_{model_tag(res.model)}", figures_dir)
    return fig


def side_by_side(res: TruthfulQAResults, k: int = 6, seed: int = 0):
    """``k`` questions (seeded choice among those both decodings answered, as
    :func:`earlyexit.studies.truthfulqa.side_by_side`) with the Best Answer and both answers."""
    import random

    import pandas as pd

    by = {name: {r["index"]: r["completion"] for r in g["items"]} for name, g in res.generations.items()}
    ref = {r["index"]: r for d in res.scores["decodings"].values() for r in d.get("items", [])}
    common = sorted(i for i in ref if all(i in d for d in by.values()))
    pick = sorted(random.Random(seed).sample(range(len(common)), min(k, len(common))))
    return pd.DataFrame([{"question": ref[common[i]]["question"], "best answer": ref[common[i]]["best_answer"],
                          **{name: by[name][common[i]] for name in by}} for i in pick])


def findings(res: TruthfulQAResults) -> str:
    """Markdown: DoLa against vanilla, then (when SLED ran) SLED against vanilla and against DoLa."""
    pairs = [("vanilla", "dola"), ("vanilla", "sled"), ("dola", "sled")]
    parts = []
    for base, other in pairs:
        lines = open_ended_findings(res.scores["decodings"], res.generations, base=base, other=other)
        if lines:
            parts.append(f"**{other} vs {base}** ({res.model})\n\n" + "\n".join(lines))
    return "\n\n".join(parts)


def draw_all(res: TruthfulQAResults, figures_dir="figures") -> list[Any]:
    return [plot_static_layers(res, figures_dir), plot_premature_layers(res, figures_dir)]
