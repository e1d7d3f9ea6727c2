"""The tuned lens (Belrose et al. 2023): one affine translator per hidden-state entry, trained offline.

For entry ``ℓ < L`` the lens reads ``h ↦ h + A_ℓ h + b_ℓ`` through the model's :class:`Unembed` (final
norm → head → logit post-processing); entry L is the model's own output. The translators start at
zero, so an untrained tuned lens *is* the logit lens. Training minimises KL(final ‖ lens) at every
position of ordinary prose (:mod:`earlyexit.studies.corpus`), per layer, with the model frozen; hidden
states are streamed a batch at a time and the KL is formed in row chunks, so memory never holds
layers × positions × vocabulary.

On disk a lens is the ``tuned-lens`` package's folder — ``config.json`` (its ``TunedLensConfig``) and
``params.pt`` (the state dict of its ``layer_translators``: ``"{i}.weight"`` ``[d, d]`` and
``"{i}.bias"`` ``[d]``, ``i`` in 0..L−1) — so lenses trained by that package load here and ours load
there; ``earlyexit.json`` beside them adds the model's weights fingerprint, a checksum of
``params.pt`` and how the lens was trained (the package ignores it).

>>> from earlyexit import load_model                                      # doctest: +SKIP
>>> model, tok = load_model("smollm2-135m")                               # doctest: +SKIP
>>> lens = train_tuned_lens(model, tok, TrainSettings(tokens=65536))      # doctest: +SKIP
>>> lens.save("lenses/smollm2"); TunedLens.load("lenses/smollm2", model)  # doctest: +SKIP
>>> earlyexit.lens_stats(model, tok, ["The capital of France is"], lens="tuned")  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from earlyexit.core import parallel, store
from earlyexit.core.atomic import atomic_path, write_json
from earlyexit.core.lenses import Lens, check_entries, get_unembed
from earlyexit.core.unembed import Unembed

CONFIG_FILE = "config.json"
PARAMS_FILE = "params.pt"
META_FILE = "earlyexit.json"
FORMAT_VERSION = 1
# Float32 logits one training or evaluation chunk may hold (bytes per [rows, V] buffer; a few exist at once).
CHUNK_BYTES = 48 * 2**20


# --- the lens ------------------------------------------------------------------------------------

@dataclass
class TunedLensConfig:
    """The ``tuned-lens`` package's ``TunedLensConfig`` (0.2.0), field for field: ``config.json``."""

    base_model_name_or_path: str
    d_model: int
    num_hidden_layers: int
    bias: bool = True
    base_model_revision: Optional[str] = None
    unembed_hash: Optional[str] = None
    lens_type: str = "linear_tuned_lens"

    @classmethod
    def from_dict(cls, d: dict) -> "TunedLensConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def unembedding_hash(unembed: Unembed) -> str:
    """The ``tuned-lens`` package's ``Unembed.unembedding_hash``: sha256 of the head matrix printed by
    numpy at one decimal (summarised, so cheap), which identifies the model's unembedding."""
    w = unembed.head.weight.detach().cpu().float().numpy()
    return hashlib.sha256(str.encode(np.array_str(w, precision=1))).hexdigest()


class TunedLens(Lens):
    """A tuned lens: translators for entries 0..L−1, then the model's :class:`Unembed`.

    ``layer_translators[ℓ]`` is an ``nn.Linear(d, d)`` whose output is *added* to the hidden state, so
    weight decay pulls the lens toward the identity (the logit lens). ``meta`` holds what
    ``earlyexit.json`` records (fingerprint, training settings, held-out KL).
    """

    name = "tuned"
    _transforms = True

    def __init__(self, unembed: Unembed, config: TunedLensConfig | None = None, *, meta: dict | None = None):
        super().__init__(unembed)
        L, d = unembed.n_layers, unembed.hidden_size
        if config is None:
            config = TunedLensConfig(base_model_name_or_path="", d_model=d, num_hidden_layers=L)
        if config.num_hidden_layers != L or config.d_model != d:
            raise ValueError(f"This tuned lens is for a model with {config.num_hidden_layers} layers of width "
                             f"{config.d_model}; this model has {L} layers of width {d}.")
        self.config = config
        self.meta: dict = dict(meta or {})
        dev = unembed.device
        self.layer_translators = nn.ModuleList(
            [nn.Linear(d, d, bias=config.bias, device=dev, dtype=torch.float32) for _ in range(L)])
        with torch.no_grad():
            for t in self.layer_translators:
                t.weight.zero_()
                if t.bias is not None:
                    t.bias.zero_()

    @classmethod
    def from_model(cls, model, *, bias: bool = True) -> "TunedLens":
        """A zero (untrained) tuned lens for ``model``: equal to the logit lens."""
        from earlyexit.core.models import model_name

        unembed = get_unembed(model)
        config = TunedLensConfig(base_model_name_or_path=model_name(model), d_model=unembed.hidden_size,
                                 num_hidden_layers=unembed.n_layers, bias=bias,
                                 unembed_hash=unembedding_hash(unembed))
        return cls(unembed, config, meta={"model_fingerprint": store.model_fingerprint(model)})

    def needs_norm(self, entry: int) -> bool:
        return entry < self.n_layers

    def transform_hidden(self, h: Tensor, idx: int) -> Tensor:
        if idx >= self.n_layers:  # entry L is the model's output: nothing to translate
            return h
        t = self.layer_translators[idx]
        return h + t(h.to(t.weight.dtype)).to(h.dtype)

    def translator_parameters(self) -> list[nn.Parameter]:
        return list(self.layer_translators.parameters())

    def fingerprint(self) -> str:
        """sha256 of the translators' parameters (changes whenever the lens does)."""
        h = hashlib.sha256()
        for k, v in self.layer_translators.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    # --- files ----------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``config.json``, ``params.pt`` and ``earlyexit.json`` into folder ``path`` (each file
        atomically; ``earlyexit.json``, written last, holds the checksum of ``params.pt``, so a folder
        left half-written is detected on load). In an ``accelerate launch`` group only the main process
        writes (every process holds the same lens after :func:`train_tuned_lens`); the others return
        ``path`` at once."""
        path = Path(path)
        if not parallel.is_main_process():
            return path
        path.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save({k: v.detach().cpu().clone() for k, v in self.layer_translators.state_dict().items()}, buf)
        blob = buf.getvalue()
        with atomic_path(path / PARAMS_FILE, suffix=".pt") as tmp:
            tmp.write_bytes(blob)
        write_json(path / CONFIG_FILE, asdict(self.config))
        meta = {**self.meta, "format": FORMAT_VERSION, "params_sha256": hashlib.sha256(blob).hexdigest(),
                "lens_fingerprint": self.fingerprint()}
        write_json(path / META_FILE, meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model, *, strict: bool = True) -> "TunedLens":
        """The lens saved in folder ``path`` (by :meth:`save` or by the ``tuned-lens`` package), for ``model``.

        Raises ``FileNotFoundError`` for a missing folder and ``ValueError`` for a lens made for another
        model (weights fingerprint or unembedding hash), another layer count or width, and for a
        corrupt or partial folder. ``strict=False`` turns the other-model checks into warnings.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"No tuned lens at {path}: expected a folder with {CONFIG_FILE} and {PARAMS_FILE}.")
        missing = [f for f in (CONFIG_FILE, PARAMS_FILE) if not (path / f).is_file()]
        if missing:
            raise ValueError(f"The tuned lens at {path} is incomplete: {', '.join(missing)} missing "
                             "(a partial copy or an interrupted save); save or train it again.")
        try:
            raw = json.loads((path / CONFIG_FILE).read_text())
            if not isinstance(raw, dict):
                raise ValueError("not a JSON object")
            config = TunedLensConfig.from_dict(raw)
            config.d_model, config.num_hidden_layers = int(config.d_model), int(config.num_hidden_layers)
        except (ValueError, TypeError) as err:
            raise ValueError(f"The tuned lens config {path / CONFIG_FILE} is corrupt ({err}).") from None
        meta = None
        if (path / META_FILE).is_file():
            try:
                meta = json.loads((path / META_FILE).read_text())
            except ValueError as err:
                raise ValueError(f"{path / META_FILE} is corrupt ({err}).") from None
        unembed = get_unembed(model)
        L, d = unembed.n_layers, unembed.hidden_size
        if config.num_hidden_layers != L:
            raise ValueError(f"The tuned lens at {path} was trained for a model with {config.num_hidden_layers} "
                             f"layers ({config.base_model_name_or_path or 'unnamed'}); this model has {L}.")
        if config.d_model != d:
            raise ValueError(f"The tuned lens at {path} is for hidden size {config.d_model}; this model's is {d}.")
        fp = store.model_fingerprint(model)
        if meta is not None and meta.get("model_fingerprint") and meta["model_fingerprint"] != fp:
            _mismatch(strict, f"The tuned lens at {path} was trained for another model "
                              f"({config.base_model_name_or_path or 'unnamed'}, weights fingerprint "
                              f"{meta['model_fingerprint'][:12]}…; this model's is {fp[:12]}…): train one for this model.")
        elif meta is None and config.unembed_hash and config.unembed_hash != unembedding_hash(unembed):
            _mismatch(strict, f"The tuned lens at {path} was trained for another model "
                              f"({config.base_model_name_or_path or 'unnamed'}): its unembedding hash does not "
                              "match this model's.")
        blob = (path / PARAMS_FILE).read_bytes()
        if meta is not None and meta.get("params_sha256") and hashlib.sha256(blob).hexdigest() != meta["params_sha256"]:
            raise ValueError(f"{path / PARAMS_FILE} does not match the checksum in {META_FILE}: the file is corrupt "
                             "or was partly written; save or train the lens again.")
        try:
            state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for a damaged zip or pickle
            raise ValueError(f"{path / PARAMS_FILE} is corrupt or truncated ({type(err).__name__}: {err}).") from None
        if not isinstance(state, dict):
            raise ValueError(f"{path / PARAMS_FILE} is not a state dict of layer translators.")
        lens = cls(unembed, config, meta=meta)
        expected = lens.layer_translators.state_dict()
        if set(state) != set(expected):
            lacking, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            raise ValueError(f"{path / PARAMS_FILE} does not hold {L} translators of width {d}: "
                             f"missing {lacking[:4]}, unexpected {extra[:4]}.")
        for k, v in state.items():
            if not isinstance(v, Tensor) or tuple(v.shape) != tuple(expected[k].shape):
                raise ValueError(f"{path / PARAMS_FILE}: {k} has shape {tuple(getattr(v, 'shape', ()))}, "
                                 f"expected {tuple(expected[k].shape)}.")
            if not torch.isfinite(v).all():
                raise ValueError(f"{path / PARAMS_FILE}: {k} holds non-finite values.")
        lens.layer_translators.load_state_dict({k: v.float() for k, v in state.items()})
        if meta is None:
            lens.meta = {"model_fingerprint": fp, "source": "tuned-lens package"}
        return lens


def _mismatch(strict: bool, message: str) -> None:
    if strict:
        raise ValueError(message + " (load(..., strict=False) to use it anyway)")
    warnings.warn(message, stacklevel=3)


# --- training text as windows --------------------------------------------------------------------

def bos_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text by default (Gemma's ``<bos>``; nothing for SmolLM2)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    n = len(with_special) - len(plain)
    return list(with_special[:n]) if n > 0 and with_special[n:] == plain else []


def make_windows(stream: np.ndarray, seq_len: int, prefix: Sequence[int] = ()) -> np.ndarray:
    """Cut a token stream into non-overlapping windows ``[n, seq_len]`` (int64), each starting with
    ``prefix``; the tail shorter than a window is dropped."""
    body = seq_len - len(prefix)
    if body < 2:
        raise ValueError(f"seq_len {seq_len} leaves no room after the {len(prefix)} prefix tokens.")
    n = len(stream) // body
    out = np.empty((n, seq_len), dtype=np.int64)
    out[:, :len(prefix)] = np.asarray(prefix, dtype=np.int64)
    out[:, len(prefix):] = np.asarray(stream[:n * body], dtype=np.int64).reshape(n, body)
    return out


def text_windows(tokenizer, split: str = "train", *, seq_len: int, texts: Sequence[str] | None = None,
                 corpus=None) -> np.ndarray:
    """Windows of the training corpus' ``split``, or of ``texts`` when given."""
    from earlyexit.studies import corpus as corpus_mod

    if texts is not None:
        if isinstance(texts, str):
            texts = [texts]
        stream = corpus_mod.texts_to_stream(tokenizer, texts)
    else:
        corpus = corpus or corpus_mod.load_corpus()
        stream = corpus.tokens(tokenizer, split)
    return make_windows(stream, seq_len, bos_prefix(tokenizer))


# --- training ------------------------------------------------------------------------------------

@dataclass
class TrainSettings:
    """How a tuned lens is trained (the published recipe, scaled to a CPU budget).

    tokens: training tokens in all; seq_len: tokens per window; tokens_per_step: tokens per optimiser
    step (a whole number of windows); optimizer ``"sgd"`` (Nesterov, lr = lr_scale·(1−momentum), as the
    reference code) or ``"adam"`` (lr = lr_scale·1e-3); weight_decay pulls the translators toward the
    identity; the learning rate decays linearly to 0 after ``warmup`` steps; clip: gradient-norm clip;
    dtype: the head product's type in training (``"bfloat16"`` or ``"float32"``; the target
    distribution and every evaluation are float32); batch: windows per model forward; init: start from
    the logit lens (``"zero"``, the reference code) or from the least-squares fit of
    :func:`fit_least_squares` on ``init_tokens`` tokens (``"lstsq"``, the default: measured on SmolLM2 with
    8,192 tokens it takes the held-out KL averaged over entries 0..29 from 15.8 to 2.0 nats, at the cost of
    a model forward per token, about a tenth of a KL step's).

    On 2 CPU threads a KL step costs ~30 head products of [tokens, d] × [d, V] each way per token (bf16 on
    AMX-capable CPUs, measured 2–4× faster than float32 here), so the budget is tens of thousands of
    tokens, not the reference's 65M.
    """

    tokens: int = 32768
    seq_len: int = 512
    tokens_per_step: int = 4096
    optimizer: str = "sgd"
    lr_scale: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 1e-3
    warmup: int = 0
    clip: float = 1.0
    seed: int = 0
    dtype: str = "bfloat16"
    batch: int = 4
    checkpoint_every: int = 4
    init: str = "lstsq"
    init_tokens: int = 32768

    def validate(self) -> "TrainSettings":
        if not isinstance(self.tokens, int) or isinstance(self.tokens, bool) or self.tokens <= 0:
            raise ValueError(f"tokens must be a positive number of training tokens, got {self.tokens!r}")
        if self.seq_len < 8:
            raise ValueError(f"seq_len must be ≥ 8, got {self.seq_len}")
        if self.tokens_per_step < self.seq_len or self.tokens_per_step % self.seq_len:
            raise ValueError(f"tokens_per_step ({self.tokens_per_step}) must be a multiple of seq_len ({self.seq_len})")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"dtype must be 'bfloat16' or 'float32', got {self.dtype!r}")
        if self.batch < 1 or self.checkpoint_every < 1:
            raise ValueError("batch and checkpoint_every must be ≥ 1")
        if self.init not in ("zero", "lstsq"):
            raise ValueError(f"init must be 'zero' (the logit lens) or 'lstsq' (least squares), got {self.init!r}")
        if self.init == "lstsq" and self.init_tokens < self.seq_len:
            raise ValueError(f"init='lstsq' needs init_tokens ≥ seq_len ({self.seq_len}), got {self.init_tokens}")
        return self

    @property
    def windows_per_step(self) -> int:
        return self.tokens_per_step // self.seq_len

    @property
    def steps(self) -> int:
        return max(1, math.ceil(self.tokens / self.tokens_per_step))


# What an embedded model's recipe changes from TrainSettings(), measured. Gemma-3's residual stream carries a few
# massive dimensions (the least-squares start reads them at unit RMS): from that start, SGD at the default rate
# (lr_scale 1, lr 0.1) took the running KL from 1.61 to 30.5 nats in one step of 4,096 tokens; on 1,024-token
# steps lr_scale 0.1 went 1.44 → 1.68 → 1.34 and lr_scale 0.01 went 1.44 → 1.31 → 1.30.
RECIPES: dict[str, dict[str, Any]] = {"gemma3-270m": {"lr_scale": 0.01}}


def default_settings(model=None) -> TrainSettings:
    """The recipe for ``model`` (a model or its name): :class:`TrainSettings` with the model's entry of
    :data:`RECIPES` applied.

    >>> default_settings("gemma3-270m").lr_scale, default_settings("smollm2-135m").lr_scale
    (0.01, 1.0)
    """
    from earlyexit.core.meta import model_name

    name = model if isinstance(model, str) or model is None else model_name(model)
    return TrainSettings(**RECIPES.get(name or "", {}))


class _Target:
    """The final distribution of a chunk of rows, shared by every entry's gradient: ``neg_entropy``
    ``[r]`` = Σ p log p, ``pW`` ``[r, d]`` = Σ_v p_v W_v (float32), and ``logp`` ``[r, V]`` for the
    general path."""

    def __init__(self, unembed: Unembed, final: Tensor, fast: bool):
        logp = torch.log_softmax(unembed(final, normed=False), -1)
        p = logp.exp()
        self.neg_entropy = (p * logp).sum(-1)
        self.pW = torch.mm(p, unembed.head.weight.detach().float())
        self.logp, self.p = (None, None) if fast else (logp, p)


def _fast_path(unembed: Unembed) -> bool:
    return unembed.softcap is None and getattr(unembed.head, "bias", None) is None


def _kl_grad(z: Tensor, target: _Target, unembed: Unembed, weight: Tensor) -> tuple[Tensor, Tensor]:
    """``dz`` ``[r, d]`` = ∂/∂z Σ_rows KL(final ‖ lens) and the per-row KL ``[r]``, for head inputs ``z``.

    Without soft-capping or a head bias (Llama, Gemma-3, GPT-2): logits = s·z Wᵀ, so
    Σ_v p_v·logit_v = s·z·(pW) and the gradient is s·(softmax(logits) W − pW): one product each way and a
    single softmax pass over the [r, V] logits (computed in ``weight``'s type, bf16 or float32), the
    log-normaliser read off the softmax as max − log q_max. Otherwise the full float32 path."""
    zd = z.detach()
    s = unembed.scale
    if target.logp is None:
        lg = torch.mm(zd.to(weight.dtype), weight.t())
        if s is not None:
            lg.mul_(s)
        q = torch.softmax(lg, -1)
        lse = lg.amax(-1).float() - q.amax(-1).float().log()
        del lg
        dz = torch.mm(q, weight).float().sub_(target.pW)
        del q
        zp = (zd * target.pW).sum(-1)
        if s is not None:
            dz.mul_(s)
            zp = zp * s
        return dz, target.neg_entropy - zp + lse
    lg = torch.mm(zd.to(weight.dtype), weight.t()).float()
    bias = getattr(unembed.head, "bias", None)
    if bias is not None:
        lg.add_(bias.detach().float())
    if s is not None:
        lg.mul_(s)
    t = None
    if unembed.softcap is not None:
        t = lg.div_(unembed.softcap).tanh_()
        lg = t * unembed.softcap
    logq = torch.log_softmax(lg, -1)
    del lg
    kl = (target.p * (target.logp - logq)).sum(-1)
    g = logq.exp_().sub_(target.p)  # ∂KL/∂logits = q − p
    if t is not None:
        g.mul_(1 - t * t)  # d/dx c·tanh(x/c)
    if s is not None:
        g.mul_(s)
    return torch.mm(g.to(weight.dtype), weight).float(), kl


@contextmanager
def frozen(model) -> Iterator[None]:
    """The model's parameters do not require grad inside the block (restored after)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in saved:
            p.requires_grad_(r)


def hidden_states(model, input_ids: Tensor) -> tuple[Tensor, ...]:
    """The L+1 hidden-state entries ``[B, T, d]`` of a batch of full windows (the model's own logits are
    formed for the last position only)."""
    with torch.no_grad():
        out = model(input_ids=input_ids, output_hidden_states=True, use_cache=False, logits_to_keep=1)
    return out.hidden_states


def chunk_rows(vocab_size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    return max(8, chunk_bytes // (4 * vocab_size))


def _final_logprobs(unembed: Unembed, final: Tensor) -> tuple[Tensor, Tensor]:
    logp = torch.log_softmax(unembed(final, normed=False), -1)
    return logp, logp.exp()


def _make_optimizer(params, s: TrainSettings):
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr_scale * (1 - s.momentum), momentum=s.momentum, nesterov=True,
                               weight_decay=s.weight_decay)
    return torch.optim.AdamW(params, lr=s.lr_scale * 1e-3, betas=(s.momentum, 0.999), weight_decay=s.weight_decay)


def _lr_factor(step: int, s: TrainSettings) -> float:
    if step < s.warmup:
        return (step + 1) / s.warmup
    return max(0.0, 1 - (step - s.warmup) / max(1, s.steps - s.warmup))


@torch.no_grad()
def fit_least_squares(model, lens: TunedLens, windows: np.ndarray, *, ridge: float = 1e-3, batch: int = 4,
                      progress: bool = False) -> TunedLens:
    """Set every translator to the (ridge) least-squares map from its entry to the final residual stream.

    The final norm makes the lens blind to the scale of what it reads, so both sides are taken at unit
    RMS: entry ℓ's ``h`` (``h̃ = h / rms(h)``) is mapped so that ``h̃ + A h̃ + b / rms(h)`` fits the
    direction of the residual stream that enters the final norm (``y / rms(y)``, captured by a hook).
    Each token costs one model forward and ``L`` accumulations of a ``(d+1)²`` matrix, a few hundredths
    of a KL step; the result starts KL training far below the logit lens. ``ridge`` (relative to the
    mean diagonal) pulls toward the identity.

    ``windows`` ``[n, T]``. In an ``accelerate launch`` group (every process calls it) each process
    accumulates its shard of the windows, in whole batches of ``batch`` (so every batch is the one a
    single process would run), and the float64 sums are added over the processes
    (:func:`earlyexit.core.parallel.reduce_sum`) before the solve: the same fit up to float64 rounding."""
    from tqdm.auto import tqdm

    unembed = lens.unembed
    L, d = unembed.n_layers, unembed.hidden_size
    dev = unembed.device
    G = torch.zeros(L, d + 1, d + 1, dtype=torch.float64, device=dev)
    C = torch.zeros(L, d + 1, d, dtype=torch.float64, device=dev)
    captured: dict[str, Tensor] = {}
    handle = unembed.final_norm.register_forward_pre_hook(lambda mod, args: captured.__setitem__("y", args[0]))
    mine = parallel.shard_indices(len(windows), unit=batch)
    try:
        for b in tqdm(range(0, len(mine), batch), desc="tuned lens (least squares)",
                      disable=not progress or not parallel.is_main_process()):
            captured.clear()
            hs = hidden_states(model, torch.as_tensor(windows[mine[b:b + batch]], device=dev))
            if "y" not in captured:
                raise RuntimeError("The model's final norm was not called in its forward: cannot fit the translators.")
            y = captured["y"].reshape(-1, d).float()
            y_hat = y / _rms(y)
            for layer in range(L):
                h = hs[layer].reshape(-1, d).float()
                r = _rms(h)
                x = torch.cat([h / r, 1 / r], -1)
                G[layer] += (x.T @ x).double()
                C[layer] += (x.T @ (y_hat - h / r)).double()
            del hs, captured["y"]
    finally:
        handle.remove()
    parallel.reduce_sum([G, C])
    eye = torch.eye(d + 1, dtype=torch.float64, device=dev)
    for layer, t in enumerate(lens.layer_translators):
        g = G[layer]
        theta = torch.linalg.solve(g + ridge * g.diagonal().mean() * eye, C[layer])  # [(d+1), d]
        t.weight.copy_(theta[:d].T.float())
        if t.bias is not None:
            t.bias.copy_(theta[d].float())
    return lens


def _rms(x: Tensor) -> Tensor:
    return x.pow(2).mean(-1, keepdim=True).add_(1e-12).sqrt_()


def train_tuned_lens(
    model,
    tokenizer,
    settings: TrainSettings | None = None,
    *,
    lens: TunedLens | None = None,
    texts: Sequence[str] | None = None,
    corpus=None,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
    log: list | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> TunedLens:
    """Train a tuned lens for ``model`` on the training split of the prose corpus (or on ``texts``), with
    ``settings`` (default: the model's recipe, :func:`default_settings`).

    Every position of every window, every entry 0..L−1: loss KL(final ‖ lens), summed over entries
    (each translator sees only its own). The model is frozen and its hidden states are computed a
    batch at a time; the KL is formed ``chunk_rows`` rows at a time. ``checkpoint``: a file to save the
    state to (atomically, every ``checkpoint_every`` steps) and to resume from when it matches the model
    and settings; it is removed at the end. ``log``: a list to append ``{"step", "tokens", "kl",
    "seconds"}`` to after each step (``kl`` = mean training KL over entries).

    Data parallel under ``accelerate launch`` (every process calls it with the same arguments): each
    step's ``windows_per_step`` windows are split over the processes (contiguous, :func:`parallel.assignment`;
    process k runs its share in batches of ``batch``), each process's gradient is its mean over its own
    rows and :func:`parallel.average_gradients` weights it by them, so that every process steps with one
    process's full-batch gradient (up to float rounding: the sums are added in another order and the
    forward batches may be composed differently) and the translators stay identical on every process; the
    step's KL is summed over the processes. The least-squares start is sharded too
    (:func:`fit_least_squares`). Only the main process writes the checkpoint (and removes it);
    ``meta["trained"]`` records ``num_processes`` and, for several, ``parallel``: which positions of every
    step's windows each process ran. One process runs exactly as without a launcher.
    """
    from tqdm.auto import tqdm

    s = (settings or default_settings(model)).validate()
    lens = lens or TunedLens.from_model(model)
    unembed = lens.unembed
    L = unembed.n_layers
    windows = text_windows(tokenizer, "train", seq_len=s.seq_len, texts=texts, corpus=corpus)
    need = s.steps * s.windows_per_step
    n_init = math.ceil(s.init_tokens / s.seq_len) if s.init == "lstsq" else 0
    need = max(need, n_init)
    if len(windows) < need:
        have = len(windows) * s.seq_len
        raise ValueError(f"The training text is too short: {s.steps} steps of {s.tokens_per_step} tokens need "
                         f"{need} windows of {s.seq_len} tokens ({need * s.seq_len:,} tokens); it has "
                         f"{len(windows)} ({have:,} tokens). Lower tokens or give more text.")
    order = np.random.default_rng(s.seed).permutation(len(windows))[:need]
    dev = unembed.device
    torch.manual_seed(s.seed)
    params = lens.translator_parameters()
    opt = _make_optimizer(params, s)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: _lr_factor(step, s))
    fp = store.model_fingerprint(model)
    ck_key = store.make_key("tuned-lens-checkpoint", {"model": fp, "settings": asdict(s), "texts": texts is not None,
                                                      "n_windows": len(windows)})
    start = 0
    history: list[dict] = []
    if checkpoint is not None:
        saved = store.read_object(checkpoint, ck_key, warn=True)
        if saved is not None:
            lens.layer_translators.load_state_dict(saved["translators"])
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
            start, history = saved["step"], saved["history"]
    K = parallel.num_processes()
    main = parallel.is_main_process()
    if K > 1:  # every process read the checkpoint (before anyone writes it again): they must agree
        starts = parallel.gather(start)
        if len(set(starts)) > 1:
            raise RuntimeError(f"The processes resumed from different checkpoint steps {starts} ({checkpoint}): "
                               "rerun with --no-resume, or remove the checkpoint.")
    if n_init and start == 0 and not history:
        t_init = time.perf_counter()
        fit_least_squares(model, lens, windows[order[:n_init]], batch=s.batch, progress=progress)
        history.append({"step": 0, "tokens": 0, "init_tokens": n_init * s.seq_len, "kl": float("nan"),
                        "kl_per_layer": [], "seconds": time.perf_counter() - t_init})
        if log is not None:
            log.append(history[-1])
        if checkpoint is not None and main:
            store.write_object(checkpoint, ck_key, {
                "translators": lens.layer_translators.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "step": 0, "history": history})
    weight = unembed.head.weight.detach()
    weight = weight.to(torch.bfloat16) if s.dtype == "bfloat16" else weight.float()
    fast = _fast_path(unembed)
    rows_per_chunk = chunk_rows(unembed.vocab_size, chunk_bytes)
    t0 = time.perf_counter() - (history[-1]["seconds"] if history else 0.0)
    bar = tqdm(total=s.steps, initial=start, desc="tuned lens", unit="step", disable=not progress or not main)
    plan = parallel.assignment(s.windows_per_step)  # positions of each step's windows, per process
    mine = plan[parallel.process_index()]
    with frozen(model):
        lens.train()
        for step in range(start, s.steps):
            kl_sum = torch.zeros(L, dtype=torch.float64)
            idx = order[step * s.windows_per_step:(step + 1) * s.windows_per_step][mine]
            n_rows = s.windows_per_step * s.seq_len  # the step's rows, over every process
            n_mine = len(idx) * s.seq_len  # this process's: its gradient is the mean over them
            for b in range(0, len(idx), s.batch):
                ids = torch.as_tensor(windows[idx[b:b + s.batch]], device=dev)
                hs = hidden_states(model, ids)
                flat = [h.reshape(-1, h.shape[-1]) for h in hs]
                for r0 in range(0, flat[0].shape[0], rows_per_chunk):
                    r1 = min(flat[0].shape[0], r0 + rows_per_chunk)
                    with torch.no_grad():
                        target = _Target(unembed, flat[L][r0:r1], fast)
                    for layer in range(L):
                        z = unembed.final_norm(lens.transform_hidden(flat[layer][r0:r1], layer))
                        with torch.no_grad():
                            dz, kl = _kl_grad(z, target, unembed, weight)
                        z.backward(dz.div_(n_mine))
                        kl_sum[layer] += float(kl.sum())
                    del target
                del hs, flat
            parallel.average_gradients(params, weight=n_mine)  # → the mean over the step's n_rows rows
            parallel.reduce_sum([kl_sum])
            if s.clip:
                torch.nn.utils.clip_grad_norm_(params, s.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            per_layer = (kl_sum / n_rows).tolist()
            history.append({"step": step + 1, "tokens": (step + 1) * s.tokens_per_step,
                            "kl": float(np.mean(per_layer)), "kl_per_layer": per_layer,
                            "seconds": time.perf_counter() - t0})
            if log is not None:
                log.append(history[-1])
            bar.update(1)
            bar.set_postfix(kl=f"{history[-1]['kl']:.3f}")
            if checkpoint is not None and main and (step + 1) % s.checkpoint_every == 0 and step + 1 < s.steps:
                store.write_object(checkpoint, ck_key, {
                    "translators": lens.layer_translators.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "step": step + 1, "history": history})
        lens.eval()
    bar.close()
    if checkpoint is not None and main and Path(checkpoint).exists():
        Path(checkpoint).unlink()
    trained = {"settings": asdict(s), "corpus": "texts" if texts is not None else _corpus_name(),
               "seconds": history[-1]["seconds"] if history else 0.0,
               "final_train_kl": history[-1]["kl"] if history else None,
               "threads": torch.get_num_threads(), "num_processes": K}
    if K > 1:  # indices[k]: the positions (0..windows_per_step−1) of every step's windows process k ran
        trained["parallel"] = {**parallel.ParallelInfo(K, "contiguous", 1, plan).as_meta(),
                               "indices_of": "each step's windows", "init_indices": parallel.assignment(
                                   n_init, unit=s.batch) if n_init else None}
    lens.meta.update({"model_fingerprint": fp, "trained": trained})
    return lens


def _corpus_name() -> str:
    from earlyexit.studies.corpus import CORPUS_NAME

    return CORPUS_NAME


# --- evaluation ----------------------------------------------------------------------------------

METRICS = ("kl", "ce", "top1", "entropy")


@dataclass
class LensEval:
    """Per-window, per-entry means on held-out windows: kl = KL(final ‖ lens), ce = cross-entropy of the
    next token (nats), top1 = agreement of the lens's top token with the final layer's, entropy (nats).
    Each ``[n_windows, E]`` (float64); ``layers`` the entries (E); positions 0..T−2 of each window."""

    lens: str
    layers: list[int]
    kl: np.ndarray
    ce: np.ndarray
    top1: np.ndarray
    entropy: np.ndarray
    tokens: int

    def mean(self, metric: str) -> np.ndarray:
        return getattr(self, metric).mean(0)

    def ci(self, metric: str, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Percentile bootstrap CI of the per-entry mean, windows resampled (``[E]`` low, ``[E]`` high)."""
        x = getattr(self, metric)
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, x.shape[0], size=(n_boot, x.shape[0]))
        boots = x[idx].mean(1)  # [n_boot, E]
        a = (1 - level) / 2
        return np.quantile(boots, a, axis=0), np.quantile(boots, 1 - a, axis=0)

    def to_dict(self) -> dict:
        out: dict = {"lens": self.lens, "layers": self.layers, "tokens": self.tokens, "windows": int(self.kl.shape[0])}
        for m in METRICS:
            lo, hi = self.ci(m)
            out[m] = {"mean": self.mean(m).tolist(), "ci_low": lo.tolist(), "ci_high": hi.tolist()}
        return out


@torch.no_grad()
def evaluate_lenses(model, lenses: dict[str, Lens] | Sequence[Lens], windows: np.ndarray, *,
                    layers: Sequence[int] | None = None, batch: int = 4, chunk_bytes: int = CHUNK_BYTES,
                    progress: bool = False) -> dict[str, LensEval]:
    """Evaluate each lens on token ``windows`` ``[n, T]`` (e.g. ``text_windows(tok, "heldout", seq_len=…)``).

    One model forward per batch serves every lens; the metrics are formed per entry in row chunks of
    float32 logits (never entries × positions × vocabulary).

    In an ``accelerate launch`` group (every process calls it) the windows are sharded in whole batches of
    ``batch`` (:func:`earlyexit.core.parallel.map_items`), so every process runs exactly the batches one
    process would, and the per-window rows are gathered in window order: every process returns the
    numbers one process would, identical."""
    from tqdm.auto import tqdm

    if not isinstance(lenses, dict):
        lenses = {lens.name: lens for lens in lenses}
    if not lenses:
        raise ValueError("No lenses to evaluate.")
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [n ≥ 1, T ≥ 2] token ids, got shape {windows.shape}")
    unembed = get_unembed(model)
    L, V = unembed.n_layers, unembed.vocab_size
    entries = check_entries(L, list(layers) if layers is not None else None)
    n, T = windows.shape
    P = T - 1
    names = list(lenses)
    rows = chunk_rows(V, chunk_bytes)
    dev = unembed.device

    def run(mine: list[int]) -> list[np.ndarray]:
        """Per-window sums ``[lenses, METRICS, E]`` (float64) of this process's windows ``mine`` (whole batches)."""
        sums = np.zeros((len(mine), len(names), len(METRICS), len(entries)))
        for b in tqdm(range(0, len(mine), batch), desc="evaluate",
                      disable=not progress or not parallel.is_main_process()):
            ids = torch.as_tensor(windows[mine[b:b + batch]], device=dev)
            B = ids.shape[0]
            hs = hidden_states(model, ids)
            flat = [h[:, :P].reshape(-1, h.shape[-1]) for h in hs]  # positions 0..T−2 (they have a next token)
            nxt = ids[:, 1:].reshape(-1)
            win = torch.arange(B, device=dev).repeat_interleave(P)
            for r0 in range(0, B * P, rows):
                r1 = min(B * P, r0 + rows)
                logp_f, p_f = _final_logprobs(unembed, flat[L][r0:r1])
                top_f = logp_f.argmax(-1)
                neg_h_f = (p_f * logp_f).sum(-1)
                del logp_f
                w = win[r0:r1].cpu().numpy()
                for i, lens in enumerate(lenses.values()):
                    for j, e in enumerate(entries):
                        st = _row_stats(lens.logits(flat[e][r0:r1][None], [e])[0], p_f, neg_h_f, nxt[r0:r1])
                        st["top1"] = (st.pop("argmax") == top_f).double()
                        for k, m in enumerate(METRICS):
                            np.add.at(sums[:, i, k, j], b + w, st[m].double().cpu().numpy())
            del hs, flat
        return list(sums)

    per_window, _ = parallel.map_items(run, range(n), unit=batch)
    sums = np.stack(per_window) / P  # [n, lenses, METRICS, E]
    return {name: LensEval(lens=name, layers=entries, tokens=n * P,
                           **{m: np.ascontiguousarray(sums[:, i, k]) for k, m in enumerate(METRICS)})
            for i, name in enumerate(names)}


def _row_stats(logits: Tensor, p_f: Tensor, neg_h_f: Tensor, nxt: Tensor) -> dict[str, Tensor]:
    """Per-row KL(final ‖ lens), cross-entropy of ``nxt``, entropy and argmax of float32 ``logits`` ``[r, V]``
    (overwritten), in six passes: log-normaliser lse = m + log Σ exp(logit − m); KL = Σ p_f log p_f −
    Σ p_f·logit + lse; H = lse − Σ q·logit."""
    m, top = logits.max(-1)
    dot_p = torch.linalg.vecdot(logits, p_f)
    ce = -logits.gather(-1, nxt[:, None])[:, 0]
    z = logits.sub_(m[:, None])
    q = torch.exp(z)
    s = q.sum(-1)
    lse = m + s.log()
    ent = s.log() - torch.linalg.vecdot(q, z) / s
    return {"kl": (neg_h_f - dot_p + lse).clamp_min_(0.0), "ce": ce + lse, "entropy": ent, "argmax": top}


def heldout_windows(tokenizer, *, seq_len: int = 512, limit: int | None = None, corpus=None) -> np.ndarray:
    """Windows of the held-out split (the first ``limit`` of them)."""
    w = text_windows(tokenizer, "heldout", seq_len=seq_len, corpus=corpus)
    return w[:limit] if limit is not None else w


# --- the cached lens of a model ------------------------------------------------------------------

def store_dir(model) -> Path:
    """Where the store keeps ``model``'s tuned lens: ``lenses/<model>/tuned-<fingerprint>``."""
    from earlyexit.core.models import model_name

    return store.area("lenses") / store.slug(model_name(model)) / f"tuned-{store.model_fingerprint(model)[:16]}"


def set_tuned_lens(model, lens: TunedLens) -> TunedLens:
    """Make ``lens`` the one ``lens="tuned"`` means for ``model`` (in this process)."""
    if lens.unembed.head is not get_unembed(model).head:
        raise ValueError("This tuned lens was built for another model object: load it with TunedLens.load(dir, model).")
    object.__setattr__(model, "_earlyexit_tuned_lens", lens)
    return lens


def _tokenizer_for(model):
    from earlyexit.core.models import EMBEDDED_MODELS, model_name, prepare_tokenizer, resolve_model_path
    from transformers import AutoTokenizer

    name = model_name(model)
    if name not in EMBEDDED_MODELS:
        return None
    return prepare_tokenizer(AutoTokenizer.from_pretrained(resolve_model_path(name)))


def tuned_lens_for(model, tokenizer=None, *, train: bool = True, settings: TrainSettings | None = None,
                   progress: bool = True, texts: Sequence[str] | None = None) -> TunedLens:
    """``model``'s tuned lens: the one set by :func:`set_tuned_lens`, else the one in the store, else
    (for the embedded models, or when ``tokenizer`` is given) one trained now with ``settings``
    (default :func:`default_settings`, on the prose corpus or ``texts``) and saved to the store. Cached on
    the model object."""
    from earlyexit.core.models import model_name

    cached = getattr(model, "_earlyexit_tuned_lens", None)
    if cached is not None:
        return cached
    path = store_dir(model)
    if (path / CONFIG_FILE).exists():
        try:
            return set_tuned_lens(model, TunedLens.load(path, model))
        except ValueError as err:
            if not train:
                raise
            warnings.warn(f"Ignoring the stored tuned lens ({err}); training it again.", stacklevel=2)
    tokenizer = tokenizer or _tokenizer_for(model)
    if not train or tokenizer is None:
        raise FileNotFoundError(
            f"No tuned lens for {model_name(model)!r} in the store ({path}). Train one: "
            f"`earlyexit tuned-lens train --model {model_name(model)} --out DIR`, or in Python "
            "tuned_lens_for(model, tokenizer) / set_tuned_lens(model, TunedLens.load(DIR, model)).")
    s = settings or default_settings(model)
    warnings.warn(f"Training the tuned lens of {model_name(model)} on first use ({s.tokens:,} tokens; minutes on a "
                  f"CPU); it is saved to {path} and reused after.", stacklevel=2)
    lens = train_tuned_lens(model, tokenizer, s, checkpoint=path.parent / f"{path.name}.checkpoint.pt",
                            progress=progress, texts=texts)
    lens.save(path)
    return set_tuned_lens(model, lens)
