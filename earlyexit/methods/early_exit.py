"""Decoders that exit early: ``early-exit`` (lossy, CALM-style), ``self-speculative`` (lossless,
LayerSkip-style) and ``layer-skip`` (lossless, Draft&Verify / SWIFT-style).

All three run the model's decoder layers one at a time (:class:`~earlyexit.core.stack.LayerStack`) on a
KV cache, batch 1, after the usual prefill (:func:`earlyexit.core.prefix.prefill`). They are registered in
the decoding registry, so ``generate(..., decoding="self-speculative")``, the CLI's ``--decoding`` and
``custom_generate`` reach them; :func:`earlyexit.core.decoding.decode` hands them the stop rule and the
token choice (``pick``) and they run their own loop.

``early-exit`` (Schuster et al. 2022): every token runs layers 1, 2, … and leaves at the first allowed
entry (``exit_entries``) whose lens confidence passes λ (``threshold``): the top-1 probability or the
top-1 − top-2 margin ≥ λ, or the entropy ≤ λ (nats). The token is chosen from the lens's logits at
that entry. The layers it skipped get their keys and values for that position from the exit hidden
state copied upward (CALM's state propagation: layer j > e reads h_e as its input), so later tokens
attend to every position at every layer. Recorded per token: ``exit_entry`` (L = no exit).

``self-speculative`` (Elhoushi et al. 2024, here on a model not trained for it): draft up to
``max_draft`` tokens with layers 1..E through the lens at entry E (``exit_entry``), one token at a
time; stop drafting early when the draft's top-1 probability falls below ``draft_threshold`` (0.4 by
default, transformers' value; the low-confidence draft is still verified). Then one verify pass runs
only layers E+1..L on the drafted positions, from the entry-E hidden states the draft already
computed — those, and the draft's KV of layers 1..E, are the full model's own. The
longest agreeing prefix is kept with the full model's next token; the cache is cut back (crop) to
what was kept. The output is the full model's greedy output (token for token, up to float rounding of
a k-position pass against k one-position passes).

``layer-skip`` (Zhang et al. 2024 Draft&Verify; Xia et al. 2025 SWIFT): the draft is the full model
with the decoder layers in ``skip_layers`` skipped (0-based indices into the layer list), read by the
model's own norm and head; the verify pass runs layers j0..L from the draft's entry-j0 hidden states,
j0 = the first skipped layer (the layers before it are exact, their KV is kept). ``skip_layers="auto"``
searches the set on calibration prompts for the largest expected speed-up (:func:`search_skip_layers`).

Every generated item records its drafts: ``Decoded.stats`` (``drafts_proposed``, ``drafts_accepted``,
``acceptance_rate``, ``verify_passes``, ``tokens_per_verify``) and per token ``drafted`` (1: a draft
token the full model agreed with, 0: the full model's own token).

>>> from earlyexit import load_tokenizer, tiny_model
>>> from earlyexit.methods.dola import generate
>>> model, tok = tiny_model("llama"), load_tokenizer()
>>> greedy = generate(model, tok, ["Q: Why is the sky blue? A:"], decoding="vanilla", repetition_penalty=1.0,
...                   max_new_tokens=12)
>>> spec = generate(model, tok, ["Q: Why is the sky blue? A:"], decoding="self-speculative",
...                 max_new_tokens=12, method_settings={"exit_entry": 2, "max_draft": 4})
>>> spec[0].token_ids == greedy[0].token_ids, sorted(spec[0].stats)[:2]
(True, ['acceptance_rate', 'drafts_accepted'])
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from earlyexit.core.errors import BadInput
from earlyexit.core.decoding import Decoded, Step, check_penalty, register, repetition_penalty, seen_ids
from earlyexit.core.lenses import Lens, LensLike, get_unembed, resolve_lens
from earlyexit.core.prefix import prefill
from earlyexit.core.stack import LayerStack, crop_layers, get_stack, prepare_cache

CONFIDENCES = ("prob", "margin", "entropy")
DEFAULT_MAX_DRAFT = 4
DEFAULT_DRAFT_THRESHOLD = 0.4  # transformers' assistant_confidence_threshold


# --- validation -----------------------------------------------------------------------------------

def _is_int(x: Any) -> bool:
    return not isinstance(x, (bool, float)) and hasattr(x, "__index__")


def check_exit_entry(entry: Any, n_layers: int, what: str = "exit_entry") -> int:
    """An entry E in 1..L−1: the draft or exit reads the hidden state after layer E."""
    if not _is_int(entry):
        raise BadInput(f"{what} must be an integer entry in 1..{n_layers - 1}, got {entry!r}")
    e = int(entry)
    if not 1 <= e <= n_layers - 1:
        raise BadInput(f"{what} {e} is outside 1..{n_layers - 1}: this model has {n_layers} decoder layers "
                         f"(entry 0 is the embeddings, entry {n_layers} the full model).")
    return e


def check_max_draft(k: Any) -> int:
    if not _is_int(k) or int(k) < 1:
        raise BadInput(f"max_draft (k, the most tokens drafted before a verify pass) must be an integer ≥ 1, "
                         f"got {k!r}")
    return int(k)


def check_unit(value: Any, what: str) -> float:
    """A threshold in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 <= value <= 1.0:
        raise BadInput(f"{what} must be a number in [0, 1], got {value!r}")
    return float(value)


def check_confidence(confidence: str) -> str:
    if confidence not in CONFIDENCES:
        raise BadInput(f"Unknown confidence {confidence!r}: use one of {CONFIDENCES} (top-1 probability, "
                         "top-1 − top-2 margin, entropy in nats).")
    return confidence


def check_exit_threshold(confidence: str, threshold: Any, vocab_size: int) -> float:
    """λ: in [0, 1] for ``prob`` and ``margin`` (exit when the confidence ≥ λ), in [0, log V] for
    ``entropy`` (exit when the entropy ≤ λ)."""
    check_confidence(confidence)
    if confidence != "entropy":
        return check_unit(threshold, f"threshold (λ for confidence {confidence!r})")
    top = math.log(vocab_size)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
            or not 0.0 <= threshold <= top + 1e-6:
        raise BadInput(f"threshold (λ for confidence 'entropy', in nats) must be a number in [0, log V = "
                         f"{top:.3f}], got {threshold!r}")
    return float(threshold)


def default_exit_entries(n_layers: int) -> list[int]:
    """Entries checked for an exit unless told: from L/2 on, every L/8 layers (SmolLM2: 15, 18, 21, 24, 27)
    — each check costs one pass through the output head."""
    step = max(1, n_layers // 8)
    return list(range(max(1, n_layers // 2), n_layers, step))


def check_exit_entries(entries: Any, n_layers: int) -> list[int]:
    if entries is None:
        return default_exit_entries(n_layers)
    if isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence) or not len(entries):
        raise BadInput(f"exit_entries must be a non-empty list of entries in 1..{n_layers - 1}, got {entries!r}")
    return sorted({check_exit_entry(e, n_layers, "exit entry") for e in entries})


def check_skip_layers(layers: Any, n_layers: int) -> list[int]:
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not len(layers):
        raise BadInput(f"skip_layers must be 'auto' or a non-empty list of layer indices in 0..{n_layers - 1}, "
                         f"got {layers!r}")
    out = []
    for x in layers:
        if not _is_int(x) or not 0 <= int(x) < n_layers:
            raise BadInput(f"skip_layers: {x!r} is not a layer index in 0..{n_layers - 1} (0-based, as in "
                             "resolve_arch(model).layers)")
        out.append(int(x))
    out = sorted(set(out))
    if len(out) >= n_layers:
        raise BadInput("skip_layers skips every layer: keep at least one.")
    return out


# --- confidence -----------------------------------------------------------------------------------

def confidence_of(logits: Tensor, confidence: str) -> Tensor:
    """``[..., V]`` logits → ``[...]`` confidence: top-1 probability, top-1 − top-2 margin, or entropy (nats)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if confidence == "entropy":  # in [0, log V]; float rounding can step just past log V on a flat distribution
        return (-(logp.exp() * logp).sum(-1)).clamp(0.0, math.log(logits.shape[-1]))
    top = logp.topk(2, dim=-1).values.exp()
    return top[..., 0] if confidence == "prob" else top[..., 0] - top[..., 1]


def passes(value: float, confidence: str, threshold: float) -> bool:
    """Whether a confidence value passes λ (entropy: at most λ; the others: at least λ)."""
    return value <= threshold if confidence == "entropy" else value >= threshold


# --- the shared loop parts ------------------------------------------------------------------------

class _Emitter:
    """The tokens of one row: the token choice (repetition penalty, ``pick``), the stop rule, the record."""

    def __init__(self, scorer, prompt: Sequence[int], stop, pick, max_new_tokens: int, device, unembed):
        self.penalty = scorer.repetition_penalty
        self.seen = seen_ids([prompt], device)
        self.stop, self.pick, self.max_new = stop, pick, max_new_tokens
        self.unembed = unembed
        self.out = Decoded()
        self.done = False

    @property
    def n(self) -> int:
        return len(self.out.token_ids)

    def penalised(self, logits: Tensor, extra: Sequence[int] = ()) -> Tensor:
        """``[V]`` → ``[1, V]`` scores with the repetition penalty over the ids seen (and ``extra`` drafted)."""
        scores = logits[None]
        if self.penalty != 1.0:
            seen = self.seen
            if extra:
                seen = torch.cat([seen, torch.tensor([list(extra)], dtype=seen.dtype, device=seen.device)], 1)
            scores = repetition_penalty(scores, seen, self.penalty)
        return scores

    def choose(self, logits: Tensor) -> int:
        scores = self.penalised(logits)
        if self.pick is None:
            return int(scores.argmax(-1))
        step = Step(self.n, [0], {}, scores, self.seen, self.unembed)
        return int(self.pick(scores, step)[0])

    def emit(self, token: int, **info: Any) -> bool:
        self.out.token_ids.append(token)
        for k, v in info.items():
            self.out.info.setdefault(k, []).append(v)
        self.seen = torch.cat([self.seen, self.seen.new_tensor([[token]])], dim=1)
        stopped = self.stop.update([token])[0] if self.stop is not None else False
        self.done = bool(stopped) or self.n >= self.max_new
        return self.done


class _OwnLoop:
    """A registered method that runs its own decoding loop (``decode``), batch 1."""

    name = "own-loop"
    entries: tuple[int, ...] = ()
    max_batch_size = 1

    def __init__(self, model, repetition_penalty: float):
        self.model = model
        self.repetition_penalty = check_penalty(repetition_penalty)
        self.stack: LayerStack = get_stack(model)
        self.unembed = get_unembed(model)
        self.L = self.stack.L

    def scores(self, step: Step):
        raise TypeError(f"decoding {self.name!r} runs its own loop: call decode() (or generate()), not scores()")

    @torch.no_grad()
    def decode(self, model, token_lists, *, max_new_tokens: int, pad_id: int, observers=(), stop=None, pick=None,
               share_prefix: bool = True) -> list[Decoded]:
        if model is not self.model:
            raise BadInput(f"this {self.name!r} decoder was built for another model")
        if len(token_lists) != 1:
            raise BadInput(f"decoding {self.name!r} decodes one sequence at a time (batch 1), got a batch of "
                             f"{len(token_lists)}: pass batch_size=1 (generate() does so for this method).")
        if observers:
            raise BadInput(f"decoding {self.name!r} does not take observers (lens statistics): its steps do not "
                             "run every layer.")
        if max_new_tokens < 1:
            raise BadInput(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
        prompt = list(token_lists[0])
        with torch.inference_mode():
            state = prefill(model, [prompt], pad_id, share_prefix=share_prefix, reserve=max_new_tokens)
            cache = prepare_cache(state.cache)
            em = _Emitter(self, prompt, stop, pick, max_new_tokens, state.logits.device, self.unembed)
            self._run(em, state.logits[0], cache, len(prompt))
        return [em.out]

    def _run(self, em: _Emitter, first_logits: Tensor, cache, start: int) -> None:
        raise NotImplementedError


# --- early exit (lossy) ---------------------------------------------------------------------------

class EarlyExit(_OwnLoop):
    """CALM-style early exit with state propagation (see the module docstring)."""

    name = "early-exit"

    def __init__(self, model, *, confidence: str = "margin", threshold: float = 0.99,
                 exit_entries: Sequence[int] | None = None, lens: LensLike = "normed",
                 repetition_penalty: float = 1.0):
        super().__init__(model, repetition_penalty)
        self.confidence = check_confidence(confidence)
        self.threshold = check_exit_threshold(confidence, threshold, self.unembed.vocab_size)
        self.exit_entries = check_exit_entries(exit_entries, self.L)
        self.lens: Lens = resolve_lens(model, lens)

    def _run(self, em: _Emitter, first_logits: Tensor, cache, start: int) -> None:
        L, stack = self.L, self.stack
        exits = set(self.exit_entries)
        layers = list(range(L))
        dev = first_logits.device
        tok = em.choose(first_logits)
        if em.emit(tok, exit_entry=L):  # the prompt's last position ran the full model (prefill)
            return
        pos = start
        while True:
            p = stack.positions(pos, 1, dev)
            h = stack.embed(torch.tensor([[tok]], device=dev), p)
            ctx = stack.context(h, p, cache, layers)
            exit_at, logits = L, None
            for i in layers:
                h = stack.layer(i, h, ctx, cache)
                e = i + 1
                if e in exits:
                    lg = self.lens.logits(h.view(1, 1, -1), [e], transposed=True)[0, 0]
                    if passes(float(confidence_of(lg, self.confidence)), self.confidence, self.threshold):
                        exit_at, logits = e, lg
                        break
            if exit_at < L:
                for j in range(exit_at, L):  # CALM's state propagation: h_e is the input of every skipped layer
                    stack.write_kv(j, h, ctx, cache)
            else:
                logits = stack.final_logits(h)[0, -1]
            tok = em.choose(logits)
            pos += 1
            if em.emit(tok, exit_entry=exit_at):
                return

    def settings(self) -> dict[str, Any]:
        return {"decoding": self.name, "confidence": self.confidence, "threshold": self.threshold,
                "exit_entries": list(self.exit_entries), "lens": self.lens.name,
                "repetition_penalty": self.repetition_penalty}


# --- draft and verify (lossless) ------------------------------------------------------------------

class _Speculative(_OwnLoop):
    """Draft with a part of the model, verify with one pass over the rest (see the module docstring).

    Subclasses set ``draft_layers`` (run per draft token), ``verify_from`` (j0: the verify pass runs
    layers j0..L−1 from the draft's entry-j0 hidden states) and :meth:`draft_logits`.
    """

    draft_layers: list[int]
    verify_from: int

    def __init__(self, model, *, max_draft: int, draft_threshold: float, repetition_penalty: float):
        super().__init__(model, repetition_penalty)
        self.max_draft = check_max_draft(max_draft)
        self.draft_threshold = check_unit(draft_threshold, "draft_threshold (stop drafting below this top-1 "
                                                           "probability; 0 = always draft max_draft tokens)")

    def draft_logits(self, h: Tensor) -> Tensor:
        raise NotImplementedError

    def _draft_step(self, tok: int, pos: int, cache, dev) -> tuple[Tensor, Tensor]:
        """One draft token: its entry-j0 hidden state ``[1, 1, d]`` (for the verify pass) and logits ``[V]``."""
        stack, j0 = self.stack, self.verify_from
        p = stack.positions(pos, 1, dev)
        h = stack.embed(torch.tensor([[tok]], device=dev), p)
        ctx = stack.context(h, p, cache, self.draft_layers)
        keep = h if j0 == 0 else None
        for i in self.draft_layers:
            h = stack.layer(i, h, ctx, cache)
            if i == j0 - 1:
                keep = h
        if keep is None:  # the layers before j0 are all in the draft; j0 itself is not
            raise RuntimeError("draft layers do not cover the layers before the verify start")
        return keep, self.draft_logits(h)

    def _run(self, em: _Emitter, first_logits: Tensor, cache, start: int) -> None:
        stack, L, j0 = self.stack, self.L, self.verify_from
        dev = first_logits.device
        proposed = accepted = passes_ = 0
        tok = em.choose(first_logits)
        done = em.emit(tok, drafted=0)
        pos = start  # position of tok, not yet in the cache
        while not done:
            k = min(self.max_draft, em.max_new - em.n)
            drafts: list[int] = []
            hidden = []
            t = tok
            for j in range(k):
                h, lg = self._draft_step(t, pos + j, cache, dev)
                hidden.append(h)
                d = int(em.penalised(lg, drafts).argmax(-1))
                drafts.append(d)
                if j == k - 1:
                    break
                if self.draft_threshold > 0 and float(torch.softmax(lg.float(), -1).max()) < self.draft_threshold:
                    break
                t = d
            n = len(drafts)
            crop_layers(cache, pos, range(j0, L))  # the draft's KV past j0 is not the full model's
            hv = stack.run(None, pos, cache, layers=range(j0, L), h=torch.cat(hidden, dim=1))
            logits = stack.final_logits(hv)[0]  # [n, V]: the full model's prediction after each fed token
            passes_ += 1
            proposed += n
            m = 0
            for j in range(n):
                f = em.choose(logits[j])
                agree = f == drafts[j]
                accepted += int(agree)
                m += 1
                done = em.emit(f, drafted=int(agree))
                if done or not agree:
                    break
                tok = f
            tok = f
            crop_layers(cache, pos + m)  # keep the agreed positions (the correction is fed next)
            pos += m
        self._last = (cache, pos)  # the cache holds every emitted token but the last (for the tests)
        em.out.stats = {"drafts_proposed": proposed, "drafts_accepted": accepted,
                        "acceptance_rate": accepted / proposed if proposed else None, "verify_passes": passes_,
                        "tokens_per_verify": (em.n - 1) / passes_ if passes_ else None}


class SelfSpeculative(_Speculative):
    """LayerSkip-style self-speculative decoding: draft with layers 1..E and the lens at entry E."""

    name = "self-speculative"

    def __init__(self, model, *, exit_entry: int | str = "auto", max_draft: int = DEFAULT_MAX_DRAFT,
                 draft_threshold: float = DEFAULT_DRAFT_THRESHOLD, lens: LensLike = "normed", repetition_penalty: float = 1.0,
                 calibration: Sequence[Sequence[int]] | None = None):
        super().__init__(model, max_draft=max_draft, draft_threshold=draft_threshold,
                         repetition_penalty=repetition_penalty)
        self.lens: Lens = resolve_lens(model, lens)
        self.choice: ExitChoice | None = None
        if isinstance(exit_entry, str):
            if exit_entry != "auto":
                raise BadInput(f"exit_entry must be 'auto' or an integer entry in 1..{self.L - 1}, got {exit_entry!r}")
            self.choice = choose_exit_entry(model, lens=self.lens, max_draft=self.max_draft, calibration=calibration)
            exit_entry = self.choice.best["entry"]
        self.exit_entry = check_exit_entry(exit_entry, self.L)
        self.draft_layers = list(range(self.exit_entry))
        self.verify_from = self.exit_entry

    def draft_logits(self, h: Tensor) -> Tensor:
        return self.lens.logits(h.view(1, 1, -1), [self.exit_entry], transposed=True)[0, 0]

    def settings(self) -> dict[str, Any]:
        s = {"decoding": self.name, "exit_entry": self.exit_entry, "max_draft": self.max_draft,
             "draft_threshold": self.draft_threshold, "lens": self.lens.name,
             "repetition_penalty": self.repetition_penalty}
        if self.choice is not None:
            s["choice"] = {**self.choice.best, "cost_model": self.choice.costs["source"]}
        return s


class LayerSkip(_Speculative):
    """Draft&Verify / SWIFT-style: the draft is the full model without ``skip_layers``."""

    name = "layer-skip"

    def __init__(self, model, *, skip_layers: Sequence[int] | str = "auto", max_draft: int = DEFAULT_MAX_DRAFT,
                 draft_threshold: float = DEFAULT_DRAFT_THRESHOLD, repetition_penalty: float = 1.0,
                 calibration: Sequence[Sequence[int]] | None = None):
        super().__init__(model, max_draft=max_draft, draft_threshold=draft_threshold,
                         repetition_penalty=repetition_penalty)
        self.search: SkipSearch | None = None
        if isinstance(skip_layers, str):
            if skip_layers != "auto":
                raise BadInput(f"skip_layers must be 'auto' or a list of layer indices, got {skip_layers!r}")
            self.search = search_skip_layers(model, max_draft=self.max_draft, calibration=calibration)
            skip_layers = self.search.skip_layers
        self.skip_layers = check_skip_layers(skip_layers, self.L)
        skip = set(self.skip_layers)
        self.draft_layers = [i for i in range(self.L) if i not in skip]
        self.verify_from = self.skip_layers[0]

    def draft_logits(self, h: Tensor) -> Tensor:
        return self.stack.final_logits(h)[0, -1]

    def settings(self) -> dict[str, Any]:
        s = {"decoding": self.name, "skip_layers": list(self.skip_layers), "max_draft": self.max_draft,
             "draft_threshold": self.draft_threshold, "repetition_penalty": self.repetition_penalty}
        if self.search is not None:
            s["search"] = self.search.summary()
        return s


# --- registry -------------------------------------------------------------------------------------

@register("early-exit")
def _early_exit(model, *, confidence: str = "margin", threshold: float = 0.99,
                exit_entries: Sequence[int] | None = None, lens: LensLike = "normed",
                repetition_penalty: float = 1.0, premature_lens: LensLike | None = None) -> EarlyExit:
    """``premature_lens`` (the registry's common setting) is not used: the exit lens is ``lens``."""
    return EarlyExit(model, confidence=confidence, threshold=threshold, exit_entries=exit_entries, lens=lens,
                     repetition_penalty=repetition_penalty)


@register("self-speculative")
def _self_speculative(model, *, exit_entry: int | str = "auto", max_draft: int = DEFAULT_MAX_DRAFT,
                      draft_threshold: float = DEFAULT_DRAFT_THRESHOLD, lens: LensLike = "normed", repetition_penalty: float = 1.0,
                      calibration: Sequence[Sequence[int]] | None = None,
                      premature_lens: LensLike | None = None) -> SelfSpeculative:
    return SelfSpeculative(model, exit_entry=exit_entry, max_draft=max_draft, draft_threshold=draft_threshold,
                           lens=lens, repetition_penalty=repetition_penalty, calibration=calibration)


@register("layer-skip")
def _layer_skip(model, *, skip_layers: Sequence[int] | str = "auto", max_draft: int = DEFAULT_MAX_DRAFT,
                draft_threshold: float = DEFAULT_DRAFT_THRESHOLD, repetition_penalty: float = 1.0,
                calibration: Sequence[Sequence[int]] | None = None,
                premature_lens: LensLike | None = None) -> LayerSkip:
    return LayerSkip(model, skip_layers=skip_layers, max_draft=max_draft, draft_threshold=draft_threshold,
                     repetition_penalty=repetition_penalty, calibration=calibration)


# --- calibration: acceptance and cost -------------------------------------------------------------

CALIBRATION_QUESTIONS = 4     # TruthfulQA questions from the end of the set (the bench uses the first 20)
CALIBRATION_NEW_TOKENS = 32


def expected_tokens(acceptance: float, k: int) -> float:
    """Expected tokens per verify pass with per-token acceptance α and at most k drafts:
    ``Σ_{j<k} α^j`` (the agreed drafts plus the full model's correction, at most k)."""
    a = min(max(float(acceptance), 0.0), 1.0)
    return float(k) if a >= 1.0 else (1.0 - a ** k) / (1.0 - a)


@dataclass
class CostModel:
    """Seconds of one decoder layer on n new positions (``layer[n-1]``), of the head on n rows
    (``head[n-1]``), and of a plain one-token step of the whole model (``step``), for n = 1..k."""

    layer: list[float]
    head: list[float]
    step: float
    source: str = "measured"

    def draft(self, n_layers: int) -> float:
        return n_layers * self.layer[0] + self.head[0]

    def verify(self, n_layers: int, n: int) -> float:
        return n_layers * self.layer[n - 1] + self.head[n - 1]

    def speedup(self, acceptance: float, k: int, draft_layers: int, verify_layers: int) -> float:
        """Expected tokens/s ÷ greedy's, drafting k tokens per verify pass."""
        return expected_tokens(acceptance, k) * self.step / (k * self.draft(draft_layers)
                                                             + self.verify(verify_layers, k))

    def break_even(self, k: int, draft_layers: int, verify_layers: int) -> float | None:
        """The acceptance at which drafting k tokens costs as much as greedy (None: never pays)."""
        cost = (k * self.draft(draft_layers) + self.verify(verify_layers, k)) / self.step
        if cost > k:
            return None
        lo, hi = 0.0, 1.0
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if expected_tokens(mid, k) < cost else (lo, mid)
        return hi

    @classmethod
    def analytic(cls, model, k: int) -> "CostModel":
        """Costs from parameter counts, as if a pass were bound by reading the weights (the same for 1..k
        positions): deterministic, for tests and a first look."""
        stack = get_stack(model)
        p_layer = sum(p.numel() for p in stack.layers[0].parameters())
        p_head = stack.unembed.head.weight.numel()
        return cls([float(p_layer)] * k, [float(p_head)] * k, float(stack.L * p_layer + p_head), "parameters")

    @classmethod
    def measure(cls, model, k: int, context: int = 256, repeats: int = 5) -> "CostModel":
        """Time the parts on this machine (median of ``repeats``), on a cache of ``context`` positions."""
        stack = get_stack(model)
        dev = stack.unembed.device
        ids = torch.arange(context, device=dev)[None] % stack.unembed.vocab_size
        with torch.inference_mode():
            cache = model(input_ids=ids, use_cache=True).past_key_values
            prepare_cache(cache)

            def timed(fn) -> float:
                out = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    fn()
                    out.append(time.perf_counter() - t0)
                return float(np.median(out))

            def layers_n(n: int) -> None:
                stack.run(ids[:, :n], context, cache, layers=range(stack.L))
                crop_layers(cache, context)

            def head_n(n: int) -> None:
                stack.final_logits(torch.zeros(1, n, stack.unembed.hidden_size, device=dev))

            layers_n(1), head_n(1)  # warm-up
            layer = [timed(lambda n=n: layers_n(n)) / stack.L for n in range(1, k + 1)]
            head = [timed(lambda n=n: head_n(n)) for n in range(1, k + 1)]
            step = stack.L * layer[0] + head[0]
        return cls(layer, head, step, f"measured (context {context}, median of {repeats})")


@dataclass
class Calibration:
    """Calibration sequences: each prompt, the full model's greedy continuation, and the full model's
    KV cache over both (every layer full-length)."""

    prompts: list[list[int]]
    continuations: list[list[int]]
    caches: list[Any] = field(repr=False)
    hidden: list[tuple[Tensor, ...]] = field(repr=False)  # L+1 entries [T, d] per sequence (last position dropped)

    @property
    def n_tokens(self) -> int:
        return sum(len(c) for c in self.continuations)


def default_calibration(model) -> list[list[int]]:
    """Token ids of TruthfulQA prompts (the 6-shot primer) of the last :data:`CALIBRATION_QUESTIONS`
    questions, with the model's tokenizer (the tiny models share SmolLM2's)."""
    from earlyexit.core.meta import model_name
    from earlyexit.core.models import DEFAULT_MODEL, EMBEDDED_MODELS, load_tokenizer
    from earlyexit.studies.data import load_truthfulqa
    from earlyexit.studies.prompts import truthfulqa_prompt

    name = model_name(model)
    if name.startswith("tiny-"):
        name = DEFAULT_MODEL
    if name not in EMBEDDED_MODELS and "/" not in name:
        raise BadInput(f"No tokenizer known for model {name!r}: pass calibration=[token id lists].")
    tok = load_tokenizer(name)
    items = load_truthfulqa()[-CALIBRATION_QUESTIONS:]
    return [tok(truthfulqa_prompt(it.question))["input_ids"] for it in items]


_CALIBRATIONS: dict[tuple, Calibration] = {}


def calibrate(model, calibration: Sequence[Sequence[int]] | None = None,
              new_tokens: int = CALIBRATION_NEW_TOKENS) -> Calibration:
    """Greedy continuations of the calibration prompts and the full model's caches and hidden states
    over them (kept for the model: one calibration serves every search)."""
    from transformers import DynamicCache

    from earlyexit.core.decoding import decode, make_scorer

    prompts = [list(map(int, p)) for p in (calibration if calibration is not None else default_calibration(model))]
    if not prompts or any(not p for p in prompts):
        raise BadInput("calibration must be a non-empty list of non-empty token id lists")
    key = (id(model), tuple(tuple(p) for p in prompts), new_tokens)
    if key in _CALIBRATIONS:
        return _CALIBRATIONS[key]
    dev = get_unembed(model).device
    greedy = make_scorer(model, "vanilla")
    conts, caches, hidden = [], [], []
    with torch.inference_mode():
        for p in prompts:
            cont = decode(model, [p], greedy, max_new_tokens=new_tokens, pad_id=0)[0].token_ids
            seq = torch.tensor([p + cont], device=dev)
            out = model(input_ids=seq, past_key_values=DynamicCache(), use_cache=True, output_hidden_states=True,
                        logits_to_keep=1)
            conts.append(cont)
            caches.append(out.past_key_values)
            # the hidden states that predict each continuation token: positions len(p)-1 .. len(p)+n-2
            hidden.append(tuple(h[0, len(p) - 1:len(p) + len(cont) - 1] for h in out.hidden_states))
    cal = Calibration(prompts, conts, caches, hidden)
    _CALIBRATIONS.clear()
    _CALIBRATIONS[key] = cal
    return cal


def lens_acceptance(model, cal: Calibration, lens: LensLike = "normed") -> np.ndarray:
    """``[L+1]``: share of continuation tokens whose lens top-1 at entry e equals the full model's token —
    the per-token acceptance of a self-speculative draft at E = e (its hidden states are exact)."""
    lens = resolve_lens(model, lens)
    L = lens.n_layers
    hits = np.zeros(L + 1)
    with torch.inference_mode():
        for hs, cont in zip(cal.hidden, cal.continuations):
            target = torch.tensor(cont, device=hs[0].device)
            for e in range(L + 1):
                lg = lens.logits(hs[e][None], [e])[0]
                hits[e] += float((lg.argmax(-1) == target).sum())
    return hits / max(cal.n_tokens, 1)


def _prefix_cache(cache, length: int):
    """A new cache holding the first ``length`` positions of ``cache``'s layers (views; appends copy)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    new = DynamicCache()
    new.layers = []
    for layer in cache.layers:
        lay = DynamicLayer()
        lay.lazy_initialization(layer.keys, layer.values)
        lay.keys, lay.values = layer.keys[..., :length, :], layer.values[..., :length, :]
        new.layers.append(lay)
    return new


def _draft_window_masks(stack: LayerStack, start: int, n: int, window: int, dtype, device) -> dict[str, Any] | None:
    """Masks ``[1, 1, n, start + n + n]`` for teacher-forcing a draft in windows of ``window`` positions in
    ONE pass: keys = the full model's KV of positions ``0..start+n-1``, then the draft's own KV of the n
    new positions ``start..start+n-1``. Query j sees the full KV before its window and the draft KV of its
    window up to itself — what a draft of that length sees in decoding. ``None`` for an attention
    implementation other than sdpa / eager."""
    impl = getattr(stack.config, "_attn_implementation", "sdpa")
    if impl not in ("sdpa", "eager"):
        return None
    F = start + n
    j = torch.arange(n, device=device)
    ws = (j // window) * window
    kpos = torch.cat([torch.arange(F, device=device), start + j])
    qpos = start + j
    full_ok = torch.arange(F, device=device)[None, :] < (start + ws)[:, None]
    draft_ok = (ws[None, :] == ws[:, None]) & (j[None, :] <= j[:, None])
    allowed = torch.cat([full_ok, draft_ok], 1)
    out = {}
    sw = getattr(stack.config, "sliding_window", None)
    for kind in set(stack.layer_types):
        a = allowed & ((qpos[:, None] - kpos[None, :]) < sw) if kind == "sliding_attention" and sw else allowed
        a = a[None, None]
        out[kind] = a if impl == "sdpa" else torch.zeros(a.shape, dtype=dtype, device=device).masked_fill(
            ~a, torch.finfo(dtype).min)
    return out


def skip_acceptance(model, cal: Calibration, skip_layers: Sequence[int], window: int) -> float:
    """Per-token acceptance of the draft without ``skip_layers``, teacher-forced on the calibration
    continuations in windows of ``window`` tokens: each window's draft attends to the full model's KV
    before it and to its own KV inside it, as a draft of that length does (all windows of a sequence in one
    pass, :func:`_draft_window_masks`)."""
    stack = get_stack(model)
    skip = set(skip_layers)
    layers = [i for i in range(stack.L) if i not in skip]
    hits = total = 0
    with torch.inference_mode():
        for p, cont, cache in zip(cal.prompts, cal.continuations, cal.caches):
            seq = p + cont
            dev = cache.layers[0].keys.device
            start, n = len(p) - 1, len(cont)  # inputs: the token before each continuation token
            target = torch.tensor(cont, device=dev)
            masks = _draft_window_masks(stack, start, n, window, cache.layers[0].keys.dtype, dev)
            if masks is None:  # one window at a time
                for s in range(0, n, window):
                    m = min(window, n - s)
                    ids = torch.tensor([seq[start + s:start + s + m]], device=dev)
                    h = stack.run(ids, start + s, _prefix_cache(cache, start + s), layers=layers)
                    hits += int((stack.final_logits(h)[0].argmax(-1) == target[s:s + m]).sum())
                total += n
                continue
            tmp = _prefix_cache(cache, start + n)
            pos = stack.positions(start, n, dev)
            h = stack.embed(torch.tensor([seq[start:start + n]], device=dev), pos)
            ctx = stack.context(h, pos, None, layers)  # rotary embeddings; the masks are replaced
            ctx.masks = masks
            for i in layers:
                h = stack.layer(i, h, ctx, tmp)
            hits += int((stack.final_logits(h)[0].argmax(-1) == target).sum())
            total += n
    return hits / max(total, 1)


@dataclass
class ExitChoice:
    """The self-speculative exit entry chosen from the calibration: acceptance per entry, predicted
    speed-up per entry (at the best draft length ≤ k), the best."""

    acceptance: list[float]
    speedup: list[float | None]
    draft_len: list[int | None]
    best: dict[str, Any]
    costs: dict[str, Any]


def choose_exit_entry(model, *, lens: LensLike = "normed", max_draft: int = DEFAULT_MAX_DRAFT,
                      calibration: Sequence[Sequence[int]] | None = None, costs: CostModel | None = None
                      ) -> ExitChoice:
    """The entry E with the largest expected speed-up ``E[tokens per verify] × t_greedy / (k·t_draft(E) +
    t_verify(E, k))`` over 2 ≤ k ≤ ``max_draft`` (k = 1 is never faster than greedy), from the calibration's lens acceptance (exact for this
    draft) and the cost model (measured unless given). Kept for the model: the same settings give the same
    entry for the rest of the session (a measured cost model would otherwise vary from call to call)."""
    cal = calibrate(model, calibration)
    lens = resolve_lens(model, lens)
    key = (id(model), lens.name, max_draft, tuple(tuple(p) for p in cal.prompts),
           None if costs is None else costs.source)
    if key in _CHOICES:
        return _CHOICES[key]
    acc = lens_acceptance(model, cal, lens)
    L = get_stack(model).L
    costs = costs or CostModel.measure(model, max_draft)
    sp: list[float | None] = [None]
    ks: list[int | None] = [None]
    k_min = 2 if max_draft >= 2 else 1  # one draft token emits one token for a full step plus a head: never faster
    for e in range(1, L):
        best = max((costs.speedup(acc[e], k, e, L - e), k) for k in range(k_min, max_draft + 1))
        sp.append(best[0])
        ks.append(best[1])
    sp.append(None)
    ks.append(None)
    e_best = max(range(1, L), key=lambda e: sp[e])
    out = ExitChoice([float(a) for a in acc], sp, ks,
                     {"entry": e_best, "speedup": sp[e_best], "max_draft": ks[e_best], "acceptance": float(acc[e_best])},
                     asdict(costs))
    _CHOICES[key] = out
    return out


_CHOICES: dict[tuple, ExitChoice] = {}


@dataclass
class SkipSearch:
    """The result of :func:`search_skip_layers`: the set, its calibration acceptance, predicted speed-up
    and draft length, and the path the search took."""

    skip_layers: list[int]
    acceptance: float
    speedup: float
    draft_len: int
    path: list[dict[str, Any]]
    single: list[float]
    costs: dict[str, Any]
    n_tokens: int

    def summary(self) -> dict[str, Any]:
        return {"skip_layers": self.skip_layers, "acceptance": self.acceptance, "predicted_speedup": self.speedup,
                "draft_len": self.draft_len, "calibration_tokens": self.n_tokens, "cost_model": self.costs["source"]}


_SEARCHES: dict[tuple, SkipSearch] = {}


def search_skip_layers(model, *, max_draft: int = DEFAULT_MAX_DRAFT,
                       calibration: Sequence[Sequence[int]] | None = None, costs: CostModel | None = None,
                       patience: int = 3) -> SkipSearch:
    """Choose the layers the ``layer-skip`` draft leaves out, for the largest expected speed-up
    (acceptance × cost, :meth:`CostModel.speedup`) on the calibration sequences.

    1. each layer alone: the draft's acceptance without it (L evaluations);
    2. nested sets: skip the layers in order of least harm, one more at a time, re-measuring the
       acceptance of each set, until the predicted speed-up has not improved for ``patience`` sets.
    The first layer is never skipped. Kept for the model (same settings → same set).
    """
    stack = get_stack(model)
    L = stack.L
    check_max_draft(max_draft)
    cal = calibrate(model, calibration)
    key = (id(model), tuple(tuple(p) for p in cal.prompts), max_draft, None if costs is None else costs.source)
    if key in _SEARCHES:
        return _SEARCHES[key]
    costs = costs or CostModel.measure(model, max_draft)
    candidates = list(range(1, L))  # layer 0 stays: its input is the embeddings, and j0 = 0 reuses nothing
    single = [float("nan")] * L
    for i in candidates:
        single[i] = skip_acceptance(model, cal, [i], max_draft)
    order = sorted(candidates, key=lambda i: -single[i])

    def score(skip: list[int]) -> tuple[float, float, int]:
        acc = skip_acceptance(model, cal, skip, max_draft)
        sp, k = max((costs.speedup(acc, k, L - len(skip), L - min(skip)), k)
                    for k in range(2 if max_draft >= 2 else 1, max_draft + 1))
        return acc, sp, k

    path: list[dict[str, Any]] = []
    best = None
    since = 0
    for n in range(1, len(order) + 1):
        skip = sorted(order[:n])
        acc, sp, k = score(skip)
        path.append({"skip_layers": skip, "acceptance": acc, "predicted_speedup": sp, "draft_len": k})
        if best is None or sp > best["predicted_speedup"]:
            best, since = path[-1], 0
        else:
            since += 1
            if since >= patience:
                break
    out = SkipSearch(best["skip_layers"], best["acceptance"], best["predicted_speedup"], best["draft_len"], path,
                     single, asdict(costs), cal.n_tokens)
    _SEARCHES[key] = out
    return out
