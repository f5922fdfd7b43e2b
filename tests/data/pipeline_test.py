import numpy as np

from jaxlm.data import pipeline, sources, tokenizers


def _source():
    return sources.ListSource([f"document number {i} " * (i + 1) for i in range(30)])


def test_lm_batches_are_shifted_rows():
    tok = tokenizers.ByteTokenizer()
    it = iter(pipeline.lm_dataset(_source(), tok, seq_len=16, batch_size=4, seed=0, shuffle=True))
    batch = next(it)
    assert batch["inputs"].shape == (4, 16) and batch["targets"].shape == (4, 16)
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    assert batch["weights"].dtype == np.float32 and (batch["weights"] == 1).all()


def test_deterministic_for_a_seed_and_different_across_seeds():
    tok = tokenizers.ByteTokenizer()
    make = lambda seed: pipeline.take(  # noqa: E731
        iter(pipeline.lm_dataset(_source(), tok, seq_len=16, batch_size=4, seed=seed, shuffle=True)), 5
    )
    a, b, c = make(0), make(0), make(1)
    assert all((x["inputs"] == y["inputs"]).all() for x, y in zip(a, b))
    assert not all((x["inputs"] == y["inputs"]).all() for x, y in zip(a, c))


def test_resume_from_iterator_state_gives_the_same_batches():
    tok = tokenizers.ByteTokenizer()
    ds = pipeline.lm_dataset(_source(), tok, seq_len=16, batch_size=4, seed=0, shuffle=True)
    it = iter(ds)
    pipeline.take(it, 7)
    state = it.get_state()
    expected = pipeline.take(it, 20)  # crosses an epoch boundary
    resumed = iter(ds)
    resumed.set_state(state)
    got = pipeline.take(resumed, 20)
    assert all((x["inputs"] == y["inputs"]).all() for x, y in zip(expected, got))


def test_hosts_read_disjoint_shards():
    tok = tokenizers.ByteTokenizer()
    src = sources.ListSource([f"{i:03d}" for i in range(40)])
    seen = []
    for index in range(2):
        it = iter(
            pipeline.lm_dataset(
                src, tok, seq_len=3, batch_size=10, seed=0, shuffle=False, shard_index=index, shard_count=2
            )
        )
        rows = pipeline.take(it, 2)
        seen.append({tok.decode(r[:3]) for b in rows for r in b["inputs"]})
    assert seen[0] and seen[1] and not (seen[0] & seen[1])
