"""Host-side text-GAN metrics: BLEU and Self-BLEU (nltk, as Texygen computes them), distinct-n, NLL.

Sequences are lists of integer token ids (Texygen compares token ids too; for real text the
ids are the tokenizer's). All functions are plain Python / NumPy; the jitted NLL_oracle of
generator samples is ``jaxlm.models.gan.oracle.nll``, and :func:`nll_oracle` here is its NumPy
counterpart for samples read from a file.

* BLEU-n (n = 2..5): the mean over hypotheses of ``nltk.translate.bleu_score.sentence_bleu``
  with uniform weights ``(1/n, ..., 1/n)`` against every reference, smoothing
  ``SmoothingFunction().method1`` (Texygen's settings). Quality: higher is closer to the data.
* Self-BLEU-n: the same, each sample against all the other samples. Diversity: lower is
  more diverse.
* distinct-n: distinct n-grams / all n-grams over the samples (Li et al., 2016).

Every score is logged beside :func:`implementation` (library and version, smoothing and the
sample counts), so figures from different runs are comparable only when that string matches.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxlm.data import oracle

Tokens = Sequence[Sequence[int]]
BLEU_ORDERS = (2, 3, 4, 5)


def implementation(num_hypotheses: int, num_references: int) -> str:
    """What computed the BLEU figures, with the nltk version and the sample counts."""
    import nltk

    return (
        f"nltk {nltk.__version__} sentence_bleu, uniform weights, SmoothingFunction().method1, "
        f"{num_hypotheses} samples, {num_references} references"
    )


def _as_lists(seqs: Tokens | np.ndarray) -> list[list[int]]:
    return [[int(t) for t in s] for s in seqs]


def bleu(hypotheses: Tokens | np.ndarray, references: Tokens | np.ndarray, n: int) -> float:
    """Mean sentence BLEU-n of ``hypotheses`` against all ``references`` (nltk, method1 smoothing)."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    refs = _as_lists(references)
    weights = tuple([1.0 / n] * n)
    smooth = SmoothingFunction().method1
    scores = [sentence_bleu(refs, h, weights, smoothing_function=smooth) for h in _as_lists(hypotheses)]
    return float(np.mean(scores)) if scores else 0.0


def self_bleu(samples: Tokens | np.ndarray, n: int) -> float:
    """Mean sentence BLEU-n of each sample against all the other samples."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    seqs = _as_lists(samples)
    weights = tuple([1.0 / n] * n)
    smooth = SmoothingFunction().method1
    scores = [
        sentence_bleu(seqs[:i] + seqs[i + 1 :], h, weights, smoothing_function=smooth) for i, h in enumerate(seqs)
    ]
    return float(np.mean(scores)) if scores else 0.0


def distinct_n(samples: Tokens | np.ndarray, n: int) -> float:
    """Distinct n-grams over all n-grams of the samples (0 when there are none)."""
    grams = [tuple(s[i : i + n]) for s in _as_lists(samples) for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def bleu_metrics(samples: Tokens | np.ndarray, references: Tokens | np.ndarray) -> dict[str, float | str]:
    """BLEU-2..5 against ``references`` and Self-BLEU-2..5 of ``samples``, with the implementation string."""
    out: dict[str, float | str] = {}
    for n in BLEU_ORDERS:
        out[f"bleu{n}"] = bleu(samples, references, n)
    for n in BLEU_ORDERS:
        out[f"self_bleu{n}"] = self_bleu(samples, n)
    out["bleu_impl"] = implementation(len(samples), len(references))
    return out


def diversity_metrics(samples: Tokens | np.ndarray) -> dict[str, float]:
    """distinct-1..4 of the samples."""
    return {f"distinct{n}": distinct_n(samples, n) for n in (1, 2, 3, 4)}


def nll_oracle(tokens: np.ndarray) -> float:
    """NLL_oracle of ``[N, T]`` token ids with the NumPy oracle (host side; slow for many samples)."""
    return oracle.nll(oracle.load_oracle(), np.asarray(tokens))


def nll_from_sums(nll_sum: float, count: float) -> float:
    """A mean NLL from a summed ``(nll, count)`` pair."""
    return float(nll_sum) / max(float(count), 1.0)
