"""Shared fixtures: tiny random models built from configs, and the real embedded SmolLM2."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("EARLYEXIT_DATA_DIR", REPO.parent / "shared" / "data"))
os.environ["EARLYEXIT_DATA_DIR"] = str(DATA_DIR)

VOCAB = 49152  # tiny models share SmolLM2's tokenizer, so their vocabulary matches it


def _tiny(kind: str):
    from earlyexit.core.tiny import tiny_model

    return tiny_model(kind, vocab_size=VOCAB)


@pytest.fixture(scope="session")
def smollm2():
    from earlyexit import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer, without loading the model (the fast tier's tiny models share it)."""
    from earlyexit.core.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


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
