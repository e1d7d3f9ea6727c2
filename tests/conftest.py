"""Shared fixtures: tiny random models built from configs, and the real embedded SmolLM2."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("EARLYEXIT_DATA_DIR", REPO.parent / "shared" / "data"))
os.environ["EARLYEXIT_DATA_DIR"] = str(DATA_DIR)

VOCAB = 49152  # tiny models share SmolLM2's tokenizer, so their vocabulary matches it


def _tiny(kind: str):
    from transformers import (Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM)

    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
    elif kind == "gemma":
        cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                           final_logit_softcapping=5.0, attn_logit_softcapping=50.0, sliding_window=64)
        model = Gemma2ForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=256, tie_word_embeddings=True)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(kind)
    # random norms (weights ≠ 1) so normed and raw lenses differ
    for name, p in model.named_parameters():
        if "norm" in name or "ln_" in name:
            torch.nn.init.normal_(p, mean=1.0, std=0.3)
    model.earlyexit_name = f"tiny-{kind}"
    return model.eval()


@pytest.fixture(scope="session")
def smollm2():
    from earlyexit import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    return smollm2[1]


@pytest.fixture(scope="session", params=["llama", "gemma", "gpt2"])
def tiny(request, tokenizer):
    """``(model, tokenizer)`` for each tiny architecture."""
    return _tiny(request.param), tokenizer


@pytest.fixture(scope="session")
def tiny_llama(tokenizer):
    return _tiny("llama"), tokenizer


@pytest.fixture(scope="session")
def data_dir():
    return DATA_DIR
