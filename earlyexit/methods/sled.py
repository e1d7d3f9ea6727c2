"""SLED — Self Logits Evolution Decoding (Zhang et al., NeurIPS 2024; the authors' code: ``JayZhang42/SLED``).

DoLa contrasts the final layer with one premature layer; SLED uses every premature layer. At one
position, with final logits ``z`` (entry L, the model's output) and premature logits ``x_n`` (the
head on the RAW hidden state of entry n, no final norm, as in the authors' DoLa fork; every n in
0..L-1 by default, the embedding entry included):

1. candidates C: the ``evolution_scale`` (k) most probable tokens of softmax(z);
2. per premature layer n and candidate i: ``cos_{n,i} = cos(softmax(x_n) − e_i, x_n − z)`` over the
   vocabulary; ``v_{n,i} = max(cos_{n,i}, 0)²``;
3. the latent distribution on C: ``P_i = Σ_n w_n v_{n,i} / s_n`` with ``s_n = Σ_i v_{n,i}`` and
   ``w_n = s_n / Σ_n s_n`` — which is ``Σ_n v_{n,i} / Σ_{n,i} v_{n,i}`` (P = 0 if every v is 0);
4. ``evolution_steps`` (T) steps of gradient descent on KL(P ‖ softmax(h)) from h = z:
   ``h ← h − r·(1 − t/T)·(softmax(h) − P)``, t = 0..T−1, the softmax over the whole vocabulary, r =
   ``evolution_rate``;
5. every token outside C is set to ``evolution_lower_bound`` (the floor); the result is the score.

The authors' code builds ``softmax(x_n) − e_i`` as ``[layers, k, V]`` tensors per position (one
such float32 tensor at k = 50 is 295 MB on SmolLM2, 30 × 50 × 49,152, and 944 MB on Gemma-3-270M,
18 × 50 × 262,144; their code makes several). Here the cosines come from per-layer sums, O(layers × V)
work and memory, O(layers × k) extra: with p = softmax(x_n) and d = x_n − z,
``(p − e_i)·d = p·d − d_i`` and ``‖p − e_i‖² = (1 − p_i)² + Σ_{v≠i} p_v²``. Both are evaluated from
``e = exp(x_n − max x_n)`` with the top token's term set aside, so a premature distribution peaked
to float32 precision (common with the raw lens) keeps its ``1 − p_max`` and ``Σ_{v≠max} p_v²``
instead of cancelling them to 0 (:func:`candidate_cosines`; tested equal to the direct form in
float64, and closer to float64 than the direct form in float32).

Defaults are the authors': k = 50 and r = 2 (their TruthfulQA argparse defaults; their scripts use
r 2.5 / k 75 for Llama-2-7B), T = 1 in generation (``sled_greedy_decode``) and T = 10 for MC
scoring (``lm_score``), floor −1000 in generation and −100 for TruthfulQA MC, repetition penalty 1.0
(their generation scripts). MC: see :class:`SledSettings` and :func:`earlyexit.studies.mc.question_raw`.

>>> import torch
>>> z = torch.tensor([[2.0, 1.0, 0.0, 0.0, 0.0]])
>>> x = torch.zeros(1, 1, 5)                                    # one premature layer, uniform
>>> cand, latent = latent_distribution(z, x, 2)
>>> cand.tolist(), [round(v, 4) for v in latent[0].tolist()]    # cosines 0.7 and 0.2 → 0.49 : 0.04
([[0, 1]], [0.9245, 0.0755])
>>> sled_scores(z, x, evolution_scale=2, evolution_rate=2.0, evolution_steps=0)[0].tolist()
[2.0, 1.0, -1000.0, -1000.0, -1000.0]
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from earlyexit.core.decoding import Step, check_penalty, register
from earlyexit.core.lenses import Lens, LensLike, check_entries, get_unembed, resolve_lens

COS_EPS = 1e-8  # torch.nn.functional.cosine_similarity's: x·y / (max(‖x‖, ε)·max(‖y‖, ε))
# premature logits more than this many nats below their layer's top are counted at exp(-EXP_FLOOR_NATS):
# all such tokens together add ≤ 262,144 · 4.2e-18 ≈ 1.1e-12 to a layer's probability mass, and every
# exp, square and product stays a normal float32 (denormals take a slow path on CPU: 50 ms, not 1 ms,
# per step on SmolLM2's raw lens)
EXP_FLOOR_NATS = 40.0
CACHE_BYTES = 2**20  # premature logits handled at once by candidate_cosines (they fit in a core's cache)

# the authors' defaults (see the module docstring)
EVOLUTION_SCALE = 50
EVOLUTION_RATE = 2.0
GENERATION_STEPS, MC_STEPS = 1, 10
GENERATION_FLOOR, MC_FLOOR = -1000.0, -100.0


# --- validation -----------------------------------------------------------------------------------

def _is_int(x: Any) -> bool:
    return not isinstance(x, (bool, float)) and hasattr(x, "__index__")


def check_scale(evolution_scale: int, vocab_size: int | None = None) -> int:
    if not _is_int(evolution_scale):
        raise ValueError(f"evolution_scale (k, the number of candidate tokens) must be an integer, "
                         f"got {evolution_scale!r}")
    k = int(evolution_scale)
    if k <= 0:
        raise ValueError(f"evolution_scale (k, the number of candidate tokens) must be ≥ 1, got {k}")
    if vocab_size is not None and k > vocab_size:
        raise ValueError(f"evolution_scale {k} is larger than the vocabulary ({vocab_size} tokens)")
    return k


def check_rate(evolution_rate: float) -> float:
    if isinstance(evolution_rate, bool) or not isinstance(evolution_rate, (int, float)) \
            or not math.isfinite(evolution_rate) or evolution_rate < 0:
        raise ValueError(f"evolution_rate must be a finite number ≥ 0, got {evolution_rate!r}")
    return float(evolution_rate)


def check_steps(evolution_steps: int, *, allow_zero: bool = True) -> int:
    """Steps T of the evolution: ≥ 0 (0 leaves the final logits as they are, on the top-k), or ≥ 1
    where ``allow_zero`` is False."""
    if not _is_int(evolution_steps):
        raise ValueError(f"evolution_steps must be an integer, got {evolution_steps!r}")
    T = int(evolution_steps)
    low = 0 if allow_zero else 1
    if T < low:
        raise ValueError(f"evolution_steps must be ≥ {low}, got {T}")
    return T


def check_floor(evolution_lower_bound: float) -> float:
    if isinstance(evolution_lower_bound, bool) or not isinstance(evolution_lower_bound, (int, float)) \
            or not math.isfinite(evolution_lower_bound):
        raise ValueError(f"evolution_lower_bound must be a finite number, got {evolution_lower_bound!r}")
    return float(evolution_lower_bound)


# --- the evolution math ---------------------------------------------------------------------------

def _check_shapes(final_logits: Tensor, premature_logits: Tensor) -> None:
    if final_logits.dim() != 2:
        raise ValueError(f"final_logits must be [B, V], got {tuple(final_logits.shape)}")
    if premature_logits.dim() != 3 or premature_logits.shape[1:] != final_logits.shape:
        raise ValueError(f"premature_logits must be [N, B, V] with [B, V] = {tuple(final_logits.shape)}, "
                         f"got {tuple(premature_logits.shape)}")
    if premature_logits.shape[0] == 0:
        raise ValueError("SLED needs at least one premature layer.")


@torch.no_grad()  # a score, never differentiated (and the blocks are written into buffers)
def candidate_cosines(final_logits: Tensor, premature_logits: Tensor, candidates: Tensor, *,
                      inplace: bool = False) -> Tensor:
    """``cos(softmax(x_n) − e_i, x_n − z)`` for every premature layer n and candidate i, in O(N·V).

    final_logits ``[B, V]`` (z), premature_logits ``[N, B, V]`` (x_n), candidates ``[B, k]`` → ``[N, B, k]``.
    With d = x − z, e = exp(x − max x) (e = 1 at the n_top tokens that reach the maximum, one unless
    tied) and sums over the other tokens S' = Σ e_v, Q' = Σ e_v², D' = Σ e_v d_v (S = n_top + S',
    D = D' + Σ_top d_t), every quantity follows from per-layer scalars and the candidates' e_i, d_i:

    - ``(p − e_i)·d = D / S − d_i``, for the single top token ``(D' − S'·d_i) / S``;
    - ``1 − p_i = 1 − e_i / S``, for a top token ``(n_top − 1 + S') / S``;
    - ``Σ_{v≠i} p_v² = (n_top + Q' − e_i²) / S²``, for a top token ``(n_top − 1 + Q') / S²``.

    The top token's terms are kept apart so that a premature distribution peaked to float32
    precision keeps its ``1 − p_max`` (which ``1 − e_m / S`` would cancel to 0). Norms below
    ``COS_EPS`` are clamped as ``torch.nn.functional.cosine_similarity`` does.
    ``inplace`` lets the function overwrite ``premature_logits`` (saves one ``[N, B, V]`` buffer).
    Layers are processed a few at a time (about ``CACHE_BYTES`` of logits), so the dozen passes over
    them run in cache rather than in memory.
    """
    _check_shapes(final_logits, premature_logits)
    N, B, V = premature_logits.shape
    rows = max(1, CACHE_BYTES // (4 * V))  # (layer, batch row) pairs at a time
    if rows >= N * B:
        return _cosines(final_logits, premature_logits if inplace else premature_logits.clone(), candidates)
    # blocks of whole layers, or of batch rows within one layer: contiguous slices either way
    n_step, b_step = (rows // B, B) if rows >= B else (1, rows)
    d_buf = final_logits.new_empty((n_step, b_step, V))
    x_buf = None if inplace else final_logits.new_empty((n_step, b_step, V))
    out = torch.empty((N, B, candidates.shape[-1]), dtype=final_logits.dtype, device=final_logits.device)
    for n0 in range(0, N, n_step):
        for b0 in range(0, B, b_step):
            x = premature_logits[n0:n0 + n_step, b0:b0 + b_step]
            if x_buf is not None:
                x = x_buf[:x.shape[0], :x.shape[1]].copy_(x)
            n, b = x.shape[:2]
            out[n0:n0 + n, b0:b0 + b] = _cosines(final_logits[b0:b0 + b], x, candidates[b0:b0 + b],
                                                 d_buf=d_buf[:n, :b])
    return out


def _cosines(final_logits: Tensor, x: Tensor, candidates: Tensor, d_buf: Tensor | None = None) -> Tensor:
    """:func:`candidate_cosines` of the layers ``x`` ``[n, B, V]``, overwriting ``x``."""
    N, B, V = x.shape
    k = candidates.shape[-1]
    d = torch.sub(x, final_logits, out=d_buf) if d_buf is not None else x - final_logits  # [N, B, V]
    norm_d = torch.linalg.vector_norm(d, dim=-1).unsqueeze_(-1)  # ‖d‖  [N, B, 1]
    # (index-returning reductions are 10× slower than amax on CPU: the top tokens are found as e == 1)
    e = x.sub_(x.amax(-1, keepdim=True)).clamp_(min=-EXP_FLOOR_NATS).exp_()
    idx = candidates.unsqueeze(0).expand(N, B, k)
    e_c, d_c = e.gather(-1, idx), d.gather(-1, idx)
    total = e.sum(-1, keepdim=True)
    D = torch.einsum("nbv,nbv->nb", e, d).unsqueeze_(-1)
    e.frac_()  # e = 1 (the top tokens) → 0; every other e < 1 is unchanged
    S1 = e.sum(-1, keepdim=True)  # S'
    Q1 = torch.linalg.vector_norm(e, dim=-1, keepdim=True).square_()  # Q'
    D1 = torch.einsum("nbv,nbv->nb", e, d).unsqueeze_(-1)  # D'
    n_top = (total - S1).round_()
    S = n_top + S1
    is_top = e_c == 1.0
    single = is_top & (n_top == 1.0)
    dot = torch.where(single, (D1 - S1 * d_c) / S, D / S - d_c)
    one_minus = torch.where(is_top, (n_top - 1.0 + S1) / S, 1.0 - e_c / S)
    rest = torch.where(is_top, n_top - 1.0 + Q1, (n_top + Q1 - e_c * e_c).clamp_(min=0.0)) / (S * S)
    norm_g = (one_minus * one_minus + rest).sqrt_()
    return dot / (norm_g.clamp(min=COS_EPS) * norm_d.clamp(min=COS_EPS))


def latent_from_cosines(cos: Tensor) -> Tensor:
    """``[N, B, k]`` cosines → the latent distribution ``[B, k]`` on the candidates: v = max(cos, 0)²,
    each layer's v normalised by its sum s_n, layers weighted by s_n / Σ s_n — i.e. Σ_n v_n / Σ_{n,i} v;
    all zeros when every v is 0 (the authors' code leaves P = 0 then)."""
    v = cos.clamp(min=0.0).square_()
    total = v.sum(dim=(0, 2))  # [B]
    num = v.sum(0)  # [B, k]
    return torch.where(total[:, None] > 0, num / total.clamp(min=torch.finfo(v.dtype).tiny)[:, None],
                       torch.zeros_like(num))


def latent_distribution(final_logits: Tensor, premature_logits: Tensor, evolution_scale: int, *,
                        inplace: bool = False) -> tuple[Tensor, Tensor]:
    """Candidates ``[B, k]`` (top-k of the final logits, most probable first) and the latent
    distribution on them ``[B, k]``. final_logits ``[B, V]``, premature_logits ``[N, B, V]``."""
    _check_shapes(final_logits, premature_logits)
    k = check_scale(evolution_scale, final_logits.shape[-1])
    candidates = final_logits.topk(k, dim=-1).indices
    cos = candidate_cosines(final_logits, premature_logits, candidates, inplace=inplace)
    return candidates, latent_from_cosines(cos)


def evolve(final_logits: Tensor, candidates: Tensor, latent: Tensor, *, evolution_rate: float,
           evolution_steps: int) -> Tensor:
    """T steps ``h ← h − r·(1 − t/T)·(softmax(h) − P)`` from h = final logits ``[B, V]`` (P: ``latent``
    ``[B, k]`` on ``candidates``, 0 elsewhere); returns the candidates' evolved logits ``[B, k]``."""
    r = check_rate(evolution_rate)
    T = check_steps(evolution_steps)
    if T == 0:
        return final_logits.gather(-1, candidates)
    h = final_logits.clone()
    for t in range(T):
        g = torch.softmax(h, dim=-1)
        g.scatter_add_(-1, candidates, -latent.to(g.dtype))
        h.sub_(g, alpha=r * (1 - t / T))
    return h.gather(-1, candidates)


def floored(candidates: Tensor, values: Tensor, vocab_size: int, evolution_lower_bound: float) -> Tensor:
    """Scores ``[B, V]``: ``values`` at ``candidates``, the floor everywhere else."""
    out = values.new_full((values.shape[0], vocab_size), check_floor(evolution_lower_bound))
    return out.scatter_(-1, candidates, values)


def sled_scores(final_logits: Tensor, premature_logits: Tensor, *, evolution_scale: int = EVOLUTION_SCALE,
                evolution_rate: float = EVOLUTION_RATE, evolution_steps: int = GENERATION_STEPS,
                evolution_lower_bound: float = GENERATION_FLOOR, inplace: bool = False) -> Tensor:
    """One SLED step: final logits ``[B, V]`` and premature logits ``[N, B, V]`` → scores ``[B, V]``
    (the evolved logits on the top-k, the floor elsewhere). Each row is evolved on its own."""
    cand, latent = latent_distribution(final_logits, premature_logits, evolution_scale, inplace=inplace)
    vals = evolve(final_logits, cand, latent, evolution_rate=evolution_rate, evolution_steps=evolution_steps)
    return floored(cand, vals, final_logits.shape[-1], evolution_lower_bound)


def target_scores(final_logits: Tensor, premature_logits: Tensor, rows: Tensor, targets: Tensor, *,
                  evolution_scale: int, evolution_rate: float, evolution_steps: int,
                  evolution_lower_bound: float, inplace: bool = False) -> tuple[Tensor, Tensor]:
    """For MC scoring: the evolved distribution at positions ``rows`` (indices into B) scored at
    ``targets`` (same length): ``(log-probability, evolved logit)`` of each, both ``[len(rows)]``.
    The log-probability is the log-softmax of the floored scores over the whole vocabulary (the
    ``post_softmax=True`` path of the authors' ``lm_score``); the evolved logit (floored outside the
    top-k) is what their default ``post_softmax=False`` sums."""
    scores = sled_scores(final_logits, premature_logits, evolution_scale=evolution_scale,
                         evolution_rate=evolution_rate, evolution_steps=evolution_steps,
                         evolution_lower_bound=evolution_lower_bound, inplace=inplace)
    logit = scores[rows, targets]
    return logit - torch.logsumexp(scores, dim=-1)[rows], logit


# --- the premature logits ---------------------------------------------------------------------------

PREMATURE_DTYPES = ("float32", "bfloat16")


def check_premature_dtype(premature_dtype: str) -> str:
    if premature_dtype not in PREMATURE_DTYPES:
        raise ValueError(f"premature_dtype must be one of {PREMATURE_DTYPES}, got {premature_dtype!r}")
    return premature_dtype


def _half_head(unembed, dtype: torch.dtype) -> Tensor:
    """The head's weight in ``dtype``, converted once and kept with the model's Unembed (re-made when
    the weight changes)."""
    w = unembed.head.weight
    cache = unembed.__dict__.setdefault("_sled_half_heads", {})
    key = (dtype, w.data_ptr(), w._version)
    if key not in cache:
        cache.clear()
        cache[key] = w.detach().to(dtype)
    return cache[key]


@torch.no_grad()
def premature_logits(lens: Lens, hidden: Tensor, entries: Sequence[int], premature_dtype: str = "float32",
                     transposed: bool = False) -> Tensor:
    """hidden ``[E, n, d]`` of ``entries`` → float32 logits ``[E, n, V]`` through ``lens``.

    ``premature_dtype="bfloat16"`` runs the head's product in bfloat16 (float32 accumulation, the
    result rounded to bfloat16, then the model's logit post-processing in float32): 3–4× faster on a
    CPU with AMX, not the float32 result (on SmolLM2's raw lens the logits, up to ~700 in size, move by
    up to 4.4, median 0.07). Needs a plain linear head.
    """
    if check_premature_dtype(premature_dtype) == "float32":
        return lens.logits(hidden, entries, transposed=transposed)
    u = lens.unembed
    head = u.head
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"premature_dtype={premature_dtype!r} needs a plain linear output head, got {type(head)}")
    w = _half_head(u, getattr(torch, premature_dtype))
    h = lens.head_inputs(hidden, list(entries)).to(w.dtype)
    out = (torch.mm(w, h.reshape(-1, h.shape[-1]).t()).t() if transposed else F.linear(h.reshape(-1, h.shape[-1]), w))
    out = out.float().view(*h.shape[:-1], w.shape[0])
    if head.bias is not None:
        out = out + head.bias.float()
    return u.postprocess(out)


# --- settings ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SledSettings:
    """SLED's settings. The defaults are the authors' for generation; :meth:`mc` gives their MC
    scoring defaults (T = 10, floor −100).

    layers: the premature entries (``None``: every entry 0..L−1, the embedding entry included, as the
    authors' ``--early-exit-layers`` default); premature_lens: how they are read (``"raw"``: the head on
    the raw hidden state, the authors'; ``"normed"`` or any lens name of
    :func:`~earlyexit.core.lenses.resolve_lens`); premature_dtype: ``"float32"`` (exact) or
    ``"bfloat16"`` for the premature entries' head product (faster, approximate: see
    :func:`premature_logits`; the final logits stay the model's own).

    MC scores use the log-probabilities of the evolved distribution (log-softmax of the floored
    scores), the protocol of every other decoding here. The authors' ``lm_score`` defaults to
    ``post_softmax=False``: it sums the evolved *logits*, floored at −100 outside the top-k, which
    are not normalised per position — MC1 and MC3 then rank answers by unnormalised sums, and MC2
    (Σ exp(true) / Σ exp(all)) is no longer a ratio of answer probabilities. Both are stored
    (:func:`earlyexit.studies.mc.evaluate` ``post_softmax=``).
    """

    evolution_scale: int = EVOLUTION_SCALE
    evolution_rate: float = EVOLUTION_RATE
    evolution_steps: int = GENERATION_STEPS
    evolution_lower_bound: float = GENERATION_FLOOR
    layers: tuple[int, ...] | None = None
    premature_lens: str = "raw"
    premature_dtype: str = "float32"

    def __post_init__(self):
        check_scale(self.evolution_scale)
        check_rate(self.evolution_rate)
        check_steps(self.evolution_steps)
        check_floor(self.evolution_lower_bound)
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, Sequence):
                raise TypeError(f"SLED premature layers must be a list of integers, got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(self.layers))
        if not isinstance(self.premature_lens, str):
            raise TypeError("SledSettings.premature_lens is a lens name (pass a Lens object to the scorer instead)")
        check_premature_dtype(self.premature_dtype)

    @classmethod
    def mc(cls, **overrides) -> "SledSettings":
        """The authors' TruthfulQA MC defaults: T = 10, floor −100 (k 50, rate 2)."""
        return cls(**{"evolution_steps": MC_STEPS, "evolution_lower_bound": MC_FLOOR, **overrides})

    def resolve(self, model, lens: LensLike | None = None) -> tuple[list[int], Lens]:
        """The premature entries (validated: 0..L−1, never the final entry) and the lens (``lens``, else
        :attr:`premature_lens`) for ``model``; checks k against the vocabulary."""
        lens = resolve_lens(model, self.premature_lens if lens is None else lens)
        check_scale(self.evolution_scale, lens.vocab_size)
        layers = check_entries(lens.n_layers, None if self.layers is None else list(self.layers), final=False,
                               what="SLED premature layer")
        return layers, lens

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d


# --- the scorer -------------------------------------------------------------------------------------

class Sled:
    """SLED's :class:`~earlyexit.core.decoding.Scorer`: the premature entries and the model's output
    through the head in ONE product per step (float32; with ``premature_dtype="bfloat16"`` the final
    logits are the model's own and the premature ones a bfloat16 product), then :func:`sled_scores`,
    every row on its own (batched)."""

    name = "sled"

    def __init__(self, model, *, evolution_scale: int = EVOLUTION_SCALE, evolution_rate: float = EVOLUTION_RATE,
                 evolution_steps: int = GENERATION_STEPS, evolution_lower_bound: float = GENERATION_FLOOR,
                 sled_layers: Sequence[int] | None = None, premature_lens: LensLike = "raw",
                 premature_dtype: str = "float32", repetition_penalty: float = 1.0):
        self.repetition_penalty = check_penalty(repetition_penalty)
        lens = resolve_lens(model, premature_lens)
        self.settings_ = SledSettings(evolution_scale, evolution_rate, evolution_steps, evolution_lower_bound,
                                      sled_layers, lens.name, premature_dtype)
        self.layers, self.lens = self.settings_.resolve(model, lens)
        self.L = get_unembed(model).n_layers
        self.entries = (*self.layers, self.L)

    def logits(self, step: Step) -> tuple[Tensor, Tensor]:
        """Final logits ``[b, V]`` and premature logits ``[N, b, V]`` of a step."""
        N = len(self.layers)
        if self.settings_.premature_dtype != "float32":
            h = torch.stack([step.hidden(e) for e in self.layers])  # [N, b, d]
            return step.logits(), premature_logits(self.lens, h, self.layers, self.settings_.premature_dtype,
                                                   transposed=h.shape[1] == 1)
        h = torch.stack([step.hidden(e) for e in self.entries])  # [N+1, b, d]
        # W·hᵀ is the faster BLAS layout for a few rows (batch 1); h·Wᵀ needs no transposed copy after
        logits = self.lens.logits(h, self.entries, transposed=h.shape[1] == 1)
        return logits[N], logits[:N]

    def scores(self, step: Step) -> tuple[Tensor, dict[str, Tensor]]:
        final, premature = self.logits(step)
        s = self.settings_
        # the premature logits are this step's own buffer: the cosines may overwrite them
        return sled_scores(final, premature, evolution_scale=s.evolution_scale, evolution_rate=s.evolution_rate,
                           evolution_steps=s.evolution_steps, evolution_lower_bound=s.evolution_lower_bound,
                           inplace=True), {}

    def settings(self) -> dict[str, Any]:
        return {"decoding": self.name, **self.settings_.as_dict(), "layers": list(self.layers),
                "repetition_penalty": self.repetition_penalty}


@register("sled")
def _sled(model, *, evolution_scale: int = EVOLUTION_SCALE, evolution_rate: float = EVOLUTION_RATE,
          evolution_steps: int = GENERATION_STEPS, evolution_lower_bound: float = GENERATION_FLOOR,
          sled_layers: Sequence[int] | None = None, premature_lens: LensLike = "raw",
          premature_dtype: str = "float32", repetition_penalty: float = 1.0) -> Sled:
    return Sled(model, evolution_scale=evolution_scale, evolution_rate=evolution_rate,
                evolution_steps=evolution_steps, evolution_lower_bound=evolution_lower_bound,
                sled_layers=sled_layers, premature_lens=premature_lens, premature_dtype=premature_dtype,
                repetition_penalty=repetition_penalty)


# the settings of the "sled" scorer beyond repetition_penalty / premature_lens (resolve_settings' method_settings)
SLED_SETTINGS = ("evolution_scale", "evolution_rate", "evolution_steps", "evolution_lower_bound", "sled_layers",
                 "premature_dtype")


def sled_method_settings(overrides: dict[str, Any] | None = None, *, mc: bool = False) -> dict[str, Any]:
    """Every setting of the ``"sled"`` scorer (:data:`SLED_SETTINGS`), the authors' defaults (generation,
    or MC scoring with ``mc=True``) overridden by ``overrides``, validated: what a run records.

    >>> sled_method_settings({"evolution_rate": 2.5})["evolution_rate"]
    2.5
    >>> sled_method_settings({"k": 3})
    Traceback (most recent call last):
    ValueError: Unknown SLED setting(s) ['k']: use evolution_scale, evolution_rate, evolution_steps, evolution_lower_bound, sled_layers, premature_dtype.
    """
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(SLED_SETTINGS))
    if unknown:
        raise ValueError(f"Unknown SLED setting(s) {unknown}: use {', '.join(SLED_SETTINGS)}.")
    layers = overrides.pop("sled_layers", None)
    base = SledSettings.mc() if mc else SledSettings()
    s = SledSettings(**{**asdict(base), "layers": layers, **overrides})  # validated here
    return {"evolution_scale": s.evolution_scale, "evolution_rate": s.evolution_rate,
            "evolution_steps": s.evolution_steps, "evolution_lower_bound": s.evolution_lower_bound,
            "sled_layers": None if s.layers is None else list(s.layers), "premature_dtype": s.premature_dtype}
