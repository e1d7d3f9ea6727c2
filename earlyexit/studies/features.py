"""Per-layer features of true/false statements at the last prompt token, batched and cached on disk.

Two feature kinds, for every hidden-state entry 0..L (entry 0 = embeddings, L = the model's output):

- ``"hidden"``: the residual stream ``[N, L+1, d]`` (what the original study's code fed its probes).
- ``"lens"``: the normed-lens log-probabilities, in a compact form ``[N, L+1, k]``. The full
  vocabulary (49,152 for SmolLM2) for 31 layers and ~6k statements is ~36 GB, so each layer's
  log-probability vector ``log p`` (length V) is multiplied by a fixed, seeded Gaussian matrix
  ``R`` of shape ``[V, k]`` (entries N(0, 1/V), k = 256 by default). A random projection keeps the
  geometry of the whole distribution (Johnson–Lindenstrauss: distances and linear structure are
  kept up to small distortion), where a fixed token subset would throw away everything outside the
  subset and would have to be chosen by hand. Note that ``log p = W·norm(h) − logsumexp`` is an
  affine function of the normed hidden state plus the log-normaliser, so this kind differs from
  ``"hidden"`` mainly through the final norm, the projection and the log-normaliser.

Besides the kinds, every run keeps the model's own output at the last token (``top1``: the argmax
token id, ``word_logprobs``: log p of the first token of ``" true"`` and ``" false"``), the inputs
of the "LM next token" and "LM token prob." baselines.

The 2-shot prompt's primer is shared by all statements: :func:`earlyexit.core.prefix.prefill` computes
it once and runs only each statement's own tokens. Features are cached in chunks of statements;
each chunk file's name is a hash of the model (name, config and a weight fingerprint), the prompt
condition, the chunk's exact prompts and labels, the feature kind and its settings. Files are
written atomically (:mod:`earlyexit.core.atomic`) and checked on reading (stored key, shapes); a file
that fails the check — e.g. cut short by a crash — is recomputed, never used.

>>> feats = extract_features(model, tok, statements, "prompted", cache_dir="cache")  # doctest: +SKIP
>>> feats.get("hidden").shape                                                       # doctest: +SKIP
(6085, 31, 576)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from earlyexit.core import parallel, store
from earlyexit.core.batching import chunks, encode_prompts, pad_id
from earlyexit.studies.data import Statement
from earlyexit.core.lenses import LENS_NAMES, Lens, get_unembed, resolve_lens
from earlyexit.core.models import model_name
from earlyexit.core.prefix import prefill
from earlyexit.studies.prompts import statement_prompt
from earlyexit.core.stats import CHUNK_BYTES

FEATURE_KINDS = ("hidden", "lens")
CONDITIONS = ("prompted", "bare")
LABEL_WORDS = (" true", " false")  # the words the 2-shot prompt asks for (label 1, label 0)
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """The store's ``features`` area (see :mod:`earlyexit.core.store`)."""
    return store.area("features")


def check_kinds(kinds: Sequence[str] | str) -> list[str]:
    """Validate feature kinds; a single string is one kind."""
    if isinstance(kinds, str):
        kinds = [kinds]
    kinds = list(kinds)
    if not kinds:
        raise ValueError(f"No feature kind given: choose from {FEATURE_KINDS}.")
    bad = [k for k in kinds if k not in FEATURE_KINDS]
    if bad:
        raise ValueError(f"Unknown feature kind {bad[0]!r}; feature kinds are {FEATURE_KINDS}.")
    return list(dict.fromkeys(kinds))


def check_condition(condition: str) -> str:
    if condition not in CONDITIONS:
        raise ValueError(f"Unknown condition {condition!r}; use one of {CONDITIONS}.")
    return condition


@dataclass(frozen=True)
class FeatureSettings:
    """What the features depend on besides model and data (all part of the cache key).

    lens: a lens name (:data:`~earlyexit.core.lenses.LENS_NAMES`, default ``"normed"``); proj_dim / proj_seed: the random projection of the
    lens log-probabilities; dtype: the stored float type.
    """

    lens: str = "normed"
    proj_dim: int = 256
    proj_seed: int = 0
    dtype: str = "float32"

    def __post_init__(self):
        if self.lens not in LENS_NAMES:
            raise ValueError(f"Unknown lens {self.lens!r}; use one of {LENS_NAMES}.")
        if self.proj_dim < 1:
            raise ValueError(f"proj_dim must be ≥ 1, got {self.proj_dim}")
        if self.dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be 'float32' or 'float16', got {self.dtype!r}")


@dataclass
class Features:
    """Features of N statements at E = L+1 hidden-state entries.

    hidden ``[N, E, d]``, lens ``[N, E, k]`` (only the kinds asked); top1 ``[N]`` argmax token of
    the model's output; word_logprobs ``[N, 2]`` log p of the first token of " true" and " false";
    labels ``[N]`` (1 = true); topics: N topic names; stats: cache hits/misses of the run.
    """

    layers: list[int]
    labels: np.ndarray
    topics: list[str]
    top1: np.ndarray
    word_logprobs: np.ndarray
    hidden: np.ndarray | None = None
    lens: np.ndarray | None = None
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, kind: str) -> np.ndarray:
        """The ``[N, E, D]`` array of feature ``kind``."""
        (kind,) = check_kinds(kind)
        arr = getattr(self, kind)
        if arr is None:
            raise ValueError(f"Feature kind {kind!r} was not extracted; pass kinds=[..., {kind!r}].")
        return arr


# --- cache keys ---------------------------------------------------------------------------------

def chunk_key(model_fp: str, condition: str, prompts: Sequence[str], labels: Sequence[int], kind: str,
              settings: FeatureSettings, lens_fingerprint: str | None = None) -> str:
    """The cache key of one chunk and kind: model, condition, exact prompts and labels, settings (and, for a
    trained lens such as ``"tuned"``, that lens's own fingerprint)."""
    kind_settings = {"dtype": settings.dtype}
    if kind == "lens":
        kind_settings.update(lens=settings.lens, proj_dim=settings.proj_dim, proj_seed=settings.proj_seed)
        if lens_fingerprint is not None:
            kind_settings["lens_fingerprint"] = lens_fingerprint
    return store.make_key("features", {"v": CACHE_VERSION, "model": model_fp, "condition": condition, "prompts": list(prompts),
                 "labels": [int(x) for x in labels], "kind": kind, "settings": kind_settings,
                 "label_words": LABEL_WORDS})


def _chunk_path(cache_dir: Path, model, condition: str, kind: str, key: str) -> Path:
    return cache_dir / store.slug(model_name(model)) / condition / f"{kind}-{key[:32]}.npz"


# --- extraction ---------------------------------------------------------------------------------

_PROJECTIONS: dict[tuple[int, int, int], torch.Tensor] = {}


def projection_matrix(vocab_size: int, dim: int, seed: int) -> torch.Tensor:
    """The fixed random projection ``[V, k]`` of the lens feature, entries N(0, 1/V) (float32)."""
    key = (vocab_size, dim, seed)
    if key not in _PROJECTIONS:
        gen = torch.Generator().manual_seed(seed)
        _PROJECTIONS.clear()
        _PROJECTIONS[key] = torch.randn(vocab_size, dim, generator=gen) / vocab_size ** 0.5
    return _PROJECTIONS[key]


def label_word_ids(tokenizer) -> list[int]:
    """First token id of each of :data:`LABEL_WORDS` (" true", " false")."""
    ids = []
    for word in LABEL_WORDS:
        toks = tokenizer(word, add_special_tokens=False)["input_ids"]
        if not toks:
            raise ValueError(f"The tokenizer turns {word!r} into no tokens.")
        ids.append(int(toks[0]))
    if ids[0] == ids[1]:
        raise ValueError(f"' true' and ' false' start with the same token ({ids[0]}); the token-prob. baseline "
                         "cannot tell them apart with this tokenizer.")
    return ids


def _is_linear_head(unembed) -> bool:
    """A plain linear head whose weights are at hand (not offloaded by accelerate: those are read only
    through the head's own call)."""
    return (unembed.softcap is None and unembed.scale is None
            and getattr(unembed.head, "bias", None) is None and unembed.head.weight.device.type != "meta")


_FOLDED: dict[tuple, torch.Tensor] = {}


def _folded_projection(unembed, R: torch.Tensor, key: tuple) -> torch.Tensor:
    """``W^T R`` ``[d, k]``: the projection folded into the output head (for a linear head)."""
    full = (id(unembed.head), unembed.head.weight.data_ptr(), *key)
    if full not in _FOLDED:
        _FOLDED.clear()
        _FOLDED[full] = unembed.head.weight.detach().float().T @ R
    return _FOLDED[full]


@torch.no_grad()
def lens_projection(lens: Lens, hidden: torch.Tensor, entries: list[int], settings: FeatureSettings,
                    chunk_bytes: int = CHUNK_BYTES, fold: bool = True) -> torch.Tensor:
    """hidden ``[E, B, d]`` → projected log-probabilities of ``lens`` ``[B, E, k]`` (float32).

    Logits are formed for a few rows at a time, so at most ``chunk_bytes`` of them exist at once.
    For a plain linear head (no soft-capping, scaling or bias) and ``fold=True``, uses
    ``log p · R = norm(h) · (Wᵀ R) − logsumexp · (1ᵀ R)``: the logits are then only needed for
    their log-normaliser, which saves the ``[V, k]`` product (same result up to float rounding).
    """
    E, B, _ = hidden.shape
    unembed = lens.unembed
    R = projection_matrix(unembed.vocab_size, settings.proj_dim, settings.proj_seed).to(hidden.device)
    hn = lens.head_inputs(hidden, entries).float()
    fast = fold and _is_linear_head(unembed)
    if fast:
        M = _folded_projection(unembed, R, (settings.proj_dim, settings.proj_seed))
        col = R.sum(0)
    out = torch.empty(B, E, settings.proj_dim, device=hidden.device)
    rows = max(1, chunk_bytes // (4 * unembed.vocab_size * E))
    for s in range(0, B, rows):
        e = min(B, s + rows)
        logits = unembed(hn[:, s:e], normed=False)  # [E, n, V]
        if fast:
            lse = torch.logsumexp(logits, dim=-1)  # [E, n]
            proj = hn[:, s:e] @ M - lse.unsqueeze(-1) * col
        else:
            proj = torch.log_softmax(logits, dim=-1) @ R
        out[s:e] = proj.transpose(0, 1)
        del logits
    return out


@torch.no_grad()
def compute_features(model, tokenizer, token_lists: Sequence[Sequence[int]], kinds: Sequence[str],
                     settings: FeatureSettings, *, share_prefix: bool = True) -> dict[str, np.ndarray]:
    """Run one batch: arrays ``hidden [B, E, d]``, ``lens [B, E, k]`` (as asked), ``top1 [B]``,
    ``word_logprobs [B, 2]``. ``share_prefix`` runs a common primer once (see :func:`prefill`)."""
    kinds = check_kinds(kinds)
    unembed = get_unembed(model)
    entries = list(range(unembed.n_layers + 1))
    res = prefill(model, token_lists, pad_id(tokenizer), share_prefix=share_prefix, output_hidden_states=True)
    hs = res.hidden_last
    if hs is None or len(hs) != len(entries):
        raise RuntimeError(f"Expected {len(entries)} hidden-state entries, got {None if hs is None else len(hs)}")
    hidden = torch.stack([h.float().to(unembed.device) for h in hs])  # [E, B, d] (a sharded model: on the head's device)
    dt = np.dtype(settings.dtype)
    out: dict[str, np.ndarray] = {}
    if "hidden" in kinds:
        out["hidden"] = hidden.transpose(0, 1).cpu().numpy().astype(dt)
    if "lens" in kinds:
        out["lens"] = lens_projection(resolve_lens(model, settings.lens), hidden, entries, settings).cpu().numpy().astype(dt)
    logp = torch.log_softmax(res.logits.float(), dim=-1)  # the model's own output at the last token
    out["top1"] = logp.argmax(-1).cpu().numpy().astype(np.int64)
    out["word_logprobs"] = logp[:, label_word_ids(tokenizer)].cpu().numpy().astype(np.float32)
    return out


def extract_features(
    model,
    tokenizer,
    statements: Sequence[Statement],
    condition: str = "prompted",
    *,
    kinds: Sequence[str] = FEATURE_KINDS,
    settings: FeatureSettings | None = None,
    batch_size: int = 32,
    chunk_size: int = 256,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> Features:
    """Features of ``statements`` under ``condition`` (``"prompted"``: the 2-shot prompt; ``"bare"``).

    Statements are processed in cache chunks of ``chunk_size`` and model batches of ``batch_size``;
    a chunk whose files exist for every kind asked is read back instead of running the model.
    ``cache_dir=None`` uses :func:`default_cache_dir`; ``use_cache=False`` neither reads nor writes.
    In an ``accelerate launch`` group the chunks to compute are sharded over the processes (whole chunks,
    contiguous) and gathered in order; ``stats["parallel"]`` says which statements each process ran.
    """
    check_condition(condition)
    kinds = check_kinds(kinds)
    settings = settings or FeatureSettings()
    if len(statements) == 0:
        raise ValueError("No statements given: load some with earlyexit.studies.data.load_true_false().")
    if chunk_size < 1 or batch_size < 1:
        raise ValueError(f"chunk_size and batch_size must be ≥ 1, got {chunk_size}, {batch_size}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    prompts = [statement_prompt(s.statement, condition) for s in statements]
    labels = np.array([int(s.label) for s in statements], dtype=np.int64)
    fp = store.model_fingerprint(model) if use_cache else ""
    lens_fp = resolve_lens(model, settings.lens).fingerprint() if use_cache and "lens" in kinds and \
        settings.lens == "tuned" else None
    all_kinds = (*kinds, "final")
    specs = []  # per cache chunk: its first position, its prompts, and per kind its key and file
    for start, chunk_prompts in chunks(prompts, chunk_size):
        chunk_labels = labels[start:start + len(chunk_prompts)]
        keys = {k: chunk_key(fp, condition, chunk_prompts, chunk_labels, k, settings, lens_fp) for k in all_kinds}
        specs.append((start, chunk_prompts, keys, {k: _chunk_path(cache, model, condition, k, keys[k]) for k in all_kinds}))

    def read(j: int, wanted) -> dict[str, dict[str, np.ndarray]]:
        _, cp, keys, paths = specs[j]
        found = {}
        for k in wanted if use_cache else ():
            data = store.read_npz(paths[k], keys[k], rows=len(cp))
            if data is not None:
                found[k] = data
        return found

    def compute(j: int, missing) -> dict[str, dict[str, np.ndarray]]:
        _, cp, keys, paths = specs[j]
        computed = _run_chunk(model, tokenizer, cp, [k for k in kinds if k in missing] or [kinds[0]],
                              settings, condition, batch_size)
        got = {}
        for k in missing:
            names = [k] if k != "final" else ["top1", "word_logprobs"]
            got[k] = {name: computed[name] for name in names}
            if use_cache:
                store.write_npz(paths[k], keys[k], got[k])
        return got

    # In an accelerate launch group the main process reads the cache and says which chunks still miss a kind;
    # those chunks are sharded over the processes (each writes its own chunks' files) and gathered in order.
    main = parallel.is_main_process()
    found_all = [read(j, all_kinds) for j in range(len(specs))] if main else None
    missing = parallel.broadcast([[k for k in all_kinds if k not in f] for f in found_all] if main else None)
    if not main:
        found_all = [read(j, [k for k in all_kinds if k not in missing[j]]) for j in range(len(specs))]
    todo = [j for j, m in enumerate(missing) if m]

    def run(js: list[int]) -> list[dict]:
        return [compute(j, missing[j]) for j in tqdm(js, desc=f"features ({condition})", disable=not progress or not main)]

    computed, info = parallel.map_items(run, todo)
    for j, got in zip(todo, computed):
        found_all[j].update(got)
    for j, found in enumerate(found_all):  # a file the main process read that this one cannot: compute it here
        absent = [k for k in all_kinds if k not in found]
        if absent:
            found.update(compute(j, absent))
    stats: dict = {"chunks": len(specs), "hits": len(specs) - len(todo), "misses": len(todo)}
    if info.num_processes > 1:
        stats["parallel"] = {**info.as_meta(), "unit": chunk_size, "indices": [
            [specs[todo[j]][0] + i for j in js for i in range(len(specs[todo[j]][1]))] for js in info.indices]}
    parts = {k: [f[k][k] for f in found_all] for k in kinds}
    parts["top1"] = [f["final"]["top1"] for f in found_all]
    parts["word_logprobs"] = [f["final"]["word_logprobs"] for f in found_all]
    L = get_unembed(model).n_layers
    feats = Features(
        layers=list(range(L + 1)), labels=labels, topics=[s.topic for s in statements],
        top1=np.concatenate(parts["top1"]), word_logprobs=np.concatenate(parts["word_logprobs"]), stats=stats,
    )
    for k in kinds:
        arr = np.concatenate(parts[k])
        if arr.shape[:2] != (len(statements), L + 1):
            raise RuntimeError(f"{k} features have shape {arr.shape}, expected ({len(statements)}, {L + 1}, ...)")
        setattr(feats, k, arr)
    return feats


def _run_chunk(model, tokenizer, prompts: Sequence[str], kinds: list[str], settings: FeatureSettings,
               condition: str, batch_size: int) -> dict[str, np.ndarray]:
    token_lists = encode_prompts(tokenizer, prompts, model)
    # the bare statements share no primer: nothing to run once
    share = condition == "prompted"
    outs = [compute_features(model, tokenizer, group, kinds, settings, share_prefix=share)
            for _, group in chunks(token_lists, batch_size)]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
