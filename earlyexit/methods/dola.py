"""DoLa decoding (Chuang et al. 2023): batched, KV-cached, premature layer chosen per sequence.

DoLa is a :class:`~earlyexit.core.decoding.Scorer` in the one decoding loop
(:func:`earlyexit.core.decoding.decode`). Each step reads the hidden states at the last position only:
the candidate entries, read through the premature lens (raw by default, the published lens;
``premature_lens="normed"`` or any :class:`~earlyexit.core.lenses.Lens`), and the model's own normed
output are sent through the output head in ONE matrix product, giving the final logits ``[B, V]`` and
the premature logits ``[C, B, V]``. Then :func:`earlyexit.methods.contrast.dola_scores` picks the most
distant candidate per sequence and takes the contrast with the adaptive plausibility filter; the loop
applies the repetition penalty to the contrast scores over the sequence's own prompt and output ids
(never over padding), and the argmax (or a seeded sample) is the next token.

Two ways in::

    >>> from earlyexit import load_tokenizer, tiny_model
    >>> model, tok = tiny_model("llama"), load_tokenizer()        # or load_model("smollm2-135m")
    >>> outs = generate(model, tok, ["Q: Why is the sky blue? A:"], decoding="dola", max_new_tokens=5)
    >>> len(outs[0].premature_layers) == len(outs[0].token_ids)   # the premature entry of every token
    True
    >>> enc = tok(["Q: Why is the sky blue? A:"], return_tensors="pt")
    >>> seq = model.generate(**enc, custom_generate=custom_generate, dola_layers="high", repetition_penalty=1.2,
    ...                      max_new_tokens=5, min_new_tokens=5, pad_token_id=tok.pad_token_id)
    >>> seq[0, enc["input_ids"].shape[1]:].tolist()[:len(outs[0].token_ids)] == outs[0].token_ids
    True

Decoding modes: ``"vanilla"`` (greedy / sampling from the final logits, repetition penalty on them),
``"dola"`` (dynamic, over the bucket ``dola_layers``), ``"dola-static"`` (one premature entry).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from earlyexit.core.batching import StopTracker, chunks, encode_prompts, pad_id
from earlyexit.core.checks import check_int, check_strings
from earlyexit.core.errors import BadInput, BadType
from earlyexit.core.decoding import (Step, check_decoding, check_penalty, check_sampling, decode, make_scorer,
                                     pick_tokens, register)
from earlyexit.core.generation import eos_ids
from earlyexit.core.lenses import Lens, LensLike, get_unembed, resolve_lens

if TYPE_CHECKING:
    from earlyexit.core.lenses import Model, Tokenizer

from earlyexit.methods.contrast import candidate_layers, check_relative_top, dola_scores

RECOMMENDED_PENALTY = 1.2


@dataclass
class DolaOutput:
    """One prompt's completion.

    text: the completion with the stop string stripped; token_ids: its new tokens (stop string and
    EOS excluded); premature_layers: for each of those tokens the hidden-state entry used as the
    premature layer (``None`` for vanilla decoding); info: any other per-token record of the method, one
    value per token (e.g. ``exit_entry`` of ``early-exit``, ``drafted`` of the speculative methods);
    stats: the method's per-item counts (e.g. drafts proposed and accepted), ``{}`` for most methods.
    """

    prompt: str
    text: str
    token_ids: list[int]
    premature_layers: list[int | None]
    info: dict[str, list] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


class Dola:
    """DoLa's scorer. ``candidates``: the premature entries (one for static DoLa); ``lens``: how they are
    read (the published raw lens by default)."""

    def __init__(self, model, *, decoding: str, candidates: Sequence[int], relative_top: float = 0.1,
                 repetition_penalty: float = RECOMMENDED_PENALTY, premature_lens: LensLike = "raw"):
        check_relative_top(relative_top)
        self.name = decoding
        self.repetition_penalty = check_penalty(repetition_penalty)
        self.lens: Lens = resolve_lens(model, premature_lens)
        self.L = get_unembed(model).n_layers
        self.candidates = tuple(candidates)
        self.relative_top = float(relative_top)
        self.entries = (*self.candidates, self.L)
        dev = get_unembed(model).device  # where the scores are (a dispatched model's head device)
        self._entries_t = torch.tensor(self.candidates, dtype=torch.long, device=dev)
        if self.repetition_penalty < RECOMMENDED_PENALTY:
            warnings.warn(
                f"DoLa with repetition_penalty={repetition_penalty}: the DoLa authors recommend 1.2 (contrast "
                "decoding tends to repeat itself without it).", UserWarning, stacklevel=4)

    def logits(self, step: Step) -> tuple[Tensor, Tensor]:
        """Final logits ``[b, V]`` and premature logits ``[C, b, V]`` of a step, in one product."""
        h = torch.stack([step.hidden(e) for e in self.entries])  # [C+1, b, d]
        logits = self.lens.logits(h, self.entries, transposed=True)
        C = len(self.candidates)
        return logits[C], logits[:C]

    def scores(self, step: Step) -> tuple[Tensor, dict[str, Tensor]]:
        final, premature = self.logits(step)
        scores, idx = dola_scores(final, premature, relative_top=self.relative_top)
        return scores, {"premature_layer": self._entries_t[idx]}

    def settings(self) -> dict[str, Any]:
        return {"decoding": self.name, "candidates": list(self.candidates), "relative_top": self.relative_top,
                "repetition_penalty": self.repetition_penalty, "premature_lens": self.lens.name}


@register("dola")
def _dola(model, *, dola_layers: str | Sequence[int] = "high", relative_top: float = 0.1,
          repetition_penalty: float = RECOMMENDED_PENALTY, premature_lens: LensLike = "raw") -> Dola:
    u = get_unembed(model)
    return Dola(model, decoding="dola", candidates=candidate_layers(u.n_layers, u.arch.tied_embeddings, dola_layers),
                relative_top=relative_top, repetition_penalty=repetition_penalty, premature_lens=premature_lens)


@register("dola-static")
def _dola_static(model, *, premature_layer: int | None = None, relative_top: float = 0.1,
                 repetition_penalty: float = RECOMMENDED_PENALTY, premature_lens: LensLike = "raw") -> Dola:
    if premature_layer is None:
        raise BadInput("decoding='dola-static' needs premature_layer=K (a hidden-state entry in 0..L-1).")
    if isinstance(premature_layer, (bool, float, str)) or not hasattr(premature_layer, "__index__"):
        raise BadType(f"premature_layer must be one integer entry, got {premature_layer!r}")
    u = get_unembed(model)
    return Dola(model, decoding="dola-static",
                candidates=candidate_layers(u.n_layers, u.arch.tied_embeddings, [int(premature_layer)]),
                relative_top=relative_top, repetition_penalty=repetition_penalty, premature_lens=premature_lens)


def resolve_settings(
    model,
    *,
    decoding: str = "dola",
    dola_layers: str | Sequence[int] = "high",
    premature_layer: int | None = None,
    relative_top: float = 0.1,
    repetition_penalty: float = RECOMMENDED_PENALTY,
    premature_lens: LensLike = "raw",
    method_settings: dict[str, Any] | None = None,
):
    """The scorer of ``decoding`` with these settings, validated against ``model`` (the registry's
    :func:`~earlyexit.core.decoding.make_scorer`; settings a mode does not take are ignored).
    ``method_settings``: further settings of a registered method other than vanilla / DoLa (e.g.
    ``{"evolution_scale": 20}`` for ``"sled"``), passed to its factory with the penalty and the lens.

    Raises ``ValueError`` for an unknown mode, ``relative_top`` outside (0, 1], a repetition penalty
    that is not a finite number > 0, an empty bucket, a static mode without ``premature_layer``, a
    premature layer equal to the mature one; ``IndexError`` for an entry out of range. Warns when DoLa
    runs with a penalty below 1.2.
    """
    check_decoding(decoding)
    if decoding == "vanilla":
        return make_scorer(model, "vanilla", repetition_penalty=repetition_penalty)
    if decoding not in ("dola", "dola-static"):
        return make_scorer(model, decoding, repetition_penalty=repetition_penalty, premature_lens=premature_lens,
                           **(method_settings or {}))
    kw: dict[str, Any] = {"relative_top": relative_top, "repetition_penalty": repetition_penalty,
                          "premature_lens": premature_lens}
    if decoding == "dola":
        kw["dola_layers"] = dola_layers
    else:
        kw["premature_layer"] = premature_layer
    return make_scorer(model, decoding, **kw)


@torch.no_grad()
def generate(
    model: Model,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    *,
    decoding: str = "dola",
    dola_layers: str | Sequence[int] = "high",
    premature_layer: int | None = None,
    relative_top: float = 0.1,
    repetition_penalty: float = RECOMMENDED_PENALTY,
    premature_lens: LensLike = "raw",
    max_new_tokens: int = 50,
    stop: Sequence[str] = ("Q:",),
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    progress: bool = False,
    share_prefix: bool = True,
    ignore_eos: bool = False,
    method_settings: dict[str, Any] | None = None,
) -> list[DolaOutput]:
    """Complete ``prompts`` with vanilla, dynamic-DoLa or static-DoLa decoding.

    Batched (``batch_size`` prompts at a time, left-padded, a shared few-shot primer computed once),
    KV cache reused, each sequence stopping on its own at a stop string or EOS and leaving the batch
    (``ignore_eos`` keeps going past EOS, for benchmarks of equal length). Returns one
    :class:`DolaOutput` per prompt, in order. See :func:`resolve_settings` for the errors.
    """
    scorer = resolve_settings(model, decoding=decoding, dola_layers=dola_layers, premature_layer=premature_layer,
                              relative_top=relative_top, repetition_penalty=repetition_penalty,
                              premature_lens=premature_lens, method_settings=method_settings)
    check_int(max_new_tokens, "max_new_tokens", minimum=1)
    check_int(batch_size, "batch_size", minimum=1)
    stop = check_strings(stop, "stop")
    check_sampling(do_sample, temperature)
    token_lists = encode_prompts(tokenizer, prompts, model, reserve=max_new_tokens)
    pad = pad_id(tokenizer)
    eos = [] if ignore_eos else eos_ids(tokenizer, model)
    pick = None
    if do_sample:
        generator = torch.Generator(device=get_unembed(model).device).manual_seed(seed)  # where the scores are
        pick = lambda scores, step: pick_tokens(scores, True, temperature, generator)  # noqa: E731
    results: list[DolaOutput] = []
    bar = tqdm(total=len(prompts), desc=f"generate ({decoding})", disable=not progress)
    batch_size = min(batch_size, getattr(scorer, "max_batch_size", None) or batch_size)  # batch-1 methods
    for start, group in chunks(token_lists, batch_size):
        tracker = StopTracker(tokenizer, len(group), stop, eos)
        decoded = decode(model, group, scorer, max_new_tokens=max_new_tokens, pad_id=pad, stop=tracker, pick=pick,
                         share_prefix=share_prefix)
        for j, d in enumerate(decoded):
            text, toks = tracker.result(j)
            layers = d.info.get("premature_layer", [None] * len(d.token_ids))
            info = {k: list(v[:len(toks)]) for k, v in d.info.items() if k != "premature_layer"}
            results.append(DolaOutput(prompt=prompts[start + j], text=text, token_ids=toks,
                                      premature_layers=list(layers[:len(toks)]), info=info,
                                      stats=dict(getattr(d, "stats", {}) or {})))
        bar.update(len(group))
    bar.close()
    return results


def _token_lists_from_batch(input_ids: Tensor, attention_mask: Tensor | None) -> list[list[int]]:
    """Rows of a left-padded ``[B, T]`` batch without their padding."""
    if attention_mask is None:
        return input_ids.tolist()
    if (attention_mask[:, -1] == 0).any():
        raise ValueError("custom_generate needs left padding: load the tokenizer with padding_side='left'.")
    return [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask)]


class _TransformersStop:
    """transformers' stopping criteria as the loop's stop rule: keeps the full ``[B, T]`` sequences
    (finished rows padded) and asks the criteria after every step."""

    def __init__(self, input_ids: Tensor, stopping_criteria, pad: int, streamer, max_length: int):
        self.sequences = input_ids
        self.criteria, self.pad, self.streamer, self.max_length = stopping_criteria, pad, streamer, max_length
        self.done = [False] * input_ids.shape[0]
        self.scores: list[Tensor] = []

    def update(self, next_tokens: Sequence[int]) -> list[bool]:
        col = torch.tensor([self.pad if self.done[i] or t < 0 else t for i, t in enumerate(next_tokens)],
                           dtype=self.sequences.dtype, device=self.sequences.device)
        self.sequences = torch.cat([self.sequences, col[:, None]], dim=1)
        if self.streamer is not None:
            self.streamer.put(col.cpu())
        if self.criteria is not None:
            stopped = self.criteria(self.sequences, None).tolist()
            self.done = [d or bool(s) for d, s in zip(self.done, stopped)]
        if self.sequences.shape[1] >= self.max_length:
            self.done = [True] * len(self.done)
        return self.done


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
    premature_lens: LensLike = "raw",
    method_settings: dict[str, Any] | None = None,
    **model_kwargs,
):
    """DoLa through transformers: ``model.generate(**inputs, custom_generate=custom_generate,
    dola_layers="high", repetition_penalty=1.2, max_new_tokens=50)``.

    transformers (5.x) prepares the generation config, the logits processors and the stopping
    criteria, then calls this function in place of its own decoding loop; the arguments that are not
    in its ``_sample`` signature (``decoding``, ``dola_layers``, ``premature_layer``, ``relative_top``,
    ``premature_lens``, ``method_settings``) are passed through to here. ``decoding`` defaults to
    ``"dola-static"`` when ``premature_layer`` is given, else ``"dola"``; any method of the registry works
    (``decoding="sled", method_settings={"evolution_scale": 20}``).

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
    scorer = resolve_settings(model, decoding=decoding, dola_layers=dola_layers if dola_layers is not None else "high",
                              premature_layer=premature_layer, relative_top=relative_top,
                              repetition_penalty=penalty, premature_lens=premature_lens,
                              method_settings=method_settings)
    processors = LogitsProcessorList(
        [p for p in (logits_processor or []) if not isinstance(p, RepetitionPenaltyLogitsProcessor)])
    max_length = int(cfg.max_length)
    T0 = input_ids.shape[1]
    if max_length <= T0:
        raise ValueError(f"max_length {max_length} leaves no room after the {T0}-token prompt.")
    token_lists = _token_lists_from_batch(input_ids, model_kwargs.get("attention_mask"))
    pad_tensor = getattr(cfg, "_pad_token_tensor", None)
    pad = int(pad_tensor) if pad_tensor is not None else int(cfg.pad_token_id or 0)
    stop = _TransformersStop(input_ids, stopping_criteria, pad, streamer, max_length)
    keep_scores = bool(cfg.return_dict_in_generate and cfg.output_scores)

    def pick(scores: Tensor, step: Step) -> Tensor:
        rows = torch.as_tensor(step.rows, device=stop.sequences.device)
        scores = processors(stop.sequences[rows].to(scores.device), scores)  # a sharded model: the head's device
        if keep_scores:
            full = scores.new_full((input_ids.shape[0], scores.shape[1]), float("-inf"))
            full[rows.to(scores.device)] = scores
            stop.scores.append(full)
        return pick_tokens(scores, bool(cfg.do_sample), 1.0, None)  # temperature is a processor

    decode(model, token_lists, scorer, max_new_tokens=max_length - T0, pad_id=pad, stop=stop, pick=pick)
    if streamer is not None:
        streamer.end()
    if cfg.return_dict_in_generate:
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(sequences=stop.sequences,
                                         scores=tuple(stop.scores) if stop.scores else None)
    return stop.sequences
