"""Bad input gives a one-line DataError naming the file, line or field, or documented handling; never a silent hole."""

import json
import logging

import numpy as np
import pytest

from jaxlm.common_types import DataError
from jaxlm.data import local_files, pipeline, sources, tokenizers

TOK = tokenizers.ByteTokenizer()


def _prepare(tmp_path, name, content, **kw):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return sources.prepare_files([str(path)], data_dir=str(tmp_path / "dd"), **kw), str(path)


def _jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def _one_line(e):
    return "\n" not in str(e.value)


# ---- Empty files.


def test_empty_files_are_errors_when_nothing_is_left_and_skipped_with_a_warning_otherwise(tmp_path, caplog):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    with pytest.raises(DataError, match="all 2 matched files are empty") as e:
        sources.split_corpus([str(tmp_path / "empty.txt"), str(tmp_path / "blank.txt")], "file", 0.1)
    assert _one_line(e)
    (tmp_path / "full.txt").write_text("one\ntwo\nthree\n")
    with caplog.at_level(logging.WARNING):
        split = sources.split_corpus([str(tmp_path / p) for p in ("empty.txt", "full.txt")], "line", 0.3)
    assert "1 of 2 files hold no text and are skipped" in caplog.text and "empty.txt" in caplog.text
    assert sorted(split["train"] + split["validation"]) == ["one", "three", "two"]


@pytest.mark.parametrize(("name", "content"), [("e.jsonl", ""), ("b.jsonl", "\n \n"), ("h.csv", "text,label\n")])
def test_record_files_without_records_are_errors(tmp_path, name, content):
    with pytest.raises(DataError, match="hold no records"):
        _prepare(tmp_path, name, content)


def test_csv_without_a_header_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no header row"):
        _prepare(tmp_path, "x.csv", "")


# ---- Invalid UTF-8.


def test_invalid_utf8_is_replaced_with_a_warning_naming_file_and_offset(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        srcs, path = _prepare(
            tmp_path, "bad.txt", b"good line\nbad \xff\xfe byte\n", document="line", eval_fraction=0.5
        )
    docs = {srcs[s][i]["text"].decode() for s in ("train", "validation") for i in range(len(srcs[s]))}
    assert docs == {"good line", "bad \ufffd\ufffd byte"}
    assert f"{path}: invalid UTF-8 at byte 14 (line 2)" in caplog.text


def test_invalid_utf8_is_rejected_when_configured(tmp_path):
    with pytest.raises(DataError, match=r"bad\.jsonl: invalid UTF-8 at byte 27 \(line 2\)") as e:
        _prepare(tmp_path, "bad.jsonl", b'{"text": "fine"}\n{"text": "\xc3("}\n', on_decode_error="error")
    assert _one_line(e)
    with pytest.raises(DataError, match="on_decode_error='ignore' is not one of: replace, error"):
        local_files.decode(b"x", "f", "ignore")
    # A UTF-8 byte-order mark is not an error, nor part of the first field's name.
    assert local_files.decode(b"\xef\xbb\xbftext", "f", "error") == "text"


# ---- Missing fields, malformed records, mixed types.


def test_jsonl_record_without_the_named_field_names_file_line_and_field(tmp_path):
    rows = [{"body": "a", "label": 0}, {"body": "b", "label": 1}, {"label": 0}]
    with pytest.raises(DataError, match=r"r\.jsonl:3: record has no field 'body' \(for 'text'\); it has: label") as e:
        _prepare(tmp_path, "r.jsonl", _jsonl(rows), fields={"text": "body", "label": "label"})
    assert _one_line(e)
    with pytest.raises(DataError, match=r"n\.jsonl:2: record has no field 'text'"):
        _prepare(tmp_path, "n.jsonl", _jsonl([{"text": "a"}, {"text": None}]))


def test_csv_row_without_the_named_column_names_file_line_and_field(tmp_path):
    with pytest.raises(DataError, match=r"s\.csv:3: record has no field 'label'"):
        _prepare(tmp_path, "s.csv", "text,label\nfine,1\nshort row\n")
    with pytest.raises(DataError, match=r"c\.csv:2: record has no field 'review'"):
        _prepare(tmp_path, "c.csv", "text,label\nfine,1\n", fields="text=review")


def test_malformed_json_and_mixed_types_name_the_line(tmp_path):
    with pytest.raises(DataError, match=r"j\.jsonl:2: not valid JSON"):
        _prepare(tmp_path, "j.jsonl", '{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match=r"a\.jsonl:1: a JSONL line must be an object"):
        _prepare(tmp_path, "a.jsonl", '["text"]\n{"text": "b"}\n')
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": "pos"}]
    with pytest.raises(DataError, match=r"m\.jsonl:2: field 'label': it is a string here but an integer"):
        _prepare(tmp_path, "m.jsonl", _jsonl(rows))
    with pytest.raises(DataError, match=r"nan\.jsonl:2: field 'score': nan is not a finite number"):
        _prepare(tmp_path, "nan.jsonl", '{"text": "a", "score": 0.5}\n{"text": "b", "score": NaN}\n')
    with pytest.raises(DataError, match=r"f\.csv:3: field 'label': could not convert"):
        _prepare(tmp_path, "f.csv", "text,label\na,0.5\nb,high\n", features={"label": "float"})


# ---- Labels outside the label set.


def test_labels_outside_the_label_set_are_errors_naming_the_value(tmp_path):
    rows = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}, {"text": "odd", "label": 7}]
    srcs, _ = _prepare(tmp_path, "l.jsonl", _jsonl(rows))
    records = [srcs[split][i] for split in ("train", "validation") for i in range(len(srcs[split]))]
    args = dict(seq_len=16, batch_size=len(records), seed=0, shuffle=False, prefetch=0)
    with pytest.raises(DataError, match=r"label=7 is not in the label set \[0, 1\]"):
        next(iter(pipeline.classification_dataset(records, TOK, labels=(0, 1), **args)))
    tags = [{"tokens": ["EU", "rejects"], "tags": ["B-ORG", "B-VERB"]}]
    with pytest.raises(DataError, match="tags='B-VERB' is not in the label set"):
        next(iter(pipeline.tagging_dataset(tags, TOK, labels=("O", "B-ORG", "I-ORG"), **{**args, "batch_size": 1})))


# ---- Documents longer than the row: split or truncated, as asked.


@pytest.mark.parametrize("objective", ["causal_lm", "masked_lm"])
def test_long_documents_are_split_or_truncated_as_configured(objective):
    docs = sources.ListSource(["x" * 40, "short"])
    options = {"packing": "first_fit"} if objective == "causal_lm" else {}
    rows = {}
    for mode in ("split", "truncate"):
        ds = pipeline.objective_builder(objective)(
            docs, TOK, seq_len=16, batch_size=1, seed=0, shuffle=False, prefetch=0, long_documents=mode, **options
        )
        it = iter(ds)
        rows[mode] = [next(it) for _ in range(8)]
    x, s = TOK.encode("x")[0], TOK.encode("s")[0]

    def has(batch, token):
        return bool((batch["targets"] == token).any() or (batch["inputs"] == token).any())

    def first_with(mode, token):
        return next(i for i, b in enumerate(rows[mode]) if has(b, token))

    # split: the 40-token document fills (at least) two rows before 'short'; truncate: one row, then 'short'.
    assert first_with("split", s) >= 2 and all(has(b, x) for b in rows["split"][:2])
    assert first_with("truncate", s) == 1 and not has(rows["truncate"][1], x)
    for mode in rows:  # never an empty row
        assert all(float(b["weights"].sum()) > 0 for b in rows[mode])
    with pytest.raises(DataError, match="long_documents='drop' is not one of: split, truncate"):
        next(
            iter(
                pipeline.objective_builder(objective)(
                    docs,
                    TOK,
                    seq_len=16,
                    batch_size=1,
                    seed=0,
                    shuffle=False,
                    prefetch=0,
                    long_documents="drop",
                    **options,
                )
            )
        )


# ---- Empty texts still make full rows.


def test_empty_text_records_give_rows_with_real_tokens(tmp_path):
    srcs, _ = _prepare(tmp_path, "e.jsonl", _jsonl([{"text": "", "label": 0}, {"text": "", "label": 1}] * 2))
    records = srcs["train"]
    batch = next(
        iter(
            pipeline.classification_dataset(
                records, TOK, seq_len=8, batch_size=len(records), seed=0, shuffle=False, prefetch=0
            )
        )
    )
    np.testing.assert_array_equal(batch["segment_ids"][:, :2], 1)  # [cls] [sep]
    assert np.isfinite(batch["label"]).all()
