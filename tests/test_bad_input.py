"""The bad-input catalogue (issue 16): every case is an input a user may give, the exit code or error it
must end in, a fragment of the message, and the files it leaves (none created, none changed, none lost).
No case may print a traceback, and the CLI cases fail before any model is loaded unless marked otherwise.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest

from earlyexit.cli import main
from earlyexit.core.errors import (BadInput, BadType, DataError, DataNotFound, EarlyexitError, ModelCacheError,
                                   ModelError, OutOfRange, OutputPathError, ResultsError)

DATA = Path(os.environ["EARLYEXIT_DATA_DIR"])
TQ = "truthfulqa/TruthfulQA.csv"
Q0 = "What happens to you if you eat watermelon seeds?"


# --- the sandbox every case runs in -----------------------------------------------------------------

def _results(tmp: Path) -> None:
    from earlyexit.core.results import GenerateResults, MCResults, ProbesResults

    MCResults(meta={"model": "m", "n": 1}, payload={"decodings": {"dola": {"mc1": 0.5}}}).save(tmp / "mc.json")
    items = [{"index": 0, "question": Q0, "completion": "Nothing happens.", "token_ids": [1, 2],
              "premature_layers": [15, 17]}]
    GenerateResults(meta={"model": "m", "n": 1, "settings": {}},
                    payload={"indices": [0], "complete": True, "n_done": 1, "items": items}).save(tmp / "gen.json")
    ProbesResults(meta={"model": "m", "n": 1}, payload={"taps": [1]}).save(tmp / "res" / "entropy_smollm2-135m.json")


def _predictions(tmp: Path) -> None:
    def gen(rows, **kw):
        return json.dumps({"kind": "truthfulqa-generate", "meta": {"model": "m"}, "indices": [0],
                           "complete": kw.get("complete", True), "n_done": 1, "items": rows})

    (tmp / "paper.json").write_text(json.dumps({"question": [Q0], "model_completion": ["Nothing."]}))
    (tmp / "paper_null.json").write_text(json.dumps({"question": [Q0], "model_completion": [None]}))
    (tmp / "paper_len.json").write_text(json.dumps({"question": [Q0, Q0], "model_completion": ["a"]}))
    (tmp / "null.json").write_text(gen([{"index": 0, "question": Q0, "completion": None}]))
    (tmp / "nocomp.json").write_text(gen([{"index": 0, "question": Q0}]))
    (tmp / "numcomp.json").write_text(gen([{"index": 0, "question": Q0, "completion": 7}]))
    (tmp / "partial.json").write_text(gen([{"index": 0, "question": Q0, "completion": "a"}], complete=False))
    (tmp / "notq.json").write_text(gen([{"index": 5000, "question": "Is this a question?", "completion": "a"}]))
    (tmp / "empty_items.json").write_text(gen([]))
    (tmp / "bad.json").write_text('{"items": [{"index": 0, ')
    (tmp / "list.json").write_text("[1, 2, 3]")


def _tq(tmp: Path, name: str, edit) -> None:
    text = (DATA / TQ).read_text(encoding="utf-8-sig")
    path = tmp / name / TQ
    path.parent.mkdir(parents=True)
    path.write_text(edit(text), encoding="utf-8")


def _tf(tmp: Path, name: str, edit) -> None:
    src = DATA / "true-false"
    dst = tmp / name / "true-false"
    shutil.copytree(src, dst)
    city = dst / "cities_true_false.csv"
    city.write_text(edit(city.read_text()))


def _cut_quoted(text: str) -> str:  # inside the last row's quoted Incorrect Answers
    return text[: text.rstrip().rfind('"') - 10]


def _cut_row(text: str) -> str:  # the last row ends after its Best Answer
    last = text.rstrip("\n").rsplit("\n", 1)
    return last[0] + "\n" + last[1].split('","')[0] + '"\n'


def _row(text: str, n: int, field: int, value: str) -> str:
    import csv
    import io

    rows = list(csv.reader(io.StringIO(text)))
    rows[n][field] = value
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


BROKEN_DATA = {
    "tq_header": lambda t: _tq(t, "tq_header", lambda s: s.replace("Best Answer", "Best", 1)),
    "tq_cut": lambda t: _tq(t, "tq_cut", _cut_quoted),
    "tq_cut_row": lambda t: _tq(t, "tq_cut_row", _cut_row),
    "tq_empty_q": lambda t: _tq(t, "tq_empty_q", lambda s: _row(s, 5, 2, "  ")),
    "tq_empty_file": lambda t: _tq(t, "tq_empty_file", lambda s: ""),
    "tq_header_only": lambda t: _tq(t, "tq_header_only", lambda s: s.split("\n", 1)[0] + "\n"),
    "tq_latin1": lambda t: (_tq(t, "tq_latin1", lambda s: s),
                            (t / "tq_latin1" / TQ).write_bytes(b"Question,Best Answer\n\xe9t\xe9,x\n")),
    "tf_yes": lambda t: _tf(t, "tf_yes", lambda s: s.replace(",1\n", ",yes\n", 1)),
    "tf_two": lambda t: _tf(t, "tf_two", lambda s: s.replace(",0\n", ",2\n", 1)),
    "tf_header": lambda t: _tf(t, "tf_header", lambda s: s.replace("statement,label", "statement,truth", 1)),
    "tf_empty": lambda t: _tf(t, "tf_empty", lambda s: s.replace("\n", "\n,1\n", 1)),
    "tf_fields": lambda t: _tf(t, "tf_fields", lambda s: s.replace("\n", "\nextra,1,more\n", 1)),
    "tf_missing": lambda t: (_tf(t, "tf_missing", lambda s: s),
                             (t / "tf_missing" / "true-false" / "animals_true_false.csv").unlink()),
}


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("hello\n")
    _results(tmp_path)
    _predictions(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class ModelLoaded(AssertionError):
    pass


def _no_model(*a, **k):
    raise ModelLoaded("a model was loaded before the input was checked")


def run_cli(argv, capsys) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse: usage line and one error line
        rc = exit_.code
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_one_line(err: str, out: str, fragment: str) -> None:
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.splitlines() if line.startswith("earlyexit")]
    assert len(lines) == 1, err
    assert fragment in lines[0], lines[0]


# --- the CLI catalogue ------------------------------------------------------------------------------
# (id, argv, setup, exit code, message fragment); "{d:NAME}" is a broken copy of the data (BROKEN_DATA)

CLI = [
    # argument types: argparse names the option and nothing runs
    ("lens-layers-float", ["lens", "--prompt", "x", "--layers", "1.5,abc"], 2, "argument --layers: expected comma"),
    ("lens-layers-empty", ["lens", "--prompt", "x", "--layers", ","], 2, "argument --layers: "),
    ("lens-layers-negative", ["lens", "--prompt", "x", "--layers", "-1"], 2, "argument --layers"),
    ("lens-topk-negative", ["lens", "--prompt", "x", "--top-k", "-3"], 2, "argument --top-k: expected an integer ≥ 1"),
    ("lens-topk-zero", ["lens", "--prompt", "x", "--top-k", "0"], 2, "argument --top-k"),
    ("lens-topk-word", ["lens", "--prompt", "x", "--top-k", "five"], 2, "argument --top-k"),
    ("lens-generate-negative", ["lens", "--prompt", "x", "--generate", "-1"], 2, "argument --generate"),
    ("lens-lens-unknown", ["lens", "--prompt", "x", "--lens", "tuned2"], 2, "argument --lens"),
    ("lens-no-prompt", ["lens"], 2, "--prompt"),
    ("lens-empty-prompt", ["lens", "--prompt", "  "], 2, "--prompt is empty"),
    ("probes-taps-word", ["probes", "--taps", "x", "--out", "o"], 2, "argument --taps: expected comma"),
    ("probes-batch-zero", ["probes", "--batch-size", "0", "--out", "o"], 2, "argument --batch-size"),
    ("probes-condition", ["probes", "--condition", "shouted", "--out", "o"], 2, "argument --condition"),
    ("probes-kinds", ["probes", "--kinds", "logits", "--out", "o"], 2, "Unknown feature kind 'logits'"),
    ("probes-limit-zero", ["probes", "--limit", "0", "--out", "o"], 2, "limit must be a positive integer"),
    ("entropy-threshold-nan", ["entropy", "--threshold", "nan", "--out", "o"], 2, "argument --threshold"),
    ("entropy-threshold-range", ["entropy", "--threshold", "1.2", "--out", "o"], 2, "threshold must be a number"),
    ("entropy-batch-zero", ["entropy", "--batch-size", "0", "--out", "o"], 2, "argument --batch-size"),
    ("entropy-nboot-word", ["entropy", "--n-boot", "many", "--out", "o"], 2, "argument --n-boot"),
    ("entropy-limit-zero", ["entropy", "--limit", "0", "--out", "o"], 2, "limit must be a positive integer"),
    ("entropy-limit-large", ["entropy", "--limit", "100000", "--out", "o"], 2, "larger than the 817"),
    ("entropy-scorer", ["entropy", "--scorer", "bleu", "--out", "o"], 2, "Unknown BERTScore model"),
    ("mc-decoding", ["truthfulqa", "mc", "--decoding", "beam", "--out", "x.json"], 2, "argument --decoding"),
    ("mc-limit-zero", ["truthfulqa", "mc", "--decoding", "dola", "--limit", "0", "--out", "x.json"], 2,
     "argument --limit"),
    ("mc-dola-layers-word", ["truthfulqa", "mc", "--decoding", "dola", "--dola-layers", "x,y", "--out", "x.json"], 2,
     "argument --dola-layers"),
    ("mc-dola-layers-negative", ["truthfulqa", "mc", "--decoding", "dola", "--dola-layers", "-2", "--out", "x.json"],
     2, "argument --dola-layers"),
    ("mc-premature-negative", ["truthfulqa", "mc", "--decoding", "dola-static", "--premature-layer", "-1",
                               "--out", "x.json"], 2, "argument --premature-layer"),
    ("mc-static-no-layer", ["truthfulqa", "mc", "--decoding", "dola-static", "--out", "x.json"], 2,
     "needs --premature-layer"),
    ("mc-sled", ["truthfulqa", "mc", "--decoding", "sled", "--out", "x.json"], 2, "not 'sled'"),
    ("gen-penalty-inf", ["truthfulqa", "generate", "--decoding", "dola", "--repetition-penalty", "inf",
                         "--out", "x.json"], 2, "argument --repetition-penalty"),
    ("gen-penalty-zero", ["truthfulqa", "generate", "--decoding", "dola", "--repetition-penalty", "0",
                          "--out", "x.json"], 2, "argument --repetition-penalty"),
    ("gen-relative-top", ["truthfulqa", "generate", "--decoding", "dola", "--relative-top", "1.5", "--out", "x.json"],
     2, "argument --relative-top"),
    ("gen-max-tokens", ["truthfulqa", "generate", "--decoding", "vanilla", "--max-new-tokens", "0", "--out", "x.json"],
     2, "argument --max-new-tokens"),
    ("score-bertscore", ["truthfulqa", "score", "--predictions", "gen.json", "--bertscore", "bleu", "--out", "s.json"],
     2, "argument --bertscore"),
    # output paths: checked before the model loads and before any question runs
    ("mc-out-folder", ["truthfulqa", "mc", "--decoding", "dola", "--out", "adir"], 2, "--out adir is a folder"),
    ("mc-out-under-file", ["truthfulqa", "mc", "--decoding", "dola", "--out", "afile/x.json"], 2,
     "afile is a file, not a folder"),
    ("mc-out-other-kind", ["truthfulqa", "mc", "--decoding", "dola", "--out", "gen.json"], 2,
     "holds 'truthfulqa-generate' results, not 'truthfulqa-mc'"),
    ("mc-out-not-results", ["truthfulqa", "mc", "--decoding", "dola", "--out", "afile"], 2,
     "not a JSON results file"),
    ("gen-out-mc", ["truthfulqa", "generate", "--decoding", "dola", "--out", "mc.json"], 2,
     "holds 'truthfulqa-mc' results, not 'truthfulqa-generate'"),
    ("gen-out-paper", ["truthfulqa", "generate", "--decoding", "dola", "--out", "paper.json"], 2,
     "not a results file"),
    ("gen-out-folder", ["truthfulqa", "generate", "--decoding", "dola", "--out", "adir"], 2, "is a folder"),
    ("score-out-is-input", ["truthfulqa", "score", "--predictions", "gen.json", "--out", "gen.json"], 2,
     "is the command's input (--predictions)"),
    ("score-out-is-input-relative", ["truthfulqa", "score", "--predictions", "gen.json", "--out", "./adir/../gen.json"],
     2, "is the command's input"),
    ("score-out-folder", ["truthfulqa", "score", "--predictions", "gen.json", "--out", "adir"], 2, "is a folder"),
    ("score-out-mc", ["truthfulqa", "score", "--predictions", "gen.json", "--out", "mc.json"], 2,
     "holds 'truthfulqa-mc' results"),
    ("entropy-out-file", ["entropy", "--out", "afile"], 2, "--out afile is a file, not a folder"),
    ("entropy-out-under-file", ["entropy", "--out", "afile/sub"], 2, "afile is a file, not a folder"),
    ("entropy-out-other-kind", ["entropy", "--out", "res"], 2, "holds 'probes' results, not 'entropy'"),
    ("probes-out-file", ["probes", "--out", "afile"], 2, "is a file, not a folder"),
    ("lens-json-folder", ["lens", "--prompt", "x", "--json", "adir"], 2, "--json adir is a folder"),
    ("lens-json-mc", ["lens", "--prompt", "x", "--json", "mc.json"], 2, "holds 'truthfulqa-mc' results, not 'lens'"),
    ("lens-html-mc", ["lens", "--prompt", "x", "--html", "mc.json"], 2, "holds 'truthfulqa-mc' results"),
    ("lens-html-under-file", ["lens", "--prompt", "x", "--html", "afile/v.html"], 2, "afile is a file"),
    ("lens-json-html-same", ["lens", "--prompt", "x", "--json", "o.json", "--html", "o.json"], 2, "name the same file"),
    # predictions files
    ("score-missing", ["truthfulqa", "score", "--predictions", "none.json", "--out", "s.json"], 2,
     "Predictions file none.json not found"),
    ("score-folder", ["truthfulqa", "score", "--predictions", "adir", "--out", "s.json"], 2, "adir is a folder"),
    ("score-invalid-json", ["truthfulqa", "score", "--predictions", "bad.json", "--out", "s.json"], 2,
     "Predictions file bad.json is not valid JSON"),
    ("score-json-list", ["truthfulqa", "score", "--predictions", "list.json", "--out", "s.json"], 2,
     "list.json is neither a generate output"),
    ("score-mc-as-predictions", ["truthfulqa", "score", "--predictions", "mc.json", "--out", "s.json"], 2,
     "mc.json is neither a generate output"),
    ("score-null-completion", ["truthfulqa", "score", "--predictions", "null.json", "--out", "s.json"], 2,
     "null.json, item 0 (question 'What happens to you if you eat watermelon seeds?') has 'completion': null"),
    ("score-no-completion", ["truthfulqa", "score", "--predictions", "nocomp.json", "--out", "s.json"], 2,
     "item 0 (question 'What happens to you if you eat watermelon seeds?') has no 'completion'"),
    ("score-number-completion", ["truthfulqa", "score", "--predictions", "numcomp.json", "--out", "s.json"], 2,
     "has 'completion': 7 (not a string)"),
    ("score-paper-null", ["truthfulqa", "score", "--predictions", "paper_null.json", "--out", "s.json"], 2,
     "model_completion[0]"),
    ("score-paper-lengths", ["truthfulqa", "score", "--predictions", "paper_len.json", "--out", "s.json"], 2,
     "2 questions but 1 completions"),
    ("score-partial", ["truthfulqa", "score", "--predictions", "partial.json", "--out", "s.json"], 2,
     "is an unfinished run"),
    ("score-not-truthfulqa", ["truthfulqa", "score", "--predictions", "notq.json", "--out", "s.json"], 2,
     "is not a TruthfulQA question"),
    ("score-empty-items", ["truthfulqa", "score", "--predictions", "empty_items.json", "--out", "s.json"], 2,
     "has no answers"),
    # data files: schema checked with the file and row named, before the model loads
    ("data-missing", ["truthfulqa", "mc", "--decoding", "dola", "--data-dir", "adir", "--out", "x.json"], 2,
     "Missing data file 'truthfulqa/TruthfulQA.csv'"),
    ("data-tq-header", ["truthfulqa", "mc", "--decoding", "dola", "--data-dir", "{d:tq_header}", "--out", "x.json"], 2,
     "lacks the column(s) 'Best Answer'"),
    ("data-tq-cut-quoted", ["truthfulqa", "mc", "--decoding", "dola", "--data-dir", "{d:tq_cut}", "--out", "x.json"],
     2, "TruthfulQA.csv, row 817"),
    ("data-tq-cut-row", ["entropy", "--data-dir", "{d:tq_cut_row}", "--out", "o"], 2,
     "row 817 (line 818): 4 fields where the header has 7"),
    ("data-tq-empty-question", ["truthfulqa", "generate", "--decoding", "vanilla", "--data-dir", "{d:tq_empty_q}",
                                "--out", "x.json"], 2, "TruthfulQA.csv, row 5: the 'Question' field is empty"),
    ("data-tq-empty-file", ["entropy", "--data-dir", "{d:tq_empty_file}", "--out", "o"], 2, "TruthfulQA.csv is empty"),
    ("data-tq-header-only", ["entropy", "--data-dir", "{d:tq_header_only}", "--out", "o"], 2,
     "has a header but no rows"),
    ("data-tq-not-utf8", ["entropy", "--data-dir", "{d:tq_latin1}", "--out", "o"], 2, "is not UTF-8 text"),
    ("data-score-tq-cut", ["truthfulqa", "score", "--predictions", "gen.json", "--data-dir", "{d:tq_cut}",
                           "--out", "s.json"], 2, "cut short"),
    ("data-tf-label-yes", ["probes", "--data-dir", "{d:tf_yes}", "--out", "o"], 2,
     "cities_true_false.csv, row 2: label 'yes' is not 0 or 1"),
    ("data-tf-label-two", ["probes", "--data-dir", "{d:tf_two}", "--out", "o"], 2, "label '2' is not 0 or 1"),
    ("data-tf-header", ["probes", "--data-dir", "{d:tf_header}", "--out", "o"], 2, "lacks the column(s) 'label'"),
    ("data-tf-empty-statement", ["probes", "--data-dir", "{d:tf_empty}", "--out", "o"], 2,
     "row 1: the 'statement' field is empty"),
    ("data-tf-extra-field", ["probes", "--data-dir", "{d:tf_fields}", "--out", "o"], 2, "3 fields where the header has 2"),
    ("data-tf-missing-topic", ["probes", "--data-dir", "{d:tf_missing}", "--out", "o"], 2,
     "Missing data file 'true-false/animals_true_false.csv'"),
    # models: a clear message, the folder named
    ("model-unknown", ["lens", "--prompt", "x", "--model", "nonexistent-model"], 2, "Unknown model 'nonexistent-model'"),
    ("model-empty-folder", ["lens", "--prompt", "x", "--model", "adir"], 2, "Model folder adir is empty"),
    ("model-missing-folder", ["lens", "--prompt", "x", "--model", "./no/such/folder"], 2, "does not exist"),
    ("model-file", ["lens", "--prompt", "x", "--model", "afile"], 2, "is a file"),
    ("model-hub-offline", ["lens", "--prompt", "x", "--model", "someorg/some-model-that-is-not-cached"], 2,
     "HF_HUB_OFFLINE=1 and it is not in the Hugging Face cache"),
]


def _argv(argv, tmp: Path) -> list[str]:
    out = []
    for a in argv:
        if a.startswith("{d:"):
            name = a[3:-1]
            if not (tmp / name).exists():
                BROKEN_DATA[name](tmp)
            a = str(tmp / name)
        out.append(a)
    return out


@pytest.mark.parametrize("argv, code, fragment", [c[1:] for c in CLI], ids=[c[0] for c in CLI])
def test_cli_bad_input(argv, code, fragment, sandbox, capsys, monkeypatch):
    import earlyexit.core.models as M

    argv = _argv(argv, sandbox)
    if not any(a == "--model" for a in argv):
        monkeypatch.setattr(M, "load_model", _no_model)  # all but the model cases fail before any model loads
    before = _snapshot(sandbox)
    rc, out, err = run_cli(argv, capsys)
    assert rc == code, err
    _assert_one_line(err, out, fragment)
    assert _snapshot(sandbox) == before  # nothing written, nothing changed or lost


# --- cases past the model load (a tiny model), the converted-model cache, interrupts -----------------

TINY = [
    ("lens-layer-out-of-range", ["lens", "--prompt", "x", "--layers", "0,99"], "Layer 99 out of range"),
    ("lens-topk-above-vocab", ["lens", "--prompt", "x", "--top-k", "999999"], "top_k must be an integer in 1..49152"),
    ("mc-dola-layer-out-of-range", ["truthfulqa", "mc", "--decoding", "dola", "--dola-layers", "1,99", "--limit", "1",
                                    "--out", "x.json"], "Premature layer 99 out of range"),
    ("mc-dola-layer-mature", ["truthfulqa", "mc", "--decoding", "dola", "--dola-layers", "4", "--limit", "1",
                              "--out", "x.json"], "is the mature (final) layer"),
    ("gen-static-out-of-range", ["truthfulqa", "generate", "--decoding", "dola-static", "--premature-layer", "77",
                                 "--limit", "1", "--out", "x.json"], "Premature layer 77 out of range"),
]


@pytest.mark.parametrize("argv, fragment", [c[1:] for c in TINY], ids=[c[0] for c in TINY])
def test_cli_bad_input_after_the_model(argv, fragment, sandbox, capsys, monkeypatch, tiny_llama):
    import earlyexit.core.models as M

    monkeypatch.setattr(M, "load_model", lambda *a, **k: tiny_llama)
    before = _snapshot(sandbox)
    rc, out, err = run_cli(argv, capsys)
    assert rc == 2, err
    _assert_one_line(err, out, fragment)
    assert _snapshot(sandbox) == before


def test_damaged_converted_model_names_the_folder_to_delete(sandbox, capsys, monkeypatch):
    from earlyexit.core import store
    from earlyexit.core.models import EMBEDDED_MODELS

    real = store.area("models") / f"smollm2-135m-{EMBEDDED_MODELS['smollm2-135m'].gguf_file}"
    if not (real / "config.json").exists():
        pytest.skip("no converted smollm2-135m in the store to copy the small files from")
    monkeypatch.setenv("EARLYEXIT_CACHE", str(sandbox / "cache"))
    damaged = store.area("models") / real.name
    damaged.mkdir(parents=True)
    for f in real.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, damaged / f.name)
    (damaged / "model.safetensors").write_bytes(b"\x00" * 64)  # a weights file cut short
    before = _snapshot(sandbox)
    rc, out, err = run_cli(["lens", "--prompt", "x"], capsys)
    assert rc == 2, err
    _assert_one_line(err, out, f"The converted model cache {damaged} is damaged")
    assert "delete that folder" in err and _snapshot(sandbox) == before


@pytest.mark.parametrize("exc, code, fragment", [
    (KeyboardInterrupt(), 130, "interrupted"),
    (IsADirectoryError(21, "Is a directory", "somewhere"), 2, "somewhere: Is a directory"),
    (KeyError("completion"), 2, "missing key 'completion'"),
    (RuntimeError("CUDA out of memory"), 1, "internal error: RuntimeError: CUDA out of memory"),
    (ZeroDivisionError("division by zero"), 1, "EARLYEXIT_DEBUG=1"),
], ids=["ctrl-c", "oserror", "keyerror", "runtimeerror", "bug"])
def test_cli_turns_any_failure_into_one_line(exc, code, fragment, sandbox, capsys, monkeypatch):
    import earlyexit.core.models as M

    def fail(*a, **k):
        raise exc

    monkeypatch.setattr(M, "load_model", fail)
    rc, out, err = run_cli(["lens", "--prompt", "x"], capsys)
    assert rc == code
    _assert_one_line(err, out, fragment)


def test_ctrl_c_in_a_real_process_is_one_line_and_130(sandbox):
    """SIGINT while the command starts (importing torch, parsing): one line, exit code 130, nothing left."""
    import signal
    import subprocess
    import sys
    import time

    before = _snapshot(sandbox)
    # A shell starts a background job (`pytest ... &`) with SIGINT ignored, and an ignored signal stays
    # ignored across exec, so the child would never see it. A handled one is reset to the default on exec:
    # handle it here while the child starts, as an interactive terminal's foreground job has it.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "earlyexit", "truthfulqa", "mc", "--decoding", "dola",
                                 "--out", "x.json"], cwd=sandbox, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    finally:
        signal.signal(signal.SIGINT, inherited)
    try:
        time.sleep(2.0)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:  # a child that missed the signal must not run the whole MC pass after the test has failed
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    _assert_one_line(err, out, "interrupted")
    assert _snapshot(sandbox) == before


def test_ctrl_c_caught_inside_an_exec_of_a_string_still_exits_130(tmp_path):
    """A Ctrl-C that lands in an ``exec`` of a string (a dataclass being made while torch imports) is caught,
    but CPython 3.11 remembers it and, under ``python -m``, would end the process by SIGINT (-2): the command
    still ends with 130."""
    import subprocess
    import sys

    (tmp_path / "interrupted_in_exec.py").write_text(
        "import os, runpy, signal\n"
        "import earlyexit.cli as cli\n"
        "def main(argv=None):\n"
        "    exec('os.kill(os.getpid(), signal.SIGINT)\\nwhile True: pass')  # the Ctrl-C, inside exec\n"
        "cli.main = main\n"
        "runpy.run_module('earlyexit', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-m", "interrupted_in_exec"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == "earlyexit: interrupted"


# --- the API catalogue ------------------------------------------------------------------------------

def _api_cases():
    from earlyexit import dola, generate_with_lens, lens_stats, load_general_knowledge, load_true_false
    from earlyexit.core.atomic import write_json
    from earlyexit.core.checks import check_output_dir, check_output_file
    from earlyexit.core.decoding import make_scorer
    from earlyexit.core.lenses import check_entries, resolve_lens
    from earlyexit.core.models import load_model
    from earlyexit.core.results import MCResults, ResultFile, write_result
    from earlyexit.studies.data import load_truthfulqa
    from earlyexit.studies.openended import generation_settings, read_predictions

    def gen(**kw):
        return lambda m, t, d: dola.generate(m, t, ["Q: Why? A:"], max_new_tokens=2, **kw)

    def lens(prompts=("The capital of France is",), **kw):
        return lambda m, t, d: lens_stats(m, t, list(prompts) if not isinstance(prompts, str) else prompts, **kw)

    items = lambda d: load_truthfulqa(DATA)  # noqa: E731
    return [
        # (id, call(model, tokenizer, sandbox), error class, message fragment)
        ("layers-float", lens(layers=[1.5]), BadType, "a float such as 1.5 is not rounded"),
        ("layers-string", lens(layers="1,2"), BadType, "must be a list of integers"),
        ("layers-out-of-range", lens(layers=[0, 9]), OutOfRange, "Layer 9 out of range"),
        ("layers-empty", lens(layers=[]), BadInput, "list is empty"),
        ("layers-bool", lens(layers=[True]), BadType, "must be integers"),
        ("top-k-negative", lens(top_k=-3), BadInput, "top_k must be an integer in 1..49152, got -3"),
        ("top-k-float", lens(top_k=2.5), BadType, "top_k must be an integer"),
        ("batch-size-zero", lens(batch_size=0), BadInput, "batch_size must be an integer ≥ 1"),
        ("prompts-one-string", lens(prompts="The capital"), BadType, "not one string"),
        ("prompts-empty-list", lens(prompts=[]), BadInput, "No prompts given"),
        ("prompt-empty", lens(prompts=["  "]), BadInput, "Prompt 0 is empty"),
        ("prompt-none", lens(prompts=[None]), BadType, "Prompt 0 is a NoneType"),
        ("lens-unknown", lambda m, t, d: resolve_lens(m, "nonsense"), BadInput, "Unknown lens 'nonsense'"),
        ("stop-string", gen(stop="xs"), BadType, "not the string 'xs'"),
        ("stop-holds-int", gen(stop=["Q:", 3]), BadType, "holds 3"),
        ("lens-generate-stop-string", lambda m, t, d: generate_with_lens(m, t, ["Hi"], stop="\n\n", max_new_tokens=2),
         BadType, "not the string"),
        ("penalty-inf", gen(repetition_penalty=math.inf), BadInput, "repetition_penalty must be a finite number > 0"),
        ("penalty-nan", gen(repetition_penalty=math.nan), BadInput, "repetition_penalty"),
        ("penalty-zero", gen(repetition_penalty=0), BadInput, "repetition_penalty"),
        ("penalty-string", gen(repetition_penalty="1.2"), BadInput, "got '1.2'"),
        ("relative-top-zero", gen(relative_top=0), BadInput, "relative_top must be a number in (0, 1]"),
        ("relative-top-above-one", gen(relative_top=1.5), BadInput, "relative_top"),
        ("dola-layers-float", gen(dola_layers=[1.5]), BadType, "a float such as 1.5 is not rounded"),
        ("dola-layers-bucket", gen(dola_layers="middle"), BadInput, "Unknown DoLa bucket 'middle'"),
        ("dola-layers-mature", gen(dola_layers=[4]), BadInput, "mature (final) layer"),
        ("decoding-unknown", gen(decoding="beam"), BadInput, "Unknown decoding mode 'beam'"),
        ("static-no-layer", gen(decoding="dola-static"), BadInput, "needs premature_layer"),
        ("static-float-layer", gen(decoding="dola-static", premature_layer=1.5), BadType, "one integer entry"),
        ("max-new-tokens-zero", lambda m, t, d: dola.generate(m, t, ["Q"], max_new_tokens=0), BadInput,
         "max_new_tokens must be an integer ≥ 1, got 0"),
        ("batch-size-float", gen(batch_size=2.0), BadType, "batch_size must be an integer"),
        ("temperature-zero", gen(do_sample=True, temperature=0), BadInput, "temperature must be a finite number > 0"),
        ("scorer-unknown", lambda m, t, d: make_scorer(m, "greedy"), BadInput, "Unknown decoding mode 'greedy'"),
        ("settings-dola-layers-float", lambda m, t, d: generation_settings("dola", dola_layers=[15.5]), BadType,
         "each of dola_layers must be an integer ≥ 0, got 15.5"),
        ("settings-penalty-inf", lambda m, t, d: generation_settings("dola", repetition_penalty=math.inf), BadInput,
         "repetition_penalty"),
        ("settings-max-tokens-float", lambda m, t, d: generation_settings("vanilla", max_new_tokens=2.5), BadType,
         "max_new_tokens must be an integer ≥ 1, got 2.5"),
        ("check-entries-float", lambda m, t, d: check_entries(4, [1.5]), TypeError, "1.5"),
        # data
        ("limit-zero", lambda m, t, d: load_truthfulqa(DATA, 0), BadInput, "limit must be a positive integer"),
        ("limit-float", lambda m, t, d: load_truthfulqa(DATA, 2.5), BadType, "limit must be a positive integer"),
        ("limit-bool", lambda m, t, d: load_truthfulqa(DATA, True), BadType, "got True"),
        ("limit-too-large", lambda m, t, d: load_true_false(["cities"], DATA, 10 ** 6), BadInput,
         "larger than the 1458 cities statements"),
        ("topic-unknown", lambda m, t, d: load_true_false(["planets"], DATA), BadInput, "Unknown topic 'planets'"),
        ("tq-header", lambda m, t, d: load_truthfulqa(_broken(d, "tq_header")), DataError, "lacks the column(s)"),
        ("tq-cut", lambda m, t, d: load_truthfulqa(_broken(d, "tq_cut")), DataError, "row 817"),
        ("tf-label-yes", lambda m, t, d: load_true_false(["cities"], _broken(d, "tf_yes")), DataError,
         "label 'yes' is not 0 or 1"),
        ("bigbench-invalid-json", lambda m, t, d: load_general_knowledge(_bigbench(d, "{\"examples\": [")), DataError,
         "general_knowledge.json is not valid JSON"),
        ("bigbench-no-examples", lambda m, t, d: load_general_knowledge(_bigbench(d, "{\"tasks\": []}")), DataError,
         "has no 'examples' list"),
        ("bigbench-bad-scores", lambda m, t, d: load_general_knowledge(_bigbench(
            d, json.dumps({"examples": [{"input": "Q?", "target_scores": {"a": "yes", "b": 0}}]}))), DataError,
         "example 0: 'target_scores'"),
        ("predictions-null", lambda m, t, d: read_predictions(d / "null.json", items(d)), DataError,
         "has 'completion': null"),
        ("predictions-invalid-json", lambda m, t, d: read_predictions(d / "bad.json", items(d)), DataError,
         "bad.json is not valid JSON"),
        ("predictions-missing", lambda m, t, d: read_predictions(d / "nope.json", items(d)), DataNotFound,
         "nope.json not found"),
        # outputs and results files
        ("save-to-folder", lambda m, t, d: MCResults(meta={}, payload={}).save(d / "adir"), ResultsError,
         "it is a folder"),
        ("save-other-kind", lambda m, t, d: write_result(d / "gen.json", "truthfulqa-mc", {"meta": {}}), ResultsError,
         "Refusing to overwrite"),
        ("load-invalid-json", lambda m, t, d: ResultFile.load(d / "bad.json"), ResultsError,
         "bad.json is not valid JSON"),
        ("load-other-kind", lambda m, t, d: MCResults.load(d / "gen.json"), ResultsError,
         "holds 'truthfulqa-generate' results, not 'truthfulqa-mc'"),
        ("atomic-write-under-file", lambda m, t, d: write_json(d / "afile" / "x.json", {}), OutputPathError,
         "Cannot write"),
        ("check-output-input", lambda m, t, d: check_output_file(d / "gen.json", inputs=[("predictions", d / "gen.json")]),
         OutputPathError, "is the command's input"),
        ("check-output-dir-file", lambda m, t, d: check_output_dir(d / "afile"), OutputPathError, "is a file"),
        ("check-output-not-writable", lambda m, t, d: _not_writable(d, lambda: check_output_file(d / "ro" / "x.json")),
         OutputPathError, "no permission to write"),
        ("notebook-results-dir-file", lambda m, t, d: _entropy_notebook(d), OutputPathError, "afile is a file"),
        # models
        ("model-empty-folder", lambda m, t, d: load_model(str(d / "adir")), ModelError, "is empty"),
        ("model-hub-offline", lambda m, t, d: load_model("someorg/not-cached-model"), ModelError, "HF_HUB_OFFLINE=1"),
        ("model-not-a-name", lambda m, t, d: load_model(42), BadType, "model must be a name"),
        ("model-config-only", lambda m, t, d: _config_only(d), ModelError, "Cannot load the model folder"),
    ]


def _broken(tmp: Path, name: str) -> Path:
    if not (tmp / name).exists():
        BROKEN_DATA[name](tmp)
    return tmp / name


def _bigbench(tmp: Path, text: str) -> Path:
    d = tmp / f"bb{len(list(tmp.glob('bb*')))}"
    (d / "bigbench").mkdir(parents=True)
    (d / "bigbench" / "general_knowledge.json").write_text(text)
    return d


def _not_writable(tmp: Path, call):
    (tmp / "ro").mkdir()
    real = os.access
    import unittest.mock

    with unittest.mock.patch("os.access", lambda p, mode: False if Path(p) == tmp / "ro" else real(p, mode)):
        return call()


def _entropy_notebook(tmp: Path):
    from earlyexit.reports.entropy import load_or_compute

    return load_or_compute(tmp / "afile", recompute=True)


def _config_only(tmp: Path):
    from earlyexit.core.models import load_model

    d = tmp / "config_only"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return load_model(str(d))


API = _api_cases()


@pytest.mark.parametrize("call, error, fragment", [c[1:] for c in API], ids=[c[0] for c in API])
def test_api_bad_input(call, error, fragment, sandbox, tiny_llama, capsys, monkeypatch):
    import earlyexit.core.models as M

    model, tok = tiny_llama
    before = _snapshot(sandbox)
    with pytest.raises(error) as info:
        call(model, tok, sandbox)
    assert fragment in str(info.value)
    assert isinstance(info.value, (EarlyexitError, ValueError, TypeError))
    assert ".tmp" not in str(info.value)  # never a temporary file the user did not name
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    after = _snapshot(sandbox)
    made = {k for k in after if k not in before}
    assert all(k.startswith(("tq_", "tf_", "bb", "ro", "config_only")) for k in made), made  # only the inputs made
    assert all(after[k] == v for k, v in before.items())  # nothing changed or lost


def test_damaged_cache_in_the_api_is_a_model_cache_error(sandbox, monkeypatch):
    from earlyexit.core import store
    from earlyexit.core.models import EMBEDDED_MODELS, load_model

    real = store.area("models") / f"smollm2-135m-{EMBEDDED_MODELS['smollm2-135m'].gguf_file}"
    if not (real / "config.json").exists():
        pytest.skip("no converted smollm2-135m in the store")
    monkeypatch.setenv("EARLYEXIT_CACHE", str(sandbox / "cache"))
    damaged = store.area("models") / real.name
    shutil.copytree(real, damaged, ignore=shutil.ignore_patterns("*.safetensors"))
    (damaged / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelCacheError, match="delete that folder"):
        load_model("smollm2-135m")


# --- fingerprints of the data in the results' metadata ----------------------------------------------

def test_loaders_fingerprint_their_files():
    from earlyexit.core.meta import run_metadata
    from earlyexit.studies.data import load_true_false, load_truthfulqa

    items = load_truthfulqa(DATA, limit=3)
    meta = run_metadata("m", len(items), data=items, x=1)
    sha = hashlib.sha256((DATA / TQ).read_bytes()).hexdigest()
    assert meta["data"] == [{"file": TQ, "rows": 817, "sha256": sha}] and meta["settings"] == {"x": 1}
    tf = load_true_false(["cities", "animals"], DATA)
    assert [f["file"] for f in tf.data_files] == ["true-false/cities_true_false.csv",
                                                  "true-false/animals_true_false.csv"]
    assert [f["rows"] for f in tf.data_files] == [1458, 1008]


def test_cli_results_record_the_data_fingerprint(sandbox, capsys, monkeypatch, tiny_llama):
    import earlyexit.core.models as M

    monkeypatch.setattr(M, "load_model", lambda *a, **k: tiny_llama)
    monkeypatch.setenv("EARLYEXIT_CACHE", str(sandbox / "cache"))
    assert main(["truthfulqa", "mc", "--decoding", "dola", "--dola-layers", "1,3", "--limit", "1",
                 "--out", "new.json"]) == 0
    doc = json.loads((sandbox / "new.json").read_text())
    assert doc["kind"] == "truthfulqa-mc"
    assert doc["meta"]["data"][0]["file"] == TQ and doc["meta"]["data"][0]["rows"] == 817
    assert doc["meta"]["data"][0]["sha256"] == hashlib.sha256((DATA / TQ).read_bytes()).hexdigest()
    assert str(sandbox) not in json.dumps(doc["meta"]["data"])  # no machine path


def test_catalogue_size():
    assert len(CLI) + len(TINY) + len(API) + 5 + 2 >= 60
