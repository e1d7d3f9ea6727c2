"""``classifier.ipynb`` / ``earlyexit probes``: truthfulness probes of every layer on true/false statements.

Results: ``probes_<model>.json`` with one report per condition under ``conditions`` (the original split's
table and per-layer curves; leave-one-topic-out at the tap layers). Every table and figure is drawn
from it alone.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from earlyexit.core.results import ProbesResults, model_tag
from earlyexit.plotting import save_figure
from earlyexit.reports import load_or_compute as _load_or_compute

CONDITIONS = ("prompted", "bare")
MLP = {"hidden": [256, 128, 64], "lr": 1e-3, "epochs": 5, "batch_size": 16}


def compute(model: str = "smollm2-135m", *, limit: int | None = None, data_dir=None,
            conditions: Sequence[str] = CONDITIONS, kinds: Sequence[str] = ("hidden", "lens"),
            loto: bool = True, loto_kinds: Sequence[str] | None = ("hidden",), taps: Sequence[int] | None = None,
            batch_size: int = 32, cache_dir=None, seed: int = 0, lens: str = "normed",
            progress: bool = True) -> ProbesResults:
    """Features (cached on disk) and probes for each condition; the result (not yet saved). ``lens``: the
    lens whose log-probabilities make the ``"lens"`` feature (:data:`~earlyexit.core.lenses.LENS_NAMES`).
    ``loto_kinds``: the feature kinds of the leave-one-topic-out runs (None: all ``kinds``; empty: no
    leave-one-topic-out, as ``loto=False``)."""
    import torch

    if loto_kinds is not None and not list(loto_kinds):
        loto = False

    from earlyexit.core.models import load_model
    from earlyexit.studies.data import load_true_false
    from earlyexit.studies.features import FeatureSettings, check_kinds, extract_features
    from earlyexit.studies.probes import SIX_TOPICS, condition_report

    kinds = check_kinds(list(kinds))
    conditions = list(conditions)
    for c in conditions:
        if c not in CONDITIONS:
            raise ValueError(f"Unknown condition {c!r}; conditions are {CONDITIONS}.")
    if not conditions:
        raise ValueError(f"No condition given: use some of {CONDITIONS}.")
    statements = load_true_false(SIX_TOPICS, data_dir, limit)
    torch.manual_seed(seed)
    lm, tok = load_model(model)
    settings = FeatureSettings(lens=lens)
    reports, cache_stats = {}, {}
    for condition in sorted(conditions):  # the order does not change any result
        feats = extract_features(lm, tok, statements, condition, kinds=kinds, settings=settings,
                                 batch_size=batch_size, cache_dir=cache_dir, progress=progress)
        cache_stats[condition] = feats.stats
        reports[condition] = condition_report(feats, tok, kinds=kinds, taps=taps, loto=loto,
                                              loto_kinds=None if loto_kinds is None else list(loto_kinds),
                                              seed=seed, progress=progress)
        del feats
    reports = {c: reports[c] for c in conditions}  # in the order asked
    parameters = {"model": model, "limit": limit, "conditions": conditions, "kinds": list(kinds), "loto": loto,
                  "loto_kinds": None if loto_kinds is None else list(loto_kinds), "taps": None if taps is None
                  else list(taps), "batch_size": batch_size, "seed": seed, "lens": lens}
    meta_settings = dict(limit_per_topic=limit, conditions=conditions, kinds=list(kinds), loto=loto,
                         loto_kinds=parameters["loto_kinds"], features=dict(settings.__dict__), batch_size=batch_size,
                         seed=seed, mlp=MLP,
                         lens_feature=f"seeded Gaussian random projection of the {lens}-lens log-probabilities",
                         cache=cache_stats)
    payload = {"parameters": parameters, "taps": reports[conditions[0]]["taps"], "conditions": reports}
    return ProbesResults.create(lm, len(statements), payload=payload, settings=meta_settings, data=statements)


def load_or_compute(results_dir="results", *, recompute: bool = False, model: str = "smollm2-135m",
                    limit: int | None = None, data_dir=None, conditions: Sequence[str] = CONDITIONS,
                    kinds: Sequence[str] = ("hidden", "lens"), loto_kinds: Sequence[str] | None = ("hidden",),
                    batch_size: int = 32, cache_dir=None, seed: int = 0, lens: str = "normed",
                    progress: bool = True) -> ProbesResults:
    """``results_dir/probes_<model>.json``: read it (``recompute=False`` and present), else compute and save it."""
    path = ProbesResults.path(results_dir, model)

    def run():
        res = compute(model, limit=limit, data_dir=data_dir, conditions=conditions, kinds=kinds,
                      loto_kinds=loto_kinds, batch_size=batch_size, cache_dir=cache_dir, seed=seed, lens=lens,
                      progress=progress)
        res.save(path)
        return ProbesResults.load(path)  # what a redraw reads, so both draw the same

    wanted = {"model": model, "limit": limit, "conditions": list(conditions), "kinds": list(kinds),
              "loto_kinds": None if loto_kinds is None else list(loto_kinds), "seed": seed, "lens": lens}
    return _load_or_compute({"probes": path}, lambda: ProbesResults.load(path), run, recompute=recompute,
                            parameters=wanted, what="probes")


# --- tables and figures ----------------------------------------------------------------------------

COLUMNS = {"train_loss": "Train Loss", "train_acc": "Train Acc", "test_acc": "Test Acc", "test_acc_low": "CI low",
           "test_acc_high": "CI high", "test_loss": "Test Loss", "test_auroc": "Test AUROC"}


def _model(res) -> str:
    return res.parameters.get("model") or res.model


def summary(res) -> str:
    p = res.parameters
    cache = res.meta.get("settings", {}).get("cache")
    return (f"{_model(res)}: {res.n} statements; conditions {list(res['conditions'])}, features {p.get('kinds')}\n"
            f"tap layers (1/2, 5/8, 3/4 of the depth): {res['taps']}" + (f"\nfeature cache: {cache}" if cache else ""))


def original_tables(res) -> dict[tuple[str, str], "object"]:
    """The original's table (test on *cities*) per ``(condition, kind)``, LM baselines included."""
    import pandas as pd

    out = {}
    for condition, rep in res["conditions"].items():
        for kind in res.parameters.get("kinds", ["hidden", "lens"]):
            rows = [r for r in rep["original"]["table"] if r["kind"] in ("-", kind)]
            out[condition, kind] = pd.DataFrame(rows).set_index("method")[list(COLUMNS)].rename(columns=COLUMNS).round(3)
    return out


def show_original_tables(res) -> None:
    """Print a heading and display each table of :func:`original_tables` (in a notebook)."""
    from IPython.display import display

    for (condition, kind), df in original_tables(res).items():
        first = res["conditions"][condition]["original"]["table"][0]
        print(f"\n=== {condition} statements, {kind} features (n_train = {first['n_train']}, "
              f"n_test = {first['n_test']}) ===")
        display(df)


def plot_layer_curves(res, figures_dir="figures"):
    """Test accuracy of a probe on every layer, per condition and feature kind."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from earlyexit.studies.probes import VARIANT_LABELS

    conditions = list(res["conditions"])
    kinds = res.parameters.get("kinds", ["hidden", "lens"])
    fig, axes = plt.subplots(len(conditions), len(kinds), figsize=(6 * len(kinds), 3.6 * len(conditions)),
                             squeeze=False, sharey=True)
    for i, condition in enumerate(conditions):
        rep = res["conditions"][condition]["original"]
        curves = pd.DataFrame(rep["curves"])
        base = next(r for r in rep["table"] if r["method"] == "LM token prob.")["test_acc"]
        for j, kind in enumerate(kinds):
            ax = axes[i, j]
            for variant, colour in (("mlp", "C0"), ("logreg", "C1")):
                c = curves[(curves.kind == kind) & (curves.variant == variant)].sort_values("layer")
                ax.plot(c.layer, c.test_acc, marker=".", color=colour, label=VARIANT_LABELS[variant])
                ax.fill_between(c.layer, c.test_acc_low, c.test_acc_high, color=colour, alpha=0.15)
            ax.axhline(0.5, color="grey", lw=0.8)
            ax.axhline(base, color="k", ls=":", lw=1, label="LM token prob.")
            for t in res["taps"]:
                ax.axvline(t, color="grey", ls="--", lw=0.5)
            ax.set_title(f"{condition} statements, {kind} features")
            ax.set_xlabel("layer (hidden-state entry)")
            ax.set_ylabel("test accuracy (cities)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"{_model(res)}: per-layer truthfulness probes")
    fig.tight_layout()
    save_figure(fig, f"probes_layer_curves_{model_tag(_model(res))}", figures_dir)
    return fig


def best_layers(res):
    """Per condition, kind and probe: the layer with the best test accuracy."""
    import pandas as pd

    from earlyexit.studies.probes import VARIANT_LABELS

    best = []
    for condition, rep in res["conditions"].items():
        curves = pd.DataFrame(rep["original"]["curves"])
        for (kind, variant), c in curves.groupby(["kind", "variant"]):
            top = c.loc[c.test_acc.idxmax()]
            best.append({"condition": condition, "kind": kind, "probe": VARIANT_LABELS[variant],
                         "best layer": int(top.layer), "test acc": round(top.test_acc, 3),
                         "95% CI": f"[{top.test_acc_low:.3f}, {top.test_acc_high:.3f}]",
                         "AUROC": round(top.test_auroc, 3)})
    return pd.DataFrame(best)


def loto_tables(res) -> dict[str, "object"]:
    """Leave-one-topic-out: mean, spread and range of test accuracy and each held-out topic, per condition."""
    import pandas as pd

    out = {}
    for condition, rep in res["conditions"].items():
        if "loto" not in rep:
            continue
        s = pd.DataFrame(rep["loto_summary"])
        per_topic = pd.DataFrame([r["per_topic"] for r in rep["loto_summary"]])
        out[condition] = pd.concat([s[["method", "kind", "test_acc_mean", "test_acc_std", "test_acc_min",
                                       "test_acc_max", "test_auroc_mean"]], per_topic],
                                   axis=1).set_index(["method", "kind"]).round(3)
    return out


def show_loto_tables(res) -> None:
    from IPython.display import display

    for condition, df in loto_tables(res).items():
        n = res["conditions"][condition]["loto_summary"][0]["n_splits"]
        print(f"\n=== {condition} statements: test accuracy over {n} held-out topics ===")
        display(df)


def plot_loto(res, figures_dir="figures"):
    """Test accuracy on each held-out topic: majority votes and LM baselines (None, and no file, when the run
    had no leave-one-topic-out)."""
    import matplotlib.pyplot as plt

    conditions = [c for c in res["conditions"] if "loto" in res["conditions"][c]]
    if not conditions:
        print("no leave-one-topic-out in these results (loto_kinds was empty): no figure")
        return None
    fig, axes = plt.subplots(1, len(conditions), figsize=(6 * len(conditions), 3.6), squeeze=False, sharey=True)
    for ax, condition in zip(axes[0], conditions):
        rep = res["conditions"][condition]
        if "loto" not in rep:
            continue
        rows = [r for r in rep["loto_summary"] if "majority" in r["method"] or r["method"].startswith("LM")]
        topics = list(rows[0]["per_topic"])
        width = 0.8 / len(rows)
        for k, r in enumerate(rows):
            ax.bar(np.arange(len(topics)) + k * width, [r["per_topic"][t] for t in topics], width,
                   label=f"{r['method']} ({r['kind']})")
        ax.axhline(0.5, color="grey", lw=0.8)
        ax.set_xticks(np.arange(len(topics)) + 0.4 - width / 2, topics, rotation=30)
        ax.set_title(f"{condition}: held-out topic")
        ax.set_ylabel("test accuracy")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, f"probes_loto_{model_tag(_model(res))}", figures_dir)
    return fig


def headline(res) -> str:
    """The headline numbers per condition: LM token prob. and the MLP majority vote on the residual stream."""
    lines = []
    for condition, rep in res["conditions"].items():
        t = {(r["method"], r["kind"]): r for r in rep["original"]["table"]}
        tp = t["LM token prob.", "-"]
        mv = t.get(("MLP, majority", "hidden"))
        line = f"{condition}: LM token prob. test acc {tp['test_acc']:.3f}"
        if mv is not None:
            line += (f"; MLP majority vote (hidden) {mv['test_acc']:.3f} [{mv['test_acc_low']:.3f}, "
                     f"{mv['test_acc_high']:.3f}], AUROC {mv['test_auroc']:.3f}")
        lines.append(line)
    return "\n".join(lines)


def print_table(res, condition: str) -> str:
    """The CLI's text table of one condition's original split."""
    out = [f"{'method':<42} {'kind':<7} {'train acc':>9} {'test acc':>8}  95% CI         {'AUROC':>6}"]
    for row in res["conditions"][condition]["original"]["table"]:
        out.append(f"{row['method']:<42} {row['kind']:<7} {row['train_acc']:9.3f} {row['test_acc']:8.3f}  "
                   f"[{row['test_acc_low']:.3f}, {row['test_acc_high']:.3f}] {row['test_auroc']:6.3f}")
    return "\n".join(out)


def draw_all(res, figures_dir="figures") -> list:
    return [plot_layer_curves(res, figures_dir), plot_loto(res, figures_dir)]
