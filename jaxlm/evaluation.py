"""Evaluation metrics: scores of predictions against gold answers, computed on the host.

Host-side metrics take plain NumPy arrays or Python lists (already gathered from the
devices and decoded to labels, tags or text) and call the maintained libraries, so the
numbers are the ones papers report:

===================  ==============================================  ============================  =========
function             keys                                            implementation                scale
===================  ==============================================  ============================  =========
classification       accuracy, macro_f1                              scikit-learn                  0..1
regression           mse, pearson                                    scikit-learn, SciPy           as data
tagging              f1, precision, recall (spans), token_accuracy   seqeval (conlleval mode)      0..1
squad                exact_match, f1                                 official SQuAD v1.1 script    0..100
bleu                 bleu, bleu_signature                            sacrebleu (corpus BLEU)       0..100
rouge                rouge1, rouge2, rougeL (F-measure, mean)        rouge-score (Porter stemmer)  0..1
===================  ==============================================  ============================  =========

:data:`IMPLEMENTATIONS` names each group's implementation and version, to be logged beside
the scores. The libraries are imported when a metric is first computed (seqeval pulls in
scikit-learn and rouge-score pulls in nltk, ~2-4 s), not when this module is imported.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.metadata
import math
import re
import string
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxlm.common_types import DataError

# ----------------------------------------------------------------------------- host-side metrics


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


IMPLEMENTATIONS: dict[str, str] = {
    "classification": f"scikit-learn {_version('scikit-learn')}",
    "regression": f"scikit-learn {_version('scikit-learn')}, scipy {_version('scipy')}",
    "tagging": f"seqeval {_version('seqeval')}",
    "squad": "SQuAD v1.1 official evaluation (evaluate-v1.1.py), reimplemented in jaxlm.evaluation",
    "bleu": f"sacrebleu {_version('sacrebleu')}",
    "rouge": f"rouge-score {_version('rouge-score')}",
}


def _check_lengths(what: str, predictions: Sequence, gold: Sequence) -> None:
    if len(predictions) != len(gold):
        raise DataError(f"{what}: {len(predictions)} predictions but {len(gold)} gold answers; they must pair up")
    if len(gold) == 0:
        raise DataError(f"{what}: no examples to score; the evaluation split is empty")


def classification_metrics(pred: np.ndarray, gold: np.ndarray, num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 of predicted class indices against gold ones.

    Macro-F1 averages the F1 of every class ``0..num_labels-1``, including classes absent
    from both ``pred`` and ``gold`` (their F1 counts as 0, scikit-learn's
    ``zero_division=0``), so the figure does not depend on which classes a split happens to hold.
    """
    from sklearn.metrics import accuracy_score, f1_score

    pred, gold = np.asarray(pred).reshape(-1), np.asarray(gold).reshape(-1)
    _check_lengths("classification_metrics", pred, gold)
    return {
        "accuracy": float(accuracy_score(gold, pred)),
        "macro_f1": float(f1_score(gold, pred, average="macro", labels=list(range(num_labels)), zero_division=0)),
    }


def regression_metrics(pred: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Mean squared error and Pearson correlation of predicted values against gold ones.

    The correlation is NaN when either side is constant (it is undefined there).
    """
    from scipy.stats import ConstantInputWarning, pearsonr
    from sklearn.metrics import mean_squared_error

    pred = np.asarray(pred, np.float64).reshape(-1)
    gold = np.asarray(gold, np.float64).reshape(-1)
    _check_lengths("regression_metrics", pred, gold)
    if len(pred) < 2 or np.ptp(pred) == 0 or np.ptp(gold) == 0:
        pearson = float("nan")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConstantInputWarning)
            pearson = float(pearsonr(pred, gold).statistic)
    return {"mse": float(mean_squared_error(gold, pred)), "pearson": pearson}


def tagging_metrics(pred_tags: Sequence[Sequence[str]], gold_tags: Sequence[Sequence[str]]) -> dict[str, float]:
    """Span-level precision, recall and F1 of BIO tag sequences (seqeval's default, conlleval mode), and token accuracy.

    A span counts only when its type and both boundaries match. Each prediction must have
    as many tags as its gold sequence.
    """
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    pred = [list(p) for p in pred_tags]
    gold = [list(g) for g in gold_tags]
    _check_lengths("tagging_metrics", pred, gold)
    for i, (p, g) in enumerate(zip(pred, gold)):
        if len(p) != len(g):
            raise DataError(f"tagging_metrics: sequence {i} has {len(p)} predicted tags but {len(g)} gold tags")
    return {
        "f1": float(f1_score(gold, pred, zero_division=0)),
        "precision": float(precision_score(gold, pred, zero_division=0)),
        "recall": float(recall_score(gold, pred, zero_division=0)),
        "token_accuracy": float(accuracy_score(gold, pred)),
    }


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalization: lower case, drop punctuation, drop articles (a, an, the), collapse whitespace.

    The same steps in the same order as ``normalize_answer`` of the official ``evaluate-v1.1.py``.
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def squad_f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 of one prediction against one gold answer, after :func:`normalize_answer` (0..1)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_exact_match(prediction: str, gold: str) -> bool:
    """Whether the prediction equals the gold answer after :func:`normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(gold)


def squad_metrics(predictions: Sequence[str], gold_answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """SQuAD v1.1 exact match and F1 in percent: each prediction scored against its best gold answer, then averaged.

    ``gold_answers[i]`` lists every acceptable answer of example ``i`` (SQuAD's validation
    split has up to several per question). An example with no gold answer (a SQuAD 2.0
    unanswerable question, which that version scores differently) counts as 0.
    """
    _check_lengths("squad_metrics", predictions, gold_answers)
    exact = f1 = 0.0
    for prediction, golds in zip(predictions, gold_answers):
        golds = [golds] if isinstance(golds, str) else list(golds)
        if not golds:
            continue
        exact += max(float(squad_exact_match(prediction, g)) for g in golds)
        f1 += max(squad_f1(prediction, g) for g in golds)
    n = len(predictions)
    return {"exact_match": 100.0 * exact / n, "f1": 100.0 * f1 / n}


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float | str]:
    """Corpus BLEU of detokenized hypotheses against one reference each, with sacrebleu's default settings.

    Returns the score (0..100) and sacrebleu's signature string
    (``nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:...``), which says exactly how it
    was computed and belongs next to the score wherever it is reported.
    """
    from sacrebleu.metrics import BLEU

    _check_lengths("bleu", hypotheses, references)
    metric = BLEU()
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return {"bleu": float(score.score), "bleu_signature": str(metric.get_signature())}


_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures (0..1), averaged over hypothesis/reference pairs.

    rouge-score with the Porter stemmer (``use_stemmer=True``), as summarization papers report
    it; ``rougeL`` is the sentence-level longest common subsequence.
    """
    from rouge_score import rouge_scorer

    _check_lengths("rouge", hypotheses, references)
    scorer = rouge_scorer.RougeScorer(list(_ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(_ROUGE_TYPES, 0.0)
    for hypothesis, reference in zip(hypotheses, references):
        scores = scorer.score(reference, hypothesis)  # rouge-score takes (target, prediction)
        for key in _ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    return {key: total / len(hypotheses) for key, total in totals.items()}


# ----------------------------------------------------------------------------- the objective registry


def reduce(pairs: Sequence[dict[str, tuple[Any, Any]]]) -> dict[str, float]:
    """Average named ``(sum, count)`` pairs over batches: ``sum of sums / sum of counts`` per name.

    Every eval step returns such pairs, so a split's mean weights each token or example
    equally however it was batched, padded or sharded. A name whose counts add up to 0 is left out.
    """
    sums: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, float] = collections.defaultdict(float)
    for batch_pairs in pairs:
        for name, (s, c) in batch_pairs.items():
            sums[name] += float(s)
            counts[name] += float(c)
    return {name: sums[name] / counts[name] for name in sums if counts[name] > 0}


@dataclasses.dataclass(frozen=True)
class Context:
    """What host-side metrics need besides the outputs: the tokenizer and the label names."""

    decode: Callable[[Sequence[int]], str]  # token ids -> text
    eos_id: int
    labels: tuple[str, ...] = ()


Outputs = dict[str, np.ndarray]  # per-row arrays of a whole split, concatenated over batches
MetricFn = Callable[[Outputs, Context], dict[str, Any]]


def _perplexity(means: dict[str, float]) -> dict[str, float]:
    return {"perplexity": math.exp(min(means["loss"], 50.0))} if "loss" in means else {}


def _no_outputs(outputs: Outputs, ctx: Context) -> dict[str, Any]:
    return {}


def _valid(outputs: Outputs) -> np.ndarray:
    return outputs["valid"] > 0 if "valid" in outputs else np.ones(len(next(iter(outputs.values()))), bool)


def _classification(outputs: Outputs, ctx: Context) -> dict[str, Any]:
    keep = _valid(outputs)
    pred, gold = outputs["pred"][keep], outputs["gold"][keep]
    if np.issubdtype(pred.dtype, np.floating):  # a one-output regression head
        return regression_metrics(pred, gold) | {"metric_impl": IMPLEMENTATIONS["regression"]}
    return classification_metrics(pred, gold, max(len(ctx.labels), 2)) | {
        "metric_impl": IMPLEMENTATIONS["classification"]
    }


def _tag_names(ids: np.ndarray, labels: tuple[str, ...]) -> list[str]:
    return [labels[i] if 0 <= i < len(labels) else "O" for i in ids]


def _token_classification(outputs: Outputs, ctx: Context) -> dict[str, Any]:
    pred_tags, gold_tags = [], []
    for pred, gold in zip(outputs["pred"], outputs["gold"]):
        words = gold != -100  # the first sub-token of every word carries its tag
        if words.any():
            pred_tags.append(_tag_names(pred[words], ctx.labels))
            gold_tags.append(_tag_names(gold[words], ctx.labels))
    return tagging_metrics(pred_tags, gold_tags) | {"metric_impl": IMPLEMENTATIONS["tagging"]}


def _span_text(ids: np.ndarray, start: int, end: int, ctx: Context) -> str:
    return "" if start == 0 and end == 0 else ctx.decode([int(t) for t in ids[start : end + 1]])


def _qa(outputs: Outputs, ctx: Context) -> dict[str, Any]:
    keep = _valid(outputs)
    predictions, gold = [], []
    for i in np.flatnonzero(keep):
        ids = outputs["inputs"][i]
        predictions.append(_span_text(ids, int(outputs["pred_start"][i]), int(outputs["pred_end"][i]), ctx))
        gold.append([_span_text(ids, int(outputs["gold_start"][i]), int(outputs["gold_end"][i]), ctx)])
    return squad_metrics(predictions, gold) | {"metric_impl": IMPLEMENTATIONS["squad"]}


def _until_eos(ids: np.ndarray, eos_id: int) -> list[int]:
    out = []
    for t in ids:
        if t == eos_id:
            break
        if t != 0:
            out.append(int(t))
    return out


def _seq2seq(outputs: Outputs, ctx: Context) -> dict[str, Any]:
    if "generated" not in outputs:
        return {}
    keep = _valid(outputs)
    hyps = [ctx.decode(_until_eos(row, ctx.eos_id)) for row in outputs["generated"][keep]]
    refs = [ctx.decode(_until_eos(row, ctx.eos_id)) for row in outputs["gold"][keep]]
    impl = f"{IMPLEMENTATIONS['bleu']}; {IMPLEMENTATIONS['rouge']}"
    return bleu(hyps, refs) | rouge(hyps, refs) | {"metric_impl": impl}


# config.data.objective -> its host-side metrics (the step layer's pairs are reduced for every one).
METRICS: dict[str, MetricFn] = {
    "causal_lm": _no_outputs,
    "masked_lm": _no_outputs,
    "nsp": _no_outputs,
    "span_corruption": _no_outputs,
    "seq2seq": _seq2seq,
    "classification": _classification,
    "token_classification": _token_classification,
    "qa": _qa,
}


def summarize(objective: str, pairs: Sequence[dict[str, tuple[Any, Any]]], outputs: Outputs, ctx: Context) -> dict:
    """Every metric of ``objective`` for one split: reduced pairs, perplexity of a token loss, host metrics."""
    means = reduce(pairs)
    lm_loss = objective in ("causal_lm", "masked_lm", "nsp", "span_corruption", "seq2seq")
    out: dict[str, Any] = dict(means) | (_perplexity(means) if lm_loss else {})
    if outputs:
        out |= METRICS[objective](outputs, ctx)
    return out
