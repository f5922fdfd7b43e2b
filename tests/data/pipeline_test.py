import numpy as np
import pytest

from jaxlm.common_types import DataError
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


# ---- every objective: fixed shapes, determinism, resume, worker processes -------------------------

_WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()


def _record(i):
    rng = np.random.default_rng(i)
    words = [str(w) for w in rng.choice(_WORDS, size=int(rng.integers(2, 9)))]
    text = ". ".join(" ".join(words[j : j + 3]) for j in range(0, len(words), 3)) + "."
    return {
        "text": text.encode(),
        "source": " ".join(words),
        "target": " ".join(reversed(words)),
        "label": int(i % 3),
        "tokens": words,
        "tags": ["B-X" if w.startswith("a") else "O" for w in words],
        "question": "which?",
        "context": text,
        "answers": {"text": [words[-1]], "answer_start": [text.rindex(words[-1])]},
    }


RECORDS = [_record(i) for i in range(24)]
OPTIONS = {
    "causal_lm": {"packing": "best_fit"},
    "masked_lm": {"whole_word": True},
    "nsp": {},
    "span_corruption": {},
    "seq2seq": {"targets_len": 24},
    "classification": {"labels": (0, 1, 2)},
    "token_classification": {"labels": ("O", "B-X", "I-X")},
    "qa": {},
}


def _objective(name, seed=0, **kw):
    args = dict(seq_len=40, batch_size=4, seed=seed, shuffle=True, prefetch=0, **OPTIONS[name])
    return pipeline.objective_builder(name)(RECORDS, tokenizers.ByteTokenizer(), **{**args, **kw})


def test_objectives_registry_lists_valid_names():
    assert set(pipeline.OBJECTIVES) == set(OPTIONS)
    with pytest.raises(DataError, match="config.data.objective='mlm' is not one of: causal_lm, masked_lm, nsp"):
        pipeline.objective_builder("mlm")


@pytest.mark.parametrize("name", list(OPTIONS))
def test_objective_batches_are_fixed_shape_deterministic_and_resumable(name):
    it = iter(_objective(name))
    first = pipeline.take(it, 3)
    for batch in first:
        assert {k: v.shape[0] for k, v in batch.items()} == {k: 4 for k in first[0]}
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {k: (v.shape, v.dtype) for k, v in first[0].items()}
        for key, value in batch.items():
            assert value.dtype == (np.float32 if key == "weights" else np.int32), key
    state = it.get_state()
    expected = pipeline.take(it, 8)  # crosses epochs (24 records)
    resumed = iter(_objective(name))
    resumed.set_state(state)
    got = pipeline.take(resumed, 8)
    again = pipeline.take(iter(_objective(name)), 3)
    for x, y in zip(expected + first, got + again):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    other = pipeline.take(iter(_objective(name, seed=1)), 3)
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(first, other))


_WORKER_SCRIPT = """
import sys
import numpy as np
sys.path.insert(0, {tests!r})
from data.pipeline_test import _objective
from jaxlm.data import pipeline


def main():
    # nsp: per-example masks and random sentences read from the source inside the workers.
    for name in ("nsp",):
        ds = _objective(name, num_workers=2)
        it = iter(ds)
        pipeline.take(it, 2)
        state = it.get_state()
        expected = pipeline.take(it, 4)
        resumed = iter(_objective(name, num_workers=2))
        resumed.set_state(state)
        for x, y in zip(expected, pipeline.take(resumed, 4)):
            for k in x:
                np.testing.assert_array_equal(x[k], y[k])
        print(name, "resumed ok")


if __name__ == "__main__":
    main()
"""


def test_resume_with_worker_processes(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "workers.py"
    script.write_text(_WORKER_SCRIPT.format(tests=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "nsp resumed ok" in out.stdout
