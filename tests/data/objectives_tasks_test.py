import itertools

import numpy as np
import pytest

from jaxlm.common_types import DataError
from jaxlm.data import objectives_tasks, pipeline, tokenizers

TOK = tokenizers.ByteTokenizer()
CLS, SEP, PAD, EOS = TOK.cls_id, TOK.sep_id, TOK.pad_id, TOK.eos_id


def _first(builder, records, **kw):
    args = dict(seq_len=32, batch_size=len(records), seed=0, shuffle=False, prefetch=0)
    return next(iter(builder(records, TOK, **{**args, **kw})))


def test_seq2seq_rows_truncate_and_end_with_eos():
    records = [
        {"source": b"Hello world", "target": "Hallo Welt"},
        {"source": "x" * 100, "target": "y" * 100},
    ]
    b = _first(pipeline.seq2seq_dataset, records, seq_len=16, targets_len=8, prefix="en-de: ")
    assert b["inputs"].shape == (2, 16) and b["targets"].shape == (2, 8) and b["weights"].shape == (2, 8)
    assert b["inputs"].dtype == np.int32 and b["weights"].dtype == np.float32
    src = np.append(TOK.encode("en-de: Hello world")[:15], EOS)
    np.testing.assert_array_equal(b["inputs"][0], src)
    np.testing.assert_array_equal(b["inputs_segment_ids"][0], np.ones(16))
    tgt = np.append(TOK.encode("Hallo Welt")[:7], EOS)
    np.testing.assert_array_equal(b["targets"][0], tgt)
    np.testing.assert_array_equal(b["targets"][1], np.append(TOK.encode("y" * 7), EOS))
    assert (b["weights"] == 1).all()
    short = _first(pipeline.seq2seq_dataset, [{"source": "ab", "target": "c"}], seq_len=8)
    np.testing.assert_array_equal(short["targets"][0], [*TOK.encode("c"), EOS, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(short["weights"][0], [1, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(short["inputs_segment_ids"][0], [1, 1, 1, 0, 0, 0, 0, 0])


def test_classification_maps_labels_by_position_and_rejects_others():
    records = [{"text": "great film", "label": b"pos"}, {"text": "dull", "label": "neg"}]
    b = _first(pipeline.classification_dataset, records, labels=("neg", "pos"))
    np.testing.assert_array_equal(b["label"], [1, 0])
    assert b["label"].dtype == np.int32 and b["label"].shape == (2,)
    n = len("great film") + 2
    np.testing.assert_array_equal(b["inputs"][0, :n], [CLS, *TOK.encode("great film"), SEP])
    np.testing.assert_array_equal(b["segment_ids"][0], np.arange(32) < n)
    assert (b["token_types"] == 0).all()
    with pytest.raises(DataError, match=r"label='meh' is not in the label set \['neg', 'pos'\]"):
        _first(pipeline.classification_dataset, [{"text": "hm", "label": "meh"}], labels=("neg", "pos"))
    with pytest.raises(DataError, match="label=7 is not in the label set"):
        _first(pipeline.classification_dataset, [{"text": "hm", "label": np.int64(7)}])


def test_classification_of_pairs_sets_token_types():
    records = [{"premise": "a cat", "hypothesis": "an animal", "label": 2}]
    b = _first(
        pipeline.classification_dataset,
        records,
        labels=(0, 1, 2),
        text_field="premise",
        pair_field="hypothesis",
    )
    a, h = TOK.encode("a cat"), TOK.encode("an animal")
    n = len(a) + len(h) + 3
    np.testing.assert_array_equal(b["inputs"][0, :n], [CLS, *a, SEP, *h, SEP])
    np.testing.assert_array_equal(b["token_types"][0, :n], [0] * (len(a) + 2) + [1] * (len(h) + 1))
    assert b["label"][0] == 2
    with pytest.raises(DataError, match="no field 'text'"):
        _first(pipeline.classification_dataset, records)


def test_tagging_labels_only_the_first_sub_token_of_each_word():
    labels = objectives_tasks.bio_labels(["PER", "LOC"])
    assert labels == ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    words = ["Angela", "Merkel", "visited", "Paris"]
    tags = ["B-PER", "I-PER", "O", "B-LOC"]
    b = _first(pipeline.tagging_dataset, [{"tokens": words, "tags": tags}], labels=labels, seq_len=40)
    inputs, targets, weights, word_ids = b["inputs"][0], b["targets"][0], b["weights"][0], b["word_ids"][0]
    assert targets.dtype == np.int32 and weights.dtype == np.float32 and b["inputs"].shape == (1, 40)
    text = " ".join(words)
    n = len(text) + 2
    np.testing.assert_array_equal(inputs[:n], [CLS, *TOK.encode(text), SEP])  # one text, not glued words
    labelled = np.flatnonzero(weights)
    # The byte tokenizer splits every word into many tokens; the tag sits on its first letter.
    assert [TOK.decode(inputs[i : i + 1]) for i in labelled] == ["A", "M", "v", "P"]
    np.testing.assert_array_equal(targets[labelled], [labels.index(t) for t in tags])
    assert (targets[weights == 0] == objectives_tasks.IGNORE_LABEL).all()
    for k, w in enumerate(words):  # word_ids cover each word (and the space before it)
        assert TOK.decode(inputs[word_ids == k]).strip() == w
    assert (word_ids[[0, n - 1]] == -1).all() and (word_ids[n:] == -1).all()


def test_tagging_errors_name_the_problem():
    labels = objectives_tasks.bio_labels(["PER"])
    with pytest.raises(DataError, match="2 'tokens' but 1 'tags'"):
        _first(pipeline.tagging_dataset, [{"tokens": ["a", "b"], "tags": ["O"]}], labels=labels)
    with pytest.raises(DataError, match="tags='B-ORG' is not in the label set"):
        _first(pipeline.tagging_dataset, [{"tokens": ["a"], "tags": ["B-ORG"]}], labels=labels)


def _squad(context, answer, start=None, question="Where?"):
    start = context.index(answer) if start is None else start
    return {"question": question, "context": context, "answers": {"text": [answer], "answer_start": [start]}}


def test_qa_positions_point_at_the_answer_tokens():
    records = [
        _squad("The cat sat on the mat in Paris today.", "Paris"),
        _squad("Bonn was the capital.", "Bonn"),
        {"question": "Why?", "context": "No answer here.", "answers": {"text": [], "answer_start": []}},
    ]
    b = _first(pipeline.qa_dataset, records, seq_len=64)
    for key in ("start_position", "end_position"):
        assert b[key].dtype == np.int32 and b[key].shape == (3,)
    for i, answer in enumerate(["Paris", "Bonn"]):
        s, e = b["start_position"][i], b["end_position"][i]
        assert TOK.decode(b["inputs"][i, s : e + 1]) == answer
        assert (b["token_types"][i, s : e + 1] == 1).all()
    assert b["start_position"][2] == 0 and b["end_position"][2] == 0  # unanswerable: [cls]
    q = len(TOK.encode("Where?"))
    np.testing.assert_array_equal(b["inputs"][1, : q + 2], [CLS, *TOK.encode("Where?"), SEP])


def test_qa_answers_past_the_cut_are_dropped_or_marked():
    far = _squad("x " * 40 + "target", "target")
    near = _squad("target is near", "target")
    dropped = _first(pipeline.qa_dataset, [far, near, near], seq_len=32)  # 3 records, 2 kept
    assert dropped["inputs"].shape == (3, 32)  # the batch is filled from the next epoch
    assert all(
        TOK.decode(row[s : e + 1]) == "target"
        for row, s, e in zip(dropped["inputs"], dropped["start_position"], dropped["end_position"])
    )
    marked = _first(pipeline.qa_dataset, [far], seq_len=32, impossible="mark")
    assert marked["start_position"][0] == 0 and marked["end_position"][0] == 0
    with pytest.raises(DataError, match="answer_start=3 does not point at 'target'"):
        _first(pipeline.qa_dataset, [_squad("target is near", "target", start=3)], seq_len=32)
    with pytest.raises(DataError, match="impossible='skip' is not one of: drop, mark"):
        _first(pipeline.qa_dataset, [near], seq_len=32, impossible="skip")


def test_one_epoch_of_every_task_objective_reads_each_record_once_and_ends():
    # Evaluation reads one epoch (num_epochs=1): a builder that ignored it repeated the split forever.
    n, batch_size = 5, 2
    cases = {
        pipeline.seq2seq_dataset: ([{"source": f"s{i}", "target": f"t{i}"} for i in range(n)], {}, "inputs"),
        pipeline.classification_dataset: ([{"text": f"x{i}", "label": i % 2} for i in range(n)], {}, "inputs"),
        pipeline.tagging_dataset: (
            [{"tokens": [f"w{i}"], "tags": ["O"]} for i in range(n)],
            {"labels": objectives_tasks.bio_labels(["PER"])},
            "inputs",
        ),
        pipeline.qa_dataset: ([_squad(f"the answer is a{i}", f"a{i}") for i in range(n)], {}, "inputs"),
    }
    for builder, (records, kw, key) in cases.items():
        args = dict(seq_len=32, batch_size=batch_size, seed=0, shuffle=False, prefetch=0, num_epochs=1)
        batches = list(itertools.islice(builder(records, TOK, **args, **kw), 10))  # 10: would not end
        assert [len(b[key]) for b in batches] == [2, 2, 1], builder.__name__
        rows = np.concatenate([b[key] for b in batches])
        assert len({r.tobytes() for r in rows}) == n, builder.__name__
