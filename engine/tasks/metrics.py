"""Metrics of the T5 paper's benchmarks, on the 0-100 scale the paper reports.

Each metric takes `(references, predictions)` (already post-processed: class ids, floats, strings, or
for SQuAD a list of acceptable answers per example) and returns a dict of named scores. BLEU and ROUGE
come from the well-kept libraries (sacrebleu, rouge-score) with the settings T5's evaluation used; the
rest are small enough to own and are tested against hand-computed values.
"""
from __future__ import annotations

import collections
import math
import re
import string
from typing import Sequence


def _check(references: Sequence, predictions: Sequence) -> None:
    if len(references) != len(predictions):
        raise ValueError(f"metrics: {len(references)} references but {len(predictions)} predictions")
    if not references:
        raise ValueError("metrics: no examples to score")


def accuracy(references: Sequence, predictions: Sequence) -> dict[str, float]:
    _check(references, predictions)
    return {"accuracy": 100.0 * sum(r == p for r, p in zip(references, predictions)) / len(references)}


def f1_binary(references: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
    """F1 of the positive class 1 (MRPC, QQP); an unparseable prediction (-1) counts as negative."""
    _check(references, predictions)
    tp = sum(r == 1 and p == 1 for r, p in zip(references, predictions))
    fp = sum(r != 1 and p == 1 for r, p in zip(references, predictions))
    fn = sum(r == 1 and p != 1 for r, p in zip(references, predictions))
    return {"f1": 0.0 if tp == 0 else 100.0 * 2 * tp / (2 * tp + fp + fn)}


def f1_and_accuracy(references, predictions) -> dict[str, float]:
    return {**f1_binary(references, predictions), **accuracy(references, predictions)}


def matthews_corr(references: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
    """Matthews correlation (CoLA), in its multi-class form (Gorodkin's R_K) so that an unparseable
    prediction (-1) is its own class, as sklearn computes it; 0 when a marginal is constant."""
    _check(references, predictions)
    n = len(references)
    true_counts = collections.Counter(references)
    pred_counts = collections.Counter(predictions)
    correct = sum(r == p for r, p in zip(references, predictions))
    covariance = correct * n - sum(true_counts[k] * pred_counts[k] for k in true_counts)
    var_pred = n * n - sum(c * c for c in pred_counts.values())
    var_true = n * n - sum(c * c for c in true_counts.values())
    if var_pred == 0 or var_true == 0:
        return {"matthews_corr": 0.0}
    return {"matthews_corr": 100.0 * covariance / math.sqrt(var_pred * var_true)}


def _pearson(x: Sequence[float], y: Sequence[float]) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return 0.0 if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank (what Spearman's correlation needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson_spearman(references: Sequence[float], predictions: Sequence[float]) -> dict[str, float]:
    """STS-B: Pearson and Spearman correlations between gold and predicted similarity scores."""
    _check(references, predictions)
    return {"pearson": 100.0 * _pearson(references, predictions),
            "spearman": 100.0 * _pearson(_ranks(references), _ranks(predictions))}


def bleu(references: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU with sacrebleu's international tokenizer and exponential smoothing (T5's settings)."""
    import sacrebleu

    _check(references, predictions)
    score = sacrebleu.corpus_bleu(list(predictions), [list(references)], smooth_method="exp",
                                  lowercase=False, tokenize="intl", use_effective_order=False)
    return {"bleu": float(score.score)}


def rouge(references: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/Lsum F-measure (rouge-score). ROUGE-Lsum splits summaries at newlines, so
    sentence ends " . " become line breaks first, as T5's evaluation did."""
    from rouge_score import rouge_scorer

    _check(references, predictions)
    keys = ("rouge1", "rouge2", "rougeLsum")
    scorer = rouge_scorer.RougeScorer(list(keys))
    totals = dict.fromkeys(keys, 0.0)
    for ref, pred in zip(references, predictions):
        scores = scorer.score(ref.replace(" . ", " .\n"), pred.replace(" . ", " .\n"))
        for key in keys:
            totals[key] += scores[key].fmeasure
    return {key: 100.0 * total / len(references) for key, total in totals.items()}


def _normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, drop punctuation and the articles a/an/the, squeeze spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _token_f1(gold: str, prediction: str) -> float:
    gold_tokens, pred_tokens = _normalize_answer(gold).split(), _normalize_answer(prediction).split()
    if not gold_tokens or not pred_tokens:
        return float(gold_tokens == pred_tokens)  # both empty (an unanswerable question) is a match
    common = sum((collections.Counter(gold_tokens) & collections.Counter(pred_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad(references: Sequence[Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
    """SQuAD exact match and token F1, each the best over the example's acceptable answers."""
    _check(references, predictions)
    em = f1 = 0.0
    for golds, pred in zip(references, predictions):
        golds = list(golds) or [""]  # SQuAD v2: no answer means the empty string is right
        em += max(float(_normalize_answer(g) == _normalize_answer(pred)) for g in golds)
        f1 += max(_token_f1(g, pred) for g in golds)
    return {"exact_match": 100.0 * em / len(references), "f1": 100.0 * f1 / len(references)}
