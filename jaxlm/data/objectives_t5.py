"""T5 span corruption as a grain transform (the ``span_corruption`` objective).

A row of raw tokens (documents concatenated with ``eos`` and cut to a fixed length) gets a
noise mask from :func:`random_spans_noise_mask`, a NumPy port of T5's reference algorithm:
about ``noise_density`` (0.15) of the tokens, in spans of mean length ``mean_noise_span_length``
(3). Each span is replaced in the inputs by one sentinel id; the targets list each sentinel
followed by the span it replaced, then ``eos``::

    tokens   a b c d e f g h
    inputs   a <X> d e f <Y> h eos
    targets  <X> b c <Y> g eos

Sentinels count down from ``sentinel_start`` as T5's ``<extra_id_0>, <extra_id_1>, ...``; see
:func:`sentinel_ids` for the ids used with jaxlm's own tokenizers. The mask of row ``k`` comes
from :func:`~jaxlm.data.objectives.example_rng` ``(seed, SALT_SPANS, k)``: deterministic for a
seed, different every time a row is seen (``k`` keeps counting across epochs).
"""

from __future__ import annotations

import grain
import numpy as np

from jaxlm.common_types import DataError
from jaxlm.data.objectives import SALT_SPANS, example_rng
from jaxlm.data.packing import pad_to
from jaxlm.data.tokenizers import Tokenizer


def random_spans_noise_mask(
    length: int, noise_density: float, mean_noise_span_length: float, rng: np.random.Generator
) -> np.ndarray:
    """T5's ``random_spans_noise_mask`` in NumPy: a bool ``[length]`` mask of noise spans.

    ``round(length * noise_density)`` noise tokens (at least 1, at most ``length - 1``) form
    ``round(noise / mean_noise_span_length)`` spans (at least 1); noise and non-noise span
    lengths are random segmentations, interleaved starting with non-noise.
    """
    orig_length = length
    length = max(length, 2)
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    num_nonnoise = length - num_noise

    def segmentation(num_items: int, num_segments: int) -> np.ndarray:
        first = np.concatenate([[False], rng.permutation(np.arange(num_items - 1) < num_segments - 1)])
        return np.bincount(np.cumsum(first), minlength=num_segments)

    interleaved = np.stack([segmentation(num_nonnoise, num_spans), segmentation(num_noise, num_spans)], 1).reshape(-1)
    starts = np.zeros(length, np.int32)
    starts[np.cumsum(interleaved)[:-1]] = 1
    return (np.cumsum(starts) % 2 == 1)[:orig_length]


def span_corruption_lengths(inputs_length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """T5's ``random_spans_helper``: raw tokens per example and targets length for ``inputs_length``.

    The raw length is the largest whose corrupted inputs (non-noise tokens, one sentinel per
    span, ``eos``) fit in ``inputs_length``.
    """

    def lengths(tokens_length: int) -> tuple[int, int]:
        noise = int(round(tokens_length * noise_density))
        spans = int(round(noise / mean_span))
        return tokens_length - noise + spans + 1, noise + spans + 1

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    _, targets_length = lengths(tokens_length)
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def own_sentinel_start(tokenizer: Tokenizer, num_sentinels: int) -> int | None:
    """The id of ``<extra_id_0>`` if the tokenizer holds T5's sentinels, else None.

    A T5 vocabulary (an ``hf`` tokenizer.json) ends with ``<extra_id_0>`` ... ``<extra_id_99>``
    on consecutive ids counting down; all ``num_sentinels`` of them must be there, laid out so.
    """
    lookup = getattr(tokenizer, "token_to_id", None)
    start = lookup("<extra_id_0>") if lookup is not None else None
    if start is None or any(lookup(f"<extra_id_{k}>") != start - k for k in range(1, num_sentinels)):
        return None
    return start


def sentinel_ids(tokenizer: Tokenizer, sentinel_start: int | None, num_sentinels: int) -> np.ndarray:
    """Sentinel ids, first span first: ``sentinel_start, sentinel_start - 1, ...`` (T5 counts down).

    ``sentinel_start=None`` uses the tokenizer's own T5 sentinels when it holds them
    (:func:`own_sentinel_start`), else puts them just past the tokenizer's vocabulary, at
    ``vocab_size + num_sentinels - 1`` down to ``vocab_size``, so the model's vocabulary must
    then have ``tokenizer.vocab_size + num_sentinels`` ids.
    """
    if num_sentinels < 1:
        raise DataError(f"num_sentinels={num_sentinels} must be at least 1")
    if sentinel_start is None:
        sentinel_start = own_sentinel_start(tokenizer, num_sentinels)
    start = tokenizer.vocab_size + num_sentinels - 1 if sentinel_start is None else sentinel_start
    ids = start - np.arange(num_sentinels)
    if ids[-1] < 0:
        raise DataError(f"sentinel_start={start} with num_sentinels={num_sentinels} reaches negative ids; raise it")
    specials = {v for v in tokenizer.special_ids.values() if v is not None}
    if clash := sorted(specials & set(ids.tolist())):
        raise DataError(
            f"sentinel ids {start}..{ids[-1]} include the special id(s) {clash}; "
            f"set sentinel_start above them (default: past the vocabulary)"
        )
    return ids.astype(np.int32)


def corrupt_spans(
    tokens: np.ndarray, noise: np.ndarray, sentinels: np.ndarray, eos_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Replace each noise span of ``tokens`` by its sentinel; targets list each sentinel and its span.

    ``inputs = non-noise tokens with sentinel k where span k was, eos``;
    ``targets = sentinel 0, span 0, sentinel 1, span 1, ..., eos``.
    """
    starts = noise & ~np.concatenate([[False], noise[:-1]])
    num_spans = int(starts.sum())
    if num_spans > len(sentinels):
        raise DataError(f"a row has {num_spans} noise spans but only {len(sentinels)} sentinels; raise num_sentinels")
    span = np.maximum(np.cumsum(starts) - 1, 0)
    inputs = np.where(starts, sentinels[span], tokens)[~noise | starts]
    targets = np.insert(tokens[noise], np.flatnonzero(starts[noise]), sentinels[:num_spans])
    return np.append(inputs, eos_id).astype(np.int32), np.append(targets, eos_id).astype(np.int32)


class SpanCorruptionRow(grain.transforms.MapWithIndex):
    """Row ``k`` of raw tokens -> padded ``{inputs, inputs_segment_ids, targets, weights}`` (T5)."""

    def __init__(
        self,
        *,
        inputs_length: int,
        targets_length: int,
        sentinels: np.ndarray,
        eos_id: int,
        pad_id: int,
        seed: int,
        noise_density: float,
        mean_span: float,
    ) -> None:
        self.inputs_length, self.targets_length, self.sentinels = inputs_length, targets_length, sentinels
        self.eos_id, self.pad_id, self.seed = eos_id, pad_id, seed
        self.noise_density, self.mean_span = noise_density, mean_span

    def map_with_index(self, index: int, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tokens = row["tokens"]
        rng = example_rng(self.seed, SALT_SPANS, index)
        noise = random_spans_noise_mask(len(tokens), self.noise_density, self.mean_span, rng)
        inputs, targets = corrupt_spans(tokens, noise, self.sentinels, self.eos_id)
        return {
            "inputs": pad_to(inputs, self.inputs_length, self.pad_id),
            "inputs_segment_ids": pad_to(np.ones(len(inputs)), self.inputs_length, 0),
            "targets": pad_to(targets, self.targets_length, self.pad_id),
            "weights": pad_to(np.ones(len(targets)), self.targets_length, 0, np.float32),
        }
