from __future__ import annotations

import pytest

from earlyexit.studies.data import DataNotFoundError, load_general_knowledge, load_true_false, load_truthfulqa


def test_truthfulqa_loads_all_questions(data_dir):
    items = load_truthfulqa(data_dir)
    assert len(items) == 817
    assert items[0].question.startswith("What happens to you if you eat watermelon seeds")
    assert all(i.correct_answers and i.incorrect_answers for i in items)
    assert len(load_truthfulqa(data_dir, limit=5)) == 5


def test_true_false_topics(data_dir):
    rows = load_true_false(["cities"], data_dir)
    assert len(rows) == 1458 and {r.label for r in rows} == {0, 1}
    assert len(load_true_false(data_dir_=data_dir)) == 6085


def test_general_knowledge_has_the_hand_added_question(data_dir):
    items = load_general_knowledge(data_dir)
    assert len(items) == 71
    assert items[-1].question == "Where is the capital of Washington State?" and items[-1].gold == ["Olympia"]
    assert all(q.gold for q in items)


def test_missing_file_names_file_directory_and_source(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataNotFoundError) as err:
        load_truthfulqa(tmp_path)
    msg = str(err.value)
    assert "truthfulqa/TruthfulQA.csv" in msg and str(tmp_path) in msg and "github.com/sylinrl/TruthfulQA" in msg
    with pytest.raises(DataNotFoundError, match="cities_true_false.csv"):
        load_true_false(["cities"], tmp_path)
    with pytest.raises(DataNotFoundError, match="general_knowledge.json"):
        load_general_knowledge(tmp_path)


@pytest.mark.parametrize("limit", [0, -3, 10_000])
def test_bad_limits(data_dir, limit):
    with pytest.raises(ValueError, match="limit"):
        load_truthfulqa(data_dir, limit=limit)


def test_unknown_topic(data_dir):
    with pytest.raises(ValueError, match="Unknown topic 'planets'"):
        load_true_false(["planets"], data_dir)
