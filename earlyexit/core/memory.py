"""How much accelerator memory a run needs, computed from a model's shapes (no model loaded).

Every figure is bytes, from the same formulas the code allocates by: the weights; the KV cache of a
generation batch; the hidden states ``output_hidden_states`` returns at the prefill (the few-shot primer's,
kept once, and the batch's own tokens); the lens workspace of :func:`~earlyexit.core.stats.layer_stats`
(two float32 buffers bounded by the chunk size, plus the half-precision head output it is upcast from);
one DoLa step (final and candidate logits in float32, their log-softmax and the two temporaries of the
distance); one MC question (its answers' hidden states and a chunk of logits with its log-softmax).

>>> b = memory_needed(LLAMA2["7b"])
>>> round(LLAMA2["7b"].params / 1e9, 2), round(b.weights / 2**30, 1)       # Llama-2-7b in bfloat16
(6.74, 12.6)
>>> print(memory_table([LLAMA2["7b"]]).splitlines()[2].split("|")[1].strip())
Llama-2-7b
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

from earlyexit.core.stats import CHUNK_BYTES, STEP_CHUNK_BYTES, chunk_rows

GIB = 2 ** 30


@dataclass(frozen=True)
class ModelShape:
    """The shapes that set a decoder-only model's memory (Llama layout: attention q, k, v, o; a gated MLP of
    three matrices; two norms per layer; a final norm; an output head, tied or not)."""

    name: str
    n_layers: int
    hidden: int
    intermediate: int
    vocab: int
    n_heads: int
    n_kv_heads: int
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    @property
    def params(self) -> int:
        d, kv = self.hidden, self.n_kv_heads * self.head_dim
        layer = 2 * d * d + 2 * d * kv + 3 * d * self.intermediate + 2 * d
        return self.vocab * d * (1 if self.tied else 2) + self.n_layers * layer + d

    @classmethod
    def from_config(cls, config, name: str | None = None) -> "ModelShape":
        """The shape of a transformers config (``model.config`` or ``AutoConfig.from_pretrained(id)``)."""
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = cfg.num_attention_heads
        return cls(name or getattr(cfg, "_name_or_path", "model"), cfg.num_hidden_layers, cfg.hidden_size,
                   cfg.intermediate_size, cfg.vocab_size, heads, getattr(cfg, "num_key_value_heads", None) or heads,
                   bool(getattr(cfg, "tie_word_embeddings", False)))


# Llama-2 (Touvron et al. 2023): the original study's model class, and DoLa's up to its largest size here
LLAMA2 = {
    "7b": ModelShape("Llama-2-7b", 32, 4096, 11008, 32000, 32, 32),
    "13b": ModelShape("Llama-2-13b", 40, 5120, 13824, 32000, 40, 40),
    "70b": ModelShape("Llama-2-70b", 80, 8192, 28672, 32000, 64, 8),
}


@dataclass(frozen=True)
class MemoryNeeds:
    """Bytes per part (see the module docstring); ``generation``, ``dola`` and ``mc`` are the peaks of the three
    jobs: weights + what the job holds at once."""

    weights: int
    kv_cache: int
    prefill_hidden: int
    lens_workspace: int
    dola_step: int
    mc_question: int

    @property
    def generation(self) -> int:
        """Generation with per-token lens statistics (the entropy study): cache, prefill states, workspace."""
        return self.weights + self.kv_cache + self.prefill_hidden + self.lens_workspace

    @property
    def dola(self) -> int:
        return self.weights + self.kv_cache + self.prefill_hidden + self.dola_step

    @property
    def mc(self) -> int:
        return self.weights + self.mc_question

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "generation": self.generation, "dola": self.dola, "mc": self.mc}


def dola_candidates(shape: ModelShape, bucket: str = "high") -> int:
    """How many candidate layers a DoLa bucket has for this depth (:func:`~earlyexit.methods.contrast.dola_buckets`)."""
    from earlyexit.methods.contrast import dola_buckets

    return len(dola_buckets(shape.n_layers, shape.tied)[bucket])


def memory_needed(shape: ModelShape, *, dtype_bytes: int = 2, batch: int = 8, primer_tokens: int = 220,
                  prompt_tokens: int = 64, new_tokens: int = 120, lens_entries: int | None = None,
                  candidates: int | None = None, answers: int = 24, answer_tokens: int = 32,
                  mc_entries: int | None = None, chunk_bytes: int = CHUNK_BYTES,
                  step_chunk_bytes: int = STEP_CHUNK_BYTES) -> MemoryNeeds:
    """The memory a run of ``shape`` needs, in bytes, for a model in ``dtype_bytes`` per value (2: bf16/fp16).

    Generation: ``batch`` prompts of ``primer_tokens`` shared few-shot tokens (TruthfulQA's 6-shot primer is
    219 SmolLM2 tokens) plus ``prompt_tokens`` of their own (the longest question has 62), ``new_tokens``
    generated (the entropy study's 120), lens statistics on ``lens_entries`` entries (default all L+1) in
    :data:`~earlyexit.core.stats.STEP_CHUNK_BYTES` chunks. DoLa: ``candidates`` premature layers (default
    the high bucket). MC: ``answers`` answers (TruthfulQA has at most 24 per question, 7.6 on average)
    right-padded to ``answer_tokens`` tokens, scored as one batch on ``mc_entries`` entries (default the
    final one and both buckets) in ``chunk_bytes`` chunks. The defaults are the worst case of TruthfulQA.
    """
    L, d, V, B = shape.n_layers, shape.hidden, shape.vocab, batch
    kv = shape.n_kv_heads * shape.head_dim
    T = primer_tokens + prompt_tokens + new_tokens
    E = L + 1 if lens_entries is None else lens_entries
    C = dola_candidates(shape) if candidates is None else candidates
    if mc_entries is None:
        mc_entries = 1 + dola_candidates(shape, "high") + dola_candidates(shape, "low")
    weights = shape.params * dtype_bytes
    # keys and values of every layer for the batch, plus the primer's own cache kept for the next batch
    kv_cache = 2 * L * kv * dtype_bytes * (B * T + primer_tokens)
    # output_hidden_states: L+1 states of the primer (kept with its cache) and of the batch's own tokens
    prefill_hidden = (L + 1) * d * dtype_bytes * (primer_tokens + B * prompt_tokens)
    # layer_stats: two float32 buffers of E × rows × V, rows chosen so that both fit the chunk; the
    # half-precision head output of one chunk exists until it is upcast into the first buffer
    rows = chunk_rows(V, E, step_chunk_bytes)
    lens_workspace = 2 * 4 * E * rows * V + (E * rows * V * dtype_bytes if dtype_bytes < 4 else 0)
    # one step: (C+1) × B × V logits (head output, then float32), log-softmax of the C candidates, and
    # the distance's two [C, B, V] float32 temporaries (js_distance_logprobs)
    dola_step = (C + 1) * B * V * (dtype_bytes + 4) + 3 * C * B * V * 4
    # question_raw: the answers' hidden states (all L+1 entries, then the mc_entries rows kept), and per
    # chunk of rows the head output, the float32 logits, their log-softmax and one candidate's distance
    # temporaries
    mc_rows = max(1, chunk_bytes // (4 * V * mc_entries))
    mc_question = ((L + 1 + mc_entries) * answers * answer_tokens * d * dtype_bytes
                   + mc_entries * mc_rows * V * (dtype_bytes + 2 * 4) + 3 * mc_rows * V * 4)
    return MemoryNeeds(weights, kv_cache, prefill_hidden, lens_workspace, dola_step, mc_question)


def _gib(x: int) -> str:
    return f"{x / GIB:.2f}" if x < 10 * GIB else f"{x / GIB:.1f}"


def memory_table(shapes: Sequence[ModelShape] = tuple(LLAMA2.values()), **kw) -> str:
    """A markdown table of :func:`memory_needed` (GiB) for ``shapes``, with the settings in ``kw``."""
    head = ("| model | params | weights | KV cache | prefill states | lens workspace | DoLa step | MC question "
            "| generation + lens | DoLa | MC |")
    rows = [head, "|" + "---|" * 11]
    for s in shapes:
        m = memory_needed(s, **kw)
        rows.append(f"| {s.name} | {s.params / 1e9:.2f} B | " + " | ".join(_gib(x) for x in (
            m.weights, m.kv_cache, m.prefill_hidden, m.lens_workspace, m.dola_step, m.mc_question, m.generation,
            m.dola, m.mc)) + " |")
    return "\n".join(rows)
