"""Group curves of per-layer entropy, their bootstrap intervals, and per-layer tests.

Inputs throughout: ``means [N, E]`` = each answer's mean entropy over its tokens, for E layers;
``n_tokens [N]`` = the answer's token count (the weight of a token-weighted mean); ``groups [N]`` =
True for "correct". Answers with zero tokens must be removed before (they have no mean).

The original study's bug, reproducible with ``weighting="original"``: the group curves reused weights
normalised over ALL answers, so each group's curve came out multiplied by that group's share of tokens.
``weighting="within"`` (the default) normalises the weights within each group.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WEIGHTINGS = ("within", "original")
CORRECTIONS = ("holm", "bh")


def _check(means: np.ndarray, n_tokens: np.ndarray, groups: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    means = np.asarray(means, dtype=float)
    n_tokens = np.asarray(n_tokens, dtype=float)
    if means.ndim != 2:
        raise ValueError(f"means must be [N, E] (answers × layers), got shape {means.shape}")
    if n_tokens.shape != (means.shape[0],):
        raise ValueError(f"n_tokens must be [N] = [{means.shape[0]}], got shape {n_tokens.shape}")
    if (n_tokens <= 0).any():
        raise ValueError("every answer needs ≥ 1 token: drop empty answers before aggregating")
    if np.isnan(means).any():
        raise ValueError("means contain NaN: drop empty answers before aggregating")
    out = [means, n_tokens]
    if groups is not None:
        groups = np.asarray(groups, dtype=bool)
        if groups.shape != (means.shape[0],):
            raise ValueError(f"groups must be [N] = [{means.shape[0]}], got shape {groups.shape}")
        out.append(groups)
    return tuple(out)


def weighted_curve(means: np.ndarray, n_tokens: np.ndarray) -> np.ndarray:
    """Token-weighted mean of per-answer means, ``[E]`` (NaN when there are no answers)."""
    means, n_tokens = _check(means, n_tokens)
    if len(n_tokens) == 0:
        return np.full(means.shape[1], np.nan)
    return n_tokens @ means / n_tokens.sum()


def group_curves(means: np.ndarray, n_tokens: np.ndarray, groups: np.ndarray,
                 weighting: str = "within") -> tuple[np.ndarray, np.ndarray]:
    """``(correct [E], wrong [E])`` token-weighted group curves.

    ``within``: weights ``n_q / Σ_{q' in group} n_q'`` — each curve is a proper mean of its group.
    ``original``: weights ``n_q / Σ_{all q'} n_q'`` — the original study's curves, each scaled by its
    group's share of tokens. An empty group gives NaN (``within``) or zeros (``original``).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"Unknown weighting {weighting!r}; use one of {WEIGHTINGS}.")
    means, n_tokens, groups = _check(means, n_tokens, groups)
    E = means.shape[1]
    out = []
    for mask in (groups, ~groups):
        w = n_tokens[mask]
        if weighting == "within":
            out.append(w @ means[mask] / w.sum() if w.sum() > 0 else np.full(E, np.nan))
        else:
            out.append(w @ means[mask] / n_tokens.sum() if n_tokens.sum() > 0 else np.full(E, np.nan))
    return out[0], out[1]


@dataclass
class CurveCI:
    """A per-layer estimate with its percentile bootstrap interval, each ``[E]``; ``n`` answers."""

    estimate: np.ndarray
    low: np.ndarray
    high: np.ndarray
    n: int

    def as_dict(self) -> dict:
        return {"estimate": _jsonable(self.estimate), "low": _jsonable(self.low),
                "high": _jsonable(self.high), "n": self.n}


def _jsonable(a: np.ndarray) -> list:
    return [None if not np.isfinite(x) else float(x) for x in np.asarray(a, dtype=float)]


def _boot_counts(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``[n_boot, n]`` how often each item is drawn in each resample (resampling with replacement)."""
    idx = rng.integers(0, n, size=(n_boot, n))
    counts = np.zeros((n_boot, n))
    np.add.at(counts, (np.arange(n_boot)[:, None], idx), 1)
    return counts


def _boot_curves(means: np.ndarray, n_tokens: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``[n_boot, E]`` token-weighted curves of resampled answers."""
    w = _boot_counts(len(n_tokens), n_boot, rng) * n_tokens  # [n_boot, N]
    return w @ means / w.sum(1, keepdims=True)


def _check_boot(n_boot: int, level: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be ≥ 1, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")


def bootstrap_curve(means: np.ndarray, n_tokens: np.ndarray, *, n_boot: int = 2000, level: float = 0.95,
                    seed: int = 0) -> CurveCI:
    """Token-weighted curve ``[E]`` with a percentile bootstrap CI over answers (questions)."""
    _check_boot(n_boot, level)
    means, n_tokens = _check(means, n_tokens)
    E = means.shape[1]
    if len(n_tokens) == 0:
        nan = np.full(E, np.nan)
        return CurveCI(nan, nan.copy(), nan.copy(), 0)
    boots = _boot_curves(means, n_tokens, n_boot, np.random.default_rng(seed))
    a = (1 - level) / 2
    return CurveCI(weighted_curve(means, n_tokens), np.quantile(boots, a, axis=0),
                   np.quantile(boots, 1 - a, axis=0), len(n_tokens))


def bootstrap_difference(means: np.ndarray, n_tokens: np.ndarray, groups: np.ndarray, *, n_boot: int = 2000,
                         level: float = 0.95, seed: int = 0) -> CurveCI:
    """Wrong − correct difference of the within-group curves, ``[E]``, with a bootstrap CI.

    The questions of each group are resampled separately (stratified), so group sizes stay fixed.
    NaN everywhere when a group is empty.
    """
    _check_boot(n_boot, level)
    means, n_tokens, groups = _check(means, n_tokens, groups)
    E = means.shape[1]
    if groups.all() or not groups.any():
        nan = np.full(E, np.nan)
        return CurveCI(nan, nan.copy(), nan.copy(), len(groups))
    rng = np.random.default_rng(seed)
    correct = _boot_curves(means[groups], n_tokens[groups], n_boot, rng)
    wrong = _boot_curves(means[~groups], n_tokens[~groups], n_boot, rng)
    c, w = group_curves(means, n_tokens, groups)
    a = (1 - level) / 2
    diff = wrong - correct
    return CurveCI(w - c, np.quantile(diff, a, axis=0), np.quantile(diff, 1 - a, axis=0), len(groups))


def adjust_pvalues(p: np.ndarray, method: str = "holm") -> np.ndarray:
    """Family-wise (Holm) or false-discovery-rate (Benjamini–Hochberg) adjusted p-values; NaN kept."""
    if method not in CORRECTIONS:
        raise ValueError(f"Unknown correction {method!r}; use one of {CORRECTIONS}.")
    p = np.asarray(p, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    q = p[ok]
    m = len(q)
    if m == 0:
        return out
    order = np.argsort(q)
    ranked = q[order]
    if method == "holm":
        adj = np.maximum.accumulate((m - np.arange(m)) * ranked)
    else:
        adj = np.minimum.accumulate((m / np.arange(1, m + 1) * ranked)[::-1])[::-1]
    res = np.empty(m)
    res[order] = np.minimum(adj, 1.0)
    out[ok] = res
    return out


@dataclass
class LayerTests:
    """Per-layer tests of correct vs wrong, each ``[E]``.

    mannwhitney_p: two-sided Mann–Whitney U on per-question means; auroc: P(entropy of a wrong answer >
    that of a correct one) = U / (n_wrong · n_correct); permutation_p: two-sided permutation test of the
    token-weighted difference (the plotted statistic); ``*_adj``: corrected with ``correction``.
    """

    mannwhitney_p: np.ndarray
    mannwhitney_adj: np.ndarray
    auroc: np.ndarray
    permutation_p: np.ndarray
    permutation_adj: np.ndarray
    correction: str
    n_correct: int
    n_wrong: int
    n_perm: int

    def as_dict(self) -> dict:
        return {
            "mannwhitney_p": _jsonable(self.mannwhitney_p), "mannwhitney_p_adjusted": _jsonable(self.mannwhitney_adj),
            "auroc_wrong_higher": _jsonable(self.auroc), "permutation_p": _jsonable(self.permutation_p),
            "permutation_p_adjusted": _jsonable(self.permutation_adj), "correction": self.correction,
            "n_correct": self.n_correct, "n_wrong": self.n_wrong, "n_permutations": self.n_perm,
        }


def layer_tests(means: np.ndarray, n_tokens: np.ndarray, groups: np.ndarray, *, correction: str = "holm",
                n_perm: int = 5000, seed: int = 0) -> LayerTests:
    """Per-layer Mann–Whitney and permutation tests of correct vs wrong, with a multiple-comparison correction.

    With fewer than one answer in either group every p-value is NaN.
    """
    from scipy.stats import mannwhitneyu

    if correction not in CORRECTIONS:
        raise ValueError(f"Unknown correction {correction!r}; use one of {CORRECTIONS}.")
    if n_perm < 1:
        raise ValueError(f"n_perm must be ≥ 1, got {n_perm}")
    means, n_tokens, groups = _check(means, n_tokens, groups)
    E = means.shape[1]
    n_c, n_w = int(groups.sum()), int((~groups).sum())
    nan = np.full(E, np.nan)
    if n_c == 0 or n_w == 0:
        return LayerTests(nan, nan.copy(), nan.copy(), nan.copy(), nan.copy(), correction, n_c, n_w, n_perm)
    u, p_mw = mannwhitneyu(means[~groups], means[groups], alternative="two-sided", axis=0)
    auroc = np.asarray(u, dtype=float) / (n_c * n_w)
    p_mw = np.asarray(p_mw, dtype=float)
    # permutation test of the token-weighted difference; the observed labelling counts as one permutation
    rng = np.random.default_rng(seed)
    wm = n_tokens[:, None] * means  # [N, E]
    masks = np.stack([rng.permutation(groups) for _ in range(n_perm)]).astype(float)  # [P, N]

    def diffs(m: np.ndarray) -> np.ndarray:  # m [P, N] 1 = correct → [P, E] wrong − correct
        c = m @ wm / (m @ n_tokens)[:, None]
        w = (1 - m) @ wm / ((1 - m) @ n_tokens)[:, None]
        return w - c

    obs = diffs(groups[None].astype(float))[0]
    perm = diffs(masks)
    p_perm = (1 + (np.abs(perm) >= np.abs(obs) - 1e-12).sum(0)) / (n_perm + 1)
    return LayerTests(p_mw, adjust_pvalues(p_mw, correction), auroc, p_perm, adjust_pvalues(p_perm, correction),
                      correction, n_c, n_w, n_perm)
