"""Architecture map, model loading errors and the stop-string tracker."""
from __future__ import annotations

import pytest
import torch

from earlyexit.core.arch import ArchSpec, resolve_arch
from earlyexit.core.batching import StopTracker
from earlyexit.core.models import EMBEDDED_MODELS, load_model, resolve_model_path


def test_resolve_arch_for_each_tiny_model(tiny):
    model, _ = tiny
    arch = resolve_arch(model)
    assert arch.n_layers == 4
    assert arch.head is model.get_output_embeddings()


def test_unknown_architecture_needs_an_override(tiny_llama):
    model, _ = tiny_llama
    model.config.model_type = "mystery"
    try:
        with pytest.raises(ValueError, match="does not know where architecture 'mystery'"):
            resolve_arch(model)
        arch = resolve_arch(model, ArchSpec(layers="model.layers", final_norm="model.norm", head="lm_head"))
        assert arch.n_layers == 4
        with pytest.raises(ValueError, match="no module at 'model.nope'"):
            resolve_arch(model, ArchSpec(layers="model.nope", final_norm="model.norm", head="lm_head"))
    finally:
        model.config.model_type = "llama"


def test_unknown_model_name_lists_the_embedded_models():
    with pytest.raises(ValueError) as err:
        resolve_model_path("smollm-9000")
    for name in EMBEDDED_MODELS:
        assert name in str(err.value)


def test_stop_tracker_stops_each_sequence_on_its_own(tokenizer):
    seqs = [tokenizer(" Paris.\nQ: next")["input_ids"], tokenizer(" Rome is far away")["input_ids"]]
    tracker = StopTracker(tokenizer, 2, stop=["\nQ:"])
    steps = max(len(s) for s in seqs)
    for t in range(steps):
        tracker.update([s[t] if t < len(s) else tokenizer.eos_token_id for s in seqs])
        if t == len(seqs[0]) - 1:
            assert tracker.done[0]
    text, toks = tracker.result(0)
    assert text == " Paris."
    assert tokenizer.decode(toks) == " Paris."
    assert tracker.result(1)[0] == " Rome is far away"


@pytest.mark.slow
def test_smollm2_predicts_paris(smollm2):
    from earlyexit import lens_stats

    model, tok = smollm2
    assert tok.padding_side == "left" and tok.pad_token is not None
    r = lens_stats(model, tok, ["The capital of France is"])
    assert tok.decode(r.top_ids[0, -1, 0, 0]) == " Paris"
    assert r.entropy.shape == (1, 31, 1)


@pytest.mark.slow
def test_second_load_uses_the_cache(smollm2, monkeypatch):
    import transformers

    from earlyexit.core.models import _converted_dir

    def no_conversion(*a, **kw):
        raise AssertionError("the converted model was built again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_conversion)
    path = _converted_dir("smollm2-135m")
    assert (path / "config.json").exists()  # only a lookup
    assert not any(p.name.endswith(".tmp") for p in path.parent.iterdir())
