"""SLED (Zhang et al. 2024): the evolution by hand on a 5-token vocabulary, the O(L·V) cosines against a
direct L·k·V implementation, batching, MC scoring against full forwards, generation through the loop and
through transformers, and bad input."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from earlyexit.core.decoding import decode, decoding_names, default_penalty, make_scorer
from earlyexit.core.lenses import get_unembed, resolve_lens
from earlyexit.methods.dola import custom_generate, generate, resolve_settings
from earlyexit.methods.sled import (SledSettings, candidate_cosines, evolve, latent_distribution, sled_scores,
                                    target_scores)
from earlyexit.studies.data import TruthfulQAItem
from earlyexit.studies.mc import evaluate, mc_question, mc_raw, mc_raw_cached, question_raw
from conftest import answer_forwards, penalise


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one thread is faster, and much faster on a shared, loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- a direct L·k·V implementation

def direct_sled(final, premature, k, rate, steps, floor):
    """The authors' structure, one position at a time: the [N, k, V] tensor softmax(x_n) − e_i,
    ``F.cosine_similarity`` against x_n − z, clipped and squared, each layer normalised and weighted by
    its share, then the T-step evolution and the floor. Works in the dtype it is given."""
    B, V = final.shape
    N = premature.shape[0]
    out = torch.empty_like(final)
    for b in range(B):
        z, x = final[b], premature[:, b]
        cand = torch.topk(F.softmax(z, -1), k).indices
        onehot = F.one_hot(cand, V).to(z.dtype)
        cos = torch.stack([  # [N, k], one layer's [k, V] at a time (the authors stack all N)
            F.cosine_similarity(F.softmax(x[n], -1)[None] - onehot, (x[n] - z)[None].expand(k, V), dim=1)
            for n in range(N)])
        v = (cos * (cos > 0)) ** 2
        s = v.sum(1)
        v = torch.where(s[:, None] != 0, v / torch.where(s != 0, s, 1)[:, None], v)
        w = s / s.sum() if s.sum() != 0 else s
        latent = torch.zeros(V, dtype=z.dtype)
        latent[cand] = (w[:, None] * v).sum(0)
        h = z.clone()
        for t in range(steps):
            h = h - rate * (1 - t / steps) * (F.softmax(h, -1) - latent)
        out[b] = torch.full_like(h, floor)
        out[b, cand] = h[cand]
    return out


def _random_case(seed, N=5, B=3, V=40, dtype=torch.float64):
    assert N >= 4 and B >= 2
    g = torch.Generator().manual_seed(seed)
    final = torch.randn(B, V, generator=g, dtype=dtype) * 3
    prem = torch.randn(N, B, V, generator=g, dtype=dtype) * 4
    prem[0] = final                                  # a layer equal to the final one: d = 0
    prem[1, 0] = prem[1, 0] * 8                      # a peaked premature distribution
    prem[2, 1, :4] = prem[2, 1].max()                # tied maxima
    prem[3, B - 1] = final[B - 1] + 0.5              # a constant shift of the final logits
    return final, prem


@pytest.mark.parametrize("k,steps", [(1, 1), (3, 1), (10, 10), (40, 3), (7, 0)])
def test_fast_form_equals_direct_float64(k, steps):
    for seed in range(3):
        final, prem = _random_case(seed)
        got = sled_scores(final, prem, evolution_scale=k, evolution_rate=2.5, evolution_steps=steps,
                          evolution_lower_bound=-100.0)
        want = direct_sled(final, prem, k, 2.5, steps, -100.0)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_cosines_equal_cosine_similarity_and_are_accurate_in_float32():
    final, prem = _random_case(7, N=4, B=2, V=300)
    cand = final.topk(20, -1).indices
    got = candidate_cosines(final, prem, cand)
    for n in range(4):
        for b in range(2):
            p = F.softmax(prem[n, b], -1)
            g = p[None] - F.one_hot(cand[b], 300).double()
            want = F.cosine_similarity(g, (prem[n, b] - final[b])[None].expand_as(g), dim=1)
            torch.testing.assert_close(got[n, b], want, rtol=0, atol=1e-12)
    # a premature distribution peaked to float32 precision (top token 18 nats above the rest): the
    # float32 form stays close to the float64 values; the direct float32 form loses 1 − p_max
    z = torch.randn(1, 300, dtype=torch.float64)
    x = torch.randn(3, 1, 300, dtype=torch.float64)
    c = z.topk(10, -1).indices
    x[:, 0, c[0, 0]] += 18.0
    ref = candidate_cosines(z, x, c)
    ours32 = candidate_cosines(z.float(), x.float(), c).double()
    assert (ours32 - ref).abs().max() < 1e-6
    p32 = F.softmax(x.float()[:, 0], -1)
    direct32 = F.cosine_similarity(p32[:, None, :] - F.one_hot(c[0], 300).float()[None],
                                   (x.float() - z.float())[:, 0][:, None, :].expand(3, 10, 300), dim=2)
    assert (direct32.double() - ref[:, 0]).abs().max() > 10 * (ours32 - ref).abs().max()


@pytest.mark.parametrize("cache_bytes", [4 * 40 * 3, 4 * 40 * 2, 4 * 40 * 7])
def test_blocked_cosines_equal_unblocked(monkeypatch, cache_bytes):
    import earlyexit.methods.sled as sled

    final, prem = _random_case(5, N=5, B=3, V=40)
    cand = final.topk(6, -1).indices
    want = candidate_cosines(final, prem, cand)
    monkeypatch.setattr(sled, "CACHE_BYTES", cache_bytes)  # blocks of 1 layer × 3 rows, 1 × 2, 2 × 3
    for inplace in (False, True):
        x = prem.clone()
        torch.testing.assert_close(candidate_cosines(final, x, cand, inplace=inplace), want, rtol=0, atol=1e-13)
        assert torch.equal(x, prem) != inplace


def test_raw_lens_scale_logits_are_fast_and_finite():
    """Logits hundreds of nats apart (the raw lens): exp is floored (no denormals), cosines stay finite."""
    g = torch.Generator().manual_seed(0)
    final = torch.randn(2, 1000, generator=g) * 5
    prem = torch.randn(6, 2, 1000, generator=g) * 300
    scores = sled_scores(final, prem, evolution_scale=50)
    assert torch.isfinite(scores).all()
    want = direct_sled(final.double(), prem.double(), 50, 2.0, 1, -1000.0)
    torch.testing.assert_close(scores.double(), want, rtol=0, atol=1e-4)


# ---------------------------------------------------------------- by hand

def test_one_step_by_hand_on_five_tokens():
    z = [2.0, 1.0, 0.0, 0.0, 0.0]
    l16 = math.log(16.0)
    layers = [[0.0] * 5,                    # uniform p: cosines 0.7 (token 0) and 0.2 (token 1)
              list(z),                      # = final: d = 0, cosine 0
              [l16, 0.0, 0.0, 0.0, 0.0]]    # p = (.8, .05, .05, .05, .05): token 0 negative, token 1 high
    # layer 1: d = (-2, -1, 0, 0, 0), |d|² = 5; p − e0 = (-.8, .2, .2, .2, .2), |·|² = .8, ·d = 1.4
    cos1 = (1.4 / math.sqrt(0.8 * 5), 0.4 / math.sqrt(0.8 * 5))
    assert cos1 == pytest.approx((0.7, 0.2))
    # layer 3: d = (ln16 − 2, −1, 0, 0, 0); p − e0 = (−.2, .05, …) · d < 0; p − e1 = (.8, −.95, .05, .05, .05)
    a = l16 - 2.0
    dot30 = -0.2 * a - 0.05
    assert dot30 < 0
    cos31 = (0.8 * a + 0.95) / math.sqrt((0.64 + 0.9025 + 3 * 0.0025) * (a * a + 1.0))
    v = {0: cos1[0] ** 2, 1: cos1[1] ** 2 + cos31 ** 2}
    total = v[0] + v[1]
    latent = [v[0] / total, v[1] / total]
    zsum = math.exp(2) + math.exp(1) + 3
    soft = [math.exp(2) / zsum, math.exp(1) / zsum]
    rate = 2.0
    want = [z[0] - rate * (soft[0] - latent[0]), z[1] - rate * (soft[1] - latent[1]), -100.0, -100.0, -100.0]

    final = torch.tensor([z], dtype=torch.float64)
    prem = torch.tensor(layers, dtype=torch.float64)[:, None, :]
    cand, lat = latent_distribution(final, prem, 2)
    assert cand.tolist() == [[0, 1]]
    assert lat[0].tolist() == pytest.approx(latent, abs=1e-12)
    got = sled_scores(final, prem, evolution_scale=2, evolution_rate=rate, evolution_steps=1,
                      evolution_lower_bound=-100.0)
    assert got[0].tolist() == pytest.approx(want, abs=1e-12)
    # the MC form: log-softmax of the floored scores, and the evolved logit itself
    lp, lg = target_scores(final, prem, torch.tensor([0, 0]), torch.tensor([1, 3]), evolution_scale=2,
                           evolution_rate=rate, evolution_steps=1, evolution_lower_bound=-100.0)
    lse = math.log(math.exp(want[0]) + math.exp(want[1]) + 3 * math.exp(-100.0))
    assert lg.tolist() == pytest.approx([want[1], -100.0], abs=1e-12)
    assert lp.tolist() == pytest.approx([want[1] - lse, -100.0 - lse], abs=1e-12)


def test_zero_steps_and_zero_rate_keep_the_final_logits_on_the_top_k():
    final, prem = _random_case(3, V=60)
    for kw in ({"evolution_steps": 0}, {"evolution_rate": 0.0, "evolution_steps": 4}):
        s = sled_scores(final, prem, evolution_scale=5, **kw)
        top = final.topk(5, -1).indices
        torch.testing.assert_close(s.gather(-1, top), final.gather(-1, top))
        assert (s.argmax(-1) == final.argmax(-1)).all()
        assert ((s == -1000.0).sum(-1) == 55).all()


def test_no_positive_cosine_means_no_latent_mass():
    # every premature layer equals the final one: d = 0, every cosine 0, P = 0 (the authors' code then
    # evolves with the softmax alone)
    final = torch.tensor([[1.0, 0.5, -1.0, 0.0]], dtype=torch.float64)
    prem = final[None].expand(3, 1, 4).clone()
    cand, lat = latent_distribution(final, prem, 2)
    assert lat.abs().max() == 0
    got = evolve(final, cand, lat, evolution_rate=1.0, evolution_steps=1)
    torch.testing.assert_close(got, final.gather(-1, cand) - torch.softmax(final, -1).gather(-1, cand))


def test_batched_equals_unbatched():
    final, prem = _random_case(11, N=4, B=5, V=200, dtype=torch.float32)
    prem = prem * 20
    together = sled_scores(final, prem, evolution_scale=12, evolution_steps=3)
    for b in range(5):
        alone = sled_scores(final[b:b + 1], prem[:, b:b + 1], evolution_scale=12, evolution_steps=3)
        torch.testing.assert_close(together[b:b + 1], alone, rtol=1e-6, atol=1e-5)


# ---------------------------------------------------------------- settings and bad input

def test_registry_and_settings(tiny_llama):
    model, _ = tiny_llama
    assert "sled" in decoding_names()
    assert default_penalty("sled") == 1.0
    s = make_scorer(model, "sled")
    assert s.entries == (0, 1, 2, 3, 4) and s.layers == [0, 1, 2, 3]
    assert s.settings() == {"decoding": "sled", "evolution_scale": 50, "evolution_rate": 2.0, "evolution_steps": 1,
                            "evolution_lower_bound": -1000.0, "layers": [0, 1, 2, 3], "premature_lens": "raw",
                            "premature_dtype": "float32", "repetition_penalty": 1.0}
    s2 = resolve_settings(model, decoding="sled", repetition_penalty=1.2, premature_lens="normed",
                          method_settings={"evolution_scale": 7, "sled_layers": [1, 3]})
    assert s2.settings()["evolution_scale"] == 7 and s2.entries == (1, 3, 4) and s2.lens.name == "normed"
    assert s2.repetition_penalty == 1.2
    assert SledSettings.mc().evolution_steps == 10 and SledSettings.mc().evolution_lower_bound == -100.0


def test_bad_input(tiny_llama):
    model, _ = tiny_llama
    V = get_unembed(model).vocab_size
    with pytest.raises(ValueError, match="≥ 1"):
        make_scorer(model, "sled", evolution_scale=0)
    with pytest.raises(ValueError, match="≥ 1"):
        make_scorer(model, "sled", evolution_scale=-3)
    with pytest.raises(ValueError, match="larger than the vocabulary"):
        make_scorer(model, "sled", evolution_scale=V + 1)
    with pytest.raises(ValueError, match="integer"):
        make_scorer(model, "sled", evolution_scale=2.5)
    with pytest.raises(ValueError, match="evolution_rate"):
        make_scorer(model, "sled", evolution_rate=-0.5)
    with pytest.raises(ValueError, match="evolution_rate"):
        make_scorer(model, "sled", evolution_rate=float("nan"))
    with pytest.raises(ValueError, match="evolution_steps must be ≥ 0"):
        make_scorer(model, "sled", evolution_steps=-1)
    with pytest.raises(ValueError, match="evolution_lower_bound"):
        make_scorer(model, "sled", evolution_lower_bound=float("-inf"))
    with pytest.raises(ValueError, match="mature"):
        make_scorer(model, "sled", sled_layers=[0, 2, 4])  # entry 4 is the final entry of 4 layers
    with pytest.raises(IndexError, match="out of range"):
        make_scorer(model, "sled", sled_layers=[5])
    with pytest.raises(ValueError, match="empty"):
        make_scorer(model, "sled", sled_layers=[])
    with pytest.raises(TypeError):
        make_scorer(model, "sled", sled_layers="high")
    with pytest.raises(TypeError):
        make_scorer(model, "sled", nonsense=1)
    with pytest.raises(ValueError, match="repetition_penalty"):
        make_scorer(model, "sled", repetition_penalty=0)
    with pytest.raises(ValueError, match="premature_dtype"):
        make_scorer(model, "sled", premature_dtype="float16")
    with pytest.raises(ValueError, match="evolution_steps must be ≥ 1"):
        from earlyexit.methods.sled import check_steps
        check_steps(0, allow_zero=False)
    with pytest.raises(ValueError, match="larger than the vocabulary"):
        sled_scores(torch.zeros(1, 5), torch.zeros(2, 1, 5), evolution_scale=6)
    with pytest.raises(ValueError, match="N, B, V"):
        sled_scores(torch.zeros(1, 5), torch.zeros(2, 2, 5))
    with pytest.raises(ValueError, match="at least one premature"):
        sled_scores(torch.zeros(1, 5), torch.zeros(0, 1, 5), evolution_scale=2)
    with pytest.raises(ValueError, match="mature"):
        SledSettings.mc(layers=(4,)).resolve(model)


# ---------------------------------------------------------------- generation

@torch.no_grad()
def reference_sled(model, ids, n_new, *, layers, k=50, rate=2.0, steps=1, floor=-1000.0, penalty=1.0):
    """Batch 1, no cache: a full forward every step, each premature layer through the raw head on its
    own, the direct L·k·V SLED in float64, the penalty over a Python set of ids."""
    u = get_unembed(model)
    ids = list(ids)
    new = []
    for _ in range(n_new):
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        final = out.logits[0, -1].double()[None]
        prem = torch.stack([u(out.hidden_states[e][0, -1], normed=False).double() for e in layers])[:, None]
        scores = penalise(direct_sled(final, prem, k, rate, steps, floor)[0], ids, penalty)
        new.append(int(scores.argmax()))
        ids.append(new[-1])
    return new


PROMPTS = ["The capital of France is", "Q: Why is the sky blue?\nA:", "one two three"]


def test_decode_matches_reference_and_batches(tiny):
    model, tok = tiny
    L = get_unembed(model).n_layers
    lists = [tok(p)["input_ids"] for p in PROMPTS]
    # (k = 8 keeps the direct reference's [L, k, V] tensors small; the default k runs in the other tests)
    scorer = make_scorer(model, "sled", evolution_scale=8, evolution_rate=10.0, repetition_penalty=1.2)
    batched = decode(model, lists, scorer, max_new_tokens=5, pad_id=0)
    for ids, got in zip(lists, batched):
        assert got.token_ids == reference_sled(model, ids, 5, layers=list(range(L)), k=8, rate=10.0, penalty=1.2)
        alone = decode(model, [ids], scorer, max_new_tokens=5, pad_id=0)[0]
        assert alone.token_ids == got.token_ids


def test_decode_settings_match_reference(tiny_llama):
    model, tok = tiny_llama
    ids = tok(PROMPTS[1])["input_ids"]
    scorer = make_scorer(model, "sled", evolution_scale=5, evolution_rate=30.0, evolution_steps=3,
                         sled_layers=[1, 3])
    got = decode(model, [ids], scorer, max_new_tokens=6, pad_id=0)[0].token_ids
    assert got == reference_sled(model, ids, 6, layers=[1, 3], k=5, rate=30.0, steps=3)
    # a large rate really changes the output (the latent distribution moves the argmax)
    assert got != decode(model, [ids], make_scorer(model, "vanilla"), max_new_tokens=6, pad_id=0)[0].token_ids


def test_zero_steps_decodes_greedy(tiny):
    model, tok = tiny
    lists = [tok(p)["input_ids"] for p in PROMPTS]
    sled0 = decode(model, lists, make_scorer(model, "sled", evolution_steps=0), max_new_tokens=8, pad_id=0)
    greedy = decode(model, lists, make_scorer(model, "vanilla"), max_new_tokens=8, pad_id=0)
    assert [d.token_ids for d in sled0] == [d.token_ids for d in greedy]


def test_bfloat16_premature_head_is_close_and_keeps_the_final_logits(tiny):
    model, tok = tiny
    from earlyexit.methods.sled import premature_logits

    u = get_unembed(model)
    L = u.n_layers
    ids = torch.tensor([tok(PROMPTS[1])["input_ids"]])
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    h = torch.stack([hs[e][0] for e in range(L)])  # [L, T, d]
    for lens in ("raw", "normed"):
        lz = resolve_lens(model, lens)
        exact = premature_logits(lz, h, list(range(L)))
        for transposed in (False, True):
            approx = premature_logits(lz, h, list(range(L)), "bfloat16", transposed=transposed)
            assert approx.dtype == torch.float32 and approx.shape == exact.shape
            assert (approx - exact).abs().max() <= 0.02 * exact.abs().max() + 1e-3
    lists = [tok(p)["input_ids"] for p in PROMPTS]
    a = decode(model, lists, make_scorer(model, "sled", premature_dtype="bfloat16", evolution_steps=0),
               max_new_tokens=5, pad_id=0)
    b = decode(model, lists, make_scorer(model, "vanilla"), max_new_tokens=5, pad_id=0)
    assert [d.token_ids for d in a] == [d.token_ids for d in b]  # the final logits are the model's own


def test_generate_and_custom_generate(tiny_llama):
    model, tok = tiny_llama
    tok.padding_side = "left"
    ms = {"evolution_scale": 10, "evolution_rate": 20.0}
    ours = generate(model, tok, PROMPTS[:2], decoding="sled", repetition_penalty=1.0, method_settings=ms,
                    max_new_tokens=6, stop=(), batch_size=2, ignore_eos=True)
    assert all(o.premature_layers == [None] * len(o.token_ids) for o in ours)
    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    seq = model.generate(**enc, custom_generate=custom_generate, decoding="sled", method_settings=ms,
                         max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
    new = seq[:, enc["input_ids"].shape[1]:].tolist()
    assert new == [o.token_ids for o in ours]
    # the penalty of generate() reaches the scorer
    pen = model.generate(**enc, custom_generate=custom_generate, decoding="sled", method_settings=ms,
                         repetition_penalty=1.3, max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
    ours_pen = generate(model, tok, PROMPTS[:2], decoding="sled", repetition_penalty=1.3, method_settings=ms,
                        max_new_tokens=6, stop=(), batch_size=2, ignore_eos=True)
    assert pen[:, enc["input_ids"].shape[1]:].tolist() == [o.token_ids for o in ours_pen]


# ---------------------------------------------------------------- MC scoring

ITEMS = [TruthfulQAItem(0, "What colour is the sky?", "The sky is blue", ["Blue", "The sky is blue."],
                        ["Green", "The sky is red"]),
         TruthfulQAItem(1, "Who wrote Hamlet?", "Shakespeare", ["William Shakespeare"],
                        ["Marlowe", "Nobody wrote Hamlet"])]


def _mc_reference(model, tok, question, settings, layers):
    """Per answer: a full forward of prompt + answer, the direct SLED in float64 at every answer position."""
    out = []
    for final, prem, tgt in answer_forwards(model, tok, question, layers):
        sc = direct_sled(final.double(), prem.double(), settings.evolution_scale, settings.evolution_rate,
                         settings.evolution_steps, settings.evolution_lower_bound)
        lg = sc.gather(-1, tgt[:, None])[:, 0]
        out.append((torch.log_softmax(sc, -1).gather(-1, tgt[:, None])[:, 0], lg))
    return out


def test_mc_scores_equal_full_forwards(tiny):
    model, tok = tiny
    L = get_unembed(model).n_layers
    settings = SledSettings.mc(evolution_scale=6, evolution_rate=5.0)
    raws = mc_raw(model, tok, ITEMS[1:], layers=[1, 2], sled=settings)
    plain = mc_raw(model, tok, ITEMS[1:], layers=[1, 2])
    for r, p in zip(raws, plain):
        assert r.sled["layers"] == list(range(L)) and r.sled["settings"] == settings.as_dict()
        torch.testing.assert_close(r.final, p.final)  # the DoLa arrays are unchanged by SLED
        torch.testing.assert_close(r.premature, p.premature)
        assert p.sled is None
        for a, (lp, lg) in enumerate(_mc_reference(model, tok, r.question, settings, list(range(L)))):
            sl = slice(r.offsets[a], r.offsets[a + 1])
            torch.testing.assert_close(r.sled["logprob"][sl].double(), lp, atol=2e-4, rtol=1e-4)
            torch.testing.assert_close(r.sled["logit"][sl].double(), lg, atol=2e-4, rtol=1e-4)


def test_mc_evaluate_both_protocols(tiny_llama):
    model, tok = tiny_llama
    raws = mc_raw(model, tok, ITEMS, layers=[], sled=SledSettings.mc())
    res = evaluate(raws, "sled", n_boot=10)
    assert res.settings["post_softmax"] is True and res.settings["sled"]["evolution_steps"] == 10
    authors = evaluate(raws, "sled", post_softmax=False, n_boot=10)
    for r, it, it2 in zip(raws, res.items, authors.items):
        q = r.question
        sums = [float(r.sled["logprob"][r.offsets[a]:r.offsets[a + 1]].double().sum()) for a in range(len(q.answers))]
        assert it["scores_true"] == pytest.approx([sums[a] for a in q.true])
        logit_sums = [float(r.sled["logit"][r.offsets[a]:r.offsets[a + 1]].double().sum())
                      for a in range(len(q.answers))]
        assert it2["scores_false"] == pytest.approx([logit_sums[a] for a in q.false])
    with pytest.raises(ValueError, match="without SLED"):
        evaluate(mc_raw(model, tok, ITEMS[:1], layers=[2]), "sled")


def test_mc_cache_keeps_sled_apart(tiny_llama, tmp_path):
    model, tok = tiny_llama
    s = SledSettings.mc(evolution_scale=8)
    with_sled = mc_raw_cached(model, tok, ITEMS, layers=[], sled=s, cache_dir=tmp_path)
    without = mc_raw_cached(model, tok, ITEMS, layers=[], cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2
    assert all(r.sled is None for r in without)
    again = mc_raw_cached(model, tok, ITEMS, layers=[], sled=s, cache_dir=tmp_path)
    for x, y in zip(with_sled, again):
        assert torch.equal(x.sled["logprob"], y.sled["logprob"]) and x.sled["settings"] == y.sled["settings"]


def test_question_raw_sled_bad_layers(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(ValueError, match="mature"):
        question_raw(model, tok, mc_question(ITEMS[0]), layers=[], sled=SledSettings.mc(layers=(1, 4)))


# ---------------------------------------------------------------- the real SmolLM2

def _questions(n):
    from earlyexit.studies.data import load_truthfulqa
    from earlyexit.studies.prompts import truthfulqa_prompt

    return [truthfulqa_prompt(it.question) for it in load_truthfulqa(None, n)]


@pytest.mark.slow
def test_smollm2_decode_matches_reference(smollm2):
    model, tok = smollm2
    L = get_unembed(model).n_layers
    ids = tok(_questions(1)[0])["input_ids"]
    got = generate(model, tok, _questions(1), decoding="sled", repetition_penalty=1.0, max_new_tokens=5, stop=(),
                   ignore_eos=True)[0].token_ids
    assert got == reference_sled(model, ids, 5, layers=list(range(L)))


@pytest.mark.slow
def test_smollm2_custom_generate_and_batches(smollm2):
    model, tok = smollm2
    prompts = _questions(3)
    kw = dict(decoding="sled", repetition_penalty=1.2, max_new_tokens=8, stop=())
    ours = generate(model, tok, prompts, batch_size=3, **kw)
    single = [generate(model, tok, [p], batch_size=1, **kw)[0] for p in prompts]
    assert [o.token_ids for o in ours] == [o.token_ids for o in single]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    seq = model.generate(**enc, custom_generate=custom_generate, decoding="sled", repetition_penalty=1.2,
                         max_new_tokens=8)
    for row, o in zip(seq[:, enc["input_ids"].shape[1]:].tolist(), ours):  # ours ends before EOS
        assert row[:len(o.token_ids)] == o.token_ids
