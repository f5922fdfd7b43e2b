import os

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
