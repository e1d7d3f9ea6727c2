"""The results schema (``earlyexit.core.results``): round trip, kind checks, clear errors naming the file."""
from __future__ import annotations

import json

import pytest

from earlyexit.core.results import (KINDS, EntropyResults, GenerateResults, MCResults, ProbesResults, ResultFile,
                                    ResultsError, ScoresResults, VisResults, load_result, model_tag, write_result)


def _probes(**payload):
    return ProbesResults(meta={"model": "m", "n": 3, "settings": {"seed": 0}, "versions": {"torch": "x"}},
                         payload={"conditions": {"bare": {"taps": [1, 2]}}, **payload})


def test_round_trip_keeps_kind_meta_and_payload(tmp_path):
    r = _probes(parameters={"model": "m", "limit": None, "kinds": ("hidden",)})
    path = r.save(tmp_path / "probes_m.json")
    doc = json.loads(path.read_text())
    assert doc["kind"] == "probes" and doc["schema"] == 1 and doc["meta"]["n"] == 3
    assert doc["conditions"] == {"bare": {"taps": [1, 2]}}  # the payload sits at the top level
    back = ProbesResults.load(path)
    assert isinstance(back, ProbesResults) and back.source == path
    assert back.to_dict() == json.loads(r.to_json()) and back.model == "m" and back.n == 3
    assert back["conditions"]["bare"]["taps"] == [1, 2] and back["meta"]["settings"] == {"seed": 0}
    assert isinstance(load_result(path), ProbesResults)  # the class of the file's kind
    assert ResultFile.from_json(r.to_json(), kind="probes").payload == back.payload
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically: no temporary file left


def test_every_kind_has_a_class_and_a_tagged_file_name():
    assert set(KINDS) >= {"vis", "entropy", "probes", "truthfulqa-mc", "truthfulqa-generate", "truthfulqa-scores"}
    assert VisResults.path("results", "smollm2-135m").as_posix() == "results/vis_smollm2-135m.json"
    assert EntropyResults.filename("gemma3-270m") == "entropy_gemma3-270m.json"
    assert EntropyResults.csv_path("r", "gemma3-270m").name == "entropy_per_question_gemma3-270m.csv"
    assert MCResults.filename("smollm2-135m") == "dola_mc_smollm2-135m.json"
    assert ScoresResults.filename("smollm2-135m") == "dola_scores_smollm2-135m.json"
    assert GenerateResults.filename("smollm2-135m", decoding="dola") == "dola_generate_dola_smollm2-135m.json"
    assert model_tag("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB_SmolLM2-135M-Instruct"
    assert model_tag("./models/my model") == "my_model"


def test_load_refuses_another_kind_naming_the_file(tmp_path):
    path = _probes().save(tmp_path / "x.json")
    with pytest.raises(ResultsError, match=r"x\.json holds 'probes' results, not 'entropy'"):
        EntropyResults.load(path)
    with pytest.raises(ResultsError, match="not 'vis'"):
        ResultFile.load(path, kind="vis")


def test_save_refuses_to_overwrite_another_kind(tmp_path):
    path = _probes().save(tmp_path / "x.json")
    before = path.read_text()
    with pytest.raises(ResultsError, match=r"Refusing to overwrite .*x\.json: it holds 'probes' results, not 'vis'"):
        VisResults(meta={"n": 1}, payload={"accuracy": 1.0}).save(path)
    assert path.read_text() == before and len(list(tmp_path.iterdir())) == 1  # nothing written
    _probes(taps=[3]).save(path)  # the same kind is overwritten
    assert ProbesResults.load(path)["taps"] == [3]
    other = tmp_path / "notes.txt"
    other.write_text("not json")
    with pytest.raises(ResultsError, match="notes.txt: it is not a JSON results file"):
        write_result(other, "vis", {"meta": {}, "accuracy": 1.0})
    assert other.read_text() == "not json"


def test_missing_and_corrupt_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Results file .*nope\.json not found"):
        ResultFile.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"kind": "vis", "meta": {')  # e.g. a truncated copy
    with pytest.raises(ResultsError, match=r"bad\.json is not valid JSON"):
        VisResults.load(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ResultsError, match=r"bad\.json holds a JSON list"):
        VisResults.load(bad)
    bad.write_text(json.dumps({"kind": "vis", "schema": 99, "meta": {}}))
    with pytest.raises(ResultsError, match="schema 99"):
        VisResults.load(bad)
    bad.write_text(json.dumps({"meta": {}, "accuracy": 1.0}))  # written before the schema
    with pytest.raises(ResultsError, match="has no 'kind'.*recompute"):
        VisResults.load(bad)


def test_pre_schema_answer_files_still_load_and_resume(tmp_path):
    """Answer files written before the schema (no ``kind``) are still read: a run resumes from them."""
    old = tmp_path / "dola_generate_dola_m.json"
    old.write_text(json.dumps({"meta": {"model": "m", "settings": {}}, "indices": [0], "complete": True,
                               "n_done": 1, "items": [{"index": 0, "completion": "a"}]}))
    r = GenerateResults.load(old)
    assert r.kind == "truthfulqa-generate" and r["items"][0]["completion"] == "a"
    write_result(old, "truthfulqa-generate", {"meta": r.meta, **r.payload})  # upgraded in place
    assert json.loads(old.read_text())["kind"] == "truthfulqa-generate"


def test_reserved_keys_and_parameter_checks(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        VisResults(payload={"kind": "x"})
    with pytest.raises(ValueError, match="holds kind 'vis'"):
        VisResults("entropy")
    r = _probes(parameters={"model": "m", "limit": 20, "kinds": ["hidden"]})
    r.check_parameters({"model": "m", "limit": 20, "kinds": ("hidden",), "other": 1})  # tuples match lists
    with pytest.raises(ResultsError, match=r"limit=20 \(asked: None\).*recompute=True"):
        r.check_parameters({"limit": None})


def test_answers_file_has_a_kind_and_resumes(tiny_llama, tmp_path, data_dir, monkeypatch):
    """``generate_answers(out=...)`` writes a ``truthfulqa-generate`` file that a rerun resumes and
    ``read_predictions`` (the scorer's reader) still reads."""
    import earlyexit.methods.dola as dola
    from earlyexit.studies.data import load_truthfulqa
    from earlyexit.studies.openended import generate_answers, generation_settings, read_predictions

    model, tok = tiny_llama
    items = load_truthfulqa(data_dir, 3)
    settings = generation_settings("vanilla", max_new_tokens=3, batch_size=1)
    out = GenerateResults.path(tmp_path, "tiny", decoding="vanilla")
    full = generate_answers(model, tok, items, settings, out=out, checkpoint_every=1)
    doc = json.loads(out.read_text())
    assert doc["kind"] == "truthfulqa-generate" and doc["complete"] and doc["items"] == full["items"]
    # an interrupted run: only its first answer on disk
    write_result(out, "truthfulqa-generate", {**doc, "complete": False, "n_done": 1, "items": doc["items"][:1]})
    asked = []
    real = dola.generate
    monkeypatch.setattr(dola, "generate", lambda m, t, prompts, **kw: asked.extend(prompts) or real(m, t, prompts, **kw))
    again = generate_answers(model, tok, items, settings, out=out, checkpoint_every=1)
    assert len(asked) == 2 and again["items"] == full["items"]
    matched, completions, meta = read_predictions(out, items)
    assert [it.index for it in matched] == [0, 1, 2] and meta["settings"] == settings
    assert GenerateResults.load(out)["complete"] is True
