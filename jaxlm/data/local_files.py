"""The user's local files: plain text, JSONL and CSV, read, checked, split and prepared once through tfds.

Formats (:data:`FORMATS`; ``'auto'`` picks one per file extension, see :func:`detect_format`):

``text``
    One document per file, per line or per blank-line paragraph (``document``); each
    becomes a ``{'text': ...}`` record. Blank documents are dropped.
``jsonl``
    One JSON object per line (blank lines are skipped); the record keeps the named fields.
``csv`` / ``tsv``
    A header row naming the columns, then one record per row; a column whose every value is
    an integer literal becomes an integer field (so labels ``0``/``1`` stay numbers).

Fields: ``fields`` maps jaxlm's field names to the file's keys or columns
(``{'text': 'review_body', 'label': 'stars'}``, or the string ``'text=review_body,label=stars'``);
``None`` keeps every key of the first record. A record without a named field is a
:class:`~jaxlm.common_types.DataError` naming the file, line and field; other keys are ignored.
Field types are inferred from the values (a field with mixed types is a ``DataError``):
strings become tfds ``Text``, integers and booleans int64 ``Scalar``, floats float32
``Scalar``, lists ``Sequence`` and objects ``FeaturesDict`` (a SQuAD-style ``answers``
object, say); ``features`` forces a type per field (``{'label': 'text'}``).

Decoding: files are UTF-8 (a leading byte-order mark is skipped). Invalid bytes are replaced
by U+FFFD with a warning naming the file and byte offset (``on_decode_error='replace'``) or
raise a ``DataError`` naming them (``'error'``).

Splitting into train and validation is deterministic: by record or document (a hash of its
file path and index), or by position when the corpus is a single document; ``eval_files``
replace the held-out share. :func:`jaxlm.data.sources.prepare_files` writes the splits once
as ``array_record`` through a tfds builder and reads them back with random access.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from jaxlm.common_types import DataError
from jaxlm.data.packing import check_choice

FORMATS = ("auto", "text", "jsonl", "csv", "tsv")
DOCUMENTS = ("file", "line", "paragraph")
DECODE_ERRORS = ("replace", "error")
FEATURE_TYPES = ("text", "int", "float")
VALIDATION_BUCKETS = 10_000
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv"}

_INT_LITERAL = re.compile(r"[+-]?\d+")
log = logging.getLogger(__name__)

# A field's type: 'text' | 'int' | 'float', [element type] for a list (None: only empty lists
# seen so far), or {key: type} for an object.
Spec = Any
Record = dict[str, Any]


def default_data_dir() -> str:
    """Where prepared datasets are cached when ``config.data.data_dir`` is empty."""
    return os.path.join(os.path.expanduser("~"), ".cache", "jaxlm", "datasets")


# ----------------------------------------------------------------------------- reading


def decode(data: bytes, path: str, on_decode_error: str = "replace") -> str:
    """UTF-8 ``data`` of file ``path`` as text; invalid bytes are replaced (with a warning) or a :class:`DataError`."""
    check_choice(on_decode_error, DECODE_ERRORS, "on_decode_error")
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = skip + e.start
        line_no = data.count(b"\n", 0, offset) + 1
        where = f"{path}: invalid UTF-8 at byte {offset} (line {line_no})"
        if on_decode_error == "error":
            raise DataError(f"{where}; re-encode the file as UTF-8 or set on_decode_error='replace'") from None
        log.warning("%s; replaced by U+FFFD (on_decode_error='replace'; 'error' rejects the file)", where)
        return data[skip:].decode("utf-8", errors="replace")


def read_text(path: str, on_decode_error: str = "replace") -> str:
    """The text of file ``path`` (see :func:`decode`)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror}); check the path and its permissions") from e
    return decode(data, path, on_decode_error)


def split_documents(text: str, document: str) -> list[str]:
    """Cut one file's text into documents: the whole file, each line, or each paragraph; blank ones are dropped."""
    if document == "file":
        parts = [text]
    elif document == "line":
        parts = text.splitlines()
    elif document == "paragraph":
        parts = text.replace("\r\n", "\n").split("\n\n")
    else:
        raise DataError(f"config.data.document={document!r} is not one of: {', '.join(DOCUMENTS)}")
    return [p for p in parts if p.strip()]


def detect_format(files: Sequence[str], format: str = "auto") -> str:
    """The one format of ``files``: ``format`` itself, or by extension (``.jsonl``, ``.csv``, ``.tsv``; else text)."""
    check_choice(format, FORMATS, "config.data.format")
    if format != "auto":
        return format
    found = {EXTENSIONS.get(os.path.splitext(f)[1].lower(), "text") for f in files}
    if len(found) > 1:
        raise DataError(
            f"config.data.files mixes formats ({', '.join(sorted(found))}); "
            "match one kind of file or set config.data.format"
        )
    return found.pop() if found else "text"


def parse_fields(fields: str | Mapping[str, str] | None) -> dict[str, str] | None:
    """A field mapping ``{jaxlm name: file key}`` from a mapping or a string ``'text=review_body,label'``."""
    if fields is None or isinstance(fields, Mapping):
        return dict(fields) if fields else None
    out = {}
    for item in (p.strip() for p in fields.split(",")):
        if not item:
            continue
        name, _, key = item.partition("=")
        name, key = name.strip(), (key.strip() or name.strip())
        if not name or name in out:
            raise DataError(f"config.data.fields={fields!r}: {item!r} is empty or repeated; write 'text=body,label'")
        out[name] = key
    return out or None


def _jsonl_rows(text: str, path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    # Split on '\n' only: JSON strings may hold U+2028 and other characters str.splitlines cuts at.
    for line_no, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno}); fix the line") from None
        if not isinstance(row, dict):
            raise DataError(
                f'{path}:{line_no}: a JSONL line must be an object like {{"text": ...}}, not a {type(row).__name__}'
            )
        yield line_no, row


def _csv_rows(text: str, path: str, delimiter: str) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    if not reader.fieldnames:
        raise DataError(f"{path}: no header row; the first line must name the columns")
    for row in reader:
        row.pop(None, None)  # values past the header's columns
        yield reader.line_num, row


def read_records(
    path: str, format: str, fields: Mapping[str, str] | None, on_decode_error: str = "replace"
) -> list[tuple[int, Record]]:
    """``(line, record)`` pairs of a JSONL or CSV/TSV file, each record holding the named ``fields``.

    ``fields`` maps output names to the file's keys (``None``: every key of the file's first
    record). A record without one of them is a :class:`DataError` naming the file, line and field.
    """
    text = read_text(path, on_decode_error)
    if format == "jsonl":
        rows = _jsonl_rows(text, path)
    elif format in ("csv", "tsv"):
        rows = _csv_rows(text, path, "," if format == "csv" else "\t")
    else:
        raise DataError(f"config.data.format={format!r}: records are read from jsonl, csv or tsv files")
    out = []
    for line_no, row in rows:
        wanted = fields or {k: k for k in row}
        record = {}
        for name, key in wanted.items():
            if row.get(key) is None:
                shown = repr(key) if name == key else f"{key!r} (for {name!r})"
                raise DataError(
                    f"{path}:{line_no}: record has no field {shown}; it has: {', '.join(map(str, row)) or 'nothing'}; "
                    "fix the record or set config.data.fields"
                )
            record[name] = row[key]
        if fields is None:
            fields = wanted
        out.append((line_no, record))
    return out


# ----------------------------------------------------------------------------- field types


def _type_of(value: Any) -> Spec:
    if isinstance(value, str):
        return "text"
    if isinstance(value, bool | int):
        return "int"
    if isinstance(value, float):
        if not math.isfinite(value):  # JSON's NaN / Infinity would reach the loss unnoticed
            raise ValueError(f"{value} is not a finite number")
        return "float"
    if isinstance(value, list):
        spec = None
        for v in value:
            spec = _unify(spec, _type_of(v))
        if isinstance(spec, list):
            raise ValueError("lists of lists are not supported")
        return [spec]
    if isinstance(value, dict):
        return {k: _type_of(v) for k, v in sorted(value.items())}
    raise ValueError(f"a {type(value).__name__} value is not supported")


def _unify(a: Spec, b: Spec) -> Spec:
    if a is None or a == b:
        return b
    if b is None:
        return a
    if isinstance(a, str) and isinstance(b, str) and {a, b} == {"int", "float"}:
        return "float"
    if isinstance(a, list) and isinstance(b, list):
        return [_unify(a[0], b[0])]
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return {k: _unify(a[k], b[k]) for k in a}
    raise ValueError(f"it is {_describe(b)} here but {_describe(a)} in earlier records")


def _describe(spec: Spec) -> str:
    if isinstance(spec, list):
        return f"a list of {_describe(spec[0]) if spec[0] else 'nothing'}"
    if isinstance(spec, dict):
        return f"an object with keys {sorted(spec)}"
    return {"text": "a string", "int": "an integer", "float": "a number"}.get(spec, str(spec))


def _coerce(value: Any, spec: Spec) -> Any:
    if spec == "text":
        return value if isinstance(value, str) else json.dumps(value)
    if spec == "int":
        return int(value)
    if spec == "float":
        return float(value)
    if isinstance(spec, list):
        return [_coerce(v, spec[0] or "text") for v in value]
    return {k: _coerce(value[k], s) for k, s in spec.items()}


def infer_features(
    records: Sequence[tuple[str, int, Record]], format: str, features: Mapping[str, str] | None = None
) -> dict[str, Spec]:
    """The type of every field of ``(path, line, record)`` triples, converting the records in place.

    CSV/TSV columns of integer literals become ``'int'``; ``features`` forces a field's type
    (``'text'``, ``'int'`` or ``'float'``). Mixed types are a :class:`DataError` naming the
    file, line and field.
    """
    forced = dict(features or {})
    for name, kind in forced.items():
        check_choice(kind, FEATURE_TYPES, f"features[{name!r}]")
    spec: dict[str, Spec] = {}
    if format in ("csv", "tsv"):
        names = {name for _, _, r in records for name in r}
        for name in names - forced.keys():
            if all(_INT_LITERAL.fullmatch(r[name].strip()) for _, _, r in records):
                forced[name] = "int"
    for path, line_no, record in records:
        for name, value in record.items():
            try:
                if name in forced:
                    record[name] = value = _coerce(value, forced[name])
                spec[name] = _unify(spec.get(name), _type_of(value))
            except (TypeError, ValueError) as e:
                raise DataError(
                    f"{path}:{line_no}: field {name!r}: {e}; make the field one type or set its type in features"
                ) from None
    for _, _, record in records:
        for name, s in spec.items():
            record[name] = _coerce(record[name], s)
    return spec


# ----------------------------------------------------------------------------- splitting


def _bucket(key: str) -> int:
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % VALIDATION_BUCKETS


def _position_split(text: str, fraction: float) -> tuple[str, str]:
    """Hold out the last ``fraction`` of one document, cut at a line break when possible."""
    cut = int(len(text) * (1.0 - fraction))
    newline = text.rfind("\n", 0, cut)
    if newline > len(text) // 2:
        cut = newline + 1
    return text[:cut], text[cut:]


def split_keyed(keyed: Sequence[tuple[str, Any]], eval_fraction: float) -> dict[str, list[Any]]:
    """Split ``(key, item)`` pairs by a hash of the key: about ``eval_fraction`` of them go to validation.

    At least one item is held out and at least one is kept, so both splits are non-empty
    when there are two items or more.
    """
    threshold = int(eval_fraction * VALIDATION_BUCKETS)
    ordered = sorted(keyed, key=lambda kd: _bucket(kd[0]))
    validation = [d for k, d in ordered if _bucket(k) < threshold]
    train = [d for k, d in ordered if _bucket(k) >= threshold]
    if not validation:  # few items: hold out the one with the smallest hash
        validation, train = [ordered[0][1]], [d for _, d in ordered[1:]]
    if not train:
        train, validation = [d for _, d in ordered[:-1]], [ordered[-1][1]]
    return {"train": train, "validation": validation}


def _text_documents(files: Sequence[str], document: str, on_decode_error: str) -> list[tuple[str, str]]:
    docs, empty = [], []
    for path in files:
        parts = split_documents(read_text(path, on_decode_error), document)
        if not parts:
            empty.append(path)
        docs.extend((f"{path}:{i}", p) for i, p in enumerate(parts))
    if empty and docs:
        log.warning("%d of %d files hold no text and are skipped (first: %s)", len(empty), len(files), empty[0])
    return docs


def split_corpus(
    files: Sequence[str],
    document: str,
    eval_fraction: float,
    eval_files: Sequence[str] = (),
    *,
    on_decode_error: str = "replace",
) -> dict[str, list[str]]:
    """Read text files and split their documents into ``{'train': [...], 'validation': [...]}``."""
    docs = _text_documents(files, document, on_decode_error)
    if not docs:
        raise DataError(
            f"config.data.files: all {len(files)} matched files are empty; point it at text files with content"
        )
    if eval_files:
        validation = [d for _, d in _text_documents(eval_files, document, on_decode_error)]
        if not validation:
            raise DataError("config.data.eval_files: the matched files are empty; point it at text files")
        return {"train": [d for _, d in docs], "validation": validation}
    if len(docs) == 1:
        train, validation = _position_split(docs[0][1], max(eval_fraction, 1e-3))
        return {"train": [train], "validation": [validation] if validation.strip() else [train[-1000:]]}
    return split_keyed(docs, eval_fraction)


def _all_records(
    files: Sequence[str], format: str, fields: Mapping[str, str] | None, on_decode_error: str, field: str
) -> list[tuple[str, int, Record]]:
    out = [(path, line_no, r) for path in files for line_no, r in read_records(path, format, fields, on_decode_error)]
    if not out:
        raise DataError(
            f"{field}: the {len(files)} matched {format} files hold no records; point it at files with content"
        )
    return out


def split_records(
    files: Sequence[str],
    format: str,
    eval_fraction: float,
    eval_files: Sequence[str] = (),
    *,
    fields: Mapping[str, str] | None = None,
    features: Mapping[str, str] | None = None,
    on_decode_error: str = "replace",
) -> tuple[dict[str, list[Record]], dict[str, Spec]]:
    """Read JSONL/CSV files and split their records; returns the splits and the fields' types."""
    train = _all_records(files, format, fields, on_decode_error, "config.data.files")
    held = _all_records(eval_files, format, fields, on_decode_error, "config.data.eval_files") if eval_files else []
    if not held and len(train) < 2:
        raise DataError(
            f"{train[0][0]} holds a single record; add records or set config.data.eval_files to hold one out"
        )
    first = train[0]
    for path, line_no, record in train + held:
        if record.keys() != first[2].keys():
            raise DataError(
                f"{path}:{line_no} has the fields {sorted(record)} but {first[0]}:{first[1]} has {sorted(first[2])}; "
                "make the files agree or set config.data.fields"
            )
    spec = infer_features(train + held, format, features)
    if held:
        return {"train": [r for _, _, r in train], "validation": [r for _, _, r in held]}, spec
    return split_keyed([(f"{p}:{n}", r) for p, n, r in train], eval_fraction), spec


# ----------------------------------------------------------------------------- tfds


def import_tfds() -> Any:
    """``tensorflow_datasets``, quietened; imported only when data is prepared or read (it is slow to import)."""
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    logging.getLogger("absl").setLevel(logging.ERROR)
    return tfds
