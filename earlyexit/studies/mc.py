"""TruthfulQA multiple choice (the DoLa paper's protocol): answer log-probabilities per layer, MC1/MC2/MC3.

One forward per question: the prompt's KV cache (and the few-shot primer's, shared by every
question) is computed once and all answers of the question run as one right-padded batch on top
of it. At every answer token the final layer's log-probability of that token is kept, with each
candidate layer's (raw lens by default) and the JS-style distance of each candidate from the final
layer. From these :class:`QuestionRaw` records every decoding is derived without another forward:
vanilla (Σ log p_final), dynamic DoLa over any bucket (premature layer chosen per token among the
bucket's candidates by the largest distance) and static DoLa at any single candidate layer
(Σ [log p_final − log p_premature], no plausibility filter).

>>> from earlyexit import load_model, load_truthfulqa                       # doctest: +SKIP
>>> model, tok = load_model("smollm2-135m")                                  # doctest: +SKIP
>>> raws = mc_raw(model, tok, load_truthfulqa(limit=2), layers=[15, 17])    # doctest: +SKIP
>>> evaluate(raws, "dola", candidates=[15, 17]).means["mc1"]               # doctest: +SKIP
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from earlyexit.core import store
from earlyexit.core.batching import pad_id
from earlyexit.core.lenses import LensLike, check_entries, get_unembed, resolve_lens
from earlyexit.core.prefix import extend_prefix
from earlyexit.core.stats import CHUNK_BYTES
from earlyexit.methods.contrast import choose_premature, contrast, js_distance_logprobs
from earlyexit.methods.sled import SledSettings, premature_logits, target_scores
from earlyexit.studies.data import TruthfulQAItem
from earlyexit.studies.prompts import truthfulqa_primer, truthfulqa_prompt

MC_DECODINGS = ("vanilla", "dola", "dola-static", "sled")
CACHE_VERSION = "mc-raw-v1"


# --- answers ------------------------------------------------------------------------------------

def format_answer(answer: str) -> str:
    """TruthfulQA's answer formatting: stripped, with a final "." appended when it does not end with one."""
    answer = answer.strip()
    if not answer:
        raise ValueError("Empty answer text.")
    return answer if answer.endswith(".") else answer + "."


@dataclass(frozen=True)
class MCQuestion:
    """The answers of one question, each scored once.

    answers: the unique formatted answer texts; true / false: indices into ``answers``;
    best: index of the Best Answer (always one of ``true``).
    """

    index: int
    question: str
    answers: list[str]
    true: list[int]
    false: list[int]
    best: int


def mc_question(item: TruthfulQAItem) -> MCQuestion:
    """Best, true (Correct Answers, the Best Answer added when missing) and false (Incorrect Answers)."""
    answers: list[str] = []

    def slot(text: str) -> int:
        text = format_answer(text)
        if text not in answers:
            answers.append(text)
        return answers.index(text)

    best = slot(item.best_answer)
    true = [best] + [i for i in (slot(a) for a in item.correct_answers) if i != best]
    true = list(dict.fromkeys(true))
    false = list(dict.fromkeys(slot(a) for a in item.incorrect_answers))
    if not false:
        raise ValueError(f"Question {item.index} has no incorrect answers: MC scores need at least one.")
    return MCQuestion(item.index, item.question, answers, true, false, best)


# --- one forward per question -------------------------------------------------------------------

@dataclass
class QuestionRaw:
    """Per-token log-probabilities of one question's answers.

    layers: the candidate hidden-state entries (C); offsets ``[A+1]``: answer a owns tokens
    ``offsets[a]:offsets[a+1]`` of the flat axis (N tokens over all answers); final ``[N]``: log p of
    each answer token under the model's output; premature ``[C, N]``: under each candidate layer's
    lens; js ``[C, N]``: distance of each candidate from the final layer at that position; sled
    (when scored with SLED): ``{"settings", "layers", "logprob" [N], "logit" [N]}``, each answer token's
    log-probability under SLED's evolved distribution and its evolved logit (floored outside the top-k).
    """

    question: MCQuestion
    layers: list[int]
    lens: str
    offsets: list[int]
    final: Tensor
    premature: Tensor
    js: Tensor
    sled: dict | None = None

    def token_scores(self, decoding: str, *, candidates: Sequence[int] | None = None,
                     premature_layer: int | None = None, post_softmax: bool = True) -> tuple[Tensor, Tensor | None]:
        """Per-token scores ``[N]`` under ``decoding`` and the chosen premature entry per token (or None):
        DoLa's choice and contrast are the decoder's own (:func:`~earlyexit.methods.contrast.choose_premature`,
        :func:`~earlyexit.methods.contrast.contrast`), on the cached per-token arrays, no plausibility filter.
        SLED: the evolved distribution's log-probabilities, or with ``post_softmax=False`` the evolved
        logits (floored) that the authors' ``lm_score`` sums by default (not normalised per position)."""
        if decoding == "vanilla":
            return self.final, None
        if decoding == "sled":
            if self.sled is None:
                raise ValueError("These answers were scored without SLED: compute them with "
                                 "question_raw(..., sled=SledSettings.mc()).")
            return (self.sled["logprob"] if post_softmax else self.sled["logit"]), None
        if decoding == "dola":
            if not candidates:
                raise ValueError("dola needs a non-empty list of candidate layers.")
            layers = list(candidates)
        elif decoding == "dola-static":
            if premature_layer is None:
                raise ValueError("dola-static needs premature_layer.")
            layers = [premature_layer]
        else:
            raise ValueError(f"Unknown decoding {decoding!r}; use one of {MC_DECODINGS}.")
        idx = torch.tensor([self._row(c) for c in layers])
        choice = choose_premature(self.js[idx]) if len(layers) > 1 else torch.zeros_like(self.final, dtype=torch.long)
        prem = self.premature[idx[choice], torch.arange(self.final.shape[0])]
        return contrast(self.final, prem), torch.tensor(layers)[choice]

    def answer_scores(self, decoding: str, *, normalise: bool = False, **kw) -> list[float]:
        """Score of every answer: the sum (or, with ``normalise``, the mean) of its token scores."""
        tok, _ = self.token_scores(decoding, **kw)
        out = []
        for a in range(len(self.offsets) - 1):
            seg = tok[self.offsets[a]:self.offsets[a + 1]].double()
            out.append(float(seg.mean() if normalise else seg.sum()))
        return out

    def _row(self, layer: int) -> int:
        if layer not in self.layers:
            raise IndexError(f"Layer {layer} was not scored; scored candidate layers: {self.layers}")
        return self.layers.index(layer)


def primer_ids(tokenizer) -> list[int]:
    """The primer's tokens as they appear inside every prompt (tokenisers may merge its trailing
    blank line differently when a question follows): the common prefix of two prompts' tokens."""
    a = list(tokenizer(truthfulqa_prompt("Why?"))["input_ids"])
    b = list(tokenizer(truthfulqa_prompt("Is it so?"))["input_ids"])
    return a[:_common_prefix([a, b])]


def _device(model) -> torch.device:
    """Where the input ids go (a sharded model's first device)."""
    from earlyexit.core.parallel import input_device

    return input_device(model)


def _common_prefix(lists: Sequence[Sequence[int]]) -> int:
    n = min(len(x) for x in lists)
    for i in range(n):
        t = lists[0][i]
        if any(x[i] != t for x in lists):
            return i
    return n


@torch.no_grad()
def question_raw(model, tokenizer, question: MCQuestion, *, layers: Sequence[int], lens: LensLike = "raw",
                 primer: Sequence[int] | None = None, shared: bool = True,
                 chunk_bytes: int = CHUNK_BYTES, sled: SledSettings | None = None) -> QuestionRaw:
    """Log-probabilities of every answer token of ``question``, final and per candidate layer.

    Prompt and answer are tokenised together (``prompt + " " + answer``); the answer's tokens are
    those after the prompt's own token count. With ``shared`` the tokens all answers share (the
    prompt) run once and the answers run as one batch on its KV cache; without it every answer is
    one full forward (the reference, and the benchmark's baseline). ``primer``: tokens of a few-shot
    primer whose KV cache is computed once and copied (:func:`~earlyexit.core.prefix.extend_prefix`).
    ``sled``: also score every answer token under SLED's evolved distribution (same forward; its
    premature entries through its own lens), e.g. ``sled=SledSettings.mc()`` with ``layers=[]``.
    """
    lens = resolve_lens(model, lens)
    unembed = get_unembed(model)
    L = unembed.n_layers
    layers = check_entries(L, layers, final=False, what="Candidate layer") if len(layers) else []
    sled_layers, sled_lens = sled.resolve(model) if sled is not None else ([], None)
    dev, hdev = _device(model), unembed.device
    prompt = truthfulqa_prompt(question.question)
    n_prompt = len(tokenizer(prompt)["input_ids"])
    full = [list(tokenizer(prompt + " " + a)["input_ids"]) for a in question.answers]
    for a, ids in zip(question.answers, full):
        if len(ids) <= n_prompt:
            raise ValueError(f"Answer {a!r} adds no tokens after the prompt.")
    entries = [L] + layers
    # positions t = n_prompt-1 .. len-2 predict tokens n_prompt .. len-1
    if shared:
        p = min(_common_prefix(full), n_prompt - 1)
        cache = extend_prefix(model, full[0][:p], primer or [])
        groups = [(list(range(len(full))), p, cache)]
    else:
        groups = [([a], 0, None) for a in range(len(full))]
    # every answer position once; positions with the same context (a shared answer prefix, e.g. the
    # prompt's last position, which every answer shares) are one row
    row_of: list[int] = []
    keys: dict[tuple, int] = {}
    hidden_rows: list[Tensor] = []
    for answers, p, cache in groups:
        suffixes = [full[a][p:] for a in answers]
        S = max(len(s) for s in suffixes)
        B = len(answers)
        ids = torch.full((B, S), pad_id(tokenizer), dtype=torch.long)
        for i, s in enumerate(suffixes):
            ids[i, :len(s)] = torch.tensor(s)  # right padding: real tokens never attend to it
        if cache is not None and B > 1:
            cache.batch_repeat_interleave(B)
        pos = torch.arange(p, p + S)[None].expand(B, S)
        out = model(input_ids=ids.to(dev), position_ids=pos.to(dev), past_key_values=cache,
                    use_cache=cache is not None, output_hidden_states=True, logits_to_keep=1)
        hs = out.hidden_states
        take_b, take_c = [], []
        for i, a in enumerate(answers):
            for t in range(n_prompt - 1, len(full[a]) - 1):
                key = tuple(full[a][:t + 1])
                if key not in keys:
                    keys[key] = len(keys)
                    take_b.append(i)
                    take_c.append(t - p)
                row_of.append(keys[key])
        if take_b:
            tb, tc = torch.tensor(take_b, device=dev), torch.tensor(take_c, device=dev)
            # each entry's rows from the device its layer ran on to the head's, once per question
            hidden_rows.append(torch.stack([hs[e][tb.to(hs[e].device), tc.to(hs[e].device)].to(hdev)
                                            for e in entries + sled_layers]))
        del out, hs
    # answers come in order (one group, or one group per answer), so row_of follows the flat token axis
    hidden = torch.cat(hidden_rows, dim=1)  # [E, U, d]
    targets = torch.tensor([t for ids in full for t in ids[n_prompt:]], device=hdev)
    row_t = torch.tensor(row_of, device=hdev)
    offsets = [0]
    for ids in full:
        offsets.append(offsets[-1] + len(ids) - n_prompt)
    N, U = targets.shape[0], hidden.shape[1]
    final = torch.empty(N)
    premature = torch.empty(len(layers), N)
    js = torch.empty(len(layers), N)
    E = len(entries)
    sled_lp, sled_lg = (torch.empty(N), torch.empty(N)) if sled is not None else (None, None)
    # ``chunk_bytes`` of logits per chunk, or as many as the head's own weight holds if that is more: every
    # chunk reads the whole head once per product, and a product over a few rows is bound by that read
    # (Gemma-3's SLED pass had 1 row per 64 MB chunk and ran 2.2x slower)
    w = unembed.head.weight
    row_bytes = 4 * unembed.vocab_size * (E + 2 * len(sled_layers))
    rows = max(1, max(chunk_bytes, w.numel() * w.element_size()) // row_bytes)
    for s in range(0, U, rows):
        e = min(U, s + rows)
        logits = lens.logits(hidden[:E, s:e], entries)  # [E, n, V]
        logp = torch.log_softmax(logits, dim=-1)
        k = ((row_t >= s) & (row_t < e)).nonzero().squeeze(1)
        lp_t = logp[:, row_t[k] - s, targets[k]]  # [E, len(k)]
        final[k.cpu()] = lp_t[0].cpu()
        if layers:
            premature[:, k.cpu()] = lp_t[1:].cpu()
            js[:, k.cpu()] = js_from_logprobs(logp[0], logp[1:])[:, row_t[k] - s].cpu()
        del logp, lp_t
        if sled is not None:
            prem = premature_logits(sled_lens, hidden[E:, s:e], sled_layers, sled.premature_dtype)  # [N_sled, n, V]
            lp_s, lg_s = target_scores(logits[0], prem, row_t[k] - s, targets[k], inplace=True,
                                       evolution_scale=sled.evolution_scale, evolution_rate=sled.evolution_rate,
                                       evolution_steps=sled.evolution_steps,
                                       evolution_lower_bound=sled.evolution_lower_bound)
            sled_lp[k.cpu()], sled_lg[k.cpu()] = lp_s.cpu(), lg_s.cpu()
            del prem
        del logits
    sled_rec = None if sled is None else {"settings": sled.as_dict(), "layers": sled_layers, "logprob": sled_lp,
                                          "logit": sled_lg}
    return QuestionRaw(question, layers, lens.name, offsets, final, premature, js, sled_rec)


def js_from_logprobs(final_logprobs: Tensor, premature_logprobs: Tensor) -> Tensor:
    """:func:`earlyexit.methods.contrast.js_distance_logprobs`, one candidate at a time (bounded memory).

    final_logprobs ``[N, V]``, premature_logprobs ``[C, N, V]`` → ``[C, N]``.
    """
    if premature_logprobs.dim() != 3 or premature_logprobs.shape[1:] != final_logprobs.shape:
        raise ValueError(f"premature_logprobs must be [C, N, V] with [N, V] = {tuple(final_logprobs.shape)}, "
                         f"got {tuple(premature_logprobs.shape)}")
    # one candidate at a time keeps the [C, N, V] temporaries of the shared formula to [1, N, V]
    return torch.cat([js_distance_logprobs(final_logprobs, lp_j[None]) for lp_j in premature_logprobs])


def mc_raw(model, tokenizer, items: Sequence[TruthfulQAItem], *, layers: Sequence[int], lens: LensLike = "raw",
           shared: bool = True, progress: bool = False, sled: SledSettings | None = None,
           sharding: str = "contiguous") -> list[QuestionRaw]:
    """:func:`question_raw` for every item, the primer's KV cache computed once for all of them. In an
    ``accelerate launch`` group each process scores its shard and every process returns all questions in
    order (see :func:`mc_raw_sharded`)."""
    return mc_raw_sharded(model, tokenizer, items, layers=layers, lens=lens, shared=shared, progress=progress,
                          sled=sled, sharding=sharding)[0]


def mc_raw_sharded(model, tokenizer, items: Sequence[TruthfulQAItem], *, layers: Sequence[int],
                   lens: LensLike = "raw", shared: bool = True, progress: bool = False,
                   sled: SledSettings | None = None, sharding: str = "contiguous"):
    """:func:`mc_raw` and its :class:`~earlyexit.core.parallel.ParallelInfo`: the questions are sharded over
    the processes of an ``accelerate launch`` group (``sharding``: ``"contiguous"`` or ``"strided"``, see
    :mod:`earlyexit.core.parallel`), each scores its own (questions are independent, so the records are
    those of one process), and the records are gathered in question order on every process."""
    from earlyexit.core import parallel

    questions = [mc_question(it) for it in items]
    if not questions:
        raise ValueError("No questions given.")
    primer = primer_ids(tokenizer) if shared else None

    def score(part: list[MCQuestion]) -> list[QuestionRaw]:
        return [question_raw(model, tokenizer, q, layers=layers, lens=lens, primer=primer, shared=shared, sled=sled)
                for q in tqdm(part, desc="MC", disable=not progress or not parallel.is_main_process())]

    return parallel.map_items(score, questions, mode=sharding, ids=[q.index for q in questions])


def mc_layers(model) -> dict[str, list[int]]:
    """The DoLa buckets of ``model`` ("high", "low") and "all": their union, the layers scored for
    every decoding (static DoLa picks its single layer among them)."""
    from earlyexit.methods.contrast import dola_buckets

    unembed = get_unembed(model)
    buckets = dola_buckets(unembed.n_layers, unembed.arch.tied_embeddings)
    return {**buckets, "all": sorted(set(buckets["high"]) | set(buckets["low"]))}


# --- cache --------------------------------------------------------------------------------------

def cache_key(model, items: Sequence[TruthfulQAItem], layers: Sequence[int], lens: str,
              sled: SledSettings | None = None) -> str:
    """Key of an MC run: the model's weights fingerprint, the questions, layers, lens and primer (and
    SLED's settings when it is scored; a run without SLED keeps its key)."""
    return store.make_key("mc-raw", {"v": CACHE_VERSION, "weights": store.model_fingerprint(model),
                                     "items": [(it.index, it.question) for it in items], "layers": list(layers),
                                     "lens": lens, "primer": truthfulqa_primer(),
                                     **({"sled": sled.as_dict()} if sled is not None else {})})


def _stem(model, key: str, n: int) -> str:
    from earlyexit.core.models import model_name

    return f"dola_mc_raw_{store.slug(Path(model_name(model)).name)}_n{n}_{key[:12]}"


def mc_raw_cached(model, tokenizer, items: Sequence[TruthfulQAItem], *, layers: Sequence[int], lens: LensLike = "raw",
                  cache_dir: str | Path | None = None, worker: tuple[int, int] | None = None, order_seed: int = 0,
                  checkpoint_every: int = 5, progress: bool = False,
                  sled: SledSettings | None = None, return_info: bool = False):
    """:func:`mc_raw` whose result is kept in the store's ``mc`` area (or ``cache_dir``), keyed by the model's
    weights fingerprint, the questions, layers, lens and SLED settings (verified on read).

    Questions run in a seeded random order (so an unfinished run holds a random subset, see
    :func:`mc_raw_available`), checkpointed every ``checkpoint_every`` questions (atomically); a new
    call skips every question any earlier or concurrent run has saved. ``worker=(k, K)`` takes every
    K-th question of that order from the k-th on, to split a long run over K processes; the call
    that completes the set writes the whole cache file. Returns all questions when the set is
    complete, else the ones available (with a worker: after its share is done).

    In an ``accelerate launch`` group ``worker`` defaults to (this process, the group's size): the same
    strided split of the seeded order (:func:`earlyexit.core.parallel.assignment`), each process
    checkpointing its own share; the shares are then gathered, so every process returns all questions
    and the main process writes the whole file. ``return_info`` also returns the
    :class:`~earlyexit.core.parallel.ParallelInfo` (the questions each process scored in this call).
    """
    from earlyexit.core import parallel

    lens = resolve_lens(model, lens)
    folder = store.area("mc", cache_dir)
    key = cache_key(model, items, layers, lens.name, sled)
    stem = _stem(model, key, len(items))
    path = folder / f"{stem}.pt"
    group = worker is None and parallel.num_processes() > 1
    whole = store.read_object(path, key)
    if group:  # every process must take the same branch
        whole = parallel.broadcast(whole)
    if whole is not None:
        raws = _from_records(whole)
        return (raws, parallel.ParallelInfo(parallel.num_processes(), "strided", 1,
                                            [[] for _ in range(parallel.num_processes())])) if return_info else raws
    k, K = (parallel.process_index(), parallel.num_processes()) if worker is None else worker
    if not 0 <= k < K:
        raise ValueError(f"worker {worker} must be (k, K) with 0 <= k < K")
    n = len(items)
    have = _load_all(folder, stem, key)
    order = np.random.default_rng(order_seed).permutation(n)
    share = [int(order[j]) for j in parallel.assignment(n, K, mode="strided")[k]]  # order[k::K]
    todo = [i for i in share if i not in have]
    mine_path = folder / f"{stem}.w{k}of{K}.partial.pt"
    mine: dict[int, dict] = store.read_object(mine_path, key) or {}
    todo = [i for i in todo if i not in mine]
    primer = primer_ids(tokenizer)
    bar = tqdm(total=len(todo), desc=f"MC (worker {k}/{K})", disable=not progress)
    for j, i in enumerate(todo):
        mine[i] = _to_record(question_raw(model, tokenizer, mc_question(items[i]), layers=layers, lens=lens,
                                          primer=primer, sled=sled))
        bar.update(1)
        if (j + 1) % checkpoint_every == 0 or j + 1 == len(todo):
            store.write_object(mine_path, key, mine)
    bar.close()
    done_by = [[items[i].index for i in todo]]
    have = _load_all(folder, stem, key)
    if group:  # the other processes' shares, through the process group rather than their files
        gathered = parallel.gather((mine, done_by[0]))
        for got, _ in gathered:
            have.update(got)
        done_by = [ids for _, ids in gathered]
        parallel.barrier()  # every process has read the partial files before the main one removes them
    if len(have) == n and (not group or parallel.is_main_process()):
        store.write_object(path, key, [have[i] for i in range(n)])
        for f in folder.glob(f"{stem}.*.pt"):
            f.unlink(missing_ok=True)
    raws = _from_records([have[i] for i in sorted(have)])
    if return_info:
        return raws, parallel.ParallelInfo(K, "strided", 1, done_by if group else
                                           [done_by[0] if j == k else [] for j in range(K)])
    return raws


def mc_raw_available(model, items: Sequence[TruthfulQAItem], *, layers: Sequence[int], lens: LensLike = "raw",
                     cache_dir: str | Path | None = None, sled: SledSettings | None = None) -> list[QuestionRaw]:
    """The questions already computed by :func:`mc_raw_cached` runs (finished or checkpointed, one
    process or several) for these items, layers, lens and SLED settings, in question order, computing nothing."""
    key = cache_key(model, items, layers, resolve_lens(model, lens).name, sled)
    have = _load_all(store.area("mc", cache_dir), _stem(model, key, len(items)), key)
    return _from_records([have[i] for i in sorted(have)])


def _load_all(folder: Path, stem: str, key: str) -> dict[int, dict]:
    """Records by question position from every cache file of ``stem`` (whole, contiguous parts
    ``.partA-B[.partial].pt``, or workers' ``.w{k}of{K}.partial.pt`` dicts)."""
    import re

    found: dict[int, dict] = {}
    if not folder.exists():
        return found
    for f in sorted(folder.glob(f"{stem}*.pt")):
        m = re.fullmatch(re.escape(stem) + r"(?:\.part(\d+)-(\d+)|\.w\d+of\d+)?(\.partial)?\.pt", f.name)
        if not m:
            continue
        data = store.read_object(f, key)
        if data is None:
            continue
        if isinstance(data, dict):
            found.update({int(i): r for i, r in data.items()})
        else:
            start = int(m.group(1)) if m.group(1) else 0
            found.update({start + i: r for i, r in enumerate(data)})
    return found


def _to_record(r: QuestionRaw) -> dict:
    q = r.question
    return {"question": {"index": q.index, "question": q.question, "answers": q.answers, "true": q.true,
                         "false": q.false, "best": q.best},
            "layers": r.layers, "lens": r.lens, "offsets": r.offsets, "final": r.final, "premature": r.premature,
            "js": r.js, **({"sled": r.sled} if r.sled is not None else {})}


def _from_records(records: list[dict]) -> list[QuestionRaw]:
    return [QuestionRaw(MCQuestion(**d["question"]), d["layers"], d["lens"], d["offsets"], d["final"],
                        d["premature"], d["js"], d.get("sled")) for d in records]


# --- metrics ------------------------------------------------------------------------------------

def mc_metrics(scores_true: Sequence[float], scores_false: Sequence[float], best: int = 0) -> dict[str, float]:
    """MC1, MC2, MC3 of one question (TruthfulQA / DoLa definitions).

    MC1 = 1 if the best answer (``scores_true[best]``) scores above every false answer;
    MC2 = Σ exp(true) / Σ exp(true ∪ false), computed in log space so scores of hundreds of nats
    do not overflow; MC3 = share of true answers that score above every false answer.

    >>> mc_metrics([-1.0, -3.0], [-2.0])["mc3"]
    0.5
    """
    t = np.asarray(scores_true, dtype=float)
    f = np.asarray(scores_false, dtype=float)
    if t.size == 0 or f.size == 0:
        raise ValueError("MC scores need at least one true and one false answer.")
    if not 0 <= best < t.size:
        raise IndexError(f"best index {best} out of range for {t.size} true answers")
    if not (np.isfinite(t).all() and np.isfinite(f).all()):
        raise ValueError("MC scores must be finite.")
    max_false = f.max()
    log_true = _logsumexp(t)
    log_all = _logsumexp(np.concatenate([t, f]))
    return {"mc1": float(t[best] > max_false), "mc2": float(math.exp(log_true - log_all)),
            "mc3": float((t > max_false).mean())}


def _logsumexp(x: np.ndarray) -> float:
    m = float(x.max())
    return m + math.log(float(np.exp(x - m).sum()))


@dataclass
class MCResult:
    """Per-question MC results of one decoding, with means and 95% bootstrap CIs.

    items: dicts with ``index``, ``question``, ``scores_true``, ``scores_false`` (summed scores),
    ``mc1``, ``mc2``, ``mc3``, ``mc2_norm`` (MC2 of the per-token mean scores) and, for DoLa, the
    per-token chosen premature layers counted in ``premature_counts``.
    """

    decoding: str
    settings: dict
    items: list[dict]
    means: dict[str, float]
    ci: dict[str, dict[str, float]]
    premature_counts: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"decoding": self.decoding, "settings": self.settings, "n": len(self.items), **self.means,
                "ci": self.ci, "premature_counts": {str(k): v for k, v in sorted(self.premature_counts.items())},
                "items": self.items}


METRICS = ("mc1", "mc2", "mc3", "mc2_norm")


def evaluate(raws: Sequence[QuestionRaw], decoding: str, *, candidates: Sequence[int] | None = None,
             premature_layer: int | None = None, n_boot: int = 2000, seed: int = 0,
             per_question_layer: Sequence[int] | None = None, post_softmax: bool = True) -> MCResult:
    """MC1/MC2/MC3 (+ length-normalised MC2) of ``decoding`` over the questions of ``raws``.

    ``per_question_layer`` (static DoLa only) gives each question its own premature layer, e.g. one
    chosen on the other fold of a cross-validation. ``post_softmax`` (SLED only): True scores answers
    by the log-probabilities of the evolved distribution (the protocol of the other decodings);
    False by the sums of evolved logits floored at the lower bound, the default of the SLED authors'
    ``lm_score`` — unnormalised per position, so MC1/MC3 rank unnormalised sums and MC2 is not a
    ratio of answer probabilities.
    """
    from earlyexit.studies.bootstrap import bootstrap_ci

    if decoding not in MC_DECODINGS:
        raise ValueError(f"Unknown decoding {decoding!r}; use one of {MC_DECODINGS}.")
    if not raws:
        raise ValueError("No questions to evaluate.")
    items, counts = [], {}
    for i, r in enumerate(raws):
        kw = {"candidates": candidates, "premature_layer": premature_layer, "post_softmax": post_softmax}
        if per_question_layer is not None:
            kw["premature_layer"] = per_question_layer[i]
        tok, chosen = r.token_scores(decoding, **kw)
        q = r.question
        sums, means = [], []
        for a in range(len(q.answers)):
            seg = tok[r.offsets[a]:r.offsets[a + 1]].double()
            sums.append(float(seg.sum()))
            means.append(float(seg.mean()))
        st, sf = [sums[a] for a in q.true], [sums[a] for a in q.false]
        m = mc_metrics(st, sf, best=0)
        m["mc2_norm"] = mc_metrics([means[a] for a in q.true], [means[a] for a in q.false])["mc2"]
        rec = {"index": q.index, "question": q.question, "scores_true": st, "scores_false": sf, **m}
        if chosen is not None:
            for layer in chosen.tolist():
                counts[layer] = counts.get(layer, 0) + 1
            if per_question_layer is not None:
                rec["premature_layer"] = int(kw["premature_layer"])
        items.append(rec)
    means = {k: float(np.mean([it[k] for it in items])) for k in METRICS}
    ci = {k: bootstrap_ci([it[k] for it in items], n_boot=n_boot, seed=seed).as_dict() for k in METRICS}
    settings = {"candidates": list(candidates) if candidates else None,
                "premature_layer": premature_layer, "lens": raws[0].lens}
    if decoding == "sled":
        settings = {"sled": raws[0].sled["settings"], "layers": raws[0].sled["layers"], "post_softmax": post_softmax}
    return MCResult(decoding, settings, items, means, ci, counts)


def static_cross_validation(raws: Sequence[QuestionRaw], layers: Sequence[int], *, folds: int = 2, seed: int = 0,
                            criterion: Sequence[str] = ("mc1", "mc2", "mc3"), n_boot: int = 2000) -> dict:
    """Static DoLa at the "best single layer", the layer never chosen on the questions it is scored on.

    Questions are split into ``folds`` random folds (fixed ``seed``). For each fold the layer with the
    highest mean of ``criterion`` on the OTHER folds is chosen and scored on this fold. Returns the
    per-fold choices and scores, the cross-fitted result over all questions (each question scored with
    the layer chosen without it), and the in-sample score of every layer (choosing from that table
    would be choosing on the test questions).
    """
    n = len(raws)
    if n < folds:
        raise ValueError(f"Cross-validation over {folds} folds needs at least {folds} questions, got {n}.")
    if not layers:
        raise ValueError("No candidate layers for static DoLa.")
    rng = np.random.default_rng(seed)
    fold_of = np.empty(n, dtype=int)
    fold_of[rng.permutation(n)] = np.arange(n) % folds
    per_layer = {}
    for layer in layers:
        res = evaluate(raws, "dola-static", premature_layer=layer, n_boot=1)
        per_layer[layer] = {k: np.array([it[k] for it in res.items]) for k in METRICS}
    chosen = np.empty(n, dtype=int)
    fold_rows = []
    for f in range(folds):
        sel, test = fold_of != f, fold_of == f
        crit = {layer: float(np.mean([per_layer[layer][k][sel].mean() for k in criterion])) for layer in layers}
        best = max(layers, key=lambda x: (crit[x], -x))
        chosen[test] = best
        fold_rows.append({"fold": f, "n_select": int(sel.sum()), "n_test": int(test.sum()), "layer": int(best),
                          "select_criterion": crit[best],
                          "test": {k: float(per_layer[best][k][test].mean()) for k in METRICS}})
    cross = evaluate(raws, "dola-static", per_question_layer=chosen.tolist(), n_boot=n_boot)
    for it, f in zip(cross.items, fold_of):
        it["fold"] = int(f)
    cross.settings.update({"selection": f"{folds}-fold cross-validation over questions (seed {seed}), layer "
                           f"maximising the mean of {'/'.join(criterion)} on the other folds",
                           "candidates": list(layers)})
    in_sample = {int(layer): {k: float(v.mean()) for k, v in per_layer[layer].items()} for layer in layers}
    return {"folds": fold_rows, "cross_fitted": cross, "in_sample": in_sample, "criterion": list(criterion)}
