"""Sources of records: the user's files, tfds catalog datasets, the built-in corpus, and synthetic data.

:func:`open_sources` turns ``config.data`` into ``{'train': ..., 'validation': ...}``
random-access sources of dict records (``{'text': bytes}`` for plain text; the named fields
for JSONL/CSV files and catalog datasets; ``source``/``target``/``text`` for the synthetic
sequence tasks):

``files`` / ``builtin``
    Local files (:mod:`jaxlm.data.local_files`), and the built-in corpus (the running
    Python's standard library source), prepared once as ``array_record`` through one tfds
    builder and read back with random access, so TensorFlow is not needed. The split into
    train and validation is deterministic. ``builtin`` with ``config.data.name`` set opens a
    built-in downstream task instead (:mod:`jaxlm.data.builtin_tasks`).
``tfds``
    A catalog dataset by name (:mod:`jaxlm.data.catalog`) from ``config.data.data_dir``.
``synthetic``
    Data of known statistics, in memory: a Markov chain of known entropy rate
    (``kind='markov'``: :func:`markov_chain`, :func:`markov_entropy_rate`) or the copy and
    reverse tasks (:func:`sequence_task_records`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from jaxlm.common_types import DataError
from jaxlm.config_lib import DataConfig
from jaxlm.data import builtin_tasks, catalog
from jaxlm.data.local_files import DECODE_ERRORS, Record, Spec, detect_format, import_tfds, parse_fields, split_records
from jaxlm.data.local_files import VALIDATION_BUCKETS as VALIDATION_BUCKETS
from jaxlm.data.local_files import default_data_dir as default_data_dir
from jaxlm.data.local_files import split_corpus as split_corpus
from jaxlm.data.local_files import split_documents as split_documents
from jaxlm.data.packing import check_choice


class TextSource(Protocol):
    """Random-access sequence of dict records, ``{'text': bytes}`` for plain text (what tfds data sources are)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


class ListSource:
    """A :class:`TextSource` over documents held in memory."""

    def __init__(self, texts: Sequence[str]) -> None:
        self._texts = [t.encode("utf-8") for t in texts]

    def __len__(self) -> int:
        return len(self._texts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"text": self._texts[index]}


class RecordSource:
    """A :class:`TextSource` over dict records held in memory (strings are stored as UTF-8 bytes, as tfds does)."""

    def __init__(self, records: Sequence[Mapping[str, Any]]) -> None:
        self._records = [{k: v.encode("utf-8") if isinstance(v, str) else v for k, v in r.items()} for r in records]

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return dict(self._records[index])


def record_texts(source: TextSource) -> Iterator[str]:
    """Every text of every record: each string field, and lists of strings joined by spaces (to train a tokenizer)."""
    for i in range(len(source)):
        for value in source[i].values():
            if isinstance(value, np.ndarray):
                value = value.tolist()
            if isinstance(value, list | tuple) and value and all(isinstance(v, str | bytes) for v in value):
                value = " ".join(v.decode("utf-8", errors="replace") if isinstance(v, bytes) else v for v in value)
            if isinstance(value, bytes):
                value = value.decode("utf-8", errors="replace")
            if isinstance(value, str):
                yield value


def check_tokens(source: TextSource, tokenizer: Any, need: int, split: str) -> None:
    """Raise a :class:`DataError` unless ``source`` holds ``need`` tokens (one ``seq_len + 1`` row).

    Counts each record's text plus its ``eos``, and stops as soon as there are enough, so a
    large corpus costs one or two records.
    """
    count = 0
    for i in range(len(source)):
        count += sum(len(tokenizer.encode(text)) for text in record_texts(_One(source[i]))) + 1
        if count >= need:
            return
    raise DataError(
        f"the {split} split holds {count} tokens in {len(source)} records, fewer than one row of "
        f"config.data.seq_len + 1 = {need} tokens; add text or lower config.data.seq_len"
    )


class _One:
    """One record as a source (for :func:`record_texts`)."""

    def __init__(self, record: dict[str, Any]) -> None:
        self._record = record

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._record


def check_not_empty(splits: Mapping[str, TextSource], fixes: Mapping[str, str]) -> None:
    """Raise a :class:`DataError` naming the sizes if a split holds no records, or only empty text."""
    sizes = ", ".join(f"{name}: {len(src)} records" for name, src in splits.items())
    for name, src in splits.items():
        if len(src) == 0 or (len(src) <= 1000 and not any(t for t in record_texts(src))):
            raise DataError(f"the {name} split comes out empty ({sizes}); {fixes.get(name, 'check config.data')}")


def builtin_files() -> list[str]:
    """The built-in corpus: the ``*.py`` files of this Python's standard library."""
    stdlib = sysconfig.get_paths()["stdlib"]
    return sorted(glob.glob(os.path.join(stdlib, "*.py")))


def expand_globs(patterns: str, field: str) -> list[str]:
    """Expand comma-separated globs (``~`` allowed) into a sorted list of files."""
    files: set[str] = set()
    for pattern in (p.strip() for p in patterns.split(",")):
        if not pattern:
            continue
        matched = [f for f in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(f)]
        if not matched:
            raise DataError(f"{field}={pattern!r} matches no files; check the path or quote the glob")
        files.update(os.path.abspath(f) for f in matched)
    if not files:
        raise DataError(f"{field} is empty; set it to a glob like '~/corpus/*.txt'")
    return sorted(files)


# ----------------------------------------------------------------------------- local files through tfds


def _feature(tfds: Any, spec: Spec) -> Any:
    if spec == "text":
        return tfds.features.Text()
    if spec == "int":
        return tfds.features.Scalar(np.int64)
    if spec == "float":
        return tfds.features.Scalar(np.float32)
    if isinstance(spec, list):
        return tfds.features.Sequence(_feature(tfds, spec[0] or "text"))
    return tfds.features.FeaturesDict({k: _feature(tfds, v) for k, v in spec.items()})


def builder_class() -> type:
    """The :class:`TextFiles` tfds builder: splits of records with a feature spec, written as ``array_record``."""
    tfds = import_tfds()
    registered = getattr(builder_class, "cls", None)
    if registered is not None:
        return registered

    class TextFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Local files as a tfds dataset of records; ``spec`` gives each field's type (default ``{'text': 'text'}``)."""

        VERSION = tfds.core.Version("1.0.0")

        def __init__(
            self, *, splits: dict[str, list[Record]] | None = None, spec: dict[str, Spec] | None = None, **kwargs: Any
        ) -> None:
            self._splits, self._spec = splits, spec or {"text": "text"}
            super().__init__(**kwargs)

        def _info(self) -> Any:
            return tfds.core.DatasetInfo(
                builder=self,
                description="Local files prepared by jaxlm.",
                features=tfds.features.FeaturesDict({k: _feature(tfds, v) for k, v in self._spec.items()}),
            )

        def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
            assert self._splits is not None
            return {name: self._generate_examples(records) for name, records in self._splits.items()}

        def _generate_examples(self, records: list[Record]) -> Iterator[tuple[int, Record]]:
            yield from enumerate(records)

    builder_class.cls = TextFiles  # type: ignore[attr-defined]
    return TextFiles


def _write(builder: Any) -> Any:
    """Write ``builder``'s records (array_record) and return a builder that reads the complete copy.

    tfds writes into an ``incomplete.*`` sibling and renames it when complete, so a kill leaves
    nothing ``is_prepared()`` accepts and the next run rebuilds. Two runs preparing the same files
    at once: either the second rename fails, or the second run finds the first one's copy already
    there and tfds returns without loading its split metadata into this builder. Either way the
    complete copy on disk is what is read, so the builder is always reopened from its directory.
    """
    tfds = import_tfds()
    try:
        builder.download_and_prepare()
    except OSError:
        if not builder.is_prepared():
            raise
    return tfds.builder_from_directory(builder.data_dir)


def _fingerprint(files: Sequence[str], eval_files: Sequence[str], options: list[Any]) -> str:
    h = hashlib.sha256()
    for path in list(files) + ["--eval--"] + list(eval_files):
        st = os.stat(path) if os.path.exists(path) else None
        h.update(json.dumps([path, st.st_size if st else -1, st.st_mtime_ns if st else -1]).encode())
    h.update(json.dumps(options, sort_keys=True).encode())
    return "h" + h.hexdigest()[:16]


def prepare_files(
    files: Sequence[str],
    eval_files: Sequence[str] = (),
    *,
    data_dir: str,
    format: str = "auto",
    document: str = "file",
    eval_fraction: float = 0.05,
    fields: str | Mapping[str, str] | None = None,
    features: Mapping[str, str] | None = None,
    on_decode_error: str = "replace",
) -> dict[str, Any]:
    """Prepare (once) and open the ``'train'`` / ``'validation'`` splits of local files as random-access sources.

    ``format``, ``fields``, ``features`` and ``on_decode_error`` are described in
    :mod:`jaxlm.data.local_files`; ``document`` applies to plain text. Records are dicts of the
    named fields (text as bytes). The prepared data lives under ``data_dir`` keyed by a
    fingerprint of the files (paths, sizes, modification times) and these options; a second
    call reads it back without reading the files.
    """
    tfds = import_tfds()
    format = detect_format(list(files) + list(eval_files), format)
    check_choice(on_decode_error, DECODE_ERRORS, "config.data.on_decode_error")
    fields = parse_fields(fields)
    data_dir = os.path.expanduser(data_dir or default_data_dir())
    try:
        os.makedirs(data_dir, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"config.data.data_dir={data_dir!r} cannot be created ({e.strerror}); pick a writable directory"
        ) from e
    options: list[Any] = [document, eval_fraction]
    if format != "text" or on_decode_error != "replace":  # the plain-text default keeps its earlier fingerprint
        options += [format, fields, dict(features or {}), on_decode_error, "records-v1"]
    name = _fingerprint(files, eval_files, options)
    cls = builder_class()
    config = tfds.core.BuilderConfig(name=name, description=f"{len(files)} {format} files, document={document}")
    builder = cls(config=config, data_dir=data_dir, file_format="array_record")
    if builder.is_prepared():
        # Read back with the features stored next to the data (the spec was inferred when preparing).
        builder = tfds.builder_from_directory(builder.data_dir)
    else:
        if format == "text":
            docs = split_corpus(files, document, eval_fraction, eval_files, on_decode_error=on_decode_error)
            splits, spec = {k: [{"text": d} for d in v] for k, v in docs.items()}, {"text": "text"}
        else:
            splits, spec = split_records(
                files,
                format,
                eval_fraction,
                eval_files,
                fields=fields,
                features=features,
                on_decode_error=on_decode_error,
            )
        builder = _write(cls(splits=splits, spec=spec, config=config, data_dir=data_dir, file_format="array_record"))
    return {split: builder.as_data_source(split=split) for split in ("train", "validation")}


def prepare_text_files(
    files: Sequence[str],
    eval_files: Sequence[str],
    document: str,
    eval_fraction: float,
    data_dir: str,
    *,
    on_decode_error: str = "replace",
) -> dict[str, Any]:
    """Prepare (once) and open the train/validation splits of plain text files as ``{'text': bytes}`` records."""
    return prepare_files(
        files,
        eval_files,
        data_dir=data_dir,
        format="text",
        document=document,
        eval_fraction=eval_fraction,
        on_decode_error=on_decode_error,
    )


def prepare_builtin_task(name: str, *, data_dir: str, eval_fraction: float) -> dict[str, Any]:
    """Prepare (once) and open the splits of built-in task ``name`` (:mod:`jaxlm.data.builtin_tasks`).

    Written as ``array_record`` through the same builder as local files, keyed by a
    fingerprint of the task, its version, ``eval_fraction`` and the standard-library files.
    """
    tfds = import_tfds()
    task = builtin_tasks.lookup(name)
    files = builtin_tasks.task_files(name)
    data_dir = os.path.expanduser(data_dir or default_data_dir())
    config = tfds.core.BuilderConfig(
        name=_fingerprint(files, [], [name, eval_fraction, builtin_tasks.VERSION]),
        description=f"jaxlm built-in task {name}",
    )
    cls = builder_class()
    builder = cls(config=config, data_dir=data_dir, file_format="array_record")
    if builder.is_prepared():
        builder = tfds.builder_from_directory(builder.data_dir)
    else:
        splits = builtin_tasks.build_task(name, eval_fraction, files)
        builder = _write(
            cls(splits=splits, spec=task.spec, config=config, data_dir=data_dir, file_format="array_record")
        )
    return {split: builder.as_data_source(split=split) for split in ("train", "validation")}


# ----------------------------------------------------------------------------- Markov chains


def markov_chain(vocab_size: int, concentration: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A random first-order Markov chain: transition matrix ``P`` and its stationary law."""
    rng = np.random.default_rng(seed)
    transition = rng.dirichlet(np.full(vocab_size, concentration), size=vocab_size)
    eigvals, eigvecs = np.linalg.eig(transition.T)
    stationary = np.real(eigvecs[:, np.argmin(np.abs(eigvals - 1.0))])
    stationary = stationary / stationary.sum()
    return transition, stationary


def markov_entropy_rate(transition: np.ndarray, stationary: np.ndarray) -> float:
    """Entropy rate in nats: ``sum_i pi_i * H(P_i)``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        row_entropy = -np.nansum(np.where(transition > 0, transition * np.log(transition), 0.0), axis=1)
    return float(stationary @ row_entropy)


MARKOV_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def markov_text(transition: np.ndarray, stationary: np.ndarray, length: int, seed: int) -> str:
    """Sample ``length`` symbols from the chain, written as letters (one byte each)."""
    rng = np.random.default_rng(seed)
    cumulative = np.cumsum(transition, axis=1)
    state = rng.choice(len(stationary), p=stationary)
    uniforms = rng.random(length)
    out = np.empty(length, dtype=np.int64)
    for i in range(length):
        out[i] = state
        state = min(int(np.searchsorted(cumulative[state], uniforms[i], side="right")), len(stationary) - 1)
    return "".join(MARKOV_ALPHABET[s] for s in out)


# ----------------------------------------------------------------------------- copy and reverse

SEQUENCE_SEPARATOR = "|"  # between source and target in the 'text' of a sequence-task record (not a symbol)
SEQUENCE_TASKS: dict[str, Callable[[str], str]] = {"copy": lambda s: s, "reverse": lambda s: s[::-1]}


def sequence_task_records(
    kind: str, *, vocab_size: int, num_tokens: int, min_len: int, max_len: int, seed: int
) -> list[dict[str, str]]:
    """Records of the copy or reverse task, until their sources hold ``num_tokens`` symbols.

    Each source is ``n ~ Uniform{min_len..max_len}`` symbols drawn independently and
    uniformly from the first ``vocab_size`` letters of :data:`MARKOV_ALPHABET` (entropy
    ``log(vocab_size)`` nats each); the target is the source (``copy``) or reversed
    (``reverse``), so it carries no entropy given the source. A record holds ``source`` and
    ``target`` for seq2seq and ``text = source + '|' + target`` for a causal LM, whose loss
    on the target part can reach 0.
    """
    if kind not in SEQUENCE_TASKS:
        raise DataError(f"config.data.synthetic.kind={kind!r} is not one of: {', '.join(SYNTHETIC_KINDS)}")
    if not 1 <= min_len <= max_len:
        raise DataError(f"config.data.synthetic: need 1 <= min_len ({min_len}) <= max_len ({max_len})")
    if not 2 <= vocab_size <= len(MARKOV_ALPHABET):
        raise DataError(f"config.data.synthetic.vocab_size={vocab_size} must be in [2, {len(MARKOV_ALPHABET)}]")
    rng = np.random.default_rng(seed)
    alphabet = np.array(list(MARKOV_ALPHABET[:vocab_size]))
    target_of = SEQUENCE_TASKS[kind]
    records, total = [], 0
    while total < max(num_tokens, 1):
        source = "".join(alphabet[rng.integers(vocab_size, size=int(rng.integers(min_len, max_len + 1)))])
        target = target_of(source)
        records.append({"source": source, "target": target, "text": source + SEQUENCE_SEPARATOR + target})
        total += len(source)
    return records


# ----------------------------------------------------------------------------- opening config.data


def _markov_sources(s: Any) -> dict[str, TextSource]:
    if s.vocab_size > len(MARKOV_ALPHABET):
        raise DataError(f"config.data.synthetic.vocab_size={s.vocab_size} exceeds {len(MARKOV_ALPHABET)}")
    transition, stationary = markov_chain(s.vocab_size, s.concentration, s.seed)
    return {
        "train": ListSource([markov_text(transition, stationary, s.num_train_tokens, s.seed + 1)]),
        "validation": ListSource([markov_text(transition, stationary, s.num_eval_tokens, s.seed + 2)]),
    }


def _sequence_task_sources(s: Any) -> dict[str, TextSource]:
    min_len = s.min_len
    max_len = s.max_len
    options = dict(vocab_size=s.vocab_size, min_len=min_len, max_len=max_len)
    return {
        "train": RecordSource(sequence_task_records(s.kind, num_tokens=s.num_train_tokens, seed=s.seed + 1, **options)),
        "validation": RecordSource(
            sequence_task_records(s.kind, num_tokens=s.num_eval_tokens, seed=s.seed + 2, **options)
        ),
    }


SYNTHETIC_KINDS: dict[str, Callable[[Any], dict[str, TextSource]]] = {
    "markov": _markov_sources,
    "copy": _sequence_task_sources,
    "reverse": _sequence_task_sources,
}


def synthetic_sources(cfg: DataConfig) -> dict[str, TextSource]:
    """In-memory train/validation records from the synthetic source ``cfg.synthetic.kind``."""
    kind = cfg.synthetic.kind
    if kind not in SYNTHETIC_KINDS:
        raise DataError(f"config.data.synthetic.kind={kind!r} is not one of: {', '.join(SYNTHETIC_KINDS)}")
    return SYNTHETIC_KINDS[kind](cfg.synthetic)


def open_sources(cfg: DataConfig) -> dict[str, TextSource]:
    """The train and validation sources named by ``config.data``; neither may come out empty."""
    splits = _open_sources(cfg)
    train_fix = {
        "tfds": "check config.data.name and config.data.train_split",
        "synthetic": "raise config.data.synthetic.num_train_tokens",
    }.get(cfg.source, "add text to config.data.files")
    eval_fix = {
        "tfds": "check config.data.eval_split",
        "synthetic": "raise config.data.synthetic.num_eval_tokens",
    }.get(cfg.source, "raise config.data.eval_fraction or set config.data.eval_files")
    check_not_empty(splits, {"train": train_fix, "validation": eval_fix})
    return splits


def _open_sources(cfg: DataConfig) -> dict[str, TextSource]:
    if cfg.source == "synthetic":
        return synthetic_sources(cfg)
    if cfg.source == "tfds":
        if not cfg.name:
            raise DataError(f"config.data.source='tfds' needs config.data.name, one of: {', '.join(catalog.CATALOG)}")
        return catalog.open_catalog(
            cfg.name,
            data_dir=cfg.data_dir,
            document=cfg.document,
            fields=parse_fields(cfg.fields),
            train_split=cfg.train_split,
            validation_split=cfg.eval_split,
            download=cfg.download,
        )
    if cfg.source == "builtin" and cfg.name:
        return prepare_builtin_task(cfg.name, data_dir=cfg.data_dir, eval_fraction=cfg.eval_fraction)
    if cfg.source == "builtin":
        files = builtin_files()
        if not files:
            raise DataError("config.data.source='builtin' found no standard-library sources; use source='files'")
    elif cfg.source == "files":
        files = expand_globs(cfg.files, "config.data.files")
    else:
        raise DataError(f"config.data.source={cfg.source!r} is not one of: builtin, files, tfds, synthetic")
    eval_files = expand_globs(cfg.eval_files, "config.data.eval_files") if cfg.eval_files.strip() else []
    file_format = cfg.format
    return prepare_files(
        files,
        eval_files,
        data_dir=cfg.data_dir,
        format=file_format if cfg.source == "files" else "text",
        document=cfg.document,
        eval_fraction=cfg.eval_fraction,
        fields=cfg.fields or None,
        on_decode_error=cfg.on_decode_error,
    )
