"""Catalog datasets, offline: ``tfds.testing.mock_data`` stands in for the prepared data, the network is cut.

No TensorFlow is needed: the builders are imported by module name and read through
``as_data_source`` (mock_data patches it), never ``tfds.load``.
"""

import importlib.util
import socket
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxlm.common_types import DataError
from jaxlm.data import catalog, pipeline, tokenizers


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# Expected jaxlm fields and the Python type of one text field, per dataset.
EXPECTED = {
    "tiny_shakespeare": {"text"},
    "lm1b": {"text"},
    "c4": {"text"},
    "imdb_reviews": {"text", "label"},
    "glue/sst2": {"text", "label"},
    "conll2003": {"tokens", "tags"},
    "wmt14_translate": {"source", "target"},
    "cnn_dailymail": {"source", "target"},
    "squad": {"question", "context", "answers"},
}


def test_catalog_lists_the_required_datasets():
    assert set(catalog.CATALOG) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_mock_data_maps_fields_offline_without_tensorflow(name, tmp_path):
    with tfds.testing.mock_data(num_examples=3):
        srcs = catalog.open_catalog(name, data_dir=str(tmp_path))
    assert set(srcs) == {"train", "validation"}
    record = srcs["validation"][0]
    assert set(record) == EXPECTED[name]
    for field in {"text", "source", "target", "question", "context"} & set(record):
        assert isinstance(record[field], str | bytes) and record[field]
    if "label" in record:
        assert isinstance(record["label"], int) and record["label"] in (0, 1)
    if "tags" in record:
        names = catalog.label_names(name)["tags"]
        assert names[:3] == ["O", "B-PER", "I-PER"] and set(record["tags"]) <= set(names)
        assert all(isinstance(w, str) for w in record["tokens"])
    if "answers" in record:
        assert set(record["answers"]) == {"text", "answer_start"}
        assert all(isinstance(t, str) for t in record["answers"]["text"])
    if importlib.util.find_spec("tensorflow") is None:
        assert "tensorflow" not in sys.modules


# Records as tfds' numpy decoding returns them (text as bytes, labels as ints), per dataset.
_CONTEXT = b"The cat sat on the mat by the door."
REAL_RECORDS = {
    "tiny_shakespeare": {"text": b"First Citizen:\nBefore we proceed.\n\nAll:\nSpeak, speak.\n"},
    "lm1b": {"text": b"A sentence of the billion-word benchmark ."},
    "c4": {"text": b"A web page.", "url": b"http://x", "timestamp": b"t", "content-length": b"1", "content-type": b"t"},
    "imdb_reviews": {"text": b"A fine film.", "label": np.int64(1)},
    "glue/sst2": {"sentence": b"dull", "label": np.int64(0), "idx": np.int32(3)},
    "conll2003": {
        "tokens": [b"EU", b"rejects", b"German", b"call"],
        "ner": [3, 0, 7, 0],
        "pos": [1, 2, 3, 4],
        "chunks": [1, 2, 3, 4],
    },
    "wmt14_translate": {"de": b"Hallo Welt", "en": b"Hello world"},
    "cnn_dailymail": {"article": b"A long article.", "highlights": b"Short.", "id": b"1", "publisher": b"cnn"},
    "squad": {
        "id": b"1",
        "title": b"Cats",
        "context": _CONTEXT,
        "question": b"Where did the cat sit?",
        "answers": {"text": [b"on the mat"], "answer_start": [np.int32(_CONTEXT.index(b"on the mat"))]},
    },
}
OBJECTIVE_OPTIONS = {"seq2seq": {"targets_len": 16}}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_records_feed_the_objective_through_the_validation_split(name, tmp_path):
    opened = []

    def as_data_source(self, split, **kwargs):
        opened.append(split)
        return [REAL_RECORDS[name]] * 4

    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        document = "paragraph" if name == "tiny_shakespeare" else "file"
        srcs = catalog.open_catalog(name, data_dir=str(tmp_path), document=document)
        options = catalog.objective_options(name)
    entry = catalog.CATALOG[name]
    assert opened == [entry.train_split, entry.validation_split]
    assert entry.validation_split == {"lm1b": "test", "imdb_reviews": "test", "conll2003": "dev"}.get(
        name, "validation"
    )
    build = pipeline.objective_builder(entry.objective)
    args = dict(seq_len=48, batch_size=2, seed=0, shuffle=False, prefetch=0)
    batch = next(
        iter(
            build(
                srcs["validation"],
                tokenizers.ByteTokenizer(),
                **args,
                **options,
                **OBJECTIVE_OPTIONS.get(entry.objective, {}),
            )
        )
    )
    assert batch["inputs"].shape == (2, 48)
    if name == "tiny_shakespeare":
        assert len(srcs["train"]) == 8  # 4 records of 2 paragraphs each
    if name == "conll2003":
        assert srcs["train"][0]["tags"] == ["B-ORG", "O", "B-MISC", "O"]
        assert options["labels"] == catalog.label_names(name)["tags"]
    if name == "squad":
        start, end = int(batch["start_position"][0]), int(batch["end_position"][0])
        assert tokenizers.ByteTokenizer().decode(batch["inputs"][0][start : end + 1].tolist()) == "on the mat"
    if name in ("imdb_reviews", "glue/sst2"):
        assert options == {"labels": [0, 1]}


def test_other_configs_and_field_overrides():
    fr = catalog.lookup("wmt14_translate/fr-en")
    assert fr.tfds_name == "wmt14_translate/fr-en" and dict(fr.fields) == {"source": "fr", "target": "en"}
    assert catalog.lookup("squad/v2.0").fields == catalog.CATALOG["squad"].fields
    assert catalog.lookup("c4/en") == catalog.CATALOG["c4"]


def test_field_override_translates_the_other_way(tmp_path):
    with tfds.testing.mock_data(as_data_source_fn=lambda self, split, **kw: [REAL_RECORDS["wmt14_translate"]]):
        srcs = catalog.open_catalog("wmt14_translate", data_dir=str(tmp_path), fields={"source": "en", "target": "de"})
    assert srcs["train"][0] == {"source": b"Hello world", "target": b"Hallo Welt"}


def test_catalog_errors_are_one_line_data_errors(tmp_path):
    with pytest.raises(DataError, match="not in jaxlm's catalog"):
        catalog.open_catalog("glue/cola", data_dir=str(tmp_path))
    # Not prepared: no download, no GCS, a message saying how to prepare it.
    with pytest.raises(DataError, match=r"not prepared under .*tfds build imdb_reviews/plain_text"):
        catalog.open_catalog("imdb_reviews", data_dir=str(tmp_path))
    with tfds.testing.mock_data(num_examples=2):
        with pytest.raises(DataError, match="has one document per record; set config.data.document='file'"):
            catalog.open_catalog("lm1b", data_dir=str(tmp_path), document="line")
        with pytest.raises(DataError, match="has no feature 'body'"):
            catalog.open_catalog("imdb_reviews", data_dir=str(tmp_path), fields={"text": "body"})


def test_download_true_stays_offline_under_mock_data(tmp_path):
    # mock_data turns download_and_prepare into a no-op; the fixture fails any socket use.
    with tfds.testing.mock_data(num_examples=2):
        srcs = catalog.open_catalog("lm1b", data_dir=str(tmp_path), download=True)
    assert len(srcs["train"]) == 2


def test_prepared_array_record_datasets_are_read_without_mocks(tmp_path):
    # Prepare glue/sst2 and conll2003 from a few made-up examples with their real builders' features,
    # then read them the way a user's prepared data is read: real as_data_source, no mock_data.
    import tensorflow_datasets.text.conll2003.conll2003 as conll
    import tensorflow_datasets.text.glue as glue

    class FakeGlue(glue.Glue, skip_registration=True):
        name = "glue"

        def _split_generators(self, dl_manager):
            return {"train": self._fake(4), "validation": self._fake(2)}

        def _fake(self, n):
            for i in range(n):
                yield i, {"sentence": f"sentence {i}", "label": i % 2, "idx": i}

    class FakeConll(conll.Conll2003, skip_registration=True):
        name = "conll2003"
        pkg_dir_path = conll.Conll2003._get_pkg_dir_path()

        def _split_generators(self, dl_manager):
            return {"train": self._fake(3), "dev": self._fake(2)}

        def _fake(self, n):
            for i in range(n):
                yield (
                    i,
                    {
                        "tokens": ["EU", "rejects"],
                        "ner": ["B-ORG", "O"],
                        "pos": ["NNP", "VBZ"],
                        "chunks": ["B-NP", "B-VP"],
                    },
                )

    FakeGlue(config="sst2", data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    FakeConll(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    sst2 = catalog.open_catalog("glue/sst2", data_dir=str(tmp_path))
    assert (len(sst2["train"]), len(sst2["validation"])) == (4, 2)
    assert {sst2["train"][i]["text"] for i in range(4)} == {f"sentence {i}".encode() for i in range(4)}
    assert all(sst2["train"][i]["label"] in (0, 1) for i in range(4))
    ner = catalog.open_catalog("conll2003", data_dir=str(tmp_path))
    assert len(ner["validation"]) == 2 and ner["train"][0] == {"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]}


def test_open_sources_reads_a_catalog_dataset_by_name(tmp_path):
    import dataclasses

    from jaxlm import config_lib
    from jaxlm.data import sources

    data = config_lib.validate(config_lib.base_config()).data
    cfg = dataclasses.replace(data, source="tfds", name="imdb_reviews", data_dir=str(tmp_path))
    with tfds.testing.mock_data(num_examples=3):
        srcs = sources.open_sources(cfg)
    assert set(srcs["train"][0]) == {"text", "label"}
    with pytest.raises(DataError, match="needs config.data.name"):
        sources.open_sources(dataclasses.replace(cfg, name=""))
