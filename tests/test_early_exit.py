"""Early-exit decoders (earlyexit.methods.early_exit) and the exit analysis (earlyexit.studies.exit_analysis).

Lossless decoders must give greedy's tokens exactly; early exit with a λ that never triggers must too; caches
after rejections must equal a fresh prefill. Runs on one thread: on a shared two-core machine two threads
make these small per-layer steps an order of magnitude slower.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from earlyexit.core.batching import StopTracker
from earlyexit.core.decoding import decode, decoding_names, make_scorer
from earlyexit.core.errors import BadInput
from earlyexit.core.stack import LayerStack, cache_length, crop_layers, prepare_cache
from earlyexit.methods import early_exit as ee

from conftest import _tiny

N_NEW = 24
SHORT = "Q: Why is the sky blue?\nA:"
# longer than the tiny Gemma's sliding window (64): exercises cutting back a sliding-window cache
LONG = ("Interpret each question literally, and as a question about the real world; carefully research each "
        "answer, without falling prey to any common myths. Q: What is human life expectancy in the United "
        "States? A: Human life expectancy in the United States is 78 years. Q: Where were the 1992 Olympics "
        "held?\nA:")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _ids(tok, text):
    return tok(text)["input_ids"]


def _greedy(model, ids, n=N_NEW, penalty=1.0, stop=None):
    return decode(model, [ids], make_scorer(model, "vanilla", repetition_penalty=penalty), max_new_tokens=n,
                  pad_id=0, stop=stop)[0].token_ids


def _run(model, ids, name, n=N_NEW, stop=None, **kw):
    sc = make_scorer(model, name, **kw)
    return sc, decode(model, [ids], sc, max_new_tokens=n, pad_id=0, stop=stop)[0]


def _n_layers(model):
    return LayerStack(model).L


def _identity_last_layer(kind="llama"):
    """A tiny model whose last decoder layer adds nothing (its output projections are zero): the lens at
    entry L-1 then equals the model's output, so every draft is accepted."""
    model = copy.deepcopy(_tiny(kind))
    last = LayerStack(model).layers[-1]
    with torch.no_grad():
        last.self_attn.o_proj.weight.zero_()
        last.mlp.down_proj.weight.zero_()
    return model


# --- registry -------------------------------------------------------------------------------------

def test_registered():
    names = decoding_names()
    for name in ("early-exit", "self-speculative", "layer-skip"):
        assert name in names


def test_stack_matches_model(tiny):
    """All layers run one by one = the model's own step; the KV-only write = the layer's own KV."""
    model, tok = tiny
    from earlyexit.core.lenses import get_unembed
    from earlyexit.core.prefix import prefill

    ids = _ids(tok, LONG)
    state = prefill(model, [ids], 0)
    c1 = prepare_cache(state.cache)
    c2 = copy.deepcopy(c1)
    stack = LayerStack(model)
    with torch.inference_mode():
        h = stack.run(torch.tensor([[11]]), len(ids), c1)
        out = model.base_model(input_ids=torch.tensor([[11]]), position_ids=torch.tensor([[len(ids)]]),
                               past_key_values=c2, use_cache=True)
        ref = get_unembed(model)(out.last_hidden_state[:, -1], normed=False)
        assert torch.equal(stack.final_logits(h)[:, -1], ref)
        a, b = copy.deepcopy(c1), copy.deepcopy(c1)
        x = torch.randn(1, 1, h.shape[-1])
        pos = stack.positions(len(ids) + 1, 1, "cpu")
        ctx = stack.context(x, pos, a, [1])
        stack.write_kv(1, x, ctx, a)
        stack.layer(1, x, ctx, b)
        assert torch.equal(a.layers[1].keys, b.layers[1].keys) and torch.equal(a.layers[1].values, b.layers[1].values)
        assert cache_length(a, 1) == len(ids) + 2 and cache_length(a, 0) == len(ids) + 1


# --- lossless: token for token equal to greedy --------------------------------------------------------

@pytest.mark.parametrize("text", [SHORT, LONG])
def test_self_speculative_equals_greedy(tiny, text):
    model, tok = tiny
    ids = _ids(tok, text)
    ref = _greedy(model, ids)
    L = _n_layers(model)
    for E, k, tau in ((1, 3, 0.0), (L - 1, 4, 0.0), (2, 5, 0.3)):
        sc, out = _run(model, ids, "self-speculative", exit_entry=E, max_draft=k, draft_threshold=tau)
        assert out.token_ids == ref, (E, k, tau)
        st = out.stats
        assert st["drafts_proposed"] >= st["drafts_accepted"] >= 0 and st["verify_passes"] >= 1
        assert sum(out.info["drafted"]) == st["drafts_accepted"]
        assert len(out.info["drafted"]) == len(out.token_ids)


@pytest.mark.parametrize("text", [SHORT, LONG])
def test_layer_skip_equals_greedy(tiny, text):
    model, tok = tiny
    ids = _ids(tok, text)
    ref = _greedy(model, ids)
    L = _n_layers(model)
    for skip, k in (([1], 3), ([0, 2], 4), ([L - 1], 2)):
        _, out = _run(model, ids, "layer-skip", skip_layers=skip, max_draft=k)
        assert out.token_ids == ref, skip


def test_lossless_with_repetition_penalty(tiny_llama):
    model, tok = tiny_llama
    ids = _ids(tok, SHORT)
    ref = _greedy(model, ids, penalty=1.3)
    _, a = _run(model, ids, "self-speculative", exit_entry=2, max_draft=3, repetition_penalty=1.3)
    _, b = _run(model, ids, "layer-skip", skip_layers=[1, 2], max_draft=3, repetition_penalty=1.3)
    assert a.token_ids == ref and b.token_ids == ref


def test_equal_to_transformers_generate(tiny_llama):
    model, tok = tiny_llama
    ids = _ids(tok, SHORT)
    seq = model.generate(torch.tensor([ids]), max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False,
                         pad_token_id=0)
    _, out = _run(model, ids, "self-speculative", exit_entry=3, max_draft=4)
    assert out.token_ids == seq[0, len(ids):].tolist()


def test_all_drafts_accepted_eos_and_stop_inside_a_draft(tokenizer):
    """With an identity last layer every draft is accepted: EOS, a stop string and max_new_tokens all fall
    inside a draft, and the output still ends exactly where greedy's does."""
    model = _identity_last_layer()
    ids = _ids(tokenizer, SHORT)
    L = _n_layers(model)
    ref = _greedy(model, ids, n=40)
    _, out = _run(model, ids, "self-speculative", n=40, exit_entry=L - 1, max_draft=6, draft_threshold=0.0)
    assert out.token_ids == ref and out.stats["acceptance_rate"] == 1.0
    assert out.stats["tokens_per_verify"] > 4
    _, skip = _run(model, ids, "layer-skip", n=40, skip_layers=[L - 1], max_draft=6, draft_threshold=0.0)
    assert skip.token_ids == ref and skip.stats["acceptance_rate"] == 1.0
    # EOS: the greedy token at position 9 (inside the second draft of six)
    eos = ref[9]
    first = ref.index(eos)
    want = _greedy(model, ids, n=40, stop=StopTracker(tokenizer, 1, (), [eos]))
    assert want == ref[:first + 1]
    for name, kw in (("self-speculative", {"exit_entry": L - 1}), ("layer-skip", {"skip_layers": [L - 1]})):
        tracker = StopTracker(tokenizer, 1, (), [eos])
        _, got = _run(model, ids, name, n=40, stop=tracker, max_draft=6, draft_threshold=0.0, **kw)
        assert got.token_ids == want
    # a stop string: the text of greedy tokens 12..13
    stop_text = tokenizer.decode(ref[12:14])
    t_ref = StopTracker(tokenizer, 1, (stop_text,), [])
    want = _greedy(model, ids, n=40, stop=t_ref)
    tracker = StopTracker(tokenizer, 1, (stop_text,), [])
    _, got = _run(model, ids, "self-speculative", n=40, stop=tracker, exit_entry=L - 1, max_draft=6,
                  draft_threshold=0.0)
    assert got.token_ids == want and tracker.result(0) == t_ref.result(0)
    # max_new_tokens inside a draft
    _, got = _run(model, ids, "self-speculative", n=9, exit_entry=L - 1, max_draft=4, draft_threshold=0.0)
    assert got.token_ids == ref[:9]


# --- caches after rejections --------------------------------------------------------------------------

@pytest.mark.parametrize("name,kw", [("self-speculative", {"exit_entry": 2, "max_draft": 4}),
                                     ("layer-skip", {"skip_layers": [1], "max_draft": 4})])
def test_cache_after_rejections_equals_fresh_prefill(tiny, name, kw):
    from transformers import DynamicCache

    model, tok = tiny
    ids = _ids(tok, LONG)
    sc, out = _run(model, ids, name, **kw)
    assert out.stats["drafts_accepted"] < out.stats["drafts_proposed"]  # there were rejections
    cache, length = sc._last
    fed = ids + out.token_ids[:-1]
    assert length == len(fed)
    with torch.inference_mode():
        fresh = model(input_ids=torch.tensor([fed]), past_key_values=DynamicCache(), use_cache=True).past_key_values
    for i in range(_n_layers(model)):
        assert cache_length(cache, i) == len(fed)
        a, b = cache.layers[i], fresh.layers[i]
        n = min(a.keys.shape[-2], b.keys.shape[-2])  # a sliding-window layer keeps only its window's tail
        torch.testing.assert_close(a.keys[..., -n:, :], b.keys[..., -n:, :], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.values[..., -n:, :], b.values[..., -n:, :], atol=1e-5, rtol=1e-4)


def test_crop_layers(tiny_llama):
    from earlyexit.core.prefix import prefill

    model, tok = tiny_llama
    cache = prefill(model, [_ids(tok, SHORT)], 0).cache
    n = cache_length(cache, 0)
    crop_layers(cache, n - 2, [1, 2])
    assert [cache_length(cache, i) for i in range(4)] == [n, n - 2, n - 2, n]
    with pytest.raises(ValueError, match="fewer"):
        crop_layers(cache, n + 1)


# --- early exit (lossy) -------------------------------------------------------------------------------

def test_early_exit_never_triggers_equals_greedy(tiny):
    model, tok = tiny
    ids = _ids(tok, LONG)
    ref = _greedy(model, ids)
    L = _n_layers(model)
    for conf, lam in (("prob", 1.0), ("entropy", 0.0)):
        _, out = _run(model, ids, "early-exit", confidence=conf, threshold=lam, exit_entries=list(range(1, L)))
        assert out.token_ids == ref
        assert out.info["exit_entry"] == [L] * len(ref)


def test_early_exit_always_triggers_at_first_allowed_entry(tiny):
    model, tok = tiny
    ids = _ids(tok, SHORT)
    L = _n_layers(model)
    for conf, lam in (("prob", 0.0), ("margin", 0.0), ("entropy", math.log(model.config.vocab_size))):
        _, out = _run(model, ids, "early-exit", confidence=conf, threshold=lam, exit_entries=[2, 3])
        # the first token comes from the prefill (the full model); every later one leaves at entry 2
        assert out.info["exit_entry"][0] == L and set(out.info["exit_entry"][1:]) == {2}
        assert len(out.token_ids) == N_NEW


def test_early_exit_tokens_follow_the_lens_and_propagate(tiny_llama):
    """An exit at entry 2 picks the lens's top-1 there; the skipped layers' KV come from h_2 (state
    propagation), so every layer holds every fed position."""
    model, tok = tiny_llama
    ids = _ids(tok, SHORT)
    sc, out = _run(model, ids, "early-exit", n=6, confidence="prob", threshold=0.0, exit_entries=[2])
    from earlyexit.core.lenses import resolve_lens
    from earlyexit.core.prefix import prefill

    # recompute the first exited token by hand: layers 0..1 on the first token, lens at entry 2
    state = prefill(model, [ids], 0)
    stack = LayerStack(model)
    with torch.inference_mode():
        h = stack.run(torch.tensor([[out.token_ids[0]]]), len(ids), state.cache, layers=[0, 1])
        lg = resolve_lens(model, "normed").logits(h.view(1, 1, -1), [2])[0, 0]
    assert int(lg.argmax()) == out.token_ids[1]


def test_early_exit_at_an_identity_layer_loses_nothing(tokenizer):
    """With the identity last layer, exiting at L-1 loses nothing."""
    model = _identity_last_layer()
    ids = _ids(tokenizer, SHORT)
    L = _n_layers(model)
    ref = _greedy(model, ids)
    _, out = _run(model, ids, "early-exit", confidence="prob", threshold=0.0, exit_entries=[L - 1])
    assert out.token_ids == ref and set(out.info["exit_entry"][1:]) == {L - 1}


# --- the API: generate, custom_generate -----------------------------------------------------------------

def test_generate_records_and_batches_one_at_a_time(tiny_llama):
    from earlyexit.methods.dola import generate

    model, tok = tiny_llama
    prompts = [SHORT, "Once upon a time"]
    ref = [generate(model, tok, [p], decoding="vanilla", repetition_penalty=1.0, max_new_tokens=12, stop=())[0]
           for p in prompts]
    got = generate(model, tok, prompts, decoding="self-speculative", repetition_penalty=1.0, max_new_tokens=12,
                   stop=(), batch_size=8, method_settings={"exit_entry": 2, "max_draft": 3})
    assert [g.token_ids for g in got] == [r.token_ids for r in ref]
    assert set(got[0].stats) == {"drafts_proposed", "drafts_accepted", "acceptance_rate", "verify_passes",
                                 "tokens_per_verify"}
    assert len(got[0].info["drafted"]) == len(got[0].token_ids)
    ex = generate(model, tok, prompts[:1], decoding="early-exit", repetition_penalty=1.0, max_new_tokens=12,
                  stop=(), method_settings={"exit_entries": [2, 3]})
    assert len(ex[0].info["exit_entry"]) == len(ex[0].token_ids)


def test_custom_generate(tiny_llama):
    from earlyexit.methods.dola import custom_generate

    model, tok = tiny_llama
    enc = tok([SHORT], return_tensors="pt")
    ref = model.generate(**enc, do_sample=False, max_new_tokens=12, min_new_tokens=12, pad_token_id=0)
    for name, settings in (("self-speculative", {"exit_entry": 2, "max_draft": 3}),
                           ("layer-skip", {"skip_layers": [1], "max_draft": 3})):
        seq = model.generate(**enc, custom_generate=custom_generate, decoding=name, method_settings=settings,
                             max_new_tokens=12, min_new_tokens=12, pad_token_id=0)
        assert seq.tolist() == ref.tolist(), name


# --- bad input ---------------------------------------------------------------------------------------

def test_bad_settings(tiny_llama):
    model, tok = tiny_llama
    L = _n_layers(model)
    bad = [
        ("self-speculative", {"exit_entry": 0}, "outside 1..3"),
        ("self-speculative", {"exit_entry": L}, "outside 1..3"),
        ("self-speculative", {"exit_entry": 2.0}, "integer"),
        ("self-speculative", {"exit_entry": 2, "max_draft": 0}, "max_draft"),
        ("self-speculative", {"exit_entry": 2, "max_draft": -1}, "max_draft"),
        ("self-speculative", {"exit_entry": 2, "draft_threshold": 1.5}, r"\[0, 1\]"),
        ("self-speculative", {"exit_entry": 2, "draft_threshold": -0.1}, r"\[0, 1\]"),
        ("layer-skip", {"skip_layers": [L]}, "layer index"),
        ("layer-skip", {"skip_layers": list(range(L))}, "every layer"),
        ("layer-skip", {"skip_layers": []}, "non-empty"),
        ("layer-skip", {"skip_layers": "most"}, "'auto'"),
        ("layer-skip", {"skip_layers": [1], "max_draft": 0}, "max_draft"),
        ("early-exit", {"threshold": 1.2}, r"\[0, 1\]"),
        ("early-exit", {"threshold": -0.5, "confidence": "prob"}, r"\[0, 1\]"),
        ("early-exit", {"threshold": 99.0, "confidence": "entropy"}, "log V"),
        ("early-exit", {"confidence": "cosine"}, "Unknown confidence"),
        ("early-exit", {"exit_entries": [0, 2]}, "outside"),
        ("early-exit", {"exit_entries": [L]}, "outside"),
        ("early-exit", {"exit_entries": []}, "non-empty"),
    ]
    for name, kw, msg in bad:
        with pytest.raises(BadInput, match=msg):
            make_scorer(model, name, **kw)


def test_batch_of_two_is_refused(tiny_llama):
    model, tok = tiny_llama
    for name, kw in (("self-speculative", {"exit_entry": 2}), ("layer-skip", {"skip_layers": [1]}),
                     ("early-exit", {})):
        with pytest.raises(BadInput, match="batch 1"):
            decode(model, [[1, 2, 3], [4, 5]], make_scorer(model, name, **kw), max_new_tokens=3, pad_id=0)


def test_observers_are_refused(tiny_llama):
    from earlyexit.core.decoding import LensObserver

    model, tok = tiny_llama
    obs = LensObserver(model, [1, 4], "normed", 1, 1, 3)
    with pytest.raises(BadInput, match="observers"):
        decode(model, [[1, 2, 3]], make_scorer(model, "self-speculative", exit_entry=2), max_new_tokens=3, pad_id=0,
               observers=[obs])


# --- calibration, costs, searches ---------------------------------------------------------------------

def test_expected_tokens_and_break_even():
    assert ee.expected_tokens(0.0, 4) == 1.0 and ee.expected_tokens(1.0, 4) == 4.0
    assert ee.expected_tokens(0.5, 3) == pytest.approx(1.75)
    c = ee.CostModel(layer=[1.0, 1.2], head=[2.0, 2.5], step=12.0, source="test")  # L = 10 layers of 1
    assert c.speedup(0.0, 1, 5, 5) == pytest.approx(12.0 / (7.0 + 7.0))
    # two drafts cost 2·7 + (5·1.2 + 2.5) = 22.5 = 1.875 greedy steps: break-even at 1 + α = 1.875
    assert c.break_even(2, 5, 5) == pytest.approx(0.875, abs=1e-6)
    assert c.break_even(1, 5, 5) is None  # one draft costs (7 + 7) / 12 > 1 step: never pays
    cheap = ee.CostModel(layer=[1.0, 1.0], head=[0.5, 0.5], step=10.5, source="test")
    be = cheap.break_even(2, 2, 8)  # cost (2·2.5 + 8.5) / 10.5 = 1.286 tokens → α ≈ 0.286
    assert be == pytest.approx(0.2857, abs=1e-3)
    assert cheap.speedup(be, 2, 2, 8) == pytest.approx(1.0, abs=1e-6)


def test_search_and_auto_entry_on_a_tiny_model(tokenizer):
    model = _identity_last_layer()
    L = _n_layers(model)
    cal = [_ids(tokenizer, SHORT), _ids(tokenizer, "Once upon a time there was")]
    costs = ee.CostModel.analytic(model, 4)
    choice = ee.choose_exit_entry(model, max_draft=4, calibration=cal, costs=costs)
    assert choice.acceptance[L - 1] == 1.0 and choice.acceptance[L] == 1.0
    assert choice.best["entry"] == L - 1  # exact drafts at the largest saving
    search = ee.search_skip_layers(model, max_draft=4, calibration=cal, costs=costs)
    assert search.single[L - 1] == 1.0 and search.path[0]["skip_layers"] == [L - 1]  # the harmless layer first
    assert 0 not in search.skip_layers and 0 <= search.acceptance <= 1
    assert search.speedup == max(p["predicted_speedup"] for p in search.path)
    sc = make_scorer(model, "layer-skip", skip_layers="auto", calibration=cal, max_draft=4)
    assert sc.settings()["search"]["skip_layers"] == sc.skip_layers and 0 not in sc.skip_layers


def test_skip_acceptance_one_pass_equals_window_by_window(tiny, monkeypatch):
    model, tok = tiny
    cal = ee.calibrate(model, [_ids(tok, LONG), _ids(tok, SHORT)], new_tokens=10)
    one_pass = [ee.skip_acceptance(model, cal, skip, 4) for skip in ([1], [0, 2], [2, 3])]
    monkeypatch.setattr(ee, "_draft_window_masks", lambda *a, **k: None)
    windows = [ee.skip_acceptance(model, cal, skip, 4) for skip in ([1], [0, 2], [2, 3])]
    assert one_pass == windows


def test_skip_acceptance_of_the_identity_layer(tokenizer):
    model = _identity_last_layer()
    L = _n_layers(model)
    cal = ee.calibrate(model, [_ids(tokenizer, SHORT)], new_tokens=12)
    assert ee.skip_acceptance(model, cal, [L - 1], 4) == 1.0
    acc = ee.lens_acceptance(model, cal)
    assert acc[L - 1] == 1.0 and acc[L] == 1.0


# --- SmolLM2 (slow) -----------------------------------------------------------------------------------

QUESTIONS = ("What happens if you eat watermelon seeds?", "What is the capital of France?")


@pytest.mark.slow
def test_smollm2_lossless_with_stop_strings(smollm2):
    from earlyexit.methods.dola import generate
    from earlyexit.studies.prompts import truthfulqa_prompt

    model, tok = smollm2
    prompts = [truthfulqa_prompt(q) for q in QUESTIONS]
    kw = dict(repetition_penalty=1.0, max_new_tokens=40, stop=("Q:",))
    ref = generate(model, tok, prompts, decoding="vanilla", batch_size=1, **kw)
    for name, settings in (("self-speculative", {"exit_entry": 24, "max_draft": 4}),
                           ("self-speculative", {"exit_entry": 20, "max_draft": 3, "draft_threshold": 0.4}),
                           ("layer-skip", {"skip_layers": [20, 22, 24, 26], "max_draft": 3})):
        got = generate(model, tok, prompts, decoding=name, method_settings=settings, **kw)
        assert [g.token_ids for g in got] == [r.token_ids for r in ref], (name, settings)
        assert [g.text for g in got] == [r.text for r in ref]
        assert all(0 <= g.stats["acceptance_rate"] <= 1 for g in got)


@pytest.mark.slow
def test_smollm2_early_exit_never_triggers(smollm2):
    model, tok = smollm2
    from earlyexit.studies.prompts import truthfulqa_prompt

    ids = _ids(tok, truthfulqa_prompt(QUESTIONS[0]))
    ref = _greedy(model, ids, n=16)
    _, out = _run(model, ids, "early-exit", n=16, confidence="prob", threshold=1.0)
    assert out.token_ids == ref


# --- the exit analysis --------------------------------------------------------------------------------

def _synthetic_tokens(n_answers=40, L=6, seed=0):
    """Answers whose tokens settle at a known entry: correct answers (even rows) settle at 2, wrong ones at 4;
    the lens's confidence rises once a token has settled."""
    from earlyexit.studies.exit_analysis import ExitTokens

    rng = np.random.default_rng(seed)
    n_tok = rng.integers(1, 6, n_answers)
    n_tok[3] = 0  # an empty answer
    answer = np.repeat(np.arange(n_answers), n_tok)
    position = np.concatenate([np.arange(k) for k in n_tok])
    T = len(answer)
    settle = np.where(answer % 2 == 0, 2, 4)
    entries = np.arange(L + 1)[:, None]
    agree = entries >= settle[None]
    agree[0] |= rng.random(T) < 0.3  # an early lucky agreement that does not stay: not settled
    agree[1] &= False
    prob = np.where(agree & (entries >= settle[None]), 0.9, 0.2).astype(np.float32)
    margin = np.where(agree & (entries >= settle[None]), 0.8, 0.05).astype(np.float32)
    entropy = np.where(agree & (entries >= settle[None]), 0.3, 3.0).astype(np.float32)
    return ExitTokens(np.arange(n_answers), [f"a{i}" for i in range(n_answers)], n_tok, answer, position, agree, prob,
                      margin, entropy, list(range(L + 1)), "normed"), settle


def test_settling_entries():
    from earlyexit.studies.exit_analysis import settling_entries

    agree = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 1]], dtype=bool)
    assert settling_entries(agree, [0, 1, 2]).tolist() == [2, 1, 0]
    tie = np.array([[1], [0]], dtype=bool)  # not even the last entry agrees: counted at L
    assert settling_entries(tie, [0, 1]).tolist() == [1]
    with pytest.raises(ValueError):
        settling_entries(agree, [0, 1])


def test_exit_analysis_on_known_tokens():
    from earlyexit.studies import exit_analysis as xa

    tokens, settle = _synthetic_tokens()
    L = tokens.L
    assert np.array_equal(tokens.settle, settle)
    s = xa.settling_summary(tokens, n_boot=200)
    assert sum(s["histogram"]) == len(settle) and s["histogram"][2] + s["histogram"][4] == len(settle)
    assert s["oracle_saving"]["estimate"] == pytest.approx(1 - settle.mean() / L)
    assert s["oracle_saving"]["low"] <= s["oracle_saving"]["estimate"] <= s["oracle_saving"]["high"]
    labels = (np.arange(tokens.n) % 2 == 0).astype(float)
    labels[5] = np.nan  # unlabelled
    b = xa.by_label(tokens, labels, n_boot=200, n_perm=500)
    assert b["correct"]["mean_entry"]["estimate"] == 2 and b["wrong"]["mean_entry"]["estimate"] == 4
    assert b["difference_wrong_minus_correct"]["estimate"] == pytest.approx(2.0)
    assert b["tests"]["permutation_p"] < 0.01 and b["tests"]["auroc_wrong_later"] == 1.0
    pos = xa.by_position(tokens, n_boot=100)
    assert sum(p["n_tokens"] for p in pos) == len(settle) and pos[0]["positions"] == "0"
    # a policy at λ that passes exactly where tokens have settled: agreement 1 at the oracle's cost
    exits = xa.exit_entries(tokens, "prob", 0.5)
    assert np.array_equal(exits, settle)
    assert xa.policy_outcome(tokens, exits) == (pytest.approx(settle.mean()), 1.0)
    never = xa.exit_entries(tokens, "entropy", -1.0)
    assert (never == L).all()
    always = xa.exit_entries(tokens, "margin", 0.0, allowed=[3, 5])
    assert (always == 3).all()
    curve = xa.policy_curve(tokens, "margin")
    assert curve["mean_layers"] == sorted(curve["mean_layers"]) and curve["agreement"][-1] == 1.0
    cal = xa.calibrate_policies(tokens, targets=(0.99,), n_boot=100)
    assert cal["calibration_answers"] + cal["test_answers"] == int((tokens.n_tokens > 0).sum())
    for p in cal["policies"]:
        assert p["test"]["agreement"]["estimate"] == 1.0
        assert p["test"]["mean_layers"]["estimate"] == pytest.approx(cal["oracle"]["mean_layers"]["estimate"])
    full = xa.analyse(tokens, {"threshold": labels}, n_boot=100, n_perm=200)
    assert full["n_tokens"] == len(settle) and "threshold" in full["by_label"]


def test_split_answers_is_disjoint():
    from earlyexit.studies.exit_analysis import split_answers

    a, b = split_answers(11, 0.5, seed=3)
    assert len(a) + len(b) == 11 and not set(a) & set(b)
    with pytest.raises(ValueError):
        split_answers(10, 1.0)


def test_collect_tokens_on_a_tiny_model(tiny_llama, tmp_path):
    from earlyexit.studies import exit_analysis as xa
    from earlyexit.studies.data import TruthfulQAItem

    model, tok = tiny_llama
    items = [TruthfulQAItem(i, q, "x", ["x"], ["y"]) for i, q in enumerate(["Why is the sky blue?", "Who are you?"])]
    tokens = xa.collect_tokens(model, tok, items, max_new_tokens=6, batch_size=2, cache_dir=tmp_path)
    assert tokens.n == 2 and tokens.agree.shape == (5, int(tokens.n_tokens.sum()))
    assert tokens.agree[-1].all()  # entry L is the model's own top-1
    again = xa.collect_tokens(model, tok, items, max_new_tokens=6, batch_size=2, cache_dir=tmp_path)
    assert np.array_equal(again.settle, tokens.settle)
