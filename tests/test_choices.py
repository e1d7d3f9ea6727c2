from __future__ import annotations

import torch

from earlyexit.studies.choices import ChoiceReading, first_choice_tokens, is_correct, normalise_answer
from earlyexit.studies.data import ChoiceQuestion, load_general_knowledge
from earlyexit.studies.prompts import vis_prompt


def test_normalised_matching():
    assert is_correct("4", ["four"]) and is_correct("Four.\n\nQuestion: ...", ["four"])
    assert is_correct("none", ["none"]) and is_correct("0", ["none"])
    assert is_correct("The Temperature", ["temperature"])
    assert not is_correct("fourteen", ["four"]) and not is_correct("two", ["four"])
    assert normalise_answer("  An Apple!  ") == "apple"


def _reading(probs):
    q = ChoiceQuestion(0, "q?", ["a", "b", "c"], ["b"])
    return ChoiceReading(q, "p", [0, 1, 2, 3], torch.tensor(probs), [1, 2, 3])


def test_first_layer_gold_settles_on_top():
    # gold (b) on top at layer 0 by noise, loses it, then leads from layer 2 to the end
    assert _reading([[0, 1e-9, 0], [0.5, 0.2, 0.3], [0.1, 0.8, 0.1], [0.2, 0.7, 0.1]]).first_layer_gold_on_top() == 2
    assert _reading([[0, 1e-9, 0], [0, 1, 0], [0, 1, 0], [0.9, 0.1, 0]]).first_layer_gold_on_top() is None
    assert _reading([[0, 1, 0]] * 4).first_layer_gold_on_top() == 0


def test_vis_prompt_uses_another_question_as_example(data_dir, tokenizer):
    qs = load_general_knowledge(data_dir)
    p0 = vis_prompt(qs[0], qs)
    assert p0.endswith(f"Question: {qs[0].question}\nOptions: {', '.join(qs[0].choices)}\nAnswer:")
    assert p0.count(qs[0].question) == 1 and qs[1].question in p0
    # each choice read as it follows "Answer:" in the example: with its leading space
    ids = first_choice_tokens(tokenizer, ["four", "two"])
    assert tokenizer.decode([ids[0]]).startswith(" ")
