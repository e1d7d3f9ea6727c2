"""The one decoding loop: prefill → step → a *scorer* picks the next token → *observers* record → finished
rows leave the batch.

Every decoding method (greedy, DoLa, …) is a :class:`Scorer` registered in :data:`DECODERS` under its
name; the CLI, open-ended generation, MC scoring and ``custom_generate`` all look methods up there
(:func:`make_scorer`), so a new method is one new scorer. Per generated token, observers
(:class:`LensObserver`) record what they need from the step's hidden states; what a scorer reports per
token (e.g. DoLa's premature layer) is kept in :attr:`Decoded.info`.

>>> import torch
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)).eval()
>>> out = decode(model, [[1, 2, 3], [4, 5]], make_scorer(model, "vanilla"), max_new_tokens=4, pad_id=0)
>>> [len(d.token_ids) for d in out]
[4, 4]
>>> ref = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
>>> ref[0, 3:].tolist() == out[0].token_ids
True
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol, Sequence

import torch
from torch import Tensor

from earlyexit.core.checks import check_int
from earlyexit.core.errors import BadInput
from earlyexit.core.lenses import LensLike, check_entries, get_unembed, resolve_lens

if TYPE_CHECKING:
    from earlyexit.core.lenses import Model, Tokenizer

from earlyexit.core.prefix import prefill
from earlyexit.core.stats import STEP_CHUNK_BYTES, Workspace, chunk_rows, layer_stats


# --- what a step shows ----------------------------------------------------------------------------

class Step:
    """One decoding step of the rows still running.

    rows: their indices in the batch; hidden(e): ``[b, d]`` last-position hidden state of entry ``e``
    (entry L is the model's normed output); logits(): the model's final logits ``[b, V]`` (float32,
    computed once when first asked); seen ``[b, T]``: ids each row has seen (prompt and output so far,
    right-filled with its own first id, never padding), for repetition penalties.
    """

    def __init__(self, index: int, rows: list[int], hidden: dict[int, Tensor], logits: Tensor | None,
                 seen: Tensor, unembed):
        self.index, self.rows, self.seen = index, rows, seen
        self._hidden, self._logits, self._unembed = hidden, logits, unembed

    def hidden(self, entry: int) -> Tensor:
        if entry not in self._hidden:
            raise KeyError(f"hidden state of entry {entry} was not requested by the scorer or an observer")
        return self._hidden[entry]

    def logits(self) -> Tensor:
        if self._logits is None:
            self._logits = self._unembed(self._hidden[self._unembed.n_layers], normed=False)
        return self._logits


class Scorer(Protocol):
    """A decoding method: next-token scores ``[b, V]`` from a :class:`Step`.

    ``entries``: hidden-state entries it reads (``()``: the final logits only); ``repetition_penalty``:
    applied by the loop to its scores (transformers' rule, over each row's own ids); ``settings()``: what a
    results file records. ``scores`` returns the scores and per-row facts to keep per token (name →
    ``[b]`` tensor), e.g. ``{"premature_layer": ...}``.
    """

    name: str
    entries: tuple[int, ...]
    repetition_penalty: float

    def scores(self, step: Step) -> tuple[Tensor, dict[str, Tensor]]: ...

    def settings(self) -> dict[str, Any]: ...


class Observer(Protocol):
    """Records per-token data: ``observe(step, tokens)`` with the tokens ``[b]`` chosen for ``step.rows``."""

    entries: tuple[int, ...]

    def observe(self, step: Step, tokens: Tensor) -> None: ...

    def finish(self) -> None: ...


# --- the registry ---------------------------------------------------------------------------------

DECODERS: dict[str, Callable[..., Scorer]] = {}
# modules that register further methods when imported
METHOD_MODULES = ("earlyexit.methods.dola", "earlyexit.methods.sled", "earlyexit.methods.early_exit")


def register(name: str):
    """Class decorator: ``@register("dola")`` makes the scorer available under ``name``."""
    def wrap(factory):
        DECODERS[name] = factory
        return factory
    return wrap


def decoding_names() -> tuple[str, ...]:
    for mod in METHOD_MODULES:
        importlib.import_module(mod)
    return tuple(DECODERS)


def check_decoding(decoding: str) -> str:
    """``decoding`` if it is a registered method, else a ``ValueError`` naming the methods."""
    names = decoding_names()
    if not isinstance(decoding, str) or decoding not in DECODERS:
        raise BadInput(f"Unknown decoding mode {decoding!r}: use one of {names}.")
    return decoding


def default_penalty(decoding: str) -> float:
    """The repetition penalty a method uses unless told otherwise (1.0 greedy, 1.2 DoLa)."""
    import inspect

    param = inspect.signature(DECODERS[check_decoding(decoding)]).parameters.get("repetition_penalty")
    return float(param.default) if param is not None and param.default is not inspect.Parameter.empty else 1.0


def make_scorer(model, decoding: str, **settings: Any) -> Scorer:
    """The scorer of ``decoding`` for ``model``, its settings validated (the one place they are)."""
    return DECODERS[check_decoding(decoding)](model, **settings)


def check_penalty(repetition_penalty: float) -> float:
    if isinstance(repetition_penalty, bool) or not isinstance(repetition_penalty, (int, float)) \
            or not math.isfinite(repetition_penalty) or not repetition_penalty > 0:
        raise BadInput(f"repetition_penalty must be a finite number > 0 (1.0 = off), got {repetition_penalty!r}")
    return float(repetition_penalty)


def repetition_penalty(scores: Tensor, seen_ids: Tensor, penalty: float) -> Tensor:
    """transformers' ``RepetitionPenaltyLogitsProcessor`` on ``scores`` ``[B, V]``: every id in
    ``seen_ids`` ``[B, T]`` (prompt and output so far) has its score divided by ``penalty`` if positive,
    multiplied if negative."""
    check_penalty(penalty)
    if penalty == 1.0:
        return scores
    picked = scores.gather(1, seen_ids)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, seen_ids, picked)


@register("vanilla")
class Greedy:
    """The model's own logits (greedy argmax, or sampling), with an optional repetition penalty."""

    name = "vanilla"
    entries: tuple[int, ...] = ()

    def __init__(self, model, *, repetition_penalty: float = 1.0):
        self.repetition_penalty = check_penalty(repetition_penalty)

    def scores(self, step: Step) -> tuple[Tensor, dict[str, Tensor]]:
        return step.logits(), {}

    def settings(self) -> dict[str, Any]:
        return {"decoding": self.name, "repetition_penalty": self.repetition_penalty}


# --- token choice ---------------------------------------------------------------------------------

def pick_tokens(scores: Tensor, do_sample: bool = False, temperature: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """Greedy argmax, or a sample from softmax(scores / temperature): ``[B, V]`` → ``[B]``."""
    if not do_sample:
        return scores.argmax(-1)
    probs = torch.softmax(scores / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def check_sampling(do_sample: bool, temperature: float) -> None:
    if do_sample and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                      or not (math.isfinite(temperature) and temperature > 0)):
        raise BadInput(f"temperature must be a finite number > 0 when sampling, got {temperature!r}")


# --- the state of one batch -----------------------------------------------------------------------

def seen_ids(token_lists: Sequence[Sequence[int]], device=None) -> Tensor:
    """``[B, T]`` ids each row has really seen, for the repetition penalty. Rows are right-filled
    with their own first id, never with padding (a duplicate id changes nothing)."""
    width = max(len(t) for t in token_lists)
    out = torch.empty((len(token_lists), width), dtype=torch.long)
    for i, toks in enumerate(token_lists):
        out[i, :len(toks)] = torch.as_tensor(list(toks), dtype=torch.long)
        out[i, len(toks):] = int(toks[0])
    return out.to(device) if device is not None else out


class DecodeState:
    """The KV-cached decoding state of one batch: prefill once (a shared prefix once), then one token
    per step; rows that finish are dropped (:meth:`keep`) and cost nothing afterwards."""

    def __init__(self, model, token_lists: Sequence[Sequence[int]], pad_id: int, entries: Iterable[int] = (),
                 *, share_prefix: bool = True, reserve: int = 0):
        self.model = model
        self.unembed = get_unembed(model)
        self.entries = sorted(set(entries))
        self.state = prefill(model, token_lists, pad_id, share_prefix=share_prefix,
                             output_hidden_states=bool(self.entries), reserve=reserve)
        self.rows = list(range(len(token_lists)))
        # a sharded model's layers return their hidden states on their own devices: every state a step
        # keeps goes to the head's device once here (and once per step in advance), never per lens call
        self.device = self.unembed.device
        self.seen = seen_ids(token_lists, self.device)
        self._no_padding = bool(self.state.attention_mask.all())
        hs = self.state.hidden_last
        self._hidden = {e: hs[e].to(self.device) for e in self.entries} if hs is not None else {}
        self._logits: Tensor | None = self.state.logits.to(self.device)
        self.state.hidden_last = None
        self.index = 0

    def step(self) -> Step:
        return Step(self.index, self.rows, self._hidden, self._logits, self.seen, self.unembed)

    def keep(self, keep: Sequence[int]) -> None:
        """Keep only the rows at positions ``keep`` of :attr:`rows`."""
        if len(keep) == len(self.rows):
            return
        self.state.keep_rows(keep)
        idx = torch.as_tensor(list(keep), dtype=torch.long, device=self.seen.device)
        self.seen = self.seen[idx]
        self._hidden = {e: h[idx] for e, h in self._hidden.items()}
        if self._logits is not None:
            self._logits = self._logits[idx]
        self.rows = [self.rows[k] for k in keep]

    @torch.no_grad()
    def advance(self, tokens: Tensor) -> None:
        """Feed ``tokens`` ``[b]`` (one per running row); the next :meth:`step` is for the position after them."""
        self.seen = torch.cat([self.seen, tokens[:, None].to(self.seen.device)], dim=1)
        inputs = self.state.step_inputs(tokens.to(self.state.attention_mask.device))
        if self._no_padding:
            inputs["attention_mask"] = None  # as transformers does: the plain causal path, no mask built
        out = self.model.base_model(**inputs, output_hidden_states=bool(self.entries))
        dev = self.device
        if self.entries:
            hs = out.hidden_states
            self._hidden = {e: hs[e][:, -1].to(dev) for e in self.entries}
        else:
            self._hidden = {self.unembed.n_layers: out.last_hidden_state[:, -1].to(dev)}
        self._logits = None  # from entry L when asked
        self.state.cache = out.past_key_values
        self.index += 1


# --- the loop -------------------------------------------------------------------------------------

@dataclass
class Decoded:
    """One row's new tokens (``token_ids``, before any stop rule cuts them) and, per token, what the
    scorer reported (``info[name]``: one value per token); ``stats``: per-row counts of a method with its
    own loop (e.g. drafts proposed and accepted)."""

    token_ids: list[int] = field(default_factory=list)
    info: dict[str, list] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


class StopRule(Protocol):
    """``update(tokens)`` with one token per batch row (``-1`` for rows already finished) → done flags."""

    def update(self, next_tokens: Sequence[int]) -> list[bool]: ...


class _Length:
    def __init__(self, B: int):
        self.done = [False] * B

    def update(self, next_tokens: Sequence[int]) -> list[bool]:
        return self.done


@torch.no_grad()
def decode(
    model: Model,
    token_lists: Sequence[Sequence[int]],
    scorer: Scorer,
    *,
    max_new_tokens: int,
    pad_id: int,
    observers: Sequence[Observer] = (),
    stop: StopRule | None = None,
    pick: Callable[[Tensor, Step], Tensor] | None = None,
    share_prefix: bool = True,
) -> list[Decoded]:
    """Decode one batch of ``token_lists``: at most ``max_new_tokens`` per row; a row finishes when
    ``stop`` says so (e.g. :class:`~earlyexit.core.batching.StopTracker`: stop strings, EOS) and leaves
    the batch. ``pick(scores, step)`` chooses the tokens (default greedy argmax). A finished row's last
    token is the one that finished it (EOS or the end of a stop string) and is in ``token_ids``.
    """
    check_int(max_new_tokens, "max_new_tokens", minimum=1)
    own_loop = getattr(scorer, "decode", None)
    if own_loop is not None:  # a method with its own loop (layers run one by one, several tokens per pass)
        return own_loop(model, token_lists, max_new_tokens=max_new_tokens, pad_id=pad_id, observers=observers,
                        stop=stop, pick=pick, share_prefix=share_prefix)
    B = len(token_lists)
    L = get_unembed(model).n_layers
    entries = set(scorer.entries)
    for obs in observers:
        entries |= set(obs.entries)
    if entries:
        entries.add(L)
    state = DecodeState(model, token_lists, pad_id, entries, share_prefix=share_prefix, reserve=max_new_tokens)
    stop = stop if stop is not None else _Length(B)
    out = [Decoded() for _ in range(B)]
    # inference mode, not just no_grad: a few % less per-op overhead; nothing made here outlives the loop
    with torch.inference_mode():
        for i in range(max_new_tokens):
            step = state.step()
            scores, info = scorer.scores(step)
            if scorer.repetition_penalty != 1.0:
                scores = repetition_penalty(scores, step.seen, scorer.repetition_penalty)
            tokens = pick(scores, step) if pick is not None else scores.argmax(-1)
            for obs in observers:
                obs.observe(step, tokens)
            full = [-1] * B
            tok_list = tokens.tolist()
            info_lists = {k: v.tolist() for k, v in info.items()}
            for k, row in enumerate(step.rows):
                full[row] = tok_list[k]
                out[row].token_ids.append(tok_list[k])
                for name, vals in info_lists.items():
                    out[row].info.setdefault(name, []).append(vals[k])
            done = stop.update(full)
            keep = [k for k, row in enumerate(step.rows) if not done[row]]
            if not keep or i == max_new_tokens - 1:
                break
            state.keep(keep)
            state.advance(tokens[keep] if len(keep) < len(step.rows) else tokens)
        for obs in observers:
            obs.finish()
    return out


# --- observers ------------------------------------------------------------------------------------

LENS_FIELDS = ("entropy", "top_ids", "top_probs", "token_probs", "token_ranks", "kl_to_final")


class LensObserver:
    """Lens statistics of every generated token, at the position that predicted it.

    The statistics of a token do not influence decoding, so they are computed for many tokens at once
    (from several steps and rows): the head's product then runs on enough rows to be efficient, where
    a step with one or two unfinished sequences would give it 31–62. Results go into per-batch tensors
    ``out[name]`` ``[E, B, T]`` (``[E, B, T, k]`` for top-k), NaN / -1 where no token was generated.
    """

    def __init__(self, model, entries: Sequence[int] | None, lens: LensLike, top_k: int, batch_size: int,
                 max_new_tokens: int, workspace: Workspace | None = None):
        self.lens = resolve_lens(model, lens)
        L = self.lens.n_layers
        self.layers = check_entries(L, entries)
        self.entries = tuple(self.layers)
        self.top_k = top_k
        self.flush_rows = chunk_rows(self.lens.vocab_size, len(self.layers), STEP_CHUNK_BYTES)
        self.workspace = workspace if workspace is not None else Workspace()
        E, B, T = len(self.layers), batch_size, max_new_tokens
        self.out = {
            "entropy": torch.full((E, B, T), float("nan")),
            "top_ids": torch.full((E, B, T, top_k), -1, dtype=torch.long),
            "top_probs": torch.full((E, B, T, top_k), float("nan")),
            "token_probs": torch.full((E, B, T), float("nan")),
            "token_ranks": torch.full((E, B, T), -1, dtype=torch.long),
            "kl_to_final": torch.full((E, B, T), float("nan")),
        }
        self._pending: list[tuple[Tensor, Tensor, Tensor, Tensor, int]] = []
        self._n = 0

    def observe(self, step: Step, tokens: Tensor) -> None:
        hidden = torch.stack([step.hidden(e) for e in self.layers])  # [E, b, d]
        self._pending.append((hidden, tokens, step.logits(), torch.as_tensor(step.rows), step.index))
        self._n += len(step.rows)
        if self._n >= self.flush_rows:
            self.finish()

    def finish(self) -> None:
        if not self._pending:
            return
        hidden = torch.cat([p[0] for p in self._pending], dim=1)
        tokens = torch.cat([p[1] for p in self._pending])
        final_logits = torch.cat([p[2] for p in self._pending])
        rows = torch.cat([p[3] for p in self._pending])
        steps = torch.cat([torch.full((len(p[3]),), p[4]) for p in self._pending])
        self._pending, self._n = [], 0
        st = layer_stats(self.lens, hidden, self.layers, top_k=self.top_k, targets=tokens.unsqueeze(1),
                         final_logits=final_logits, chunk_bytes=STEP_CHUNK_BYTES, workspace=self.workspace)
        got = {"entropy": st.entropy, "top_ids": st.top_ids, "top_probs": st.top_probs,
               "token_probs": st.target_probs[..., 0], "token_ranks": st.target_ranks[..., 0],
               "kl_to_final": st.kl_to_final}
        for name, t in got.items():
            self.out[name][:, rows, steps] = t.cpu()

    def row(self, j: int, n: int) -> dict[str, Tensor]:
        """The statistics of batch row ``j``'s first ``n`` tokens: name → ``[E, n(, k)]``."""
        return {k: self.out[k][:, j, :n].clone() for k in LENS_FIELDS}
