"""The logit lens on tiny random models: invariants that must hold for every architecture."""
from __future__ import annotations

import pytest
import torch

from earlyexit import lens_stats
from earlyexit.core.generation import generate_with_lens
from earlyexit.core.lens import answer_span, depth_layers
from earlyexit.core.lenses import get_unembed
from earlyexit.core.lenses import LogitLens
from earlyexit.core.stats import layer_stats

PROMPTS = ["The capital of France is", "One, two, three, four,", "Hello world"]


def test_lens_at_last_layer_equals_model_logits(tiny):
    model, tok = tiny
    L = get_unembed(model).n_layers
    r = lens_stats(model, tok, PROMPTS[:1], positions="all", layers=[L], return_probs=True)
    ids = torch.tensor([r.tokens[0]])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    probs = torch.softmax(logits, -1)
    assert (r.probs[0, 0] - probs).abs().max() <= 1e-4
    # and the unembedding of entry L (already normed) reproduces the logits themselves
    with torch.no_grad():
        h = model(ids, output_hidden_states=True).hidden_states[L][0]
        assert (get_unembed(model)(h, normed=False) - logits).abs().max() <= 1e-4


def test_entropy_and_kl_match_float64_reference(tiny):
    model, tok = tiny
    unembed = get_unembed(model)
    L = unembed.n_layers
    r = lens_stats(model, tok, PROMPTS[:1], positions="all", kl=True, top_k=3)
    ids = torch.tensor([r.tokens[0]])
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
        final = torch.log_softmax(unembed(hs[L][0], normed=False).double(), -1)
        for e in range(L + 1):
            logits = unembed(hs[e][0], normed=e < L).double()
            logp = torch.log_softmax(logits, -1)
            ent = -(logp.exp() * logp).sum(-1)
            kl = (final.exp() * (final - logp)).sum(-1)
            assert torch.allclose(r.entropy[0, e].double(), ent, atol=1e-4)
            assert torch.allclose(r.kl_to_final[0, e].double(), kl, atol=1e-4)
            top = logp.topk(3, -1)
            assert torch.equal(r.top_ids[0, e], top.indices)
    assert r.kl_to_final[0, L].abs().max() < 1e-5


def test_batched_equals_unbatched_with_left_padding(tiny):
    model, tok = tiny
    targets = [tok("!")["input_ids"][0], 13]
    batched = lens_stats(model, tok, PROMPTS, positions=[-1, -2, 0], targets=targets, batch_size=3)
    for i, p in enumerate(PROMPTS):
        single = lens_stats(model, tok, [p], positions=[-1, -2, 0], targets=targets, batch_size=1)
        assert torch.allclose(batched.entropy[i], single.entropy[0], atol=1e-4)
        assert torch.allclose(batched.target_probs[i], single.target_probs[0], atol=1e-5)
        # ranks may move by a tie's width under float noise, never more
        assert (batched.target_ranks[i] - single.target_ranks[0]).abs().max() <= 2


def test_raw_and_normed_differ_below_the_top_and_agree_at_it(tiny):
    model, tok = tiny
    L = get_unembed(model).n_layers
    normed = lens_stats(model, tok, PROMPTS[:1], positions="all")
    raw = lens_stats(model, tok, PROMPTS[:1], positions="all", lens="raw")
    assert torch.allclose(normed.entropy[0, L], raw.entropy[0, L])
    assert not torch.allclose(normed.entropy[0, 1:L], raw.entropy[0, 1:L], atol=1e-3)


def test_gemma_softcapping_is_applied(tokenizer):
    from tests.conftest import _tiny

    model = _tiny("gemma")
    unembed = get_unembed(model)
    assert unembed.softcap == 5.0
    h = torch.randn(4, unembed.hidden_size) * 50
    assert unembed(h).abs().max() <= 5.0 + 1e-5


def test_target_rank_and_probability(tiny_llama):
    model, tok = tiny_llama
    r = lens_stats(model, tok, PROMPTS[:1], top_k=2, targets=[5])
    # the top token has rank 0 and its probability equals the top-1 probability
    top = int(r.top_ids[0, -1, 0, 0])
    r2 = lens_stats(model, tok, PROMPTS[:1], top_k=2, targets=[top])
    assert int(r2.target_ranks[0, -1, 0, 0]) == 0
    assert torch.isclose(r2.target_probs[0, -1, 0, 0], r.top_probs[0, -1, 0, 0])
    assert int(r.target_ranks[0, -1, 0, 0]) >= 0


def test_chunking_does_not_change_results(tiny_llama):
    model, tok = tiny_llama
    unembed = get_unembed(model)
    hidden = torch.randn(5, 7, unembed.hidden_size)
    entries = [0, 1, 2, 3, 4]
    a = layer_stats(LogitLens(unembed), hidden, entries, top_k=4)
    b = layer_stats(LogitLens(unembed), hidden, entries, top_k=4, chunk_bytes=1)
    assert torch.allclose(a.entropy, b.entropy, atol=1e-5)
    assert torch.equal(a.top_ids, b.top_ids)


def test_answer_span_positions_predict_the_answer_tokens(tiny_llama):
    model, tok = tiny_llama
    full, positions, targets = answer_span(tok, "The capital of France is", " Paris, of course")
    ids = tok(full)["input_ids"]
    assert [ids[p + 1] for p in positions] == targets
    r = lens_stats(model, tok, [full], positions=[positions], targets=[targets])
    assert r.target_probs.shape[2] == len(targets)


def test_generation_stats_match_the_lens_on_the_full_text(tiny_llama):
    model, tok = tiny_llama
    gen = generate_with_lens(model, tok, PROMPTS[:2], max_new_tokens=5, stop=(), batch_size=2)
    for g in gen:
        assert len(g.token_ids) == 5
        prompt_ids = tok(g.prompt)["input_ids"]
        full = prompt_ids + g.token_ids
        # the lens on the very token ids (no decode/encode round trip) at the positions that predicted them
        r = lens_stats(model, tok, [full], positions=list(range(len(prompt_ids) - 1, len(full) - 1)))
        assert r.tokens[0] == full
        assert torch.allclose(r.entropy[0], g.entropy, atol=1e-3)


def test_depth_layers():
    assert depth_layers(32) == [0, 8, 16, 24, 31, 32]
    assert depth_layers(30) == [0, 7, 15, 22, 29, 30]


@pytest.mark.parametrize("bad, exc, match", [
    ({"layers": [99]}, IndexError, "out of range"),
    ({"layers": [-1]}, IndexError, "out of range"),
    ({"positions": [50]}, IndexError, "Position 50 out of range"),
    ({"positions": "middle"}, ValueError, "Unknown positions"),
    ({"lens": "bogus"}, ValueError, "Unknown lens"),
    ({"top_k": 0}, ValueError, "top_k"),
])
def test_bad_arguments_raise_clear_errors(tiny_llama, bad, exc, match):
    model, tok = tiny_llama
    with pytest.raises(exc, match=match):
        lens_stats(model, tok, PROMPTS[:1], **bad)


def test_empty_and_too_long_prompts(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(ValueError, match="Prompt 1 is empty"):
        lens_stats(model, tok, ["fine", "  "])
    with pytest.raises(ValueError, match="context is 256 tokens"):
        lens_stats(model, tok, ["word " * 300])
    with pytest.raises(ValueError, match="context"):
        generate_with_lens(model, tok, ["word " * 250], max_new_tokens=10)


def test_shared_prefix_positions_are_computed_once_with_the_same_result(tiny_llama):
    model, tok = tiny_llama
    from earlyexit.core.prefix import shared_prefix_len

    prompts = ["Q: one two three four five six. A: yes", "Q: one two three four five six. A: no way",
               "Q: one two three four five six, seven"]
    assert shared_prefix_len([tok(p)["input_ids"] for p in prompts]) >= 8  # the shared path is taken
    a = lens_stats(model, tok, prompts, positions="all", kl=True, batch_size=3)
    b = lens_stats(model, tok, prompts, positions="all", kl=True, batch_size=3, dedupe_prefix=False)
    ok = a.valid
    assert torch.equal(a.valid, b.valid)
    assert torch.allclose(a.entropy[ok.unsqueeze(1).expand_as(a.entropy)],
                          b.entropy[ok.unsqueeze(1).expand_as(b.entropy)], atol=1e-4)
    assert torch.allclose(a.kl_to_final.nan_to_num(), b.kl_to_final.nan_to_num(), atol=1e-4)


def test_sliding_window_model_gives_the_same_result_with_a_long_shared_prefix(tokenizer):
    from tests.conftest import _tiny

    model = _tiny("gemma")  # sliding window 64
    primer = "Q: one two three four five six seven eight nine ten. " * 8
    prompts = [primer + "A: yes", primer + "A: no way at all"]
    assert len(tokenizer(prompts[0])["input_ids"]) > 64
    batched = lens_stats(model, tokenizer, prompts, positions=[-1, -3], batch_size=2)
    for i, p in enumerate(prompts):
        single = lens_stats(model, tokenizer, [p], positions=[-1, -3], batch_size=1)
        assert torch.allclose(batched.entropy[i], single.entropy[0], atol=1e-4)


def test_final_logits_and_a_reused_workspace_give_the_same_statistics(tiny_llama):
    from earlyexit.core.stats import Workspace

    model, tok = tiny_llama
    unembed = get_unembed(model)
    L = unembed.n_layers
    torch.manual_seed(1)
    hidden = torch.randn(L + 1, 6, unembed.hidden_size)
    entries = list(range(L + 1))
    targets = torch.randint(0, unembed.vocab_size, (6, 1))
    ref = layer_stats(LogitLens(unembed), hidden, entries, top_k=3, targets=targets, final=hidden[L])
    ws = Workspace()
    for _ in range(2):  # the second call reuses the first call's buffers
        got = layer_stats(LogitLens(unembed), hidden, entries, top_k=3, targets=targets, workspace=ws, chunk_bytes=1,
                          final_logits=unembed(hidden[L], normed=False))
        torch.testing.assert_close(got.entropy, ref.entropy, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.kl_to_final, ref.kl_to_final, rtol=0, atol=1e-5)
        assert torch.equal(got.top_ids, ref.top_ids) and torch.equal(got.target_ranks, ref.target_ranks)
    with pytest.raises(ValueError, match="not both"):
        layer_stats(LogitLens(unembed), hidden, entries, final=hidden[L], final_logits=unembed(hidden[L], normed=False))
    with pytest.raises(ValueError, match="final_logits must be"):
        layer_stats(LogitLens(unembed), hidden, entries, final_logits=torch.zeros(6, 3))
