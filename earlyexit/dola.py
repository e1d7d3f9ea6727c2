"""DoLa decoding (Chuang et al. 2023): batched, KV-cached, premature layer chosen per sequence.

Each step reads the hidden states at the last position only: the candidate entries (raw by
default, the published lens; ``premature_lens="normed"`` applies the final norm) and the model's own
normed output are stacked and sent through the output head in ONE matrix product, giving the
final logits ``[B, V]`` and the premature logits ``[C, B, V]``. Then, per sequence, the most distant
candidate is picked (:func:`earlyexit.contrast.select_premature`), the contrast is taken with the
adaptive plausibility filter, the repetition penalty is applied to the contrast scores over the
sequence's own prompt and output ids (never over padding), and the argmax (or a seeded sample) is
the next token.

Two ways in::

    >>> outs = generate(model, tok, [truthfulqa_prompt(q)], decoding="dola")      # doctest: +SKIP
    >>> outs[0].text, outs[0].premature_layers                                    # doctest: +SKIP
    >>> enc = tok([prompt], return_tensors="pt")                                  # doctest: +SKIP
    >>> seq = model.generate(**enc, custom_generate=custom_generate, dola_layers="high",
    ...                      repetition_penalty=1.2, max_new_tokens=50)           # doctest: +SKIP

Decoding modes: ``"vanilla"`` (greedy / sampling from the final logits, repetition penalty on them),
``"dola"`` (dynamic, over the bucket ``dola_layers``), ``"dola-static"`` (one premature entry).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from earlyexit.batching import StopTracker, chunks, encode_prompts, pad_id
from earlyexit.contrast import (candidate_layers, check_relative_top, js_distance_logprobs,
                                plausibility_mask, repetition_penalty as apply_repetition_penalty)
from earlyexit.generation import eos_ids
from earlyexit.lens import get_unembed
from earlyexit.prefix import prefill
from earlyexit.unembed import check_lens

DECODING_MODES = ("vanilla", "dola", "dola-static")
RECOMMENDED_PENALTY = 1.2


@dataclass
class DolaOutput:
    """One prompt's completion.

    text: the completion with the stop string stripped; token_ids: its new tokens (stop string and
    EOS excluded); premature_layers: for each of those tokens the hidden-state entry used as the
    premature layer (``None`` for vanilla decoding).
    """

    prompt: str
    text: str
    token_ids: list[int]
    premature_layers: list[int | None]


@dataclass(frozen=True)
class DolaSettings:
    """Validated decoding settings. ``candidates``: premature entries (empty for vanilla)."""

    decoding: str
    candidates: tuple[int, ...]
    relative_top: float
    repetition_penalty: float
    premature_lens: str

    @property
    def contrast(self) -> bool:
        return self.decoding != "vanilla"


def resolve_settings(
    model,
    *,
    decoding: str = "dola",
    dola_layers: str | Sequence[int] = "high",
    premature_layer: int | None = None,
    relative_top: float = 0.1,
    repetition_penalty: float = RECOMMENDED_PENALTY,
    premature_lens: str = "raw",
) -> DolaSettings:
    """Check the settings against ``model`` and resolve the candidate entries.

    Raises ``ValueError`` for an unknown mode, ``relative_top`` outside (0, 1], a repetition penalty
    ≤ 0, an empty bucket, a static mode without ``premature_layer``, a premature layer equal to the
    mature one; ``IndexError`` for an entry out of range. Warns when DoLa runs with a penalty below 1.2.
    """
    if decoding not in DECODING_MODES:
        raise ValueError(f"Unknown decoding mode {decoding!r}: use one of {DECODING_MODES}.")
    check_relative_top(relative_top)
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {repetition_penalty}")
    check_lens(premature_lens)
    unembed = get_unembed(model)
    L, tied = unembed.n_layers, unembed.arch.tied_embeddings
    if decoding == "vanilla":
        candidates: list[int] = []
    elif decoding == "dola":
        candidates = candidate_layers(L, tied, dola_layers)
    else:
        if premature_layer is None:
            raise ValueError("decoding='dola-static' needs premature_layer=K (a hidden-state entry in 0..L-1).")
        if isinstance(premature_layer, bool) or int(premature_layer) != premature_layer:
            raise ValueError(f"premature_layer must be one integer entry, got {premature_layer!r}")
        candidates = candidate_layers(L, tied, [int(premature_layer)])
    if decoding != "vanilla" and repetition_penalty < RECOMMENDED_PENALTY:
        warnings.warn(
            f"DoLa with repetition_penalty={repetition_penalty}: the DoLa authors recommend 1.2 (contrast "
            "decoding tends to repeat itself without it).", UserWarning, stacklevel=3)
    return DolaSettings(decoding, tuple(candidates), float(relative_top), float(repetition_penalty), premature_lens)


def seen_ids(token_lists: Sequence[Sequence[int]], device=None) -> Tensor:
    """``[B, T]`` ids each row has really seen, for the repetition penalty. Rows are right-filled
    with their own first id, never with padding (a duplicate id changes nothing)."""
    width = max(len(t) for t in token_lists)
    out = torch.empty((len(token_lists), width), dtype=torch.long)
    for i, toks in enumerate(token_lists):
        out[i, :len(toks)] = torch.as_tensor(list(toks), dtype=torch.long)
        out[i, len(toks):] = int(toks[0])
    return out.to(device) if device is not None else out


def head_matmul(head: torch.nn.Module, h: Tensor) -> Tensor:
    """``head(h)`` for a linear head, ``h`` ``[..., d]`` → ``[..., V]``, computed as ``W @ hᵀ``: with a
    few rows and a large vocabulary this BLAS layout is faster on CPU than ``h @ Wᵀ``."""
    w = getattr(head, "weight", None)
    if not isinstance(head, torch.nn.Linear) or w is None or h.dtype != w.dtype:
        return head(h)
    flat = h.reshape(-1, h.shape[-1])
    out = torch.mm(w, flat.t()).t().contiguous()
    if head.bias is not None:
        out = out + head.bias
    return out.view(*h.shape[:-1], w.shape[0])


class ContrastHead:
    """Final and premature logits from the last-position hidden states in one matrix product,
    and the DoLa choice per sequence.

    Reads ``settings.candidates`` (the C premature hidden-state entries), ``settings.premature_lens``
    (``"raw"``, the published lens, or ``"normed"``) and ``settings.relative_top``.
    """

    def __init__(self, model, settings: DolaSettings):
        self.unembed = get_unembed(model)
        self.settings = settings
        self.entries = list(settings.candidates)
        self.normed = settings.premature_lens == "normed"
        dev = self.unembed.head.weight.device
        self._entries_t = torch.tensor(self.entries or [0], dtype=torch.long, device=dev)

    def logits(self, premature_hidden: Sequence[Tensor], final_hidden: Tensor) -> tuple[Tensor, Tensor]:
        """C tensors ``[B, d]`` (the candidate entries, un-normed) and the normed output ``[B, d]``
        → final logits ``[B, V]``, premature logits ``[C, B, V]`` (float32)."""
        C = len(premature_hidden)
        h = torch.stack([*premature_hidden, final_hidden])  # [C+1, B, d]
        if self.normed:
            h = torch.cat([self.unembed.final_norm(h[:C]), h[C:]])
        u = self.unembed
        logits = u.postprocess(head_matmul(u.head, h)).float()  # one matmul for all C+1 rows
        return logits[C], logits[:C]

    def choose(self, final: Tensor, premature: Tensor) -> tuple[Tensor, Tensor]:
        """Contrast scores ``[B, V]`` and the chosen entry of each sequence ``[B]`` (hidden-state index).

        Same result as :func:`earlyexit.contrast.select_premature` followed by
        :func:`earlyexit.contrast.contrast_scores`, with the log-softmaxes computed once."""
        B = final.shape[0]
        lp_f = torch.log_softmax(final.float(), dim=-1)
        lp_p = torch.log_softmax(premature.float(), dim=-1)
        if premature.shape[0] == 1:
            idx = torch.zeros(B, dtype=torch.long, device=final.device)
            lp_c = lp_p[0]
        else:
            idx = js_distance_logprobs(lp_f, lp_p).argmax(0)  # [B]: per sequence, never shared
            lp_c = lp_p[idx, torch.arange(B, device=final.device)]
        keep = plausibility_mask(lp_f, self.settings.relative_top)
        # implausible tokens: premature log-prob floored at PREMATURE_FLOOR, then the score set to −inf
        # anyway, so one where() gives the same scores
        scores = torch.where(keep, lp_f - lp_c, float("-inf"))
        return scores, self._entries_t[idx]


class _Decoder:
    """The KV-cached decoding state of one batch: prefill once, then one token per step."""

    def __init__(self, model, settings: DolaSettings, token_lists: Sequence[Sequence[int]], pad: int,
                 share_prefix: bool = True, reserve: int = 0):
        self.model = model
        self.settings = settings
        self.head = ContrastHead(model, settings) if settings.contrast else None
        self.base = model.base_model
        self.L = get_unembed(model).n_layers
        self.state = prefill(model, token_lists, pad, share_prefix=share_prefix,
                             output_hidden_states=settings.contrast, reserve=reserve)
        self.seen = seen_ids(token_lists, self.state.logits.device)
        self._no_padding = bool(self.state.attention_mask.all())
        if settings.contrast:
            hs = self.state.hidden_last
            self._hidden = ([hs[e] for e in self.settings.candidates], hs[self.L])
        self._logits = self.state.logits
        self.state.hidden_last = None

    def scores(self) -> tuple[Tensor, Tensor | None]:
        """Scores ``[B, V]`` of the next token (repetition penalty applied) and the chosen premature
        entry per sequence ``[B]`` (``None`` for vanilla)."""
        if self.settings.contrast:
            final, premature = self.head.logits(*self._hidden)
            scores, chosen = self.head.choose(final, premature)
        else:
            scores, chosen = self._logits, None
        scores = apply_repetition_penalty(scores, self.seen, self.settings.repetition_penalty)
        return scores, chosen

    @torch.no_grad()
    def advance(self, next_tokens: Tensor) -> None:
        """Feed the chosen tokens ``[B]``; the next :meth:`scores` is for the position after them."""
        self.seen = torch.cat([self.seen, next_tokens[:, None]], dim=1)
        inputs = self.state.step_inputs(next_tokens)
        if self._no_padding:
            inputs["attention_mask"] = None  # as transformers does: the plain causal path, no mask built
        if self.settings.contrast:
            out = self.base(**inputs, output_hidden_states=True)
            hs = out.hidden_states
            self._hidden = ([hs[e][:, -1] for e in self.settings.candidates], out.last_hidden_state[:, -1])
        else:
            out = self.model(**inputs)
            self._logits = out.logits[:, -1].float()
        self.state.cache = out.past_key_values


def pick_tokens(scores: Tensor, do_sample: bool, temperature: float, generator: torch.Generator | None) -> Tensor:
    """Greedy argmax, or a sample from softmax(scores / temperature): ``[B, V]`` → ``[B]``."""
    if not do_sample:
        return scores.argmax(-1)
    probs = torch.softmax(scores / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _check_sampling(do_sample: bool, temperature: float) -> None:
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    decoding: str = "dola",
    dola_layers: str | Sequence[int] = "high",
    premature_layer: int | None = None,
    relative_top: float = 0.1,
    repetition_penalty: float = RECOMMENDED_PENALTY,
    premature_lens: str = "raw",
    max_new_tokens: int = 50,
    stop: Sequence[str] = ("Q:",),
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    progress: bool = False,
    share_prefix: bool = True,
    ignore_eos: bool = False,
) -> list[DolaOutput]:
    """Complete ``prompts`` with vanilla, dynamic-DoLa or static-DoLa decoding.

    Batched (``batch_size`` prompts at a time, left-padded, a shared few-shot primer computed once),
    KV cache reused, each sequence stopping on its own at a stop string or EOS (``ignore_eos`` keeps
    going past EOS, for benchmarks of equal length). Returns one :class:`DolaOutput` per prompt, in
    order. See :func:`resolve_settings` for the errors.
    """
    settings = resolve_settings(model, decoding=decoding, dola_layers=dola_layers, premature_layer=premature_layer,
                                relative_top=relative_top, repetition_penalty=repetition_penalty,
                                premature_lens=premature_lens)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    _check_sampling(do_sample, temperature)
    token_lists = encode_prompts(tokenizer, prompts, model, reserve=max_new_tokens)
    pad = pad_id(tokenizer)
    eos = [] if ignore_eos else eos_ids(tokenizer, model)
    generator = None
    if do_sample:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    results: list[DolaOutput] = []
    bar = tqdm(total=len(prompts), desc=f"generate ({decoding})", disable=not progress)
    for start, group in chunks(token_lists, batch_size):
        B = len(group)
        tracker = StopTracker(tokenizer, B, stop, eos)
        dec = _Decoder(model, settings, group, pad, share_prefix=share_prefix, reserve=max_new_tokens)
        layers: list[Tensor] = []
        # inference mode, not just no_grad: a few % less per-op overhead; nothing made here outlives the loop
        with torch.inference_mode():
            for step in range(max_new_tokens):
                scores, chosen = dec.scores()
                next_tok = pick_tokens(scores, do_sample, temperature, generator)
                if chosen is not None:
                    layers.append(chosen)
                tracker.update(next_tok.tolist())
                if tracker.all_done or step == max_new_tokens - 1:
                    break
                dec.advance(next_tok)
        per_step = torch.stack(layers, 1).tolist() if layers else [[None] * max_new_tokens] * B
        for j in range(B):
            text, toks = tracker.result(j)
            results.append(DolaOutput(prompt=prompts[start + j], text=text, token_ids=toks,
                                      premature_layers=list(per_step[j][:len(toks)])))
        bar.update(B)
    bar.close()
    return results


def _token_lists_from_batch(input_ids: Tensor, attention_mask: Tensor | None) -> list[list[int]]:
    """Rows of a left-padded ``[B, T]`` batch without their padding."""
    if attention_mask is None:
        return input_ids.tolist()
    if (attention_mask[:, -1] == 0).any():
        raise ValueError("custom_generate needs left padding: load the tokenizer with padding_side='left'.")
    return [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask)]


@torch.no_grad()
def custom_generate(
    model,
    input_ids: Tensor,
    logits_processor=None,
    stopping_criteria=None,
    generation_config=None,
    synced_gpus: bool = False,
    streamer=None,
    decoding: str | None = None,
    dola_layers: str | Sequence[int] | None = "high",
    premature_layer: int | None = None,
    relative_top: float = 0.1,
    premature_lens: str = "raw",
    **model_kwargs,
):
    """DoLa through transformers: ``model.generate(**inputs, custom_generate=custom_generate,
    dola_layers="high", repetition_penalty=1.2, max_new_tokens=50)``.

    transformers (5.x) prepares the generation config, the logits processors and the stopping
    criteria, then calls this function in place of its own decoding loop; the arguments that are not
    in its ``_sample`` signature (``decoding``, ``dola_layers``, ``premature_layer``, ``relative_top``,
    ``premature_lens``) are passed through to here. ``decoding`` defaults to ``"dola-static"`` when
    ``premature_layer`` is given, else ``"dola"``.

    The repetition penalty (``generation_config.repetition_penalty``) is applied to the contrast
    scores over each row's real prompt and output ids (padding excluded), in place of transformers'
    own processor; the other logits processors (min length, temperature, top-k/p when sampling, …)
    then run on the contrast scores as in transformers ≤ 4.55, and its stopping criteria (max length,
    EOS, ``stop_strings``) end each row; finished rows are filled with ``pad_token_id``.

    Returns what ``generate()`` returns by default: the sequences ``[B, T + n]`` (LongTensor: the
    prompt as given, padding included, then the new tokens). With ``return_dict_in_generate=True``
    a ``GenerateDecoderOnlyOutput`` holding ``sequences`` (and ``scores`` if ``output_scores``).
    Premature layers are not returned here: use :func:`generate` for them.
    """
    from transformers.generation.logits_process import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    cfg = generation_config
    if decoding is None:
        decoding = "dola-static" if premature_layer is not None else "dola"
    penalty = float(getattr(cfg, "repetition_penalty", None) or 1.0)
    settings = resolve_settings(model, decoding=decoding, dola_layers=dola_layers if dola_layers is not None else "high",
                                premature_layer=premature_layer, relative_top=relative_top,
                                repetition_penalty=penalty, premature_lens=premature_lens)
    processors = LogitsProcessorList(
        [p for p in (logits_processor or []) if not isinstance(p, RepetitionPenaltyLogitsProcessor)])
    max_length = int(cfg.max_length)
    if max_length <= input_ids.shape[1]:
        raise ValueError(f"max_length {max_length} leaves no room after the {input_ids.shape[1]}-token prompt.")
    token_lists = _token_lists_from_batch(input_ids, model_kwargs.get("attention_mask"))
    pad_tensor = getattr(cfg, "_pad_token_tensor", None)
    pad = int(pad_tensor) if pad_tensor is not None else int(cfg.pad_token_id or 0)
    generator = None  # sampling follows torch's global seed, as transformers does
    dec = _Decoder(model, settings, token_lists, pad, reserve=max_length - input_ids.shape[1])
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    all_scores = []
    while True:
        scores, _ = dec.scores()
        scores = processors(input_ids, scores)
        if cfg.return_dict_in_generate and cfg.output_scores:
            all_scores.append(scores)
        next_tok = pick_tokens(scores, bool(cfg.do_sample), 1.0, generator)  # temperature is a processor
        next_tok = torch.where(unfinished, next_tok, torch.full_like(next_tok, pad))
        input_ids = torch.cat([input_ids, next_tok[:, None].to(input_ids.device)], dim=1)
        if streamer is not None:
            streamer.put(next_tok.cpu())
        if stopping_criteria is not None:
            unfinished = unfinished & ~stopping_criteria(input_ids, scores).to(unfinished.device)
        if not unfinished.any() or input_ids.shape[1] >= max_length:
            break
        dec.advance(next_tok.to(dec.seen.device))
    if streamer is not None:
        streamer.end()
    if cfg.return_dict_in_generate:
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(sequences=input_ids, scores=tuple(all_scores) if all_scores else None)
    return input_ids
