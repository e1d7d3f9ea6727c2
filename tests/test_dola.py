"""DoLa decoding: the contrast by hand, the cached batched loop against a plain reference loop,
per-sequence layer choice, the transformers entry point, and bad input."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from earlyexit.core.decoding import repetition_penalty, seen_ids
from earlyexit.core.generation import eos_ids
from earlyexit.core.lenses import get_unembed
from earlyexit.methods.contrast import candidate_layers, dola_scores, js_distance
from earlyexit.methods.dola import custom_generate, generate, resolve_settings
from conftest import penalise


def contrast_scores(final, premature, relative_top=0.1):
    """One candidate: DoLa's scores of ``[B, V]`` final and premature logits."""
    return dola_scores(final, premature[None], relative_top=relative_top)[0]


# ---------------------------------------------------------------- the contrast on a tiny vocabulary

def _np_logsoftmax(x):
    x = np.asarray(x, dtype=np.float64)
    z = x - x.max()
    return z - np.log(np.exp(z).sum())


def _published_distance(f, p):
    """0.5·(KL(M‖p_f) + KL(M‖p_j)), each averaged over the vocabulary (the DoLa code's direction)."""
    pf, pj = np.exp(_np_logsoftmax(f)), np.exp(_np_logsoftmax(p))
    m = 0.5 * (pf + pj)
    return 0.5 * (np.mean(m * (np.log(m) - np.log(pf))) + np.mean(m * (np.log(m) - np.log(pj))))


def _textbook_js(f, p):
    pf, pj = np.exp(_np_logsoftmax(f)), np.exp(_np_logsoftmax(p))
    m = 0.5 * (pf + pj)
    return 0.5 * (np.mean(pf * (np.log(pf) - np.log(m))) + np.mean(pj * (np.log(pj) - np.log(m))))


# final, and two candidates on which the published direction and the textbook JS disagree
F_DIR = [0.0, 0.0, -2.0, 0.0]
A_DIR = [-2.0, -2.0, 0.0, -3.0]
B_DIR = [1.0, 5.0, 1.0, -2.0]


def test_distance_direction_by_hand():
    final = torch.tensor([F_DIR])
    prem = torch.tensor([[A_DIR], [B_DIR]])
    got = js_distance(final, prem)[:, 0].double().numpy()
    want = np.array([_published_distance(F_DIR, A_DIR), _published_distance(F_DIR, B_DIR)])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # the two definitions disagree on this case: the published one picks B, the textbook one A
    assert _textbook_js(F_DIR, A_DIR) > _textbook_js(F_DIR, B_DIR)
    assert want.argmax() == 1


def test_fast_distance_equals_kl_div_formula():
    """The written-out distance equals the published F.kl_div formula, extreme logits included."""
    torch.manual_seed(0)
    final = torch.randn(3, 50) * 60  # probabilities that underflow to 0 in float32: 0·log 0 = 0
    prem = torch.randn(4, 3, 50) * 60
    lp_f, lp_j = torch.log_softmax(final, -1)[None], torch.log_softmax(prem, -1)
    m = 0.5 * (lp_f.exp() + lp_j.exp())
    kl = torch.nn.functional.kl_div
    want = 0.5 * (kl(lp_f.expand_as(lp_j), m, reduction="none").mean(-1) + kl(lp_j, m, reduction="none").mean(-1))
    got = js_distance(final, prem)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_contrast_by_hand_mask_floor_and_choice(tiny_llama):
    final = [3.0, 1.0, 0.5, -2.0]
    prem = [0.0, 2.0, 1.0, float("-inf")]  # token 3: premature log-prob -inf, filtered anyway
    lf, lp = _np_logsoftmax(final), _np_logsoftmax(np.array(prem[:3] + [-1e30]))
    keep = lf >= lf.max() + math.log(0.1)
    assert keep.tolist() == [True, True, False, False]  # 3−0.5 = 2.5 > ln 10 ≈ 2.30 > 3−1 = 2
    got = contrast_scores(torch.tensor([final]), torch.tensor([prem]), relative_top=0.1)[0]
    np.testing.assert_allclose(got[:2].double().numpy(), (lf - lp)[:2], rtol=1e-5)
    assert got[2] == float("-inf") and got[3] == float("-inf")  # filtered: −inf, never +inf or NaN
    # relative_top = 1 keeps the top token only
    only = contrast_scores(torch.tensor([final]), torch.tensor([prem]), relative_top=1.0)[0]
    assert torch.isfinite(only).tolist() == [True, False, False, False]
    # the full DoLa choice: candidate picked by the published distance
    scores, chosen = dola_scores(torch.tensor([F_DIR]), torch.tensor([[A_DIR], [B_DIR]]))
    assert chosen.tolist() == [1]  # candidate B
    want = contrast_scores(torch.tensor([F_DIR]), torch.tensor([B_DIR]))
    torch.testing.assert_close(scores, want)


def test_repetition_penalty_on_contrast_scores_by_hand():
    scores = torch.tensor([[0.6, -0.3, float("-inf"), 0.2]])
    out = repetition_penalty(scores, torch.tensor([[0, 1, 2, 0]]), 1.2)[0]
    assert out[0].item() == pytest.approx(0.5)
    assert out[1].item() == pytest.approx(-0.36)
    assert out[2].item() == float("-inf")
    assert out[3].item() == pytest.approx(0.2)  # never seen


def test_choice_is_per_sequence(tiny_llama):
    """Two rows whose most distant candidates differ get different premature layers."""
    final = torch.tensor([F_DIR, F_DIR])
    prem = torch.tensor([[A_DIR, B_DIR], [B_DIR, A_DIR]])  # [C=2, B=2, V]
    scores, chosen = dola_scores(final, prem)
    assert chosen.tolist() == [1, 0]
    torch.testing.assert_close(scores[1], contrast_scores(final[1:], torch.tensor([B_DIR]))[0])


def test_seen_ids_never_hold_padding():
    ids = seen_ids([[5, 6, 7], [9]])
    assert ids.tolist() == [[5, 6, 7], [9, 9, 9]]


# ---------------------------------------------------------------- a plain reference loop

@torch.no_grad()
def reference_dola(model, ids: list[int], candidates: list[int], n_new: int, penalty: float,
                   relative_top: float = 0.1, lens: str = "raw") -> tuple[list[int], list[int]]:
    """Batch 1, no cache: a full forward over the whole sequence every step; each premature layer
    through the head on its own; distances in float64; the penalty over a Python set of ids."""
    unembed = get_unembed(model)
    ids = list(ids)
    new, layers = [], []
    for _ in range(n_new):
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        final = out.logits[0, -1].double()
        lf = torch.log_softmax(final, -1)
        prem = []
        for e in candidates:
            h = out.hidden_states[e][0, -1]
            prem.append(torch.log_softmax(unembed(h, normed=(lens == "normed")).double(), -1))
        dists = []
        for lp in prem:
            m = 0.5 * (lf.exp() + lp.exp())
            dists.append(0.5 * ((m * (m.log() - lf)).mean() + (m * (m.log() - lp)).mean()).item())
        j = int(np.argmax(dists))
        keep = lf >= lf.max() + math.log(relative_top)
        scores = penalise(torch.where(keep, lf - prem[j], torch.tensor(float("-inf"), dtype=torch.float64)), ids,
                          penalty)
        tok = int(scores.argmax())
        ids.append(tok)
        new.append(tok)
        layers.append(candidates[j])
    return new, layers


@torch.no_grad()
def reference_vanilla(model, ids: list[int], n_new: int, penalty: float) -> list[int]:
    ids = list(ids)
    new = []
    for _ in range(n_new):
        scores = penalise(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), ids, penalty)
        new.append(int(scores.argmax()))
        ids.append(new[-1])
    return new


TINY_PROMPTS = ["The capital of France is", "Q: Why is the sky blue?\nA:", "one two three"]


def _first_layers(model):
    return list(range(get_unembed(model).n_layers))


def test_tiny_matches_reference(tiny):
    model, tok = tiny
    cands = _first_layers(model)[1:]  # 1..L-1
    for prompt in TINY_PROMPTS[:2]:
        ids = tok(prompt)["input_ids"]
        want, want_layers = reference_dola(model, ids, cands, 6, 1.2)
        got = generate(model, tok, [prompt], dola_layers=cands, max_new_tokens=6, stop=())[0]
        got_ids = got.token_ids
        assert got_ids == want[:len(got_ids)]
        assert got.premature_layers == want_layers[:len(got_ids)]
        assert len(got_ids) == 6 or want[len(got_ids)] in eos_ids(tok, model)


def test_tiny_normed_lens_and_static_match_reference(tiny_llama):
    model, tok = tiny_llama
    ids = tok(TINY_PROMPTS[0])["input_ids"]
    want, _ = reference_dola(model, ids, [1, 2, 3], 5, 1.2, lens="normed")
    got = generate(model, tok, [TINY_PROMPTS[0]], dola_layers=[1, 2, 3], premature_lens="normed",
                   max_new_tokens=5, stop=())[0]
    assert got.token_ids == want
    want_s, layers_s = reference_dola(model, ids, [2], 5, 1.5)
    got_s = generate(model, tok, [TINY_PROMPTS[0]], decoding="dola-static", premature_layer=2,
                     repetition_penalty=1.5, max_new_tokens=5, stop=())[0]
    assert got_s.token_ids == want_s and got_s.premature_layers == [2] * 5
    want_v = reference_vanilla(model, ids, 5, 1.3)
    got_v = generate(model, tok, [TINY_PROMPTS[0]], decoding="vanilla", repetition_penalty=1.3,
                     max_new_tokens=5, stop=())[0]
    assert got_v.token_ids == want_v and got_v.premature_layers == [None] * 5


def test_tiny_batched_equals_unbatched(tiny):
    model, tok = tiny
    cands = _first_layers(model)[1:]
    kw = dict(dola_layers=cands, max_new_tokens=6, stop=())
    batched = generate(model, tok, TINY_PROMPTS, batch_size=3, **kw)
    single = [generate(model, tok, [p], batch_size=1, **kw)[0] for p in TINY_PROMPTS]
    for b, s in zip(batched, single):
        assert b.token_ids == s.token_ids
        assert b.premature_layers == s.premature_layers


def test_sampling_is_seeded(tiny_llama):
    model, tok = tiny_llama
    kw = dict(dola_layers=[1, 2, 3], max_new_tokens=8, stop=(), do_sample=True, temperature=2.0, relative_top=0.001)
    a = generate(model, tok, TINY_PROMPTS, seed=3, **kw)
    b = generate(model, tok, TINY_PROMPTS, seed=3, **kw)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    # sampling is really used: other seeds give other tokens, and greedy differs from the samples
    others = [generate(model, tok, TINY_PROMPTS, seed=s, **kw) for s in (4, 5)]
    assert any([o.token_ids for o in x] != [o.token_ids for o in a] for x in others)
    greedy = generate(model, tok, TINY_PROMPTS, **{**kw, "do_sample": False})
    assert [o.token_ids for o in greedy] != [o.token_ids for o in a]


def test_stop_string_is_stripped(tiny_llama):
    model, tok = tiny_llama
    free = generate(model, tok, [TINY_PROMPTS[0]], dola_layers=[1, 2, 3], max_new_tokens=8, stop=())[0]
    assert len(free.token_ids) >= 3
    stop_text = tok.decode(free.token_ids[2:3]).strip() or tok.decode(free.token_ids[2:3])
    out = generate(model, tok, [TINY_PROMPTS[0]], dola_layers=[1, 2, 3], max_new_tokens=8, stop=(stop_text,))[0]
    assert stop_text not in out.text
    assert out.token_ids == free.token_ids[:len(out.token_ids)]
    assert len(out.premature_layers) == len(out.token_ids)


# ---------------------------------------------------------------- bad input

def test_bad_input(tiny):
    model, tok = tiny
    L = get_unembed(model).n_layers
    p = [TINY_PROMPTS[0]]
    with pytest.raises(ValueError, match="relative_top"):
        generate(model, tok, p, relative_top=0.0)
    with pytest.raises(ValueError, match="relative_top"):
        generate(model, tok, p, relative_top=1.5)
    with pytest.raises(ValueError, match="mature"):
        generate(model, tok, p, dola_layers=[1, L])
    with pytest.raises(IndexError, match="out of range"):
        generate(model, tok, p, dola_layers=[L + 3])
    with pytest.raises(IndexError, match="out of range"):
        generate(model, tok, p, dola_layers=[-1])
    with pytest.raises(ValueError, match="empty"):
        generate(model, tok, p, dola_layers=[])
    with pytest.raises(ValueError, match="repetition_penalty"):
        generate(model, tok, p, repetition_penalty=0.0)
    with pytest.raises(ValueError, match="repetition_penalty"):
        generate(model, tok, p, decoding="vanilla", repetition_penalty=-1.0)
    with pytest.raises(ValueError, match="Unknown decoding"):
        generate(model, tok, p, decoding="contrastive")
    with pytest.raises(ValueError, match="premature_layer"):
        generate(model, tok, p, decoding="dola-static")
    with pytest.raises(ValueError, match="mature"):
        generate(model, tok, p, decoding="dola-static", premature_layer=L)
    with pytest.raises(IndexError, match="out of range"):
        generate(model, tok, p, decoding="dola-static", premature_layer=L + 1)
    with pytest.raises(ValueError, match="bucket"):
        generate(model, tok, p, dola_layers="middle")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tok, p, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, tok, p, do_sample=True, temperature=0.0)


def test_empty_bucket_of_a_small_tied_model(tiny):
    model, _ = tiny
    unembed = get_unembed(model)
    if not unembed.arch.tied_embeddings:
        pytest.skip("untied: the low bucket starts at 0")
    with pytest.raises(ValueError, match="empty"):
        resolve_settings(model, dola_layers="low")  # 4 tied layers: range(2, 2, 2)


def test_penalty_warning(tiny_llama):
    model, _ = tiny_llama
    with pytest.warns(UserWarning, match="1.2"):
        resolve_settings(model, decoding="dola", repetition_penalty=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_settings(model, decoding="vanilla", repetition_penalty=1.0)
        resolve_settings(model, decoding="dola", repetition_penalty=1.2)


def test_buckets_of_smollm2_shape():
    assert candidate_layers(30, True, "high") == [15, 17, 19, 21, 23, 25, 27, 29]
    assert candidate_layers(30, True, "low") == [2, 4, 6, 8, 10, 12, 14]


# ---------------------------------------------------------------- SmolLM2 (slow)

def _questions(n):
    from earlyexit.studies.data import load_truthfulqa
    from earlyexit.studies.prompts import truthfulqa_prompt

    return [truthfulqa_prompt(it.question) for it in load_truthfulqa(limit=n)]


@pytest.mark.slow
def test_smollm2_cached_dola_equals_reference_loop(smollm2):
    model, tok = smollm2
    cands = candidate_layers(30, True, "high")
    prompts = _questions(3)
    outs = generate(model, tok, prompts, max_new_tokens=10, stop=(), batch_size=1)
    for prompt, out in zip(prompts, outs):
        want, want_layers = reference_dola(model, tok(prompt)["input_ids"], cands, 10, 1.2)
        assert out.token_ids == want
        assert out.premature_layers == want_layers


@pytest.mark.slow
def test_smollm2_batched_equals_unbatched_and_layers_differ(smollm2):
    model, tok = smollm2
    prompts = _questions(4)
    kw = dict(max_new_tokens=16, stop=("Q:",))
    batched = generate(model, tok, prompts, batch_size=4, **kw)
    single = [generate(model, tok, [p], batch_size=1, **kw)[0] for p in prompts]
    for b, s in zip(batched, single):
        assert b.text == s.text
        assert b.token_ids == s.token_ids
        assert b.premature_layers == s.premature_layers
    # the choice is per sequence: at some step the rows of the batch chose different layers
    n = min(len(o.premature_layers) for o in batched)
    assert any(len({o.premature_layers[t] for o in batched}) > 1 for t in range(n))


@pytest.mark.slow
def test_smollm2_custom_generate_matches(smollm2):
    model, tok = smollm2
    prompts = _questions(2)
    ours = generate(model, tok, prompts, max_new_tokens=10, stop=(), batch_size=2)
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    seq = model.generate(**enc, custom_generate=custom_generate, dola_layers="high", repetition_penalty=1.2,
                         max_new_tokens=10)
    assert isinstance(seq, torch.Tensor) and seq.shape[0] == 2
    new = seq[:, enc["input_ids"].shape[1]:]
    for row, o in zip(new.tolist(), ours):
        assert row[:len(o.token_ids)] == o.token_ids
    # static DoLa through transformers as well
    ours_s = generate(model, tok, prompts[:1], decoding="dola-static", premature_layer=16, max_new_tokens=6, stop=())
    enc1 = tok(prompts[:1], return_tensors="pt")
    seq1 = model.generate(**enc1, custom_generate=custom_generate, premature_layer=16, repetition_penalty=1.2,
                          max_new_tokens=6)
    assert seq1[0, enc1["input_ids"].shape[1]:].tolist() == ours_s[0].token_ids
