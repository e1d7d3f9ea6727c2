"""Where each architecture keeps its decoder layers, final norm and output head.

A declarative map, resolved from ``config.model_type``::

    >>> from earlyexit.core.arch import ARCHITECTURES
    >>> ARCHITECTURES["llama"].final_norm
    'model.norm'

Logit post-processing is described by config attribute names, so a model's own
values (e.g. Gemma-2's ``final_logit_softcapping=30.0``) are read at resolve time.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Attribute paths (dotted, from the ``*ForCausalLM`` module) and logit post-processing.

    ``softcap_attr``: config attribute holding the final soft-capping value c
    (logits ← c·tanh(logits / c)). ``scale_attr``: config attribute of a factor that multiplies
    the logits; ``divide_attr``: one that divides them (Granite's ``logits_scaling``).
    """

    layers: str
    final_norm: str
    head: str
    softcap_attr: str | None = None
    scale_attr: str | None = None
    divide_attr: str | None = None


_LLAMA_LIKE = ArchSpec(layers="model.layers", final_norm="model.norm", head="lm_head")
_SOFTCAPPED = replace(_LLAMA_LIKE, softcap_attr="final_logit_softcapping")

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "smollm3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _SOFTCAPPED,
    "gemma3_text": _SOFTCAPPED,
    "cohere": replace(_LLAMA_LIKE, scale_attr="logit_scale"),
    "granite": replace(_LLAMA_LIKE, divide_attr="logits_scaling"),
    "gpt2": ArchSpec(layers="transformer.h", final_norm="transformer.ln_f", head="lm_head"),
    "gpt_neox": ArchSpec(layers="gpt_neox.layers", final_norm="gpt_neox.final_layer_norm", head="embed_out"),
}


@dataclass(frozen=True)
class ResolvedArch:
    """The modules and post-processing constants of one loaded model."""

    layers: nn.ModuleList
    final_norm: nn.Module
    head: nn.Module
    softcap: float | None
    scale: float | None
    n_layers: int
    tied_embeddings: bool


def _get(module: nn.Module, path: str) -> nn.Module:
    obj = module
    for part in path.split("."):
        if not hasattr(obj, part):
            raise AttributeError(path)
        obj = getattr(obj, part)
    return obj


def resolve_arch(model: nn.Module, override: ArchSpec | None = None) -> ResolvedArch:
    """Find layers, final norm, head and logit post-processing of ``model``.

    ``override`` replaces the map entry (for architectures not listed in :data:`ARCHITECTURES`).

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    ...                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
    >>> resolve_arch(LlamaForCausalLM(cfg)).n_layers
    2
    """
    config = model.config
    model_type = getattr(config, "model_type", None)
    spec = override or ARCHITECTURES.get(model_type)
    if spec is None:
        raise ValueError(
            f"earlyexit does not know where architecture {model_type!r} keeps its layers, final norm and "
            f"head. Known: {sorted(ARCHITECTURES)}. Pass arch=ArchSpec(layers=..., final_norm=..., head=...)."
        )
    try:
        layers = _get(model, spec.layers)
        norm = _get(model, spec.final_norm)
        head = _get(model, spec.head)
    except AttributeError as err:
        raise ValueError(
            f"Architecture {model_type!r}: no module at {err.args[0]!r} in {type(model).__name__}. "
            "Pass arch=ArchSpec(...) with the right attribute paths."
        ) from None
    scale = None
    if spec.scale_attr and getattr(config, spec.scale_attr, None) is not None:
        scale = float(getattr(config, spec.scale_attr))
    if spec.divide_attr and getattr(config, spec.divide_attr, None) is not None:
        scale = 1.0 / float(getattr(config, spec.divide_attr))
    softcap = getattr(config, spec.softcap_attr, None) if spec.softcap_attr else None
    tied = bool(getattr(config, "tie_word_embeddings", False))
    get_text = getattr(config, "get_text_config", None)
    if get_text is not None:
        tied = bool(getattr(get_text(), "tie_word_embeddings", tied))
    return ResolvedArch(
        layers=layers,
        final_norm=norm,
        head=head,
        softcap=float(softcap) if softcap else None,
        scale=scale,
        n_layers=len(layers),
        tied_embeddings=tied,
    )
