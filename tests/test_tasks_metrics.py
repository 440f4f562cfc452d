"""Metrics against hand-computed values, and each task's evaluate() end to end."""
import math

import pytest

from engine.tasks import (accuracy, bleu, f1_binary, get_task, matthews_corr, pearson_spearman, rouge, squad)


def test_accuracy_and_f1():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == {"accuracy": 50.0}
    # tp=2 (rows 0, 2), fp=1 (row 1), fn=1 (row 3): F1 = 2*2 / (2*2 + 1 + 1)
    assert f1_binary([1, 0, 1, 1], [1, 1, 1, -1])["f1"] == pytest.approx(100 * 4 / 6)
    assert f1_binary([0, 0], [0, 0])["f1"] == 0.0
    with pytest.raises(ValueError, match="2 references but 1 predictions"):
        accuracy([1, 0], [1])


def test_matthews_binary_and_multiclass():
    # tp=2, tn=1, fp=1, fn=1: (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    refs, preds = [1, 1, 1, 0, 0], [1, 1, 0, 1, 0]
    assert matthews_corr(refs, preds)["matthews_corr"] == pytest.approx(100 / 6)
    assert matthews_corr([0, 1, 0, 1], [0, 1, 0, 1])["matthews_corr"] == pytest.approx(100.0)
    assert matthews_corr([0, 1, 0, 1], [1, 1, 1, 1])["matthews_corr"] == 0.0
    # an unparseable prediction (-1) is its own class (R_K): n=4, correct=2, true counts {1:2, 0:2},
    # predicted {1:3, -1:1}: (2*4 - 2*3) / sqrt((16 - 10) * (16 - 8))
    assert matthews_corr([1, 0, 1, 0], [1, -1, 1, 1])["matthews_corr"] == pytest.approx(100 * 2 / math.sqrt(48))


def test_pearson_spearman():
    scores = pearson_spearman([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 40.0])
    assert scores["spearman"] == pytest.approx(100.0)  # monotone
    x, y = [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 40.0]
    mx, my = 2.5, 11.5
    r = sum((a - mx) * (b - my) for a, b in zip(x, y)) / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))
    assert scores["pearson"] == pytest.approx(100 * r)
    # ties share their average rank: ranks [1.5, 1.5, 3] vs [1, 2, 3] -> r = sqrt(3)/2
    assert pearson_spearman([1.0, 1.0, 2.0], [1.0, 2.0, 3.0])["spearman"] == pytest.approx(100 * math.sqrt(3) / 2)


def test_squad_em_f1():
    scores = squad([["The Eiffel Tower", "Eiffel"], ["in 1889"], []], ["eiffel tower!", "1889 or 1890", ""])
    # 1: normalised equal -> EM 1; 2: tokens {1889} common, P=1/3 R=1/2 -> F1 0.4; 3: unanswerable, empty = match
    assert scores["exact_match"] == pytest.approx(200 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 0.4 + 1) / 3)


def test_bleu_and_rouge_from_the_libraries():
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"])["bleu"] == pytest.approx(100.0)
    assert bleu(["the cat sat on the mat"], ["dogs run"])["bleu"] < 5
    scores = rouge(["the cat sat on the mat . it was happy ."], ["the cat sat on the mat ."])
    # punctuation is not a token: 6 of the reference's 9 tokens predicted, precision 1, recall 6/9
    assert scores["rouge1"] == pytest.approx(100 * 2 * (6 / 9) / (1 + 6 / 9))
    assert set(scores) == {"rouge1", "rouge2", "rougeLsum"}


def test_task_evaluate_postprocesses_outputs():
    sst2 = get_task("sst2")
    examples = [sst2.make_example({"sentence": "good", "label": "1"}),
                sst2.make_example({"sentence": "bad", "label": "0"})]
    assert sst2.evaluate(examples, ["positive", "positive "]) == {"accuracy": 50.0}
    stsb = get_task("stsb")
    examples = [stsb.make_example({"sentence1": "a", "sentence2": "b", "score": s}) for s in ("3.84", "1.0", "4.5")]
    # nearest 0.2 with one decimal; halves round to even as tf.round does in T5 (4.5 * 5 = 22.5 -> 22)
    assert [e.targets for e in examples] == ["3.8", "1.0", "4.4"]
    assert stsb.evaluate(examples, ["3.8", "1.2", "4.4"])["spearman"] == pytest.approx(100.0)
    assert stsb.postprocessor("not a number") == -1.0
