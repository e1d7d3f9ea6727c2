"""Shared fixtures: tiny random models built from configs, and the real embedded SmolLM2."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# MKL (torch's CPU BLAS on x86) may round a product differently with its arrays' alignment in memory, which
# differs from process to process: seen on an AMD EPYC, where the multi-process tests' bit-for-bit comparison
# of launched workers with an in-process reference failed by one ulp in one cell. Conditional numerical
# reproducibility (read by MKL when torch first calls it, so set before; inherited by the launched workers)
# removes that.
os.environ.setdefault("MKL_CBWR", "AUTO")
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


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tokenizer):
    """The tiny Llama saved as a model folder, so that the command line can load it (``--model <folder>``)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    _tiny("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def store_tuned_lens(model, seed: int = 1, scale: float = 0.3):
    """A tuned lens with random (non-zero, so ≠ the logit lens) translators, saved where ``lens="tuned"``
    (and ``premature_lens="tuned"``) reads it for ``model``."""
    import torch

    from earlyexit.core.tuned_lens import TunedLens, store_dir

    lens = TunedLens.from_model(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lens.translator_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    lens.save(store_dir(model))
    return lens


# --- the reference loops' shared pieces (plain, uncached forwards; what the package's paths are tested against)

def penalise(scores, ids, penalty: float):
    """transformers' repetition penalty on a score vector ``[V]``, in place, one id at a time over the set of
    ``ids``: the rule every reference decoding loop applies."""
    for t in set(ids):
        s = scores[t]
        scores[t] = s * penalty if s < 0 else s / penalty
    return scores


def answer_forwards(model, tok, question, layers):
    """Per answer of an MC ``question``: one plain forward of prompt + answer (no cache, no shared primer) →
    ``(final, premature, targets)``: the head's logits at the answer positions ``[n, V]``, the RAW head's at
    ``layers`` ``[N, n, V]`` (float32) and the answer's ids ``[n]``."""
    import torch

    from earlyexit.core.lenses import get_unembed
    from earlyexit.studies.prompts import truthfulqa_prompt

    u = get_unembed(model)
    prompt = truthfulqa_prompt(question.question)
    n_p = len(tok(prompt)["input_ids"])
    out = []
    for a in question.answers:
        ids = tok(prompt + " " + a)["input_ids"]
        with torch.no_grad():
            hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        pos = torch.arange(n_p - 1, len(ids) - 1)
        final = u(hs[-1][0, pos], normed=False)
        prem = torch.stack([u(hs[e][0, pos], normed=False) for e in layers])
        out.append((final, prem, torch.tensor(ids[n_p:])))
    return out
