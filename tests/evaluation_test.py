"""Host-side metrics against hand-computed values and the libraries' documented examples."""

import math

import numpy as np
import pytest

from jaxlm import evaluation
from jaxlm.common_types import DataError


def test_classification_hand_computed():
    # class 0: F1 1; class 1: P 1/2 R 1 -> 2/3; class 2: P 1 R 1/2 -> 2/3; class 3 never seen -> 0.
    out = evaluation.classification_metrics(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), num_labels=4)
    assert out["accuracy"] == pytest.approx(0.75)
    assert out["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3 + 0) / 4)


def test_classification_length_mismatch_is_one_line_error():
    with pytest.raises(DataError, match="3 predictions but 2 gold"):
        evaluation.classification_metrics(np.array([0, 1, 1]), np.array([0, 1]), num_labels=2)


def test_regression_hand_computed():
    out = evaluation.regression_metrics(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0]))
    assert out["mse"] == pytest.approx(1 / 3)
    # deviations (-1, 0, 1) and (-4/3, -1/3, 5/3): r = 3 / sqrt(2 * 42/9) = 9 / sqrt(84)
    assert out["pearson"] == pytest.approx(9 / math.sqrt(84))
    assert math.isnan(evaluation.regression_metrics(np.ones(3), np.array([1.0, 2.0, 3.0]))["pearson"])


def test_tagging_seqeval_documented_example():
    # seqeval's README example: f1 0.50, accuracy 0.80.
    gold = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    out = evaluation.tagging_metrics(pred, gold)
    assert out == pytest.approx({"f1": 0.5, "precision": 0.5, "recall": 0.5, "token_accuracy": 0.8})


def test_tagging_default_mode_is_conlleval():
    # conlleval (seqeval's default mode) opens a span at an I- tag with no B-; strict IOB2 would not.
    out = evaluation.tagging_metrics([["B-PER", "I-PER", "O"]], [["I-PER", "I-PER", "O"]])
    assert out["f1"] == pytest.approx(1.0)
    assert out["token_accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(DataError, match="sequence 0 has 2 predicted tags but 3 gold"):
        evaluation.tagging_metrics([["O", "O"]], [["O", "O", "O"]])


def test_squad_normalization_as_official_script():
    assert evaluation.normalize_answer("The  Cat's hat!") == "cats hat"
    assert evaluation.normalize_answer("an apple, a pear and THE plum") == "apple pear and plum"
    # articles only as whole words, after punctuation is gone: "the-ory" -> "theory" stays
    assert evaluation.normalize_answer("the-ory of Anne") == "theory of anne"


def test_squad_metrics_hand_computed():
    # 1: exact after normalization; 2: "cat sat" vs "cat sat on": P 1, R 2/3 -> F1 0.8, no exact;
    # 3: best of two golds is exact; 4: no overlap.
    predictions = ["Denver Broncos", "the cat sat", "1976", "Paris"]
    golds = [["Denver Broncos", "Denver Broncos"], ["a cat sat on"], ["in 1975", "1976."], ["London"]]
    out = evaluation.squad_metrics(predictions, golds)
    assert out["exact_match"] == pytest.approx(100 * 2 / 4)
    assert out["f1"] == pytest.approx(100 * (1 + 0.8 + 1 + 0) / 4)
    # evaluate's documented squad example: one exact answer -> 100 / 100.
    assert evaluation.squad_metrics(["1976"], [["1976"]]) == {"exact_match": 100.0, "f1": 100.0}


def test_bleu_hand_computed_and_signature():
    # n-gram precisions 4/5, 3/4, 2/3, 1/2, no brevity penalty: BLEU = 100 * 0.2 ** 0.25.
    out = evaluation.bleu(["a b c d e"], ["a b c d f"])
    assert out["bleu"] == pytest.approx(100 * 0.2**0.25, abs=1e-6)
    assert "nrefs:1" in out["bleu_signature"] and "tok:13a" in out["bleu_signature"]
    assert "version:" in out["bleu_signature"]
    assert evaluation.bleu(["The dog bit the man."], ["The dog bit the man."])["bleu"] == pytest.approx(100.0)


def test_rouge_readme_example_hand_computed():
    # rouge-score's README pair; stemmed tokens: target "the quick brown fox jump over the lazi dog" (9),
    # prediction "the quick brown dog jump on the log" (8).
    out = evaluation.rouge(["The quick brown dog jumps on the log."], ["The quick brown fox jumps over the lazy dog"])
    assert out["rouge1"] == pytest.approx(12 / 17)  # 6 unigrams shared: P 6/8, R 6/9
    assert out["rouge2"] == pytest.approx(8 / 30)  # 2 bigrams shared: P 2/7, R 2/8
    assert out["rougeL"] == pytest.approx(10 / 17)  # LCS "the quick brown jump the": P 5/8, R 5/9
    two = evaluation.rouge(["a b", "x y"], ["a b", "p q"])
    assert two["rouge1"] == pytest.approx(0.5)  # mean over pairs


def test_implementations_name_library_versions():
    import sacrebleu

    assert set(evaluation.IMPLEMENTATIONS) >= {"classification", "regression", "tagging", "squad", "bleu", "rouge"}
    assert evaluation.IMPLEMENTATIONS["bleu"] == f"sacrebleu {sacrebleu.__version__}"
    assert "not installed" not in " ".join(evaluation.IMPLEMENTATIONS.values())
