import os

import numpy as np
import pytest

from jaxlm.common_types import DataError
from jaxlm.data import sources


def test_builtin_corpus_is_the_stdlib():
    files = sources.builtin_files()
    assert len(files) > 50 and any(f.endswith("os.py") for f in files)


def test_split_by_document_is_deterministic_and_disjoint(text_corpus):
    files = sources.expand_globs(text_corpus, "config.data.files")
    a = sources.split_corpus(files, "line", 0.1)
    b = sources.split_corpus(list(reversed(files)), "line", 0.1)
    assert sorted(a["train"]) == sorted(b["train"]) and sorted(a["validation"]) == sorted(b["validation"])
    assert a["validation"] and a["train"]
    total = sum(len(sources.split_documents(open(f).read(), "line")) for f in files)
    assert len(a["train"]) + len(a["validation"]) == total


def test_single_document_is_split_by_position(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("".join(f"line {i}\n" for i in range(1000)))
    split = sources.split_corpus([str(path)], "file", 0.05)
    assert len(split["train"]) == 1 and len(split["validation"]) == 1
    assert split["train"][0] + split["validation"][0] == path.read_text()
    assert 0.03 < len(split["validation"][0]) / len(path.read_text()) < 0.07


def test_eval_files_are_used_for_validation(text_corpus, tmp_path):
    held = tmp_path / "held.txt"
    held.write_text("held out text\n")
    files = sources.expand_globs(text_corpus, "config.data.files")
    split = sources.split_corpus(files, "file", 0.1, [str(held)])
    assert split["validation"] == ["held out text\n"] and len(split["train"]) == len(files)


def test_prepared_through_tfds_array_record(text_corpus, tmp_path):
    files = sources.expand_globs(text_corpus, "config.data.files")
    srcs = sources.prepare_text_files(files, [], "file", 0.2, str(tmp_path / "dd"))
    assert len(srcs["train"]) + len(srcs["validation"]) == 12
    assert isinstance(srcs["train"][0]["text"], bytes)
    written = [f for _, _, fs in os.walk(tmp_path / "dd") for f in fs]
    assert any("array_record" in f for f in written)
    # A second call reuses the prepared files.
    again = sources.prepare_text_files(files, [], "file", 0.2, str(tmp_path / "dd"))
    assert [again["train"][i] for i in range(3)] == [srcs["train"][i] for i in range(3)]


def test_missing_and_empty_inputs_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="matches no files"):
        sources.expand_globs(str(tmp_path / "nothing*.txt"), "config.data.files")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="are empty"):
        sources.split_corpus([str(tmp_path / "empty.txt")], "file", 0.1)


def test_markov_entropy_rate_closed_form():
    import numpy as np

    p = np.array([[0.5, 0.5], [0.1, 0.9]])
    pi = np.array([1 / 6, 5 / 6])
    h = -(pi[0] * (2 * 0.5 * np.log(0.5)) + pi[1] * (0.1 * np.log(0.1) + 0.9 * np.log(0.9)))
    assert abs(sources.markov_entropy_rate(p, pi) - h) < 1e-12
    transition, stationary = sources.markov_chain(5, 0.5, 0)
    np.testing.assert_allclose(stationary @ transition, stationary, atol=1e-10)


# ---- JSONL / CSV records with named fields, prepared through the same tfds builder.


def _write_jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_jsonl_fields_are_renamed_typed_and_prepared_through_tfds(tmp_path):
    rows = [{"review_body": f"review {i} é", "stars": i % 2, "extra": [1, 2]} for i in range(30)]
    path = _write_jsonl(tmp_path / "reviews.jsonl", rows)
    fields = {"text": "review_body", "label": "stars"}
    srcs = sources.prepare_files([path], data_dir=str(tmp_path / "dd"), fields=fields, eval_fraction=0.2)
    records = [srcs[s][i] for s in ("train", "validation") for i in range(len(srcs[s]))]
    assert len(records) == 30 and srcs["validation"] and len(srcs["validation"]) < 15
    assert all(set(r) == {"text", "label"} for r in records)
    assert isinstance(records[0]["text"], bytes) and int(records[0]["label"]) in (0, 1)
    texts = sorted(r["text"].decode() for r in records)
    assert texts == sorted(r["review_body"] for r in rows)
    assert any("array_record" in f for _, _, fs in os.walk(tmp_path / "dd") for f in fs)
    # The split is deterministic, and a second call reads the prepared files back.
    again = sources.prepare_files([path], data_dir=str(tmp_path / "dd2"), fields="text=review_body,label=stars")
    cached = sources.prepare_files([path], data_dir=str(tmp_path / "dd"), fields=fields, eval_fraction=0.2)
    assert [cached["validation"][i] for i in range(len(cached["validation"]))] == [
        srcs["validation"][i] for i in range(len(srcs["validation"]))
    ]
    assert len(again["train"]) + len(again["validation"]) == 30


def test_csv_and_tsv_columns_integer_columns_and_pairs(tmp_path):
    (tmp_path / "pairs.csv").write_text(
        "source,target,label\n" + "".join(f'"hello, {i}",hallo {i},{i % 3}\n' for i in range(12))
    )
    srcs = sources.prepare_files([str(tmp_path / "pairs.csv")], data_dir=str(tmp_path / "dd"))
    r = srcs["train"][0]
    assert set(r) == {"source", "target", "label"} and r["source"].startswith(b"hello, ")
    assert isinstance(r["label"], int | np.integer)
    (tmp_path / "t.tsv").write_text("text\tlabel\n" + "".join(f"line {i}\tL{i % 2}\n" for i in range(6)))
    tsv = sources.prepare_files([str(tmp_path / "t.tsv")], data_dir=str(tmp_path / "dd"), features={"label": "text"})
    assert tsv["train"][0]["label"] in (b"L0", b"L1")


def test_nested_jsonl_records_feed_the_tagging_and_qa_objectives(tmp_path):
    from jaxlm.data import pipeline, tokenizers

    context = "The cat sat on the mat."
    rows = [
        {
            "tokens": ["EU", "rejects", "German", "call"],
            "tags": ["B-ORG", "O", "B-MISC", "O"],
            "question": "Where?",
            "context": context,
            "answers": {"text": ["on the mat"], "answer_start": [context.index("on the mat")]},
        }
    ] * 4
    srcs = sources.prepare_files([_write_jsonl(tmp_path / "a.jsonl", rows)], data_dir=str(tmp_path / "dd"))
    tok = tokenizers.ByteTokenizer()
    args = dict(seq_len=48, batch_size=2, seed=0, shuffle=False, prefetch=0)
    qa = next(iter(pipeline.qa_dataset(srcs["train"], tok, **args)))
    start, end = int(qa["start_position"][0]), int(qa["end_position"][0])
    assert tok.decode(qa["inputs"][0][start : end + 1].tolist()) == "on the mat"
    labels = ["O", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]
    tags = next(iter(pipeline.tagging_dataset(srcs["train"], tok, labels=labels, **args)))
    assert sorted(set(tags["targets"][0].tolist()) - {-100}) == [0, 1, 3]


def test_format_detection_and_field_strings():
    from jaxlm.data import local_files

    assert local_files.detect_format(["a.jsonl", "b.JSONL"]) == "jsonl"
    assert local_files.detect_format(["a.txt", "b.md"]) == "text"
    assert local_files.detect_format(["a.csv"], "jsonl") == "jsonl"
    with pytest.raises(DataError, match="mixes formats"):
        local_files.detect_format(["a.csv", "b.txt"])
    assert local_files.parse_fields("text=review_body, label") == {"text": "review_body", "label": "label"}
    assert local_files.parse_fields("") is None


def test_open_sources_reads_jsonl_files(tmp_path):
    import dataclasses

    from jaxlm import config_lib

    _write_jsonl(tmp_path / "a.jsonl", [{"text": f"doc {i}", "label": i % 2} for i in range(10)])
    data = config_lib.validate(config_lib.base_config()).data
    cfg = dataclasses.replace(data, source="files", files=str(tmp_path / "*.jsonl"), data_dir=str(tmp_path / "dd"))
    srcs = sources.open_sources(cfg)
    assert set(srcs["train"][0]) == {"text", "label"} and len(srcs["train"]) + len(srcs["validation"]) == 10


# ---- Synthetic copy / reverse tasks.


@pytest.mark.parametrize("kind", ["copy", "reverse"])
def test_copy_and_reverse_records_have_known_statistics(kind):
    records = sources.sequence_task_records(kind, vocab_size=4, num_tokens=20_000, min_len=3, max_len=9, seed=0)
    assert records == sources.sequence_task_records(kind, vocab_size=4, num_tokens=20_000, min_len=3, max_len=9, seed=0)
    symbols = "".join(r["source"] for r in records)
    assert 20_000 <= len(symbols) < 20_009 and set(symbols) == set("abcd")
    counts = np.array([symbols.count(c) for c in "abcd"]) / len(symbols)
    entropy = -(counts * np.log(counts)).sum()
    assert abs(entropy - np.log(4)) < 0.01  # uniform i.i.d. symbols: log(vocab_size) nats each
    lengths = [len(r["source"]) for r in records]
    assert min(lengths) == 3 and max(lengths) == 9
    for r in records[:50]:
        assert r["target"] == (r["source"] if kind == "copy" else r["source"][::-1])
        assert r["text"] == r["source"] + "|" + r["target"]


def test_synthetic_copy_source_from_config_feeds_seq2seq_and_causal_lm():
    import dataclasses

    from jaxlm import config_lib
    from jaxlm.data import pipeline, tokenizers

    data = config_lib.validate(config_lib.base_config()).data
    synthetic = dataclasses.replace(data.synthetic, kind="reverse", num_train_tokens=2000, num_eval_tokens=200)
    srcs = sources.open_sources(dataclasses.replace(data, source="synthetic", synthetic=synthetic))
    assert set(srcs["train"][0]) == {"source", "target", "text"} and len(srcs["validation"]) >= 200 // 32
    assert srcs["train"][0] != srcs["validation"][0]
    tok = tokenizers.ByteTokenizer()
    args = dict(seq_len=40, batch_size=2, seed=0, shuffle=True, prefetch=0)
    s2s = next(iter(pipeline.seq2seq_dataset(srcs["train"], tok, **args)))
    lm = next(iter(pipeline.lm_dataset(srcs["train"], tok, **args)))
    assert s2s["inputs"].shape == (2, 40) and lm["inputs"].shape == (2, 40)
    with pytest.raises(DataError, match="synthetic.kind='shuffle' is not one of: markov, copy, reverse"):
        sources.open_sources(
            dataclasses.replace(data, source="synthetic", synthetic=dataclasses.replace(synthetic, kind="shuffle"))
        )


def test_record_texts_collects_every_string_field():
    src = sources.RecordSource([{"source": "ab", "target": "ba", "label": 1, "tokens": ["x", "y"]}])
    assert list(sources.record_texts(src)) == ["ab", "ba", "x y"]
