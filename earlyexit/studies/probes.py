"""Truthfulness probes on per-layer features: splits by topic, the original MLP, logistic regression,
the two LM baselines and the majority vote (see Part 3 of ../shared/docs/protocols.md).

Splits are by topic, never by random rows: the original trains on animals, companies, elements,
facts and inventions and tests on cities; leave-one-topic-out holds out each of the six topics in
turn. Anything fitted (probe weights, feature standardisation) sees training rows only.

Metrics: train loss / test loss are the mean binary cross-entropy per row of that split (the
original divided the summed test loss by the number of *training* batches); accuracy at threshold
0.5; AUROC of the predicted probability; a percentile-bootstrap 95% CI of test accuracy over test rows.

>>> split = original_split(feats.topics)                                  # doctest: +SKIP
>>> res = fit_probe("mlp", feats.get("hidden")[:, 15], feats.labels, split)  # doctest: +SKIP
>>> res.metrics["test_acc"]                                                # doctest: +SKIP
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn

from earlyexit.studies.bootstrap import bootstrap_ci
from earlyexit.studies.data import TRUE_FALSE_TOPICS

SIX_TOPICS = TRUE_FALSE_TOPICS[:6]  # "generated" is not one of the study's topics
ORIGINAL_TRAIN = ("animals", "companies", "elements", "facts", "inventions")
ORIGINAL_TEST = ("cities",)
TAP_FRACTIONS = (1 / 2, 5 / 8, 3 / 4)  # the original's layers 16, 20, 24 of 32
PROBE_KINDS = ("mlp", "logreg")
EPS = 1e-7


# --- splits ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Split:
    """Row indices of a topic split; ``train_topics`` and ``test_topics`` never overlap."""

    name: str
    train_topics: tuple[str, ...]
    test_topics: tuple[str, ...]
    train_idx: np.ndarray
    test_idx: np.ndarray


def _check_topics(topics: Sequence[str], what: str) -> tuple[str, ...]:
    if isinstance(topics, str):
        topics = [topics]
    topics = tuple(topics)
    bad = [t for t in topics if t not in TRUE_FALSE_TOPICS]
    if bad:
        raise ValueError(f"Unknown topic {bad[0]!r} in the {what} topics; topics are {TRUE_FALSE_TOPICS}.")
    if not topics:
        raise ValueError(f"No {what} topics given.")
    return topics


def topic_split(row_topics: Sequence[str], train_topics: Sequence[str], test_topics: Sequence[str],
                name: str = "") -> Split:
    """Split rows by their topic. Raises for unknown or overlapping topics and for an empty split."""
    train_t = _check_topics(train_topics, "training")
    test_t = _check_topics(test_topics, "test")
    overlap = set(train_t) & set(test_t)
    if overlap:
        raise ValueError(f"Topic(s) {sorted(overlap)} are in both the training and the test topics.")
    row_topics = np.asarray(list(row_topics))
    unknown = sorted(set(row_topics.tolist()) - set(TRUE_FALSE_TOPICS))
    if unknown:
        raise ValueError(f"Unknown topic {unknown[0]!r} among the rows; topics are {TRUE_FALSE_TOPICS}.")
    train_idx = np.flatnonzero(np.isin(row_topics, train_t))
    test_idx = np.flatnonzero(np.isin(row_topics, test_t))
    if len(train_idx) == 0:
        raise ValueError(f"Empty training split: no rows of topics {list(train_t)} (rows have topics "
                         f"{sorted(set(row_topics.tolist()))}). Load those topics or choose others.")
    if len(test_idx) == 0:
        raise ValueError(f"Empty test split: no rows of topics {list(test_t)} (rows have topics "
                         f"{sorted(set(row_topics.tolist()))}). Load those topics or choose others.")
    return Split(name or f"test={'+'.join(test_t)}", train_t, test_t, train_idx, test_idx)


def original_split(row_topics: Sequence[str]) -> Split:
    """Train on animals, companies, elements, facts, inventions; test on cities."""
    return topic_split(row_topics, ORIGINAL_TRAIN, ORIGINAL_TEST, name="original")


def leave_one_topic_out(row_topics: Sequence[str], topics: Sequence[str] = SIX_TOPICS) -> list[Split]:
    """One split per topic: test on it, train on the other ``topics``."""
    topics = _check_topics(topics, "leave-one-out")
    if len(topics) < 2:
        raise ValueError("Leave-one-topic-out needs at least two topics.")
    return [topic_split(row_topics, [t for t in topics if t != held], [held], name=f"loto:{held}")
            for held in topics]


# --- layers ---------------------------------------------------------------------------------------

def tap_layers(n_layers: int, fractions: Sequence[float] = TAP_FRACTIONS) -> list[int]:
    """Hidden-state entries at the given fractions of the depth, rounded half up (30 → 15, 19, 23)."""
    if n_layers < 1:
        raise ValueError(f"n_layers must be ≥ 1, got {n_layers}")
    return [int(math.floor(f * n_layers + 0.5)) for f in fractions]


def check_taps(taps: Sequence[int], n_entries: int) -> list[int]:
    """Validate tap layers against ``n_entries`` = L+1 hidden-state entries (the one range check,
    :func:`~earlyexit.core.lenses.check_entries`)."""
    from earlyexit.core.lenses import check_entries

    if taps is not None and len(taps) == 0:
        raise ValueError("No tap layers given.")
    return check_entries(n_entries - 1, list(taps), what="Tap layer")


# --- probes ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MLPConfig:
    """The original probe: d→256→128→64→1, ReLU, sigmoid + BCE, Adam, minibatches, fixed epochs.

    ``standardize`` z-scores the features with the training rows' mean and std first (the original
    fed raw hidden states; off by default).
    """

    hidden: tuple[int, ...] = (256, 128, 64)
    lr: float = 1e-3
    epochs: int = 5
    batch_size: int = 16
    seed: int = 0
    standardize: bool = False


class Standardizer:
    """z-scoring with statistics of the rows it is fitted on (training rows only)."""

    def __init__(self, x_train: np.ndarray):
        self.mean = x_train.mean(0)
        std = x_train.std(0)
        self.std = np.where(std > 0, std, 1.0)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std


class StackedMLP(nn.Module):
    """P independent MLPs d→h1→…→1 (ReLU) evaluated together: x ``[P, n, d]`` → logits ``[P, n]``.

    Probe p's weights are initialised exactly like ``nn.Linear`` layers built after
    ``torch.manual_seed(seeds[p])``, so a probe does not depend on which others share the stack.
    """

    def __init__(self, seeds: Sequence[int], dims: Sequence[int]):
        super().__init__()
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        per_probe = []
        for seed in seeds:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                per_probe.append([nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])])
        for i in range(len(dims) - 1):
            self.weights.append(nn.Parameter(torch.stack([lin[i].weight.detach().T for lin in per_probe])))
            self.biases.append(nn.Parameter(torch.stack([lin[i].bias.detach() for lin in per_probe]).unsqueeze(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if i < len(self.weights) - 1:
                x = torch.relu(x)
        return x.squeeze(-1)


class MLPProbe:
    """Trained MLP probe(s). :meth:`predict_proba` maps features ``[n, d]`` (one probe) or
    ``[n, P, d]`` (a stack) to p(true) ``[n]`` or ``[n, P]``."""

    def __init__(self, net: StackedMLP, scalers: list[Standardizer] | None, train_losses: np.ndarray):
        self.net, self.scalers, self.train_losses = net, scalers, train_losses  # losses [epochs, P]

    @torch.no_grad()
    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        single = x.ndim == 2
        xs = x[:, None, :] if single else x
        if self.scalers is not None:
            xs = np.stack([sc(xs[:, p]) for p, sc in enumerate(self.scalers)], axis=1)
        xt = torch.as_tensor(np.ascontiguousarray(xs.transpose(1, 0, 2), dtype=np.float32))
        proba = torch.sigmoid(self.net(xt)).numpy().astype(np.float64).T  # [n, P]
        return proba[:, 0] if single else proba


def _check_xy(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim not in (2, 3):
        raise ValueError(f"features must be [n, d] (or [n, P, d] for a stack), got shape {x.shape}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels must be [n={x.shape[0]}], got shape {y.shape}")
    if x.shape[0] == 0:
        raise ValueError("Empty training split: no rows to train on.")
    if len(np.unique(y)) < 2:
        raise ValueError(f"The training rows all have label {int(y[0])}: a probe needs both labels. Use more "
                         "statements per topic (a larger limit).")
    return x, y


def train_mlp(x: np.ndarray, y: np.ndarray, config: MLPConfig = MLPConfig(),
              init_seeds: Sequence[int] | None = None) -> MLPProbe:
    """Train the MLP on features ``x [n, d]`` and labels ``y [n]``; deterministic for a seed.

    ``x [n, P, d]`` trains P independent probes (e.g. one per layer) in one pass: they see the same
    minibatch order, each its own weights and its own Adam state (Adam is element-wise, and the
    summed loss leaves each probe's gradient its own), so each equals a probe trained alone.
    ``config.seed`` fixes the minibatch order; ``init_seeds`` (default ``config.seed + p``) each
    probe's initial weights.
    """
    x, y = _check_xy(x, y)
    xs = x[:, None, :] if x.ndim == 2 else x
    n, P, d = xs.shape
    scalers = [Standardizer(xs[:, p]) for p in range(P)] if config.standardize else None
    if scalers is not None:
        xs = np.stack([sc(xs[:, p]) for p, sc in enumerate(scalers)], axis=1)
    xt = torch.as_tensor(np.ascontiguousarray(xs.transpose(1, 0, 2), dtype=np.float32))  # [P, n, d]
    yt = torch.as_tensor(y, dtype=torch.float32)
    seeds = list(init_seeds) if init_seeds is not None else [config.seed + p for p in range(P)]
    if len(seeds) != P:
        raise ValueError(f"{len(seeds)} init seeds for {P} probes")
    net = StackedMLP(seeds, (d, *config.hidden, 1))
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    losses = np.zeros((config.epochs, P))
    for epoch in range(config.epochs):
        order = torch.randperm(n, generator=gen)
        total = torch.zeros(P)
        for s in range(0, n, config.batch_size):
            idx = order[s:s + config.batch_size]
            opt.zero_grad()
            logits = net(xt[:, idx])  # [P, b]
            per_probe = nn.functional.binary_cross_entropy_with_logits(
                logits, yt[idx].expand(P, -1), reduction="none").mean(1)
            per_probe.sum().backward()
            opt.step()
            total += per_probe.detach() * len(idx)
        losses[epoch] = (total / n).numpy()
    return MLPProbe(net, scalers, losses)


def train_logreg(x: np.ndarray, y: np.ndarray, *, C: float = 1.0, max_iter: int = 2000, seed: int = 0):
    """Logistic regression on features standardised with the training rows' statistics only."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = _check_xy(x, y)
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
    pipe.fit(x.astype(np.float64), y)
    return pipe


# --- metrics --------------------------------------------------------------------------------------

def bce(p: np.ndarray, y: np.ndarray) -> float:
    """Mean binary cross-entropy per row (nats)."""
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    y = np.asarray(y, dtype=np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def auroc(score: np.ndarray, y: np.ndarray) -> float:
    """Area under the ROC curve; NaN when ``y`` has one label only."""
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, score))


def metrics(split: Split, labels: np.ndarray, pred: np.ndarray, proba: np.ndarray | None = None,
            n_boot: int = 2000, seed: int = 0) -> dict:
    """Train/test loss (mean BCE per row), accuracy, test AUROC and a bootstrap 95% CI of test acc.

    pred ``[N]`` predicted labels (anything but 0/1 counts as wrong); proba ``[N]`` p(true) or
    None (no loss or AUROC).
    """
    y_tr, y_te = labels[split.train_idx], labels[split.test_idx]
    correct = (pred == labels).astype(float)
    ci = bootstrap_ci(correct[split.test_idx], n_boot=n_boot, seed=seed)
    out = {
        "n_train": int(len(split.train_idx)), "n_test": int(len(split.test_idx)),
        "train_acc": float(correct[split.train_idx].mean()), "test_acc": float(correct[split.test_idx].mean()),
        "test_acc_low": ci.low, "test_acc_high": ci.high,
        "train_loss": float("nan"), "test_loss": float("nan"), "test_auroc": float("nan"),
    }
    if proba is not None:
        out["train_loss"] = bce(proba[split.train_idx], y_tr)
        out["test_loss"] = bce(proba[split.test_idx], y_te)
        out["test_auroc"] = auroc(proba[split.test_idx], y_te)
    return out


@dataclass
class ProbeResult:
    """p(true) for every row ``[N]`` (train and test) and the split's metrics."""

    probe: str
    layer: int | None
    proba: np.ndarray
    metrics: dict = field(default_factory=dict)


def fit_probe(probe: str, x: np.ndarray, labels: np.ndarray, split: Split, *,
              mlp_config: MLPConfig = MLPConfig(), seed: int = 0, layer: int | None = None,
              n_boot: int = 2000) -> ProbeResult:
    """Fit ``probe`` (``"mlp"`` or ``"logreg"``) on the split's training rows of ``x [N, d]``;
    evaluate on both parts. Nothing of the test rows is used in fitting."""
    if probe not in PROBE_KINDS:
        raise ValueError(f"Unknown probe {probe!r}; probes are {PROBE_KINDS}.")
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] != len(labels):
        raise ValueError(f"features must be [N={len(labels)}, d], got shape {x.shape}")
    x_tr, y_tr = x[split.train_idx], labels[split.train_idx]
    if probe == "mlp":
        model = train_mlp(x_tr, y_tr, MLPConfig(**{**asdict(mlp_config), "seed": seed}))
        proba = model.predict_proba(x)
    else:
        model = train_logreg(x_tr, y_tr, seed=seed)
        proba = model.predict_proba(x.astype(np.float64))[:, 1]
    pred = (proba > 0.5).astype(int)
    return ProbeResult(probe, layer, proba, metrics(split, labels, pred, proba, n_boot=n_boot, seed=seed))


def majority_vote(results: Sequence[ProbeResult], labels: np.ndarray, split: Split, n_boot: int = 2000,
                  seed: int = 0) -> ProbeResult:
    """Majority of the probes' 0/1 predictions; loss and AUROC use the mean of their p(true)."""
    if len(results) % 2 == 0:
        raise ValueError(f"A majority vote needs an odd number of probes, got {len(results)}.")
    probas = np.stack([r.proba for r in results])
    votes = (probas > 0.5).sum(0)
    pred = (votes * 2 > len(results)).astype(int)
    mean_p = probas.mean(0)
    return ProbeResult("majority", None, mean_p, metrics(split, labels, pred, mean_p, n_boot=n_boot, seed=seed))


# --- the LM baselines -----------------------------------------------------------------------------

def lm_next_token(top1: np.ndarray, tokenizer) -> np.ndarray:
    """"LM next token": the model's full-vocabulary argmax, decoded, stripped and lower-cased, is
    "true" (→ 1) or "false" (→ 0); anything else → -1 (wrong for either label)."""
    words = {i: tokenizer.decode([int(i)]).strip().lower() for i in np.unique(top1)}
    return np.array([1 if words[i] == "true" else 0 if words[i] == "false" else -1 for i in top1])


def lm_token_prob(word_logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """"LM token prob.": predict true iff p(" true") > p(" false"). Returns (pred ``[N]``, the
    two-way normalised p(true) = p_t / (p_t + p_f) ``[N]``, used for loss and AUROC)."""
    wl = np.asarray(word_logprobs, dtype=np.float64)
    if wl.ndim != 2 or wl.shape[1] != 2:
        raise ValueError(f"word_logprobs must be [N, 2], got {wl.shape}")
    p_true = 1 / (1 + np.exp(wl[:, 1] - wl[:, 0]))
    return (wl[:, 0] > wl[:, 1]).astype(int), p_true


# --- a whole condition: table, per-layer curves, leave-one-topic-out ------------------------------

#: probe variants of the report: name → (probe kind, MLP settings)
VARIANTS: dict[str, tuple[str, MLPConfig | None]] = {
    "mlp": ("mlp", MLPConfig(standardize=True)),
    "mlp_raw": ("mlp", MLPConfig(standardize=False)),
    "logreg": ("logreg", None),
}
VARIANT_LABELS = {"mlp": "MLP", "mlp_raw": "MLP, raw input (original)", "logreg": "Logistic regression"}


def fit_layers(variant: str, x: np.ndarray, labels: np.ndarray, split: Split, layers: Sequence[int], *,
               seed: int = 0, n_boot: int = 2000) -> dict[int, ProbeResult]:
    """Fit probe ``variant`` on each of ``layers`` of features ``x [N, E, D]``.

    MLPs of all layers train together in one stack (see :func:`train_mlp`); the probe of layer l
    starts from seed ``seed + l``, so it is the same whichever other layers are fitted with it.
    """
    if variant not in VARIANTS:
        raise ValueError(f"Unknown probe variant {variant!r}; variants are {list(VARIANTS)}.")
    x = np.asarray(x)
    if x.ndim != 3 or x.shape[0] != len(labels):
        raise ValueError(f"features must be [N={len(labels)}, E, D], got shape {x.shape}")
    layers = check_taps(layers, x.shape[1])
    probe, cfg = VARIANTS[variant]
    out: dict[int, ProbeResult] = {}
    if probe == "mlp":
        cfg = MLPConfig(**{**asdict(cfg), "seed": seed})
        model = train_mlp(x[split.train_idx][:, layers], labels[split.train_idx], cfg,
                          init_seeds=[seed + layer for layer in layers])
        proba = model.predict_proba(x[:, layers])  # [N, P]
        for p, layer in enumerate(layers):
            pr = proba[:, p]
            out[layer] = ProbeResult(variant, layer, pr, metrics(split, labels, (pr > 0.5).astype(int), pr,
                                                                 n_boot=n_boot, seed=seed))
    else:
        for layer in layers:
            res = fit_probe(probe, x[:, layer], labels, split, seed=seed, layer=layer, n_boot=n_boot)
            res.probe = variant
            out[layer] = res
    return out


def baseline_rows(feats, tokenizer, split: Split, n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """The two LM baselines on ``split`` (rows of the report table)."""
    labels = np.asarray(feats.labels)
    pred_tok, p_true = lm_token_prob(feats.word_logprobs)
    return [
        {"method": "LM next token", "kind": "-", "layer": None,
         **metrics(split, labels, lm_next_token(feats.top1, tokenizer), None, n_boot=n_boot, seed=seed)},
        {"method": "LM token prob.", "kind": "-", "layer": None,
         **metrics(split, labels, pred_tok, p_true, n_boot=n_boot, seed=seed)},
    ]


def split_report(feats, tokenizer, split: Split, *, kinds: Sequence[str], taps: Sequence[int],
                 curve_variants: Sequence[str] = ("mlp", "logreg"), tap_variants: Sequence[str] = tuple(VARIANTS),
                 all_layers: bool = True, seed: int = 0, n_boot: int = 2000, progress: bool = False) -> dict:
    """Everything for one split: ``table`` rows (baselines; each variant at each tap layer and their
    majority vote, per feature kind) and, with ``all_layers``, ``curves`` rows (every layer, each
    of ``curve_variants``)."""
    from tqdm.auto import tqdm

    from earlyexit.studies.features import check_kinds

    kinds = check_kinds(kinds)
    labels = np.asarray(feats.labels)
    E = len(feats.layers)
    taps = check_taps(taps, E)
    for v in (*curve_variants, *tap_variants):
        if v not in VARIANTS:
            raise ValueError(f"Unknown probe variant {v!r}; variants are {list(VARIANTS)}.")
    jobs = []
    for kind in kinds:
        for v in dict.fromkeys((*curve_variants, *tap_variants)):
            layers = list(range(E)) if (all_layers and v in curve_variants) else taps
            jobs.append((kind, v, layers))
    fitted: dict[tuple[str, str, int], ProbeResult] = {}
    for kind, v, layers in tqdm(jobs, desc=f"probes {split.name}", disable=not progress):
        for layer, res in fit_layers(v, feats.get(kind), labels, split, layers, seed=seed, n_boot=n_boot).items():
            fitted[kind, v, layer] = res
    table = baseline_rows(feats, tokenizer, split, n_boot, seed)
    for kind in kinds:
        for v in tap_variants:
            for t in taps:
                table.append({"method": f"{VARIANT_LABELS[v]}, layer {t}", "variant": v, "kind": kind, "layer": t,
                              **fitted[kind, v, t].metrics})
            vote = majority_vote([fitted[kind, v, t] for t in taps], labels, split, n_boot, seed)
            table.append({"method": f"{VARIANT_LABELS[v]}, majority", "variant": v, "kind": kind, "layer": None,
                          **vote.metrics})
    curves = [{"kind": k, "variant": v, "layer": layer, **r.metrics}
              for (k, v, layer), r in fitted.items() if all_layers and v in curve_variants]
    return {"split": split.name, "train_topics": list(split.train_topics), "test_topics": list(split.test_topics),
            "table": table, "curves": curves}


def loto_summary(reports: Sequence[dict]) -> list[dict]:
    """Mean, std, min and max of test accuracy (and mean AUROC) of each table row over the
    leave-one-topic-out splits."""
    by: dict[tuple, list[dict]] = {}
    for rep in reports:
        for row in rep["table"]:
            by.setdefault((row["method"], row["kind"]), []).append({**row, "held_out": rep["test_topics"][0]})
    out = []
    for (method, kind), rows in by.items():
        acc = np.array([r["test_acc"] for r in rows])
        au = np.array([r["test_auroc"] for r in rows], dtype=float)
        out.append({"method": method, "kind": kind, "n_splits": len(rows), "test_acc_mean": float(acc.mean()),
                    "test_acc_std": float(acc.std(ddof=1)) if len(acc) > 1 else float("nan"),
                    "test_acc_min": float(acc.min()), "test_acc_max": float(acc.max()),
                    "test_auroc_mean": float(np.nanmean(au)) if np.isfinite(au).any() else float("nan"),
                    "per_topic": {r["held_out"]: r["test_acc"] for r in rows}})
    return out


def condition_report(feats, tokenizer, *, kinds: Sequence[str] = ("hidden", "lens"),
                     taps: Sequence[int] | None = None, loto: bool = True,
                     loto_kinds: Sequence[str] | None = None, loto_variants: Sequence[str] = ("mlp", "logreg"),
                     seed: int = 0, n_boot: int = 2000, progress: bool = False) -> dict:
    """Original split: the table (baselines; every variant at the tap layers and their majority
    vote) and per-layer curves for every layer and kind. With ``loto``: leave-one-topic-out over
    the topics present among the six, restricted to the tap layers and majority vote of
    ``loto_variants`` on ``loto_kinds`` (default: all ``kinds``) to keep the cost down."""
    L = len(feats.layers) - 1
    taps = check_taps(taps if taps is not None else tap_layers(L), L + 1)
    original = split_report(feats, tokenizer, original_split(feats.topics), kinds=kinds, taps=taps, seed=seed,
                            n_boot=n_boot, progress=progress)
    out = {"taps": taps, "original": original}
    if loto:
        present = [t for t in SIX_TOPICS if t in set(feats.topics)]
        lk = list(loto_kinds) if loto_kinds is not None else list(kinds)
        reports = [split_report(feats, tokenizer, sp, kinds=lk, taps=taps, all_layers=False,
                                curve_variants=tuple(loto_variants), tap_variants=tuple(loto_variants),
                                seed=seed, n_boot=n_boot, progress=progress)
                   for sp in leave_one_topic_out(feats.topics, present)]
        out["loto"] = reports
        out["loto_settings"] = {"kinds": lk, "variants": list(loto_variants), "layers": taps}
        out["loto_summary"] = loto_summary(reports)
    return out
