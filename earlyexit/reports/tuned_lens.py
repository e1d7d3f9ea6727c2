"""``tuned_lens.ipynb``: the logit lens against the tuned lens, per layer, on held-out prose.

Per hidden-state entry: KL(final ‖ lens), cross-entropy of the next token, top-1 agreement with the
final layer and entropy, with bootstrap CIs over held-out windows; and a prediction trajectory (tokens ×
layers, top token per cell) of one prompt under both lenses.

>>> res = load_or_compute("results", model="smollm2-135m", recompute=False)   # doctest: +SKIP
>>> plot_metrics(res, "figures"); plot_trajectory(res, "figures")           # doctest: +SKIP
"""
from __future__ import annotations

from typing import Any

import numpy as np

from earlyexit.core.results import KINDS, ResultFile, model_tag
from earlyexit.plotting import save_figure
from earlyexit.reports import load_or_compute as _load_or_compute

PROMPT = "The capital of France is Paris, and the capital of Italy is"
LENSES = ("logit", "tuned")
METRIC_LABELS = {"kl": "KL(final ‖ lens) (nats)", "ce": "cross-entropy, next token (nats)",
                 "top1": "top-1 agreement with the final layer", "entropy": "entropy (nats)"}
DEFAULT_WINDOWS = 16  # held-out windows of 512 tokens when limit is None: 8,176 positions


class TunedLensResults(ResultFile):
    """``tuned_lens.ipynb`` / ``earlyexit tuned-lens eval``: per-entry metrics of both lenses and a trajectory."""
    KIND, FILENAME = "tuned_lens", "tuned_lens_{tag}.json"


KINDS.setdefault(TunedLensResults.KIND, TunedLensResults)


def trajectory(model, tokenizer, prompt: str, lenses: dict) -> dict[str, Any]:
    """Top token, its probability and the entropy at every position and entry of ``prompt``, per lens."""
    from earlyexit.core.lens import lens_stats

    out: dict[str, Any] = {"prompt": prompt}
    for name, lens in lenses.items():
        r = lens_stats(model, tokenizer, [prompt], positions="all", lens=lens, top_k=1)
        ids = r.top_ids[0, :, :, 0]  # [E, P]
        out["tokens"] = [tokenizer.decode([t]) for t in r.tokens[0]]
        out["layers"] = r.layers
        out[name] = {"top_tokens": [[tokenizer.decode([int(t)]) for t in row] for row in ids],
                     "top_probs": r.top_probs[0, :, :, 0].tolist(), "entropy": r.entropy[0].tolist()}
    return out


def quick_settings(train_tokens: int, seq_len: int = 512, model: str | None = None):
    """``model``'s recipe (:func:`~earlyexit.core.tuned_lens.default_settings`) cut to ``train_tokens`` tokens
    of KL steps and of least-squares start (a quick look or a test, never the model's stored lens).

    >>> s = quick_settings(1024)
    >>> s.tokens, s.init_tokens, s.tokens_per_step, s.steps
    (1024, 1024, 1024, 1)
    """
    import dataclasses

    from earlyexit.core.checks import check_int
    from earlyexit.core.tuned_lens import default_settings

    check_int(train_tokens, "train_tokens", minimum=seq_len)
    base = dataclasses.replace(default_settings(model), seq_len=seq_len)
    per_step = max(seq_len, min(base.tokens_per_step, train_tokens) // seq_len * seq_len)
    return dataclasses.replace(base, tokens=train_tokens, init_tokens=min(base.init_tokens, train_tokens),
                               tokens_per_step=per_step).validate()


def compute(model: str = "smollm2-135m", *, limit: int | None = None, seq_len: int = 512, prompt: str = PROMPT,
            train_tokens: int | None = None, batch: int = 4, progress: bool = True) -> TunedLensResults:
    """Load ``model`` and its tuned lens (the stored one, trained on first use with the model's recipe), evaluate
    both lenses on ``limit`` held-out windows (default :data:`DEFAULT_WINDOWS`) and read the trajectory of
    ``prompt``; the result (not saved). ``train_tokens``: instead train a lens of :func:`quick_settings` for
    this run only (not stored, so ``lens="tuned"`` elsewhere is untouched)."""
    import torch

    from earlyexit.core.models import load_model
    from earlyexit.core.tuned_lens import heldout_windows, train_tuned_lens, tuned_lens_for

    torch.manual_seed(0)
    llm, tok = load_model(model)
    if train_tokens is None:
        tuned = tuned_lens_for(llm, tok, progress=progress)
    else:
        tuned = train_tuned_lens(llm, tok, quick_settings(train_tokens, seq_len, model), progress=progress)
    windows = heldout_windows(tok, seq_len=seq_len, limit=limit or DEFAULT_WINDOWS)
    return build(llm, tok, tuned, windows, parameters={"model": model, "limit": limit, "seq_len": seq_len,
                                                        "prompt": prompt, "train_tokens": train_tokens},
                 batch=batch, progress=progress)


def build(llm, tok, tuned, windows, *, parameters: dict, batch: int = 4, progress: bool = False) -> TunedLensResults:
    """The result for a loaded model, its tuned lens and held-out token ``windows``."""
    from earlyexit.core.lenses import resolve_lens
    from earlyexit.core.tuned_lens import evaluate_lenses

    prompt, seq_len = parameters.get("prompt", PROMPT), int(windows.shape[1])
    lenses = {"logit": resolve_lens(llm, "normed"), "tuned": tuned}
    evals = evaluate_lenses(llm, lenses, windows, batch=batch, progress=progress)
    L = tuned.n_layers
    payload = {
        "parameters": dict(parameters),
        "n_layers": L,
        "heldout": {name: ev.to_dict() for name, ev in evals.items()},
        "tuned_lens": {k: v for k, v in tuned.meta.items() if k != "heldout"} | {"fingerprint": tuned.fingerprint()},
        "trajectory": trajectory(llm, tok, prompt, lenses),
    }
    kl_l, kl_t = np.array(payload["heldout"]["logit"]["kl"]["mean"]), np.array(payload["heldout"]["tuned"]["kl"]["mean"])
    payload["tuned_below_logit_every_entry"] = bool((kl_t[:L] < kl_l[:L]).all())
    settings = dict(corpus="python3.11-doc prose, held-out pages", seq_len=seq_len, windows=int(windows.shape[0]),
                    tokens=int(evals["tuned"].tokens))
    return TunedLensResults.create(llm, int(windows.shape[0]), payload=payload, settings=settings)


def load_or_compute(results_dir="results", *, recompute: bool = False, model: str = "smollm2-135m",
                    limit: int | None = None, seq_len: int = 512, prompt: str = PROMPT,
                    train_tokens: int | None = None, progress: bool = True) -> TunedLensResults:
    """``results_dir/tuned_lens_<model>.json``: read it (``recompute=False`` and present), else compute and save it."""
    path = TunedLensResults.path(results_dir, model)

    def run():
        res = compute(model, limit=limit, seq_len=seq_len, prompt=prompt, train_tokens=train_tokens,
                      progress=progress)
        res.save(path)
        return TunedLensResults.load(path)

    return _load_or_compute({"tuned_lens": path}, lambda: TunedLensResults.load(path), run, recompute=recompute,
                            parameters={"model": model, "limit": limit, "seq_len": seq_len,
                                        "train_tokens": train_tokens}, what="tuned lens")


# --- tables and figures ----------------------------------------------------------------------------

def _tag(res) -> str:
    return model_tag(res["parameters"].get("model") or res.meta.get("model"))


def table(res):
    """One row per entry: each metric under both lenses."""
    import pandas as pd

    h = res["heldout"]
    cols: dict[str, Any] = {"entry": h["tuned"]["layers"]}
    for m in ("kl", "ce", "top1", "entropy"):
        for name in LENSES:
            cols[f"{m}_{name}"] = h[name][m]["mean"]
    return pd.DataFrame(cols).set_index("entry")


def summary(res) -> str:
    h, L = res["heldout"], res["n_layers"]
    kl_l, kl_t = np.array(h["logit"]["kl"]["mean"]), np.array(h["tuned"]["kl"]["mean"])
    top_l, top_t = np.array(h["logit"]["top1"]["mean"]), np.array(h["tuned"]["top1"]["mean"])
    trained = res["tuned_lens"].get("trained", {})
    s = trained.get("settings", {})
    worse = [int(e) for e, a, b in zip(h["tuned"]["layers"][:L], kl_t[:L], kl_l[:L]) if a >= b]
    lines = [
        f"{res['parameters']['model']}: {L} layers; held-out {h['tuned']['tokens']:,} positions in {h['tuned']['windows']} windows",
        (f"tuned lens: trained on {s['tokens']:,} tokens of KL steps" if s else "tuned lens: untrained or trained "
         "elsewhere (no training record)")
        + (f" after a least-squares start on {s['init_tokens']:,}" if s.get("init") == "lstsq" else "")
        + (f", {trained['seconds'] / 60:.1f} min on {trained.get('threads')} threads" if trained.get("seconds") else ""),
        f"mean KL over entries 0..{L - 1}: logit {kl_l[:L].mean():.3f}, tuned {kl_t[:L].mean():.3f} nats",
        f"mean top-1 agreement over entries 0..{L - 1}: logit {top_l[:L].mean():.3f}, tuned {top_t[:L].mean():.3f}",
        "tuned KL below the logit lens's at every entry 0..L-1: "
        + ("yes" if not worse else f"no (entries {worse})"),
    ]
    return "\n".join(lines)


def plot_metrics(res, figures_dir="figures"):
    """Four panels (KL, cross-entropy, top-1 agreement, entropy) per entry, both lenses with 95% CIs."""
    import matplotlib.pyplot as plt

    h = res["heldout"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for ax, m in zip(axes.flat, ("kl", "ce", "top1", "entropy")):
        for name, color in zip(LENSES, ("tab:gray", "tab:blue")):
            d = h[name][m]
            x = h[name]["layers"]
            ax.plot(x, d["mean"], color=color, label=f"{name} lens", marker=".")
            ax.fill_between(x, d["ci_low"], d["ci_high"], color=color, alpha=0.25)
        ax.set_ylabel(METRIC_LABELS[m], fontsize=9)
        if m in ("kl",):
            ax.set_yscale("symlog", linthresh=0.1)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("hidden-state entry (0 = embeddings, L = output)")
    axes[0, 0].legend()
    fig.suptitle(f"{res['parameters']['model']}: logit vs tuned lens on held-out prose "
                 f"({h['tuned']['tokens']:,} positions; bands: 95% bootstrap CI over windows)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, f"tuned_lens_metrics_{_tag(res)}", figures_dir)
    return fig


def plot_trajectory(res, figures_dir="figures", max_layers: int | None = None):
    """Prediction trajectory of the prompt: tokens × entries, the top token written in each cell, colour =
    its probability; logit lens left, tuned lens right."""
    import matplotlib.pyplot as plt

    t = res["trajectory"]
    layers, tokens = t["layers"], t["tokens"]
    rows = list(range(len(layers)))[::-1] if max_layers is None else list(range(len(layers)))[::-1][:max_layers]
    fig, axes = plt.subplots(1, 2, figsize=(2 + 1.1 * len(tokens) * 2, 0.28 * len(rows) + 2), sharey=True)
    for ax, name in zip(axes, LENSES):
        probs = np.array(t[name]["top_probs"])[rows]
        ax.imshow(probs, aspect="auto", cmap="Blues", vmin=0, vmax=1)
        for i, r in enumerate(rows):
            for j in range(len(tokens)):
                word = t[name]["top_tokens"][r][j].replace("\n", "\\n")
                ax.text(j, i, word[:8], ha="center", va="center", fontsize=6,
                        color="white" if probs[i, j] > 0.6 else "black")
        ax.set_xticks(range(len(tokens)), [x.replace("\n", "\\n") for x in tokens], rotation=60, fontsize=7)
        ax.set_title(f"{name} lens", fontsize=10)
    axes[0].set_yticks(range(len(rows)), [str(layers[r]) for r in rows], fontsize=6)
    axes[0].set_ylabel("hidden-state entry")
    fig.suptitle(f"{res['parameters']['model']}: top token at each position and entry (colour: its probability)",
                 fontsize=10)
    fig.tight_layout()
    save_figure(fig, f"tuned_lens_trajectory_{_tag(res)}", figures_dir)
    return fig
