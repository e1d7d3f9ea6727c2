"""Lenses: how a hidden-state entry is read as a distribution over the vocabulary.

A :class:`Lens` takes hidden states of entries ``0..L`` (``output_hidden_states`` numbering: 0 = the
embeddings, k = after decoder layer k, L = the model's own normed output) and returns float32 logits,
always through the model's :class:`~earlyexit.core.unembed.Unembed` (final norm → head → logit
post-processing). Every consumer — :func:`~earlyexit.core.lens.lens_stats`, generation, probe features,
DoLa's premature logits, MC scoring — takes a ``Lens`` (or one of the shortcut names in
:data:`LENS_NAMES`, resolved by :func:`resolve_lens` and nowhere else).

>>> import torch
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)).eval()
>>> lens = resolve_lens(model, "normed")
>>> lens.name, lens.n_layers
('normed', 2)
>>> lens.logits(torch.zeros(3, 5, 16), [0, 1, 2]).shape        # [E, n, d] → [E, n, V]
torch.Size([3, 5, 64])
>>> resolve_lens(model, "raw").needs_norm(1)
False
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Sequence, Union

from torch import Tensor, nn

if TYPE_CHECKING:  # the types callers pass: any transformers causal LM and its tokenizer
    from transformers import PreTrainedModel as Model
    from transformers import PreTrainedTokenizerBase as Tokenizer

from earlyexit.core.unembed import Unembed

LensName = Literal["normed", "raw", "tuned"]
LENS_NAMES: tuple[str, ...] = ("normed", "raw", "tuned")


class Lens(nn.Module):
    """Hidden-state entry → float32 logits through :class:`Unembed`.

    Subclasses say whether an entry ``< L`` gets the final norm (:meth:`needs_norm`) and may map the
    hidden state first (:meth:`transform_hidden`, the identity here; a translator in the tuned lens).
    Entry L is the model's own output: it is never transformed or normed again, so every lens reads
    the model's logits there.
    """

    name: str = "lens"
    _transforms = False  # True where transform_hidden is not the identity

    def __init__(self, unembed: Unembed):
        super().__init__()
        self.unembed = unembed

    @property
    def n_layers(self) -> int:
        return self.unembed.n_layers

    @property
    def vocab_size(self) -> int:
        return self.unembed.vocab_size

    def needs_norm(self, entry: int) -> bool:
        """Whether the final norm is applied to hidden-state ``entry`` (0..L)."""
        raise NotImplementedError

    def transform_hidden(self, h: Tensor, idx: int) -> Tensor:
        """``h`` ``[..., d]`` of entry ``idx`` → what the final norm (or the head) reads ``[..., d]``."""
        return h

    def head_inputs(self, hidden: Tensor, entries: Sequence[int]) -> Tensor:
        """hidden ``[E, n, d]`` of ``entries`` → ``[E, n, d]`` the head reads (transformed, normed where
        :meth:`needs_norm`). ``hidden`` itself is left as is."""
        if hidden.dim() != 3 or hidden.shape[0] != len(entries):
            raise ValueError(f"hidden must be [E={len(entries)}, n, d], got {tuple(hidden.shape)}")
        L = self.n_layers
        moved = [i for i, e in enumerate(entries) if e < L and self._transforms]
        if moved:
            hidden = hidden.clone()
            for i in moved:
                hidden[i] = self.transform_hidden(hidden[i], entries[i])
        norm_idx = [i for i, e in enumerate(entries) if self.needs_norm(e)]
        if len(norm_idx) == len(entries):
            return self.unembed.final_norm(hidden)
        if norm_idx:
            if not moved:
                hidden = hidden.clone()
            # .to: a final norm that sits on another device than the head returns there
            hidden[norm_idx] = self.unembed.final_norm(hidden[norm_idx]).to(hidden.device, hidden.dtype)
        return hidden

    def logits(self, hidden: Tensor, entries: Sequence[int], out: Tensor | None = None,
               transposed: bool = False) -> Tensor:
        """hidden ``[E, n, d]`` → float32 logits ``[E, n, V]``, all entries through the head in one
        product, written into ``out`` when given (see :meth:`Unembed.forward`). ``hidden`` goes to the head's
        device first, once for all entries (a sharded model's layers sit on other devices)."""
        dev = self.unembed.device
        if hidden.device != dev:
            hidden = hidden.to(dev)
        return self.unembed(self.head_inputs(hidden, list(entries)), normed=False, out=out, transposed=transposed)

    def forward(self, h: Tensor, idx: int) -> Tensor:
        """``h`` ``[..., d]`` of entry ``idx`` → logits ``[..., V]`` (the tuned-lens call convention)."""
        flat = h.reshape(1, -1, h.shape[-1])
        return self.logits(flat, [idx]).view(*h.shape[:-1], self.vocab_size)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, n_layers={self.n_layers}"


class LogitLens(Lens):
    """The logit lens done right (the default): final norm, head and post-processing on every entry."""

    name = "normed"

    def needs_norm(self, entry: int) -> bool:
        return entry < self.n_layers


class RawLens(Lens):
    """The head without the final norm (the original study's and DoLa's published lens)."""

    name = "raw"

    def needs_norm(self, entry: int) -> bool:
        return False


LensLike = Union[str, Lens]


def get_unembed(model) -> Unembed:
    """The model's :class:`Unembed`, built once and kept on the model."""
    unembed = getattr(model, "_earlyexit_unembed", None)
    if unembed is None:
        unembed = Unembed(model, getattr(model, "earlyexit_arch", None))
        object.__setattr__(model, "_earlyexit_unembed", unembed)
    return unembed


def lens_record(lens: Lens, key: str = "lens") -> dict[str, str]:
    """What a results file or a cache key records of a lens: ``{key: name}``, and for a trained lens (one
    with a ``fingerprint()``, the tuned lens) ``{key}_fingerprint``: the sha256 of its parameters, so that
    results of a retrained lens are never taken for the old one's.

    >>> from earlyexit import tiny_model
    >>> lens_record(resolve_lens(tiny_model("llama"), "raw"), "premature_lens")
    {'premature_lens': 'raw'}
    """
    out = {key: lens.name}
    if callable(getattr(lens, "fingerprint", None)):
        out[f"{key}_fingerprint"] = lens.fingerprint()
    return out


def resolve_lens(model, lens: LensLike = "normed") -> Lens:
    """The one place a lens name becomes a :class:`Lens`: ``"normed"`` → :class:`LogitLens`, ``"raw"`` →
    :class:`RawLens`, ``"tuned"`` → the model's trained tuned lens. A ``Lens`` passes through after a
    check that it was made for this model."""
    unembed = get_unembed(model)
    if isinstance(lens, Lens):
        if lens.unembed.head is not unembed.head:
            raise ValueError(f"The {lens.name!r} lens was built for another model: build it from this one "
                             "(e.g. resolve_lens(model, name)).")
        return lens
    if not isinstance(lens, str) or lens not in LENS_NAMES:
        from earlyexit.core.errors import BadInput

        raise BadInput(f"Unknown lens {lens!r}; use one of {LENS_NAMES} or a Lens object.")
    if lens == "tuned":
        from earlyexit.core.tuned_lens import tuned_lens_for  # trains on first use, then cached

        return tuned_lens_for(model)
    lenses = getattr(model, "_earlyexit_lenses", None)
    if lenses is None:
        lenses = {}
        object.__setattr__(model, "_earlyexit_lenses", lenses)
    if lens not in lenses:
        lenses[lens] = (LogitLens if lens == "normed" else RawLens)(unembed)
    return lenses[lens]


def check_entries(n_layers: int, entries: Sequence[int] | None, *, final: bool = True,
                  what: str = "Layer") -> list[int]:
    """Validate hidden-state entries against ``0..L`` (``0..L-1`` with ``final=False``, for premature
    layers); ``None`` → all of them. The one range check every consumer uses.

    >>> check_entries(4, [0, 4])
    [0, 4]
    >>> check_entries(4, [4], final=False)
    Traceback (most recent call last):
    ...
    earlyexit.core.errors.BadInput: Layer 4 is the mature (final) layer: pick entries in 0..3.
    """
    from earlyexit.core.errors import BadInput, BadType, OutOfRange

    top = n_layers if final else n_layers - 1
    if entries is None:
        return list(range(top + 1))
    if isinstance(entries, (str, bytes)) or not hasattr(entries, "__iter__"):
        raise BadType(f"{what} entries must be a list of integers, got {entries!r}")
    out = []
    for x in entries:
        if isinstance(x, (bool, float)) or not hasattr(x, "__index__"):  # ints, numpy / torch integers
            raise BadType(f"{what} entries must be integers (a float such as 1.5 is not rounded), got {x!r}")
        out.append(int(x))
    if not out:
        raise BadInput(f"{what} list is empty: pass None for all layers or a list of entries in 0..{top}.")
    for x in out:
        if not final and x == n_layers:
            raise BadInput(f"{what} {x} is the mature (final) layer: pick entries in 0..{top}.")
        if not 0 <= x <= top:
            raise OutOfRange(f"{what} {x} out of range: this model has {n_layers} decoder layers, so entries are "
                             f"0..{top} (0 = embeddings{', L = the model output' if final else ''}).")
    return out
