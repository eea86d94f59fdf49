"""Evaluation metrics: SQuAD 2.0 EM/F1, the QuAC F1, multiple-choice predictions, mean/std.

* SQuAD follows the official v2.0 evaluation script: answers are normalised (lower case,
  punctuation removed, articles a/an/the removed, whitespace collapsed); a prediction's score is
  its maximum over the gold answers; golds that normalise to "" are dropped, and a question
  without any (unanswerable) has the single gold "", so only an empty prediction scores 1.
* QuAC follows the official scorer (``scorer.py`` of the QuAC release): references are reduced by
  ``quac_references`` (CANNOTANSWER wins when at least half of them say it, else it is dropped);
  with one reference the F1 is the F1 against it, with several it is the leave-one-out maximum:
  the mean, over each reference left out, of the best F1 against the others. "CANNOTANSWER" as a
  gold only matches the exact prediction "CANNOTANSWER". ``quac_scores`` also applies the
  scorer's filter (questions whose human F1 is below 0.4 are not scored) and reports HEQ.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Sequence

QUAC_CANNOTANSWER = "CANNOTANSWER"
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower, drop punctuation, drop articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _golds(golds: str | Sequence[str]) -> list[str]:
    """Gold answers as the SQuAD v2 script reads them ("" alone when none survives normalising)."""
    golds = [golds] if isinstance(golds, str) else list(golds)
    return [g for g in golds if normalize_answer(g)] or [""]


def _token_f1(pred: str, gold: str) -> float:
    """Harmonic mean of token precision and recall after normalising (0.0 without overlap)."""
    pred_tokens, gold_tokens = normalize_answer(pred).split(), normalize_answer(gold).split()
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _f1_pair(pred: str, gold: str) -> float:
    """SQuAD v2's F1: when either side normalises to nothing, 1.0 only if both do."""
    if not normalize_answer(pred) or not normalize_answer(gold):
        return float(normalize_answer(pred) == normalize_answer(gold))
    return _token_f1(pred, gold)


def exact_match(pred: str, golds: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised gold answer, else 0.0."""
    return max(float(normalize_answer(pred) == normalize_answer(g)) for g in _golds(golds))


def f1(pred: str, golds: str | Sequence[str]) -> float:
    """Token F1 of the prediction, maximised over the gold answers (SQuAD v2 official)."""
    return max(_f1_pair(pred, g) for g in _golds(golds))


# ----------------------------------------------------------------------------------------------
# QuAC


def quac_references(refs: Sequence[str]) -> list[str]:
    """The official scorer's ``handle_cannot``: ["CANNOTANSWER"] when at least half of the
    references are CANNOTANSWER, otherwise the references without it."""
    refs = list(refs)
    if not refs:
        raise ValueError("QuAC needs at least one reference answer")
    n_cannot = sum(r == QUAC_CANNOTANSWER for r in refs)
    if n_cannot >= len(refs) - n_cannot:
        return [QUAC_CANNOTANSWER]
    return [r for r in refs if r != QUAC_CANNOTANSWER]


def _quac_pair(pred: str, ref: str) -> float:
    """The scorer's per-reference F1: CANNOTANSWER matches only itself, otherwise token F1."""
    if ref == QUAC_CANNOTANSWER:
        return float(pred == QUAC_CANNOTANSWER)
    return _token_f1(pred, ref)


def quac_f1(pred: str, refs: Sequence[str]) -> float:
    """The official QuAC F1 of one prediction against its references (leave-one-out maximum)."""
    refs = quac_references(refs)
    if len(refs) == 1:
        return _quac_pair(pred, refs[0])
    scores = [max(_quac_pair(pred, r) for j, r in enumerate(refs) if j != i) for i in range(len(refs))]
    return sum(scores) / len(scores)


def quac_human_f1(refs: Sequence[str]) -> float:
    """Human agreement of the references: the mean over references of the best F1 against the
    others (1.0 with a single reference)."""
    refs = quac_references(refs)  # several references never include CANNOTANSWER
    if len(refs) == 1:
        return 1.0
    best = [max(_token_f1(r, o) for j, o in enumerate(refs) if j != i) for i, r in enumerate(refs)]
    return sum(best) / len(best)


def quac_scores(preds: Sequence[str], refs_list: Sequence[Sequence[str]], min_human_f1: float = 0.4) -> dict:
    """Corpus QuAC scores as the official scorer computes them (x100): ``f1`` (mean over the
    questions whose human F1 reaches ``min_human_f1``), ``heq`` (share of those where the
    prediction's F1 reaches the human F1) and ``count`` (questions scored)."""
    if len(preds) != len(refs_list):
        raise ValueError(f"{len(preds)} predictions for {len(refs_list)} questions")
    f1s, heq = [], 0
    for pred, refs in zip(preds, refs_list):
        human = quac_human_f1(refs)
        if human < min_human_f1:
            continue
        score = quac_f1(pred, refs)
        f1s.append(score)
        heq += score >= human
    if not f1s:
        return {"f1": 0.0, "heq": 0.0, "count": 0}
    return {"f1": 100 * sum(f1s) / len(f1s), "heq": 100 * heq / len(f1s), "count": len(f1s)}


# ----------------------------------------------------------------------------------------------
# Aggregation and multiple choice


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std needs at least one value")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize_templates(accs: Sequence[float]) -> dict:
    """Per-template accuracies (fractions) -> ``{"mean", "std"}`` in percent (std with ddof=1),
    as the ImageNetVC protocol reports them."""
    mean, std = mean_std(accs)
    return {"mean": 100 * mean, "std": 100 * std}


def _argmax(values: Sequence[float]) -> int:
    """Index of the first maximum (numpy's tie rule)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def mc_predictions(logliks: Sequence[float], lengths: Sequence[int]) -> tuple[int, int]:
    """``(pred_acc, pred_norm)`` for one multiple-choice question, as lm-evaluation-harness does:
    the option with the largest summed continuation log-likelihood, and the largest after
    dividing by the option's character length (``MCExample.norm_lengths()``). Ties go to the
    first option."""
    if len(logliks) != len(lengths) or not logliks:
        raise ValueError(f"need one length per option: {len(logliks)} log-likelihoods, {len(lengths)} lengths")
    if any(n <= 0 for n in lengths):
        raise ValueError(f"character lengths must be positive, got {list(lengths)}")
    return _argmax(logliks), _argmax([ll / n for ll, n in zip(logliks, lengths)])


def ppl_prediction(mean_nlls: Sequence[float]) -> int:
    """The released protocol's choice: the option whose query has the lowest exp(mean token NLL)
    (equivalently the lowest mean NLL; ties go to the first option)."""
    if not mean_nlls:
        raise ValueError("need at least one option")
    return _argmax([-x for x in mean_nlls])
