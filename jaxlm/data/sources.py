"""Text sources: the user's files, the built-in corpus, and synthetic data of known statistics.

Local files (and the built-in corpus, which is the running Python's standard library source)
go through one tensorflow-datasets builder, :class:`TextFiles`, prepared once as
``array_record`` under ``config.data.data_dir`` and read back with random access, so
TensorFlow is not needed. Splitting into train and validation is deterministic: by document
(a hash of its file path and index), or by position when the corpus is a single document.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import sysconfig
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from jaxlm.common_types import DataError
from jaxlm.config_lib import DataConfig

VALIDATION_BUCKETS = 10_000


class TextSource(Protocol):
    """Random-access sequence of ``{'text': bytes}`` records (what tfds data sources are)."""

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


def default_data_dir() -> str:
    """Where prepared datasets are cached when ``config.data.data_dir`` is empty."""
    return os.path.join(os.path.expanduser("~"), ".cache", "jaxlm", "datasets")


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


def split_documents(text: str, document: str) -> list[str]:
    """Cut one file's text into documents: the whole file, each line, or each paragraph."""
    if document == "file":
        parts = [text]
    elif document == "line":
        parts = text.splitlines()
    elif document == "paragraph":
        parts = [p for p in text.replace("\r\n", "\n").split("\n\n")]
    else:
        raise DataError(f"config.data.document={document!r} is not one of: file, line, paragraph")
    return [p for p in parts if p.strip()]


def _read(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    return data.decode("utf-8", errors="replace")


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


def split_corpus(
    files: Sequence[str], document: str, eval_fraction: float, eval_files: Sequence[str] = ()
) -> dict[str, list[str]]:
    """Read files and split their documents into ``{'train': [...], 'validation': [...]}``."""
    docs: list[tuple[str, str]] = []
    empty = 0
    for path in files:
        parts = split_documents(_read(path), document)
        empty += not parts
        docs.extend((f"{path}:{i}", p) for i, p in enumerate(parts))
    if not docs:
        raise DataError(
            f"config.data.files: all {len(files)} matched files are empty; point it at text files with content"
        )
    if eval_files:
        validation = [p for path in eval_files for p in split_documents(_read(path), document)]
        if not validation:
            raise DataError("config.data.eval_files: the matched files are empty; point it at text files")
        return {"train": [d for _, d in docs], "validation": validation}
    if len(docs) == 1:
        train, validation = _position_split(docs[0][1], max(eval_fraction, 1e-3))
        return {"train": [train], "validation": [validation] if validation.strip() else [train[-1000:]]}
    threshold = int(eval_fraction * VALIDATION_BUCKETS)
    keyed = sorted(docs, key=lambda kd: _bucket(kd[0]))
    validation = [d for k, d in keyed if _bucket(k) < threshold]
    train = [d for k, d in keyed if _bucket(k) >= threshold]
    if not validation:  # few documents: hold out the one with the smallest hash
        validation, train = [keyed[0][1]], [d for _, d in keyed[1:]]
    if not train:
        train, validation = [d for _, d in keyed[:-1]], [keyed[-1][1]]
    return {"train": train, "validation": validation}


def _import_tfds() -> Any:
    # tfds is heavy to import and chatty; import it only when files are prepared or read.
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    logging.getLogger("absl").setLevel(logging.ERROR)
    return tfds


def _builder_class() -> type:
    tfds = _import_tfds()
    registered = getattr(_builder_class, "cls", None)
    if registered is not None:
        return registered

    class TextFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Local text files as a tfds dataset of ``{'text': str}`` documents."""

        VERSION = tfds.core.Version("1.0.0")

        def __init__(self, *, splits: dict[str, list[str]] | None = None, **kwargs: Any) -> None:
            self._splits = splits
            super().__init__(**kwargs)

        def _info(self) -> Any:
            return tfds.core.DatasetInfo(
                builder=self,
                description="Local text files prepared by jaxlm.",
                features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            )

        def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
            assert self._splits is not None
            return {name: self._generate_examples(docs) for name, docs in self._splits.items()}

        def _generate_examples(self, docs: list[str]) -> Iterator[tuple[int, dict[str, str]]]:
            for i, text in enumerate(docs):
                yield i, {"text": text}

    _builder_class.cls = TextFiles  # type: ignore[attr-defined]
    return TextFiles


def _fingerprint(files: Sequence[str], eval_files: Sequence[str], document: str, eval_fraction: float) -> str:
    h = hashlib.sha256()
    for path in list(files) + ["--eval--"] + list(eval_files):
        st = os.stat(path) if os.path.exists(path) else None
        h.update(json.dumps([path, st.st_size if st else -1, st.st_mtime_ns if st else -1]).encode())
    h.update(json.dumps([document, eval_fraction]).encode())
    return "h" + h.hexdigest()[:16]


def prepare_text_files(
    files: Sequence[str], eval_files: Sequence[str], document: str, eval_fraction: float, data_dir: str
) -> dict[str, TextSource]:
    """Prepare (once) and open the train/validation splits of local text files."""
    tfds = _import_tfds()
    data_dir = os.path.expanduser(data_dir or default_data_dir())
    try:
        os.makedirs(data_dir, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"config.data.data_dir={data_dir!r} cannot be created ({e.strerror}); pick a writable directory"
        ) from e
    name = _fingerprint(files, eval_files, document, eval_fraction)
    cls = _builder_class()
    config = tfds.core.BuilderConfig(name=name, description=f"{len(files)} files, document={document}")
    builder = cls(config=config, data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        builder = cls(
            splits=split_corpus(files, document, eval_fraction, eval_files),
            config=config,
            data_dir=data_dir,
            file_format="array_record",
        )
        builder.download_and_prepare()
    return {split: builder.as_data_source(split=split) for split in ("train", "validation")}


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


def synthetic_sources(cfg: DataConfig) -> dict[str, TextSource]:
    """In-memory train/validation text from a synthetic source of known statistics."""
    s = cfg.synthetic
    if s.vocab_size > len(MARKOV_ALPHABET):
        raise DataError(f"config.data.synthetic.vocab_size={s.vocab_size} exceeds {len(MARKOV_ALPHABET)}")
    transition, stationary = markov_chain(s.vocab_size, s.concentration, s.seed)
    return {
        "train": ListSource([markov_text(transition, stationary, s.num_train_tokens, s.seed + 1)]),
        "validation": ListSource([markov_text(transition, stationary, s.num_eval_tokens, s.seed + 2)]),
    }


def open_sources(cfg: DataConfig) -> dict[str, TextSource]:
    """The train and validation sources named by ``config.data``."""
    if cfg.source == "synthetic":
        return synthetic_sources(cfg)
    if cfg.source == "builtin":
        files = builtin_files()
        if not files:
            raise DataError("config.data.source='builtin' found no standard-library sources; use source='files'")
    elif cfg.source == "files":
        files = expand_globs(cfg.files, "config.data.files")
    else:
        raise DataError(f"config.data.source={cfg.source!r} is not available yet; use builtin, files or synthetic")
    eval_files = expand_globs(cfg.eval_files, "config.data.eval_files") if cfg.eval_files.strip() else []
    return prepare_text_files(files, eval_files, cfg.document, cfg.eval_fraction, cfg.data_dir)
