"""Beyond one process: data parallelism through ``accelerate launch`` (real processes, gloo on CPU),
models dispatched / offloaded by accelerate, half precision, and the memory estimates.

The multi-process tests start ``accelerate launch --multi_gpu --num_processes 2`` (a torchrun launch; on a
machine without CUDA :mod:`earlyexit.core.parallel` runs the group on CPU over gloo — accelerate 1.15's
``--cpu`` flag would start a single process) on a tiny model saved to a folder: two launches in all (MC and
generation, the entropy study's answers and the probe features in one, the killed worker in the other), each
the start of three Python processes, not a model's compute; the first also runs the early-exit analysis's
tokens and a few steps of tuned-lens training with its evaluation. The numbers are identical (the tuned
lens's training: equal to float rounding) at the same number of threads per process (1 in the workers and in the references: with 2 threads a long reduction, e.g. the probe
features' folded projection or SmolLM2's products, rounds differently, see bench/scale.py).
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DATA_DIR, REPO, _tiny
from earlyexit.core import parallel
from earlyexit.core.memory import LLAMA2, ModelShape, memory_needed, memory_table

ACCELERATE = Path(sys.executable).parent / "accelerate"
LAUNCH = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
PROMPTS = ["The capital of France is", "Q: Why is the sky blue?\nA:"]


# --- sharding, one process ----------------------------------------------------------------------

def test_assignment_covers_every_item_once_in_whole_units():
    for n in (0, 1, 5, 7, 12):
        for size in (1, 2, 3, 5):
            for mode in ("contiguous", "strided"):
                for unit in (1, 2, 4):
                    plan = parallel.assignment(n, size, mode=mode, unit=unit)
                    assert len(plan) == size
                    assert sorted(i for p in plan for i in p) == list(range(n))
                    for p in plan:  # whole units: a process's items start on a unit boundary, unit by unit
                        starts = [i for i in p if i % unit == 0]
                        assert all(any(s <= i < s + unit for s in starts) for i in p)
    assert parallel.assignment(6, 2, unit=2) == [[0, 1, 2, 3], [4, 5]]
    assert parallel.assignment(6, 2, mode="strided", unit=2) == [[0, 1, 4, 5], [2, 3]]
    with pytest.raises(ValueError, match="sharding"):
        parallel.assignment(3, 2, mode="random")


def test_single_process_needs_no_launcher():
    assert not parallel.launched() and parallel.state() is None
    assert parallel.num_processes() == 1 and parallel.is_main_process()
    assert parallel.gather({"a": 1}) == [{"a": 1}] and parallel.broadcast(3) == 3
    res, info = parallel.map_items(lambda part: [x + 1 for x in part], [5, 6, 7], ids=["a", "b", "c"])
    assert res == [6, 7, 8] and info.as_meta() == {"num_processes": 1, "sharding": "contiguous", "unit": 1,
                                                    "indices": [["a", "b", "c"]]}
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([1.0, 3.0])
    t = torch.tensor([2.0])
    parallel.average_gradients([p], weight=5)
    parallel.reduce_sum([t])
    assert p.grad.tolist() == [1.0, 3.0] and t.tolist() == [2.0]  # no-ops: one process holds every item


# --- real processes ---------------------------------------------------------------------------------

def _env(tmp_path: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", EARLYEXIT_DATA_DIR=str(DATA_DIR), EARLYEXIT_CACHE=str(tmp_path / "cache"),
               TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1",
               OMP_NUM_THREADS="1")  # torchrun's default, stated: an inherited value would change the rounding
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _launch(args: list[str], tmp_path: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(LAUNCH + args, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=timeout)


class _one_thread:
    """The references run on one thread, as each launched worker does (torchrun sets OMP_NUM_THREADS=1): a
    reduction split over two threads rounds differently (e.g. the probe features' folded projection)."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def _one_process(args: list[str]) -> None:
    from earlyexit.cli import main

    with _one_thread():
        assert main(args) == 0


def _payload(path: Path) -> tuple[dict, dict]:
    doc = json.loads(Path(path).read_text())
    meta = doc.pop("meta")
    return doc, meta


MC_ARGS = ["truthfulqa", "mc", "--decoding", "dola", "--limit", "6"]
GEN_ARGS = ["truthfulqa", "generate", "--decoding", "dola", "--limit", "4", "--batch-size", "2", "--max-new-tokens", "8"]


@pytest.fixture(scope="module")
def two_processes(tiny_folder, tmp_path_factory):
    """MC on 6 questions and DoLa answers to 4, by one process (in this one) and by two launched processes
    (both commands in one launch: tests/_cli_sequence.py runs each as ``-m earlyexit`` would), then the
    studies (entropy answers, probe features, exit tokens, tuned lens) in the same launch; their one-process
    references are computed by the tests below."""
    tmp = tmp_path_factory.mktemp("two")
    files = {k: {n: tmp / f"{k}{n}.json" for n in (1, 2)} for k in ("mc", "gen")}
    mc = MC_ARGS + ["--model", tiny_folder]
    gen = GEN_ARGS + ["--model", tiny_folder]
    _one_process(mc + ["--out", str(files["mc"][1])])
    _one_process(gen + ["--out", str(files["gen"][1])])
    files["studies"] = {2: tmp / "studies2.pt"}
    files["cache"] = {2: tmp / "cache2"}
    run = _launch([str(REPO / "tests" / "_cli_sequence.py"), *mc, "--out", str(files["mc"][2]), ":::",
                   *gen, "--out", str(files["gen"][2]), ":::", "studies", tiny_folder, str(files["studies"][2]),
                   str(tmp / "cache2")], tmp)
    assert run.returncode == 0, run.stderr[-3000:]
    return files, run


def test_mc_on_two_processes_is_identical_to_one(two_processes):
    files, run = two_processes
    assert run.stdout.count("wrote ") == 2  # per command, the main process alone writes and says so
    p1, m1 = _payload(files["mc"][1])
    p2, m2 = _payload(files["mc"][2])
    assert p2 == p1  # every score, every per-question record, the same order
    assert m1["num_processes"] == 1 and "parallel" not in m1
    assert m2["num_processes"] == 2 and m2["parallel"]["sharding"] == "contiguous"
    assert m2["parallel"]["indices"] == [[0, 1, 2], [3, 4, 5]]  # TruthfulQA rows each process scored
    assert m2["settings"] == m1["settings"]


def test_generation_on_two_processes_is_identical_to_one(two_processes):
    files, _ = two_processes
    p1, m1 = _payload(files["gen"][1])
    p2, m2 = _payload(files["gen"][2])
    assert p2 == p1 and p2["complete"] and len(p2["items"]) == 4
    assert [r["index"] for r in p2["items"]] == [0, 1, 2, 3]
    assert m2["num_processes"] == 2 and m2["parallel"]["unit"] == 2  # whole batches per process
    assert m2["parallel"]["indices"] == [[0, 1], [2, 3]]


def test_entropy_answers_and_probe_features_on_two_processes_are_identical(two_processes, tiny_folder, tmp_path):
    import numpy as np

    from earlyexit.core.models import load_model
    from earlyexit.studies.data import load_true_false, load_truthfulqa
    from earlyexit.studies.entropy import generate_answers
    from earlyexit.studies.features import extract_features

    files, _ = two_processes
    got = torch.load(files["studies"][2], weights_only=False)
    model, tok = load_model(tiny_folder)
    with _one_thread():
        ref = generate_answers(model, tok, load_truthfulqa(DATA_DIR, 4), batch_size=2, chunk_size=2,
                               max_new_tokens=8, cache_dir=False, progress=False)
    a = got["answers"]
    assert a.texts == ref.texts and np.array_equal(a.n_tokens, ref.n_tokens)
    assert np.array_equal(a.means, ref.means, equal_nan=True)
    assert a.parallel["num_processes"] == 2 and a.parallel["indices"] == [[0, 1], [2, 3]]  # a chunk each
    with _one_thread():
        feats = extract_features(model, tok, load_true_false("cities", DATA_DIR, 8), "prompted", batch_size=2,
                                 chunk_size=4, use_cache=False)
    f = got["features"]
    for k in ("hidden", "lens", "top1", "word_logprobs", "labels"):
        assert np.array_equal(getattr(f, k), getattr(feats, k)), k
    assert f.stats["parallel"]["indices"] == [[0, 1, 2, 3], [4, 5, 6, 7]] and f.stats["misses"] == 2


def _same_tokens(a, b) -> None:
    import numpy as np

    for k in ("indices", "n_tokens", "answer", "position", "agree", "prob", "margin", "entropy"):
        assert np.array_equal(getattr(a, k), getattr(b, k)), k
    assert a.texts == b.texts and a.layers == b.layers and a.lens == b.lens


def test_exit_analysis_tokens_on_two_processes_are_identical(two_processes, tiny_folder):
    from _cli_sequence import exit_tokens
    from earlyexit.core.models import load_model

    files, _ = two_processes
    got = torch.load(files["studies"][2], weights_only=False)["exit"]
    model, tok = load_model(tiny_folder)
    with _one_thread():
        ref = exit_tokens(model, tok, False)
    _same_tokens(got, ref)  # every reading of every token of every answer, in question order
    assert ref.parallel is None and got.parallel["num_processes"] == 2 and got.parallel["unit"] == 2
    assert got.parallel["indices"] == [[0, 1, 2, 3], [4]]  # whole chunks of 2 questions: 2 + 1 chunks
    assert len(list((files["cache"][2] / "exit").glob("tokens-*.npz"))) == 3  # each process wrote its chunks
    _same_tokens(exit_tokens(model, tok, files["cache"][2] / "exit"), ref)  # read back: keys and contents valid


def test_tuned_lens_training_on_two_processes_matches_one(two_processes, tiny_folder):
    """3 SGD steps after a least-squares start, each step's 3 windows split 2 + 1 over the processes.

    Tolerance: every translator entry within 1e-7 of one process's (absolute; the entries reach 0.34, whose
    float32 spacing is 3e-8, and the three steps move them by 1e-4 to 3e-3, at least 1000 times more); the
    logged KL within 1e-6 nats. Not exact, because the all-reduce adds the processes' float32 gradients in
    another order than one process accumulates its batches, and each process's mean over its own rows is
    reweighted (× rows / total): float32 rounding, ~1e-7 relative per gradient entry, which the steps
    (lr 0.1) carry into the weights — measured ≤ 2e-9. The KL is a difference of terms of size log V ≈ 11,
    so its float32 rounding is ~1e-6 absolute (measured 3e-8). The forward batches are the ones a single
    process runs here, the least-squares start differs only by float64 summation order, and the
    evaluation, sharded in whole batches, is identical."""
    import numpy as np

    from _cli_sequence import LENS_SETTINGS, LENS_TEXTS, lens_evals, train_lens
    from earlyexit.core.models import load_model
    from earlyexit.core.tuned_lens import METRICS, TrainSettings, TunedLens, train_tuned_lens

    files, _ = two_processes
    got = torch.load(files["studies"][2], weights_only=False)
    model, tok = load_model(tiny_folder)
    two = TunedLens.load(files["cache"][2] / "lens", model)  # written by the main process alone
    with _one_thread():
        one, log = train_lens(model, tok)
        start = train_tuned_lens(model, tok, TrainSettings(**{**LENS_SETTINGS, "lr_scale": 0.0}), texts=LENS_TEXTS,
                                 progress=False)  # the least-squares start alone (steps of lr 0)
    a, b = one.layer_translators.state_dict(), two.layer_translators.state_dict()
    s0 = start.layer_translators.state_dict()
    for k in a:
        assert float((a[k] - b[k]).abs().max()) <= 1e-7, k
        assert float((a[k] - s0[k]).abs().max()) >= 1e-5, k  # the steps moved every translator (100× that)
    assert [r["step"] for r in got["lens_log"]] == [r["step"] for r in log] == [0, 1, 2, 3]
    np.testing.assert_allclose([r["kl"] for r in got["lens_log"][1:]], [r["kl"] for r in log[1:]], rtol=0, atol=1e-6)
    t1, t2 = one.meta["trained"], two.meta["trained"]
    assert t1["num_processes"] == 1 and "parallel" not in t1
    assert t2["num_processes"] == 2 and t2["parallel"]["indices"] == [[0, 1], [2]]  # positions in each step
    assert t2["parallel"]["init_indices"] == [[0, 1, 2, 3], [4]]  # the least-squares windows, whole batches
    assert t2["settings"] == t1["settings"] and not got["checkpoint_left"]  # the main process removed it
    # weighted by each process's items (an empty shard: weight 0, no gradient); plain mean; none anywhere
    assert got["grads"] == [([1.0, 2.0, 3.0], [0.5], True)] * 2
    with _one_thread():
        ref = lens_evals(model, tok, two)
    for name, ev in got["evals"].items():
        for m in METRICS:
            assert np.array_equal(getattr(ev, m), getattr(ref[name], m)), (name, m)


def test_a_killed_worker_leaves_no_result_file(tiny_folder, tmp_path):
    from earlyexit.core.results import load_result

    out = tmp_path / "mc.json"
    run = _launch([str(REPO / "tests" / "_kill_worker.py"), "truthfulqa", "mc", "--model", tiny_folder,
                   "--decoding", "dola", "--limit", "6", "--out", str(out)], tmp_path)
    assert run.returncode != 0
    assert not out.exists()  # the main process never got the killed worker's share: nothing written
    with pytest.raises(FileNotFoundError):
        load_result(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mc.json")]  # no temporary left behind


# --- sharded / offloaded models ---------------------------------------------------------------------

DEVICE_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
              "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}


@pytest.fixture(scope="module")
def whole_and_dispatched(tiny_llama, tmp_path_factory):
    """The tiny Llama, and a copy dispatched by accelerate with layers 1 and 3 and the head offloaded to disk
    (their weights live on ``meta`` between calls; accelerate's hooks load them)."""
    from accelerate import dispatch_model

    model, tok = tiny_llama
    d = dispatch_model(copy.deepcopy(model), device_map=DEVICE_MAP, offload_dir=str(tmp_path_factory.mktemp("offload")))
    d.earlyexit_name = model.earlyexit_name
    assert d.lm_head.weight.device.type == "meta" and d.model.layers[1].mlp.up_proj.weight.device.type == "meta"
    return model, d, tok


def test_dispatched_model_gives_the_same_lens_dola_and_mc(whole_and_dispatched):
    from earlyexit import lens_stats
    from earlyexit.core import store
    from earlyexit.methods.dola import generate
    from earlyexit.studies.data import load_truthfulqa
    from earlyexit.studies.mc import evaluate, mc_raw

    model, d, tok = whole_and_dispatched
    for lens in ("normed", "raw"):
        a = lens_stats(model, tok, PROMPTS, positions="all", kl=True, lens=lens)
        b = lens_stats(d, tok, PROMPTS, positions="all", kl=True, lens=lens)
        assert torch.equal(a.top_ids, b.top_ids)
        torch.testing.assert_close(b.entropy, a.entropy, equal_nan=True, rtol=0, atol=1e-6)
        torch.testing.assert_close(b.kl_to_final, a.kl_to_final, equal_nan=True, rtol=0, atol=1e-6)
    ga = generate(model, tok, PROMPTS, decoding="dola", max_new_tokens=8)
    gb = generate(d, tok, PROMPTS, decoding="dola", max_new_tokens=8)
    assert [g.token_ids for g in gb] == [g.token_ids for g in ga]
    assert [g.premature_layers for g in gb] == [g.premature_layers for g in ga]
    items = load_truthfulqa(DATA_DIR, 2)
    ra, rb = mc_raw(model, tok, items, layers=[1, 2, 3]), mc_raw(d, tok, items, layers=[1, 2, 3])
    for x, y in zip(ra, rb):
        torch.testing.assert_close(y.final, x.final, rtol=0, atol=1e-6)
        torch.testing.assert_close(y.js, x.js, rtol=0, atol=1e-7)
    ea, eb = evaluate(ra, "dola", candidates=[1, 3], n_boot=10), evaluate(rb, "dola", candidates=[1, 3], n_boot=10)
    assert eb.means == pytest.approx(ea.means, abs=1e-9) and eb.premature_counts == ea.premature_counts
    assert store.model_fingerprint(d) == store.model_fingerprint(model)  # the same weights, the same cache keys


@pytest.mark.parametrize("decoding, settings", [
    ("sled", {}),
    ("early-exit", {"threshold": 0.5}),
    ("self-speculative", {"exit_entry": 2, "max_draft": 3}),
    ("layer-skip", {"skip_layers": [1, 2], "max_draft": 3}),
])
def test_dispatched_model_gives_the_same_sled_and_early_exit_tokens(whole_and_dispatched, decoding, settings):
    """The other decoders too: SLED reads every layer's logits, the early-exit methods run the layers one by one
    (through accelerate's hooks when offloaded) and copy or reuse their KV."""
    from earlyexit.methods.dola import generate

    model, d, tok = whole_and_dispatched
    ga = generate(model, tok, PROMPTS, decoding=decoding, max_new_tokens=8, batch_size=1, method_settings=settings)
    gb = generate(d, tok, PROMPTS, decoding=decoding, max_new_tokens=8, batch_size=1, method_settings=settings)
    assert [g.token_ids for g in gb] == [g.token_ids for g in ga]
    assert [g.info for g in gb] == [g.info for g in ga]  # exit entries, drafts proposed and accepted


def test_load_model_with_a_device_map_and_cpu_offload(tiny_folder, tmp_path, tiny_llama):
    from accelerate import cpu_offload

    from earlyexit import lens_stats, load_model

    model, tok = tiny_llama
    ref = lens_stats(model, tok, PROMPTS, positions="all", kl=True)
    mapped, _ = load_model(tiny_folder, device_map=DEVICE_MAP, offload_folder=tmp_path / "offload")
    assert mapped.hf_device_map["lm_head"] == "disk"
    off = cpu_offload(copy.deepcopy(model), execution_device="cpu")  # every weight offloaded
    for m in (mapped, off):
        r = lens_stats(m, tok, PROMPTS, positions="all", kl=True)
        assert torch.equal(r.top_ids, ref.top_ids)
        torch.testing.assert_close(r.entropy, ref.entropy, equal_nan=True, rtol=0, atol=1e-5)
    from earlyexit.core.meta import run_metadata

    assert run_metadata(mapped, 1)["device_map"]["lm_head"] == "disk"
    with pytest.raises(ValueError, match="not both"):
        load_model(tiny_folder, device="cpu", device_map="auto")


# --- half precision -----------------------------------------------------------------------------------

def test_bf16_lens_is_float32_statistics_within_1e_2_nats(tiny_llama):
    from earlyexit import lens_stats
    from earlyexit.methods.dola import generate

    model, tok = tiny_llama
    half = copy.deepcopy(model).to(torch.bfloat16)
    for lens in ("normed", "raw"):
        a = lens_stats(model, tok, PROMPTS, positions="all", kl=True, lens=lens)
        b = lens_stats(half, tok, PROMPTS, positions="all", kl=True, lens=lens)
        assert b.entropy.dtype == torch.float32 and b.kl_to_final.dtype == torch.float32
        assert float((a.entropy - b.entropy)[a.valid[:, None].expand_as(a.entropy)].abs().max()) < 1e-2
        assert float(b.kl_to_final[:, -1][b.valid].abs().max()) < 1e-5  # entry L is the model's own output
    prompt = ["Q: What is the capital of Italy?\nA:"]
    ga = generate(model, tok, prompt, decoding="dola", max_new_tokens=10)
    gb = generate(half, tok, prompt, decoding="dola", max_new_tokens=10)
    assert gb[0].token_ids == ga[0].token_ids and gb[0].premature_layers == ga[0].premature_layers


def test_fp16_overflow_is_a_clear_error(tiny_llama):
    from earlyexit import lens_stats
    from earlyexit.core.unembed import NonFiniteLogits

    model, tok = tiny_llama
    half = copy.deepcopy(model).to(torch.float16)
    with torch.no_grad():
        half.model.embed_tokens.weight.mul_(3e3)  # raw-lens logits beyond float16's range (65,504)
        half.lm_head.weight.mul_(3e3)
    with pytest.raises(NonFiniteLogits, match="bfloat16"):
        lens_stats(half, tok, PROMPTS[:1], lens="raw")


# --- memory from the shapes ---------------------------------------------------------------------------

def test_memory_from_shapes():
    # the published parameter counts of Llama-2 7B, 13B, 70B
    assert [s.params for s in LLAMA2.values()] == [6_738_415_616, 13_015_864_320, 68_976_648_192]
    tiny = ModelShape("t", n_layers=2, hidden=8, intermediate=16, vocab=10, n_heads=2, n_kv_heads=1)
    m = memory_needed(tiny, dtype_bytes=2, batch=3, primer_tokens=4, prompt_tokens=5, new_tokens=6, candidates=1,
                      lens_entries=3, answers=2, answer_tokens=3, mc_entries=2, chunk_bytes=800, step_chunk_bytes=480)
    assert m.weights == 2 * (2 * 10 * 8 + 2 * (2 * 64 + 2 * 8 * 4 + 3 * 8 * 16 + 16) + 8)
    assert m.kv_cache == 2 * 2 * 4 * 2 * (3 * 15 + 4)           # K and V × layers × kv width × bytes × positions
    assert m.prefill_hidden == 3 * 8 * 2 * (4 + 3 * 5)           # (L+1) states of the primer and the batch's own
    assert m.lens_workspace == 2 * 4 * 3 * 2 * 10 + 3 * 2 * 10 * 2  # rows = 480 // (8·10·3) = 2
    assert m.dola_step == 2 * 3 * 10 * 6 + 3 * 1 * 3 * 10 * 4
    assert m.generation == m.weights + m.kv_cache + m.prefill_hidden + m.lens_workspace
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32)
    assert ModelShape.from_config(cfg).params == LLAMA2["7b"].params
    table = memory_table()
    assert table.count("\n") == 4 and "Llama-2-70b" in table
