"""Invariants of the kernel and the decoding loop, on tiny random models (fast tier)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from earlyexit import lens_stats
from earlyexit.core import store
from earlyexit.core.decoding import Decoded, decode, make_scorer
from earlyexit.core.lenses import RawLens, get_unembed, resolve_lens
from earlyexit.methods.contrast import js_distance_logprobs
from earlyexit.studies.mc import MCQuestion, QuestionRaw, js_from_logprobs

PROMPTS = ["The capital of France is", "Q: What is two plus two?\nA:", "Once upon a time"]


@pytest.mark.parametrize("scale, softcap", [(None, None), (0.5, None), (1 / 8, None), (None, 5.0), (0.25, 3.0)])
def test_unembed_out_and_transposed_equal_the_plain_path(tiny_llama, scale, softcap):
    """scale (Cohere), divide (Granite's 1/logits_scaling) and soft-capping (Gemma): the in-place ``out=``
    path and the ``W @ hᵀ`` layout give the plain path's logits."""
    u = get_unembed(tiny_llama[0])
    old = u.scale, u.softcap
    u.scale, u.softcap = scale, softcap
    try:
        with torch.no_grad():
            h = torch.randn(3, 7, u.hidden_size, generator=torch.Generator().manual_seed(0))
            plain = u(h)
            buf = torch.empty(3, 7, u.vocab_size)
            assert u(h, out=buf) is buf
            torch.testing.assert_close(buf, plain, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(u(h, transposed=True), plain, rtol=1e-5, atol=1e-5)
            if softcap is not None:
                assert plain.abs().max() <= softcap
    finally:
        u.scale, u.softcap = old


def test_kl_is_non_negative_and_entropy_within_its_bounds(tiny):
    model, tok = tiny
    for lens in ("normed", "raw"):
        r = lens_stats(model, tok, PROMPTS, positions="all", kl=True, lens=lens)
        ent, kl = r.entropy[:, :, :][r.valid[:, None, :].expand_as(r.entropy)], r.kl_to_final
        kl = kl[r.valid[:, None, :].expand_as(kl)]
        assert (ent >= -1e-5).all() and (ent <= math.log(get_unembed(model).vocab_size) + 1e-4).all()
        assert (kl >= -1e-5).all()
        assert r.kl_to_final[:, -1][r.valid].abs().max() < 1e-5  # entry L against itself


class _StopRowAt:
    """Stops batch row ``row`` after ``n`` tokens; the others run to the length limit."""

    def __init__(self, B: int, row: int, n: int):
        self.done, self.row, self.n, self.count = [False] * B, row, n, 0

    def update(self, next_tokens):
        self.count += 1
        if self.count >= self.n:
            self.done[self.row] = True
        return self.done


@pytest.mark.parametrize("decoding", ["vanilla", "dola"])
def test_dropping_finished_rows_changes_nothing(tiny, decoding):
    model, tok = tiny
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    kw = {"dola_layers": [1, 2, 3], "repetition_penalty": 1.2} if decoding == "dola" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scorer = make_scorer(model, decoding, **kw)
    full = decode(model, ids, scorer, max_new_tokens=8, pad_id=0)
    early = decode(model, ids, scorer, max_new_tokens=8, pad_id=0, stop=_StopRowAt(3, row=0, n=2))
    assert len(early[0].token_ids) == 2 and early[0].token_ids == full[0].token_ids[:2]
    for a, b in zip(full[1:], early[1:]):  # the rows that stayed: token for token, and the same layers
        assert a.token_ids == b.token_ids and a.info == b.info
    alone = [decode(model, [x], scorer, max_new_tokens=8, pad_id=0)[0] for x in ids]
    assert [d.token_ids for d in alone] == [d.token_ids for d in full]


def test_mc_layer_choice_equals_decodings(tiny_llama):
    """DoLa's per-token premature layer: the decoder's choice at each step equals MC's choice
    (:meth:`QuestionRaw.token_scores`) on the same positions."""
    model, tok = tiny_llama
    cands = [1, 2, 3]
    prompt = tok(PROMPTS[1])["input_ids"]
    out = decode(model, [prompt], make_scorer(model, "dola", dola_layers=cands, repetition_penalty=1.2,
                                               relative_top=1e-3), max_new_tokens=6, pad_id=0)[0]
    seq = prompt + out.token_ids
    with torch.no_grad():
        hs = model(input_ids=torch.tensor([seq]), output_hidden_states=True).hidden_states
    L = get_unembed(model).n_layers
    pos = list(range(len(prompt) - 1, len(seq) - 1))
    lens = RawLens(get_unembed(model))
    hidden = torch.stack([hs[e][0, pos] for e in [L, *cands]])
    lp = torch.log_softmax(lens.logits(hidden, [L, *cands]), -1)
    tgt = torch.tensor(out.token_ids)
    n = len(tgt)
    raw = QuestionRaw(MCQuestion(0, "q", ["a"], [0], [0], 0), cands, "raw", [0, n],
                      lp[0, torch.arange(n), tgt], lp[1:, torch.arange(n), tgt], js_from_logprobs(lp[0], lp[1:]))
    _, chosen = raw.token_scores("dola", candidates=cands)
    assert chosen.tolist() == out.info["premature_layer"]


def test_mc_cache_is_invalidated_when_the_weights_change(tiny_llama, tmp_path):
    from earlyexit.studies.data import TruthfulQAItem
    from earlyexit.studies.mc import mc_raw_cached

    model, tok = tiny_llama
    items = [TruthfulQAItem(0, "Is the sky blue?", "Yes", ["It is blue"], ["It is green"])]
    first = mc_raw_cached(model, tok, items, layers=[2], cache_dir=tmp_path)
    fp = store.model_fingerprint(model)
    with torch.no_grad():
        p = next(model.parameters())
        p.add_(0.5)
    try:
        assert store.model_fingerprint(model) != fp  # changed in place: another key
        again = mc_raw_cached(model, tok, items, layers=[2], cache_dir=tmp_path)
        assert not torch.equal(again[0].final, first[0].final)  # recomputed, not read back
        assert len(list(tmp_path.glob("*.pt"))) == 2
    finally:
        with torch.no_grad():
            p.sub_(0.5)


def test_one_cache_variable_and_its_deprecated_alias(monkeypatch, tmp_path):
    monkeypatch.delenv(store.ENV, raising=False)
    monkeypatch.setenv(store.DEPRECATED_ENV, str(tmp_path / "old"))
    store._warned.clear()
    with pytest.warns(DeprecationWarning, match=store.ENV):
        assert store.cache_root() == tmp_path / "old"
    monkeypatch.setenv(store.ENV, str(tmp_path / "new"))
    assert store.cache_root() == tmp_path / "new" and store.area("features") == tmp_path / "new" / "features"


def test_store_entries_are_verified_on_read(tmp_path):
    p = tmp_path / "x.pt"
    store.write_object(p, "k1", {"a": [1, 2]})
    assert store.read_object(p, "k1") == {"a": [1, 2]}
    with pytest.warns(UserWarning, match="key does not match"):
        assert store.read_object(p, "k2") is None
    p.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable"):
        assert store.read_object(p, "k1") is None


def test_a_lens_of_another_model_is_refused(tiny_llama):
    from earlyexit.core.tiny import tiny_model

    other = tiny_model("llama", seed=1)
    lens = resolve_lens(other, "normed")
    with pytest.raises(ValueError, match="another model"):
        lens_stats(tiny_llama[0], tiny_llama[1], PROMPTS[:1], lens=lens)
