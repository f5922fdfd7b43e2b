"""packing='windows': causal-LM rows at seeded random offsets of the tokenized text (nanoGPT's get_batch)."""

import numpy as np
import pytest

from jaxlm.common_types import DataError
from jaxlm.data import pipeline, sources, tokenizers, windows

TOK = tokenizers.ByteTokenizer()
DOCS = [f"document number {i} " * (i + 1) for i in range(30)]


def _rows(seed=0, n=8, **kw):
    args = dict(seq_len=16, batch_size=4, seed=seed, shuffle=True, packing="windows", prefetch=0) | kw
    return pipeline.take(iter(pipeline.lm_dataset(sources.ListSource(DOCS), TOK, **args)), n)


def _stream():
    return np.concatenate([np.r_[TOK.encode(d), TOK.eos_id] for d in DOCS])


def _starts(batch, stream):
    """Offsets in ``stream`` where each row (inputs + last target) occurs; a row found nowhere fails."""
    views = np.lib.stride_tricks.sliding_window_view(stream, batch["inputs"].shape[1] + 1)
    out = []
    for inputs, targets in zip(batch["inputs"], batch["targets"]):
        hits = np.flatnonzero((views == np.r_[inputs, targets[-1]]).all(axis=1))
        assert hits.size, "row is not a window of the token stream"
        out.append(int(hits[0]))
    return out


def test_every_row_is_a_window_of_the_text_shifted_by_one():
    stream = _stream()
    assert np.array_equal(windows.token_stream(sources.ListSource(DOCS), TOK), stream)
    for batch in _rows():
        assert batch["inputs"].shape == (4, 16) and batch["inputs"].dtype == np.int32
        np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
        assert (batch["weights"] == 1).all()
        _starts(batch, stream)


def test_offsets_cover_the_text_not_in_document_order():
    stream = _stream()
    starts = [s for batch in _rows(n=50, batch_size=10) for s in _starts(batch, stream)]
    # 500 draws spread over the whole text: a reader of chunks in order would stay in the first
    # documents; both the first and the last fifth are visited, and a batch mixes far-apart offsets.
    pos = np.array(starts) / len(stream)
    assert (pos < 0.2).any() and (pos > 0.8).any()
    assert np.ptp(pos[:10]) > 0.3


def test_deterministic_per_seed_and_resumable():
    a, b, c = _rows(0), _rows(0), _rows(1)
    assert all((x["inputs"] == y["inputs"]).all() for x, y in zip(a, b))
    assert not all((x["inputs"] == y["inputs"]).all() for x, y in zip(a, c))
    it = iter(
        pipeline.lm_dataset(
            sources.ListSource(DOCS), TOK, seq_len=16, batch_size=4, seed=0, shuffle=True, packing="windows", prefetch=0
        )
    )
    pipeline.take(it, 3)
    state = it.get_state()
    rest = pipeline.take(it, 5)
    it2 = iter(
        pipeline.lm_dataset(
            sources.ListSource(DOCS), TOK, seq_len=16, batch_size=4, seed=0, shuffle=True, packing="windows", prefetch=0
        )
    )
    it2.set_state(state)
    assert all((x["inputs"] == y["inputs"]).all() for x, y in zip(rest, pipeline.take(it2, 5)))


def test_hosts_draw_from_their_own_documents():
    shard = windows.token_stream(sources.ListSource(DOCS), TOK, shard_index=1, shard_count=2)
    expected = np.concatenate([np.r_[TOK.encode(d), TOK.eos_id] for d in DOCS[1::2]])
    np.testing.assert_array_equal(shard, expected)


def test_evaluation_pass_reads_fixed_chunks_like_concat():
    args = dict(seq_len=16, batch_size=4, seed=0, shuffle=False, num_epochs=1, prefetch=0)
    src = sources.ListSource(DOCS)
    w = list(pipeline.lm_dataset(src, TOK, packing="windows", **args))
    c = list(pipeline.lm_dataset(src, TOK, packing="concat", **args))
    assert len(w) == len(c) and all((x["inputs"] == y["inputs"]).all() for x, y in zip(w, c))


def test_text_shorter_than_a_row_is_repeated_as_concat_would():
    short = sources.ListSource(["abc"])  # 4 tokens with eos, rows of 17
    batch = next(
        iter(
            pipeline.lm_dataset(
                short, TOK, seq_len=16, batch_size=2, seed=0, shuffle=True, packing="windows", prefetch=0
            )
        )
    )
    cycle = np.r_[TOK.encode("abc"), TOK.eos_id]
    for inputs in batch["inputs"]:
        start = int(np.flatnonzero(cycle == inputs[0])[0])
        np.testing.assert_array_equal(inputs, np.resize(np.roll(cycle, -start), 16))


def test_no_documents_or_too_few_for_the_hosts_is_a_one_line_error():
    with pytest.raises(DataError, match="no documents"):
        windows.token_stream(sources.ListSource([]), TOK)
    with pytest.raises(DataError, match="2 documents cannot be sharded over 4 hosts"):
        windows.token_stream(sources.ListSource(["a", "b"]), TOK, shard_index=0, shard_count=4)
