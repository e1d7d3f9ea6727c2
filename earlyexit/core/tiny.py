"""Tiny random models built from configs, one per architecture family the project maps: for tests,
doctests and examples that must run in a second on a laptop.

>>> model = tiny_model("gemma")           # Gemma-style: soft-capped logits, sliding-window attention
>>> model.config.final_logit_softcapping, model.config.num_hidden_layers
(5.0, 4)
"""
from __future__ import annotations

from typing import Literal

import torch

TinyKind = Literal["llama", "gemma", "gpt2"]
TINY_KINDS: tuple[str, ...] = ("llama", "gemma", "gpt2")
SMOLLM2_VOCAB = 49152  # the default: tiny models share SmolLM2's tokenizer


def tiny_model(kind: TinyKind = "llama", *, vocab_size: int = SMOLLM2_VOCAB, n_layers: int = 4, seed: int = 0):
    """A random ``*ForCausalLM`` in eval mode: ``"llama"`` (untied head), ``"gemma"`` (Gemma-2 config with
    final-logit soft-capping 5.0) or ``"gpt2"`` (tied embeddings); hidden size 32. Norm weights are random
    (≠ 1) so that the normed and the raw lens differ."""
    from transformers import (Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM)

    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False))
    elif kind == "gemma":
        model = Gemma2ForCausalLM(Gemma2Config(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
            final_logit_softcapping=5.0, attn_logit_softcapping=50.0, sliding_window=64))
    elif kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=n_layers, n_head=4,
                                           n_positions=256, tie_word_embeddings=True))
    else:
        raise ValueError(f"Unknown tiny model kind {kind!r}: use one of {TINY_KINDS}.")
    for name, p in model.named_parameters():
        if "norm" in name or "ln_" in name:
            torch.nn.init.normal_(p, mean=1.0, std=0.3)
    model.earlyexit_name = f"tiny-{kind}"
    return model.eval()
