"""Catalog datasets of tensorflow-datasets by name, read with random access and mapped to jaxlm's record fields.

Each dataset of :data:`CATALOG` is opened from ``data_dir`` with its builder's
``as_data_source`` (``array_record``, so TensorFlow is not needed) and its records are
renamed to the fields jaxlm's objectives read by default:

=================  ==========================  ===================================  ==========  ====================
name               tfds name                   jaxlm field <- tfds feature          validation  objective
=================  ==========================  ===================================  ==========  ====================
tiny_shakespeare   tiny_shakespeare            text <- text (one text per split)    validation  causal_lm
lm1b               lm1b                        text <- text                         test        causal_lm
c4                 c4/en                       text <- text                         validation  causal_lm
imdb_reviews       imdb_reviews/plain_text     text <- text, label <- label         test        classification
glue/sst2          glue/sst2                   text <- sentence, label <- label     validation  classification
conll2003          conll2003                   tokens <- tokens, tags <- ner        dev         token_classification
wmt14_translate    wmt14_translate/de-en       source <- de, target <- en           validation  seq2seq
cnn_dailymail      cnn_dailymail               source <- article, target <- highl.  validation  seq2seq
squad              squad/v1.1                  question, context, answers           validation  qa
=================  ==========================  ===================================  ==========  ====================

Other configs of these datasets work too (``c4/en.noclean``, ``squad/v2.0``, and
``wmt14_translate/fr-en``, whose source is its first language). Values come back as jaxlm's
objectives read them: text as bytes, class labels as int class indices (``label_names`` gives
their names; an unlabelled split such as glue's ``test``, label -1, is a ``DataError`` at the
objective), tag sequences as their names (``'B-PER'``), lists of text as lists of ``str``,
SQuAD ``answers`` as ``{'text': [str], 'answer_start': [int]}``; :func:`objective_options`
gives the ``labels=`` to pass to the objective. ``fields`` renames or adds fields
(``{'source': 'en', 'target': 'de'}`` translates the other way).

tiny_shakespeare holds each split as one text: ``document='file'`` keeps it whole,
``'line'`` or ``'paragraph'`` cut it into lines or blank-line paragraphs (speaker turns).
For the others each record is one document and ``document`` must stay ``'file'``.

Nothing is downloaded unless ``download=True``: a dataset missing from ``data_dir`` is a
:class:`~jaxlm.common_types.DataError` saying how to prepare it (``tfds build NAME
--data_dir=DIR --file_format=array_record``, on a machine with network access; some builders
need TensorFlow or Apache Beam to prepare, and c4 is very large). GCS is never consulted
(``try_gcs=False``). The builder modules are imported by name first, so the datasets are
registered even where tfds' lazy import of its catalog skips them without TensorFlow.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxlm.common_types import DataError
from jaxlm.data.local_files import default_data_dir, import_tfds, split_documents


@dataclasses.dataclass(frozen=True)
class CatalogDataset:
    """How jaxlm reads one tfds catalog dataset."""

    tfds_name: str  # name/config as tfds spells it
    module: str  # builder module, imported so the name is registered without TensorFlow
    fields: Mapping[str, str]  # jaxlm field -> tfds feature
    validation_split: str
    objective: str  # the objective its records suit
    train_split: str = "train"
    whole_text: bool = False  # each split is one text, cut into documents by `document`


_TFDS = "tensorflow_datasets"
CATALOG: dict[str, CatalogDataset] = {
    "tiny_shakespeare": CatalogDataset(
        "tiny_shakespeare",
        f"{_TFDS}.datasets.tiny_shakespeare.tiny_shakespeare_dataset_builder",
        {"text": "text"},
        "validation",
        "causal_lm",
        whole_text=True,
    ),
    "lm1b": CatalogDataset(
        "lm1b", f"{_TFDS}.datasets.lm1b.lm1b_dataset_builder", {"text": "text"}, "test", "causal_lm"
    ),
    "c4": CatalogDataset("c4/en", f"{_TFDS}.text.c4", {"text": "text"}, "validation", "causal_lm"),
    "imdb_reviews": CatalogDataset(
        "imdb_reviews/plain_text",
        f"{_TFDS}.datasets.imdb_reviews.imdb_reviews_dataset_builder",
        {"text": "text", "label": "label"},
        "test",
        "classification",
    ),
    "glue/sst2": CatalogDataset(
        "glue/sst2", f"{_TFDS}.text.glue", {"text": "sentence", "label": "label"}, "validation", "classification"
    ),
    "conll2003": CatalogDataset(
        "conll2003",
        f"{_TFDS}.text.conll2003.conll2003",
        {"tokens": "tokens", "tags": "ner"},
        "dev",
        "token_classification",
    ),
    "wmt14_translate": CatalogDataset(
        "wmt14_translate/de-en", f"{_TFDS}.translate.wmt14", {"source": "de", "target": "en"}, "validation", "seq2seq"
    ),
    "cnn_dailymail": CatalogDataset(
        "cnn_dailymail",
        f"{_TFDS}.summarization.cnn_dailymail",
        {"source": "article", "target": "highlights"},
        "validation",
        "seq2seq",
    ),
    "squad": CatalogDataset(
        "squad/v1.1",
        f"{_TFDS}.datasets.squad.squad_dataset_builder",
        {"question": "question", "context": "context", "answers": "answers"},
        "validation",
        "qa",
    ),
}


def lookup(name: str) -> CatalogDataset:
    """The catalog entry of ``name``: a key of :data:`CATALOG`, or another config of one (``squad/v2.0``)."""
    if name in CATALOG:
        return CATALOG[name]
    family, _, config = name.partition("/")
    base = CATALOG.get(family) or next((d for d in CATALOG.values() if d.tfds_name == name), None)
    if base is not None and config:
        if family == "wmt14_translate":
            source, _, target = config.partition("-")
            return dataclasses.replace(base, tfds_name=name, fields={"source": source, "target": target})
        return dataclasses.replace(base, tfds_name=name)
    raise DataError(
        f"config.data.name={name!r} is not in jaxlm's catalog ({', '.join(CATALOG)}); "
        "use one of them, or prepare your own files with config.data.source='files'"
    )


def _builder(entry: CatalogDataset, data_dir: str) -> Any:
    tfds = import_tfds()
    importlib.import_module(entry.module)
    return tfds.builder(entry.tfds_name, data_dir=data_dir, try_gcs=False, file_format="array_record")


def label_names(name: str, data_dir: str = "") -> dict[str, list[str]]:
    """Names of the class labels of each jaxlm field that holds them (``{'label': ['neg', 'pos']}``)."""
    entry = lookup(name)
    features = _builder(entry, os.path.expanduser(data_dir or default_data_dir())).info.features
    tfds = import_tfds()
    out = {}
    for field, key in entry.fields.items():
        feature = features[key]
        inner = feature.feature if isinstance(feature, tfds.features.Sequence) else feature
        if isinstance(inner, tfds.features.ClassLabel):
            out[field] = list(inner.names)
    return out


def objective_options(name: str, data_dir: str = "") -> dict[str, Any]:
    """Keyword arguments the dataset's objective needs: the ``labels=`` set of classification and tagging.

    Classification records hold class indices (``labels=[0, 1, ...]``); tagging records hold
    tag names (``labels=['O', 'B-PER', ...]``).
    """
    entry = lookup(name)
    names = label_names(name, data_dir)
    if entry.objective == "classification":
        return {"labels": list(range(len(names["label"])))}
    if entry.objective == "token_classification":
        return {"labels": names["tags"]}
    return {}


def _plain(value: Any, top: bool = True) -> Any:
    """A decoded tfds value as plain Python: arrays to lists, NumPy scalars unwrapped, nested bytes to ``str``."""
    if isinstance(value, np.ndarray):
        value = value.item() if value.ndim == 0 else value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        return value if top else value.decode("utf-8", errors="replace")
    if isinstance(value, list | tuple):
        return [_plain(v, top=False) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v, top=False) for k, v in value.items()}
    return value


class MappedSource:
    """A random-access source whose records are a tfds source's records renamed to jaxlm's fields."""

    def __init__(self, source: Sequence[Any], fields: Mapping[str, str], names: Mapping[str, list[str]]) -> None:
        self.source, self.fields, self.names = source, dict(fields), dict(names)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        raw = self.source[index]
        record = {}
        for field, key in self.fields.items():
            value = _plain(raw[key])
            if field in self.names:  # a sequence of class labels, as names
                names = self.names[field]
                if bad := [int(i) for i in value if not 0 <= int(i) < len(names)]:
                    raise DataError(
                        f"record {index}: {key}={bad[0]} is not a class of {names}; the split has no labels"
                    )
                value = [names[int(i)] for i in value]
            record[field] = value
        return record


class _Documents:
    """Documents held in memory as ``{'text': bytes}`` records."""

    def __init__(self, texts: Sequence[str]) -> None:
        self._texts = [t.encode("utf-8") for t in texts]

    def __len__(self) -> int:
        return len(self._texts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"text": self._texts[index]}


def _as_text(value: Any) -> str:
    value = _plain(value)
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _open_split(builder: Any, name: str, split: str, data_dir: str) -> Any:
    try:
        return builder.as_data_source(split=split)
    except Exception as e:  # tfds raises several types; every one means the data cannot be read here
        tfds_name = builder.info.full_name.rsplit("/", 1)[0]
        fix = f"prepare it with `tfds build {tfds_name} --data_dir={data_dir} --file_format=array_record`"
        if not builder.is_prepared():
            raise DataError(
                f"catalog dataset {name!r} is not prepared under config.data.data_dir={data_dir!r}; {fix} "
                "on a machine with network access, or set download=True"
            ) from e
        if isinstance(e, NotImplementedError):
            raise DataError(
                f"catalog dataset {name!r} under {data_dir!r} is stored as tfrecord, which needs TensorFlow; "
                f"jaxlm reads array_record: {fix} into another data_dir"
            ) from e
        raise DataError(f"catalog dataset {name!r}: split {split!r} cannot be read ({e}); check the split name") from e


def open_catalog(
    name: str,
    *,
    data_dir: str = "",
    document: str = "file",
    fields: Mapping[str, str] | None = None,
    train_split: str = "",
    validation_split: str = "",
    download: bool = False,
) -> dict[str, Any]:
    """The ``'train'`` and ``'validation'`` sources of catalog dataset ``name``, records mapped to jaxlm's fields.

    Args:
      name: a key of :data:`CATALOG` or another config of one of its datasets.
      data_dir: where the prepared dataset lives ('' = :func:`default_data_dir`).
      document: how whole-text datasets (tiny_shakespeare) are cut: ``'file'``, ``'line'``, ``'paragraph'``.
      fields: ``{jaxlm field: tfds feature}`` added to or replacing the entry's mapping.
      train_split, validation_split: tfds split strings ('' = the entry's, e.g. ``'train[:10%]'``).
      download: download and prepare the dataset as ``array_record`` when it is missing.
    """
    entry = lookup(name)
    data_dir = os.path.expanduser(data_dir or default_data_dir())
    if document != "file" and not entry.whole_text:
        raise DataError(
            f"config.data.document={document!r} cuts whole texts (tiny_shakespeare, local files) but {name!r} "
            "has one document per record; set config.data.document='file'"
        )
    builder = _builder(entry, data_dir)
    features = builder.info.features
    mapping = {**entry.fields, **(fields or {})}
    if missing := [k for k in mapping.values() if k not in features]:
        raise DataError(
            f"catalog dataset {name!r} has no feature {missing[0]!r} (it has: {', '.join(features)}); "
            "fix config.data.fields"
        )
    if download:
        try:
            builder.download_and_prepare(file_format="array_record")
        except Exception as e:  # network, disk or a builder needing TensorFlow / Beam
            raise DataError(
                f"catalog dataset {name!r} could not be prepared under {data_dir!r} ({type(e).__name__}: {e}); "
                "preparing needs network access, and TensorFlow (tensorflow-cpu) for tiny_shakespeare, lm1b and "
                "cnn_dailymail, Apache Beam for c4; or prepare it elsewhere with `tfds build` and copy data_dir"
            ) from e
    tfds = import_tfds()
    names = {
        field: list(features[key].feature.names)
        for field, key in mapping.items()
        if isinstance(features[key], tfds.features.Sequence)
        and isinstance(features[key].feature, tfds.features.ClassLabel)
    }
    splits = {"train": train_split or entry.train_split, "validation": validation_split or entry.validation_split}
    out = {}
    for key, split in splits.items():
        raw = _open_split(builder, name, split, data_dir)
        if entry.whole_text:
            text = "\n".join(_as_text(raw[i][mapping["text"]]) for i in range(len(raw)))
            out[key] = _Documents(split_documents(text, document))
        else:
            out[key] = MappedSource(raw, mapping, names)
        if len(out[key]) == 0:
            raise DataError(f"catalog dataset {name!r}: split {split!r} is empty; choose another split")
    return out
