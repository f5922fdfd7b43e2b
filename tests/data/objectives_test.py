import re

import numpy as np
import pytest

from jaxlm.common_types import DataError
from jaxlm.data import objectives, objectives_t5, pipeline, sources, tokenizers

TOK = tokenizers.ByteTokenizer()
CLS, SEP, MASK, PAD = TOK.cls_id, TOK.sep_id, TOK.mask_id, TOK.pad_id
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly bumps".split()


def _text(rng, n_words):
    return " ".join(rng.choice(WORDS, size=n_words))


# ---- masked LM ----------------------------------------------------------------------------------


def test_masking_selects_15_percent_with_80_10_10_replacement():
    table = objectives.TokenTable(TOK)
    rng = np.random.default_rng(0)
    selected = masked = unchanged = randomized = maskable = 0
    for i in range(300):
        tokens = np.concatenate([[CLS], rng.integers(3, 259, size=rng.integers(20, 120)), [SEP]])
        inputs, sel = objectives.mask_tokens(tokens, objectives.example_rng(0, i), table=table, mask_id=MASK)
        assert not sel[0] and not sel[-1] and inputs[0] == CLS and inputs[-1] == SEP  # specials never masked
        np.testing.assert_array_equal(inputs[~sel], tokens[~sel])
        assert not table.special[inputs[sel & (inputs != MASK)]].any()  # random tokens are ordinary
        maskable += len(tokens) - 2
        selected += sel.sum()
        masked += (inputs[sel] == MASK).sum()
        unchanged += (inputs[sel] == tokens[sel]).sum()
        randomized += ((inputs[sel] != MASK) & (inputs[sel] != tokens[sel])).sum()
    assert abs(selected / maskable - 0.15) < 0.005
    assert abs(masked / selected - 0.8) < 0.03
    # A random replacement draws the original token 1 time in 256: it then counts as unchanged.
    assert abs(unchanged / selected - 0.1) < 0.02 and abs(randomized / selected - 0.1) < 0.02


def test_word_rule_for_bytes_splits_on_spaces():
    table = objectives.TokenTable(TOK, words=True)
    ids = np.concatenate([[CLS], TOK.encode("the cat  sat"), [SEP]])
    words = objectives.word_ids(ids, table.starts_word, table.special)
    groups = [TOK.decode(ids[words == w]) for w in np.unique(words)]
    assert groups == ["", "the", " cat", " ", " sat", ""]  # [cls] and [sep] are words of their own


def test_whole_word_masking_masks_whole_words_only():
    table = objectives.TokenTable(TOK, words=True)
    rng = np.random.default_rng(1)
    total = maskable = 0
    for i in range(200):
        tokens = np.concatenate([[CLS], TOK.encode(_text(rng, 30)), [SEP]])
        inputs, sel = objectives.mask_tokens(
            tokens, objectives.example_rng(0, i), table=table, mask_id=MASK, whole_word=True
        )
        words = objectives.word_ids(tokens, table.starts_word, table.special)
        for w in np.unique(words[sel]):
            assert sel[words == w].all(), "a selected word is selected whole"
        total += sel.sum()
        maskable += len(tokens) - 2
    assert 0.13 < total / maskable <= 0.15


def _mlm(docs, **kw):
    args = dict(seq_len=64, batch_size=2, seed=0, shuffle=False, prefetch=0)
    return iter(pipeline.masked_lm_dataset(sources.ListSource(docs), TOK, **{**args, **kw}))


def test_masked_lm_rows_and_a_fresh_mask_every_epoch():
    docs = ["one two three four five six seven eight nine ten", "alpha beta gamma delta epsilon zeta eta theta"]
    b0, b1 = pipeline.take(_mlm(docs), 2)  # one batch is one epoch here
    assert {k: (v.shape, v.dtype) for k, v in b0.items()} == {
        "inputs": ((2, 64), np.int32),
        "targets": ((2, 64), np.int32),
        "weights": ((2, 64), np.float32),
        "segment_ids": ((2, 64), np.int32),
        "token_types": ((2, 64), np.int32),
    }
    n = len(TOK.encode(docs[0])) + 2
    np.testing.assert_array_equal(b0["targets"][0, :n], np.concatenate([[CLS], TOK.encode(docs[0]), [SEP]]))
    assert (b0["targets"][0, n:] == PAD).all() and (b0["weights"][0, n:] == 0).all()
    np.testing.assert_array_equal(b0["segment_ids"][0], np.arange(64) < n)
    assert (b0["token_types"] == 0).all()
    assert (b0["weights"] == 1).sum() == sum(round(0.15 * len(TOK.encode(d))) for d in docs)
    # Same documents next epoch, a different mask; the same seed repeats it, another seed does not.
    np.testing.assert_array_equal(b0["targets"], b1["targets"])
    assert not (b0["weights"] == b1["weights"]).all()
    again = next(_mlm(docs))
    np.testing.assert_array_equal(again["inputs"], b0["inputs"])
    assert not (next(_mlm(docs, seed=1))["weights"] == b0["weights"]).all()


def test_masked_lm_splits_long_documents_into_pieces():
    doc = " ".join(["word"] * 40)  # 199 bytes: 4 pieces of at most 62
    pieces = pipeline.take(_mlm([doc], batch_size=4), 1)[0]["targets"]
    body = np.concatenate([row[1 : list(row).index(SEP)] for row in pieces])
    np.testing.assert_array_equal(body, TOK.encode(doc))
    first = next(_mlm([doc], batch_size=1, long_documents="truncate"))["targets"][0]
    np.testing.assert_array_equal(first[1:63], TOK.encode(doc)[:62])


# ---- next-sentence prediction -------------------------------------------------------------------


def _nsp_docs(n_docs=30, n_sent=6):
    return [" ".join(f"Doc{d} sent{s} ends." for s in range(n_sent)) for d in range(n_docs)]


def test_nsp_pairs_layout_labels_and_ratio():
    ds = pipeline.nsp_dataset(
        sources.ListSource(_nsp_docs()), TOK, seq_len=48, batch_size=10, seed=0, shuffle=True, mask_rate=0.0
    )
    labels = []
    for batch in pipeline.take(iter(ds), 30):
        assert batch["nsp_label"].shape == (10,) and batch["nsp_label"].dtype == np.int32
        assert (batch["weights"] == 0).all()  # mask_rate=0: nothing to predict but the label
        for row, types, seg, label in zip(
            batch["inputs"], batch["token_types"], batch["segment_ids"], batch["nsp_label"]
        ):
            n = int(seg.sum())
            seps = np.flatnonzero(row == SEP)
            assert row[0] == CLS and seps[-1] == n - 1 and len(seps) == 2
            np.testing.assert_array_equal(types[:n], np.arange(n) > seps[0])
            assert (types[n:] == 0).all() and (row[n:] == PAD).all()
            a = re.fullmatch(r"Doc(\d+) sent(\d+) ends\.", TOK.decode(row[1 : seps[0]]))
            b = re.fullmatch(r"Doc(\d+) sent(\d+) ends\.", TOK.decode(row[seps[0] + 1 : seps[1]]))
            assert a and b
            same_doc = a[1] == b[1]
            if label == objectives.NSP_IS_NEXT:  # 0: B follows A (Hugging Face's convention)
                assert same_doc and int(b[2]) == int(a[2]) + 1
            else:
                assert not same_doc
            labels.append(int(label))
    assert abs(np.mean(labels) - 0.5) < 0.07


def test_nsp_with_masking_keeps_token_types_and_masks_only_sentences():
    ds = pipeline.nsp_dataset(sources.ListSource(_nsp_docs()), TOK, seq_len=48, batch_size=8, seed=0, shuffle=True)
    batch = next(iter(ds))
    sel = batch["weights"] > 0
    assert sel.any() and not np.isin(batch["targets"][sel], [CLS, SEP, PAD]).any()
    assert set(batch) == {"inputs", "targets", "weights", "segment_ids", "token_types", "nsp_label"}


def test_nsp_truncates_the_longer_sentence():
    a, b = objectives.truncate_pair(np.arange(10), np.arange(4), 8)
    assert len(a) == 4 and len(b) == 4
    assert objectives.split_sentences("One. Two!  Three?\nFour") == ["One.", "Two!", "Three?", "Four"]


# ---- T5 span corruption -------------------------------------------------------------------------


def _reconstruct(inputs, targets, sentinels):
    """Undo span corruption (both without their final eos): splice each sentinel's span back in."""
    spans, current = {}, None
    for t in targets:
        if t in sentinels:
            current = int(t)
            spans[current] = []
        else:
            spans[current].append(int(t))
    out = []
    for t in inputs:
        out.extend(spans[int(t)] if t in sentinels else [int(t)])
    return out


def test_random_spans_noise_mask_statistics_match_t5():
    rng = np.random.default_rng(0)
    noise = spans = tokens = 0
    for _ in range(500):
        length = int(rng.integers(50, 600))
        mask = objectives_t5.random_spans_noise_mask(length, 0.15, 3.0, rng)
        assert not mask[0]  # T5 interleaves starting with a non-noise span
        starts = mask & ~np.concatenate([[False], mask[:-1]])
        assert starts.sum() == max(round(round(length * 0.15) / 3), 1)
        noise += mask.sum()
        spans += starts.sum()
        tokens += length
    assert abs(noise / tokens - 0.15) < 0.002
    assert abs(noise / spans - 3.0) < 0.05


def test_t5_length_helper_matches_the_reference():
    assert objectives_t5.span_corruption_lengths(512, 0.15, 3.0) == (568, 114)  # T5's published numbers
    for inputs_length in (16, 100, 257):
        raw, targets = objectives_t5.span_corruption_lengths(inputs_length, 0.15, 3.0)
        noise = round(raw * 0.15)
        assert raw - noise + round(noise / 3) + 1 <= inputs_length and targets == noise + round(noise / 3) + 1
        noise = round((raw + 1) * 0.15)
        assert raw + 1 - noise + round(noise / 3) + 1 > inputs_length  # the largest raw length that fits


def test_corrupt_spans_example_and_reconstruction():
    tokens = np.array([10, 11, 12, 13, 14, 15, 16, 17])
    mask = np.array([0, 1, 1, 0, 0, 0, 1, 0], bool)
    inputs, targets = objectives_t5.corrupt_spans(tokens, mask, np.array([99, 98, 97]), eos_id=2)
    assert inputs.tolist() == [10, 99, 13, 14, 15, 98, 17, 2]
    assert targets.tolist() == [99, 11, 12, 98, 16, 2]


def test_span_corruption_batches_reconstruct_the_text_and_hit_the_statistics():
    docs = [" ".join(f"w{i}x{j}" for j in range(30)) for i in range(20)]
    seq_len = 64
    ds = pipeline.span_corruption_dataset(
        sources.ListSource(docs), TOK, seq_len=seq_len, batch_size=4, seed=0, shuffle=False
    )
    raw_len, targets_len = objectives_t5.span_corruption_lengths(seq_len, 0.15, 3.0)
    sentinels = set(range(TOK.vocab_size, TOK.vocab_size + 100))
    stream = np.concatenate([np.append(TOK.encode(d), TOK.eos_id) for d in docs])
    rebuilt = []
    for batch in pipeline.take(iter(ds), 10):
        assert batch["inputs"].shape == (4, seq_len) and batch["targets"].shape == (4, targets_len)
        assert batch["weights"].dtype == np.float32 and batch["inputs_segment_ids"].dtype == np.int32
        for inputs, seg, targets, weights in zip(
            batch["inputs"], batch["inputs_segment_ids"], batch["targets"], batch["weights"]
        ):
            n_inputs, n_targets = int(seg.sum()), int(weights.sum())
            assert inputs[n_inputs - 1] == TOK.eos_id and (inputs[n_inputs:] == PAD).all()
            assert targets[n_targets - 1] == TOK.eos_id and (targets[n_targets:] == PAD).all()
            assert targets[0] == TOK.vocab_size + 99  # <extra_id_0> is the highest sentinel id
            rebuilt.extend(_reconstruct(inputs[: n_inputs - 1], targets[: n_targets - 1], sentinels))
            n_spans = sum(int(t) in sentinels for t in targets)
            # Exactly T5's counts for this length: round(0.15 * 70) = 10 noise tokens in round(10 / 3) spans.
            assert n_targets - 1 - n_spans == round(raw_len * 0.15) and n_spans == round(round(raw_len * 0.15) / 3)
    assert len(rebuilt) == 40 * raw_len
    np.testing.assert_array_equal(rebuilt, np.resize(stream, len(rebuilt)))


def test_sentinel_ids_count_down_and_must_not_hit_special_ids():
    ids = objectives_t5.sentinel_ids(TOK, None, 100)
    assert ids[0] == TOK.vocab_size + 99 and ids[-1] == TOK.vocab_size
    assert objectives_t5.sentinel_ids(TOK, 1000, 3).tolist() == [1000, 999, 998]
    with pytest.raises(DataError, match="special id"):
        objectives_t5.sentinel_ids(TOK, TOK.vocab_size - 1, 100)  # would reuse [sep], [cls], ...
