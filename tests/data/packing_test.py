import dataclasses

import numpy as np
import pytest

from jaxlm.common_types import DataError
from jaxlm.data import packing, pipeline, sources, tokenizers

TOK = tokenizers.ByteTokenizer()


def _docs(n=40, seed=0):
    rng = np.random.default_rng(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    return [" ".join(rng.choice(words, size=rng.integers(1, 8))) for _ in range(n)]


def _packed(docs, method="first_fit", seq_len=48, batch_size=4, **kw):
    ds = pipeline.lm_dataset(
        sources.ListSource(docs),
        TOK,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=0,
        shuffle=True,
        packing=method,
        prefetch=0,
        **kw,
    )
    return iter(ds)


def _segments(batch):
    """(row, segment id, slice) of every packed document in a batch."""
    out = []
    for r, seg in enumerate(batch["segment_ids"]):
        for s in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s)
            assert (np.diff(idx) == 1).all(), "a document's tokens are contiguous"
            out.append((r, s, slice(idx[0], idx[-1] + 1)))
    return out


def test_chunks_split_truncate_and_overlap():
    x = np.arange(10)
    assert [c.tolist() for c in packing.chunks(x, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [c.tolist() for c in packing.chunks(x, 4, overlap=1)] == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert [c.tolist() for c in packing.chunks(x, 4, long_documents="truncate")] == [[0, 1, 2, 3]]
    assert packing.chunks(x[:0], 4) == [] and [c.tolist() for c in packing.chunks(x[:3], 4)] == [[0, 1, 2]]
    with pytest.raises(DataError, match="long_documents"):
        packing.chunks(x, 4, long_documents="drop")


@pytest.mark.parametrize("method", ["first_fit", "best_fit"])
def test_packed_rows_hold_whole_shifted_documents(method):
    docs = _docs()
    encoded = {tuple(np.append(TOK.encode(d), TOK.eos_id)) for d in docs}
    it = _packed(docs, method)
    for batch in pipeline.take(it, 6):
        assert set(batch) == {"inputs", "targets", "weights", "segment_ids", "positions"}
        for key in ("inputs", "targets", "segment_ids", "positions"):
            assert batch[key].dtype == np.int32 and batch[key].shape == (4, 48)
        assert batch["weights"].dtype == np.float32
        seg = batch["segment_ids"]
        # Loss ignores padding, and only padding.
        np.testing.assert_array_equal(batch["weights"], (seg > 0).astype(np.float32))
        np.testing.assert_array_equal(batch["positions"], packing.segment_positions(seg))
        for r, _s, sl in _segments(batch):
            inputs, targets = batch["inputs"][r, sl], batch["targets"][r, sl]
            np.testing.assert_array_equal(inputs[1:], targets[:-1])  # shifted within the document
            assert tuple(np.append(inputs, targets[-1])) in encoded  # one whole source document
            np.testing.assert_array_equal(batch["positions"][r, sl], np.arange(sl.stop - sl.start))
        for row in seg:  # segment ids count 1, 2, ... and padding comes last
            used = row[row > 0]
            assert used[0] == 1 and (np.diff(used) >= 0).all() and (np.diff(used) <= 1).all()


def test_long_documents_are_split_so_every_target_is_predicted_once_or_truncated():
    doc = "".join(chr(ord("a") + i % 26) for i in range(100))
    ids = np.append(TOK.encode(doc), TOK.eos_id)
    it = _packed([doc], seq_len=16, batch_size=1)
    targets = []
    while len(targets) < len(ids) - 1:
        b = next(it)
        for r, _s, sl in _segments(b):
            targets.extend(b["targets"][r, sl].tolist())
    assert sorted(targets) == sorted(ids[1:].tolist())
    it = _packed([doc], seq_len=16, batch_size=1, long_documents="truncate")
    b = next(it)
    np.testing.assert_array_equal(b["inputs"][0], ids[:16])
    np.testing.assert_array_equal(b["segment_ids"][0], np.ones(16))


def test_add_bos_starts_every_document_with_bos():
    it = _packed(_docs(), add_bos=True)
    b = next(it)
    for r, _s, sl in _segments(b):
        assert b["inputs"][r, sl.start] == TOK.bos_id


def test_packed_resume_gives_the_same_batches():
    ds = pipeline.lm_dataset(
        sources.ListSource(_docs()), TOK, seq_len=48, batch_size=4, seed=0, shuffle=True, packing="best_fit"
    )
    it = iter(ds)
    pipeline.take(it, 5)
    state = it.get_state()
    expected = pipeline.take(it, 12)  # crosses epochs
    resumed = iter(ds)
    resumed.set_state(state)
    for x, y in zip(expected, pipeline.take(resumed, 12)):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_bad_packing_is_a_data_error():
    with pytest.raises(DataError, match="packing='fifo' is not one of: concat, windows, first_fit, best_fit"):
        _packed(_docs(), "fifo")


def test_packed_attention_never_crosses_documents_and_loss_ignores_padding():
    """With the real decoder, each packed document's logits equal those of the document alone."""
    import jax
    import jax.numpy as jnp

    from jaxlm import config_lib, losses, models

    cfg = config_lib.validate(config_lib.base_config()).model
    cfg = dataclasses.replace(
        cfg, vocab_size=TOK.vocab_size, num_layers=2, num_heads=2, embed_dim=32, mlp_dim=64, max_len=48
    )
    model = models.build(cfg)
    batch = next(_packed(_docs(), seq_len=48, batch_size=4))
    assert batch["segment_ids"].max() >= 2 and (batch["segment_ids"] == 0).any()
    params = jax.jit(model.init)(jax.random.key(0), jnp.asarray(batch["inputs"]))["params"]
    apply = jax.jit(lambda x, p, s: model.apply({"params": params}, x, positions=p, segment_ids=s))
    packed = np.asarray(apply(batch["inputs"], batch["positions"], batch["segment_ids"]))
    # Every document run alone: one row each, right-padded (causal attention keeps the padding
    # out of earlier positions; the first document also runs unpadded to show that).
    segments = _segments(batch)
    alone_rows = np.zeros((len(segments), 48), np.int32)
    for i, (r, _s, sl) in enumerate(segments):
        alone_rows[i, : sl.stop - sl.start] = batch["inputs"][r, sl]
    run_alone = jax.jit(lambda x: model.apply({"params": params}, x))
    alone = np.asarray(run_alone(alone_rows))
    for i, (r, _s, sl) in enumerate(segments):
        np.testing.assert_allclose(packed[r, sl], alone[i, : sl.stop - sl.start], atol=1e-5)
    r, _, sl = segments[0]
    unpadded = np.asarray(run_alone(batch["inputs"][r : r + 1, sl]))[0]
    np.testing.assert_allclose(packed[r, sl], unpadded, atol=1e-5)
    # The check has teeth: without segment ids and positions, later documents see earlier ones.
    rows = np.broadcast_to(np.arange(48, dtype=np.int32), (4, 48))
    crossing = np.asarray(apply(batch["inputs"], rows, np.ones((4, 48), np.int32)))
    later = [(r, sl) for r, s, sl in segments if s > 1]
    assert not all(np.allclose(crossing[r, sl], packed[r, sl], atol=1e-5) for r, sl in later)
    # Whatever sits in the padding changes neither the documents' logits nor the loss.
    noisy = batch["inputs"].copy()
    pad = batch["segment_ids"] == 0
    noisy[pad] = np.random.default_rng(0).integers(3, 259, size=int(pad.sum()))
    noisy_targets = np.where(pad, 7, batch["targets"])
    other = np.asarray(apply(noisy, batch["positions"], batch["segment_ids"]))
    np.testing.assert_allclose(other[~pad], packed[~pad], atol=1e-5)
    loss = losses.weighted_cross_entropy(jnp.asarray(packed), batch["targets"], batch["weights"])
    loss_noisy = losses.weighted_cross_entropy(jnp.asarray(other), noisy_targets, batch["weights"])
    np.testing.assert_allclose(np.asarray(loss), np.asarray(loss_noisy), rtol=1e-6)
    assert float(loss[1]) == float((~pad).sum())
