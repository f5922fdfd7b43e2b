import ast
import builtins
import dataclasses
import keyword
import os
import textwrap

import numpy as np
import pytest

from jaxlm.common_types import DataError
from jaxlm.config_lib import DataConfig
from jaxlm.data import builtin_tasks, pipeline, sources, tokenizers
from jaxlm.data.objectives_tasks import bio_labels

TOK = tokenizers.ByteTokenizer()

MODULE = textwrap.dedent(
    '''\
    """Module docstring."""
    import os


    def first(x):
        """Add one to a number.

        More text that is not the summary.
        """
        y = x + 1
        return y


    def second(path):
        """Return the base name of a path."""
        name = os.path.basename(path)
        return name.upper()


    class Box:
        """A box."""

        def only_doc(self):
            """Do nothing at all."""

        def third(self, items):
            """Count the items in the box."""
            total = 0
            for _ in items:
                total += 1
            return total

        def fourth(self):
            return len(self.items)
    '''
)


@pytest.fixture
def module_file(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text(MODULE)
    return str(path)


def _stdlib(*names):
    return [os.path.join(builtin_tasks.stdlib_dir(), n) for n in names]


def test_token_tags_follow_tokenize_keyword_and_builtins(tmp_path):
    path = tmp_path / "t.py"
    path.write_text('def f(x):  # add one\n    return len(x) + 1.5, "a b"\n')
    (record,) = builtin_tasks.token_records(str(path))
    expected = [
        ("def", "B-KEYWORD"),
        ("f", "B-NAME"),
        ("(", "O"),
        ("x", "B-NAME"),
        (")", "O"),
        (":", "O"),
        ("#", "B-COMMENT"),
        ("add", "I-COMMENT"),
        ("one", "I-COMMENT"),
        ("return", "B-KEYWORD"),
        ("len", "B-BUILTIN"),
        ("(", "O"),
        ("x", "B-NAME"),
        (")", "O"),
        ("+", "O"),
        ("1.5", "B-NUMBER"),
        (",", "O"),
        ('"a', "B-STRING"),
        ('b"', "I-STRING"),
    ]
    assert list(zip(record["tokens"], record["tags"])) == expected


def test_token_chunks_are_whole_lines_and_bounded():
    records = builtin_tasks.token_records(_stdlib("bisect.py")[0])
    assert len(records) > 5
    tags = set(bio_labels(builtin_tasks.ENTITY_TYPES))
    for r in records:
        assert 0 < len(r["tokens"]) == len(r["tags"]) <= builtin_tasks.TOKEN_CHUNK_WORDS
        assert set(r["tags"]) <= tags and not r["tags"][0].startswith("I-")
    # Every NAME tag is a Python name that is neither a keyword nor a builtin.
    names = [w for r in records for w, t in zip(r["tokens"], r["tags"]) if t == "B-NAME"]
    assert names and all(w.isidentifier() and w not in dir(builtins) and not keyword.iskeyword(w) for w in names)


def test_summary_drops_docstrings_and_targets_the_first_line(module_file):
    records = builtin_tasks.summary_records(module_file)
    by_target = {r["target"]: r["source"] for r in records}
    # only_doc has no body left (fewer than MIN_SOURCE_LINES lines); fourth has no docstring.
    assert set(by_target) == {"Add one to a number.", "Return the base name of a path.", "Count the items in the box."}
    src = by_target["Count the items in the box."]
    assert src.startswith("def third(self, items):\n    total = 0") and '"""' not in src
    ast.parse(src)  # still valid Python, dedented


def test_qa_answer_is_the_name_where_the_function_is_defined(module_file):
    records = builtin_tasks.qa_records(module_file)
    assert {r["question"] for r in records} == {
        "Add one to a number.",
        "Return the base name of a path.",
        "Do nothing at all.",
        "Count the items in the box.",
    }
    for r in records:
        (name,), (start,) = r["answers"]["text"], r["answers"]["answer_start"]
        assert r["context"][start : start + len(name)] == name
        assert r["context"][:start].endswith("def ")
        assert r["question"] not in r["context"] and '"""' not in r["context"]
        assert r["context"].count("def ") >= 2  # several functions
        assert len(r["context"]) <= builtin_tasks.MAX_CONTEXT_CHARS
    only_doc = next(r for r in records if r["question"] == "Do nothing at all.")
    assert "def only_doc(self):\n    ...\n" in only_doc["context"]  # a docstring-only body becomes ...


def test_qa_records_feed_the_qa_objective(module_file):
    records = builtin_tasks.qa_records(module_file)
    batch = next(iter(pipeline.qa_dataset(records, TOK, seq_len=512, batch_size=len(records), seed=0, shuffle=False)))
    for row, r in zip(range(len(records)), records):
        s, e = int(batch["start_position"][row]), int(batch["end_position"][row])
        assert TOK.decode(batch["inputs"][row, s : e + 1].tolist()) == r["answers"]["text"][0]


def test_topic_labels_are_frequent_packages_and_records_carry_them():
    labels = builtin_tasks.topic_labels()
    assert len(labels) == builtin_tasks.TOPIC_LABELS == len(set(labels))
    assert "asyncio" in labels and "encodings" not in labels
    records = builtin_tasks.topic_records(_stdlib(os.path.join("asyncio", "locks.py"))[0])
    assert len(records) > 10 and {r["label"] for r in records} == {"asyncio"}
    for r in records:
        assert r["text"].startswith(("def ", "async def ")) and len(r["text"]) <= builtin_tasks.MAX_SOURCE_CHARS
        assert len(r["text"].splitlines()) >= builtin_tasks.MIN_SOURCE_LINES
    assert builtin_tasks.topic_records(_stdlib("bisect.py")[0]) == []  # not a package
    opts = builtin_tasks.builtin_task_options("builtin_code_topic")
    batch = next(
        iter(pipeline.classification_dataset(records[:4], TOK, seq_len=64, batch_size=4, seed=0, shuffle=False, **opts))
    )
    np.testing.assert_array_equal(batch["label"], [labels.index("asyncio")] * 4)


def test_package_files_leave_out_tests():
    files = builtin_tasks.package_files()
    assert files and all(os.sep + "test" + os.sep not in f and "idle_test" not in f for f in files)


def test_split_is_by_file_deterministic_and_disjoint():
    files = sources.builtin_files()[:12]
    a = builtin_tasks.split_files(files, 0.2)
    b = builtin_tasks.split_files(list(reversed(files)), 0.2)
    assert a == b and not set(a["train"]) & set(a["validation"])
    assert sorted(a["train"] + a["validation"]) == sorted(files) and a["validation"]
    built = builtin_tasks.build_task("builtin_code_summary", 0.2, files)
    per_file = {f: builtin_tasks.summary_records(f) for f in files}
    assert any(not r for r in per_file.values())  # files without records take no part in the split
    s = builtin_tasks.split_files([f for f in files if per_file[f]], 0.2)
    assert built["validation"] == [r for f in s["validation"] for r in per_file[f]]
    assert built["train"] == [r for f in s["train"] for r in per_file[f]]


def test_options_and_unknown_names():
    assert builtin_tasks.builtin_task_options("builtin_code_tokens") == {
        "labels": bio_labels(["KEYWORD", "BUILTIN", "NAME", "NUMBER", "STRING", "COMMENT"])
    }
    assert builtin_tasks.builtin_task_options("builtin_code_qa") == {}
    assert builtin_tasks.builtin_task_options("builtin_code_summary") == {}
    with pytest.raises(DataError, match=r"config.data.name='nope' is not a built-in task \(builtin_code_topic, "):
        builtin_tasks.lookup("nope")


def _data_config(name, data_dir):
    from jaxlm import config_lib

    c = config_lib.base_config()
    c.data.source, c.data.name, c.data.data_dir, c.data.eval_fraction = "builtin", name, str(data_dir), 0.3
    return config_lib.validate(c).data


@pytest.mark.parametrize("name", sorted(builtin_tasks.BUILTIN_TASKS))
def test_open_sources_prepares_each_task_once_through_tfds(name, tmp_path, monkeypatch):
    few = {
        "builtin_code_topic": [
            os.path.join(*p.split("/"))
            for p in ("asyncio/locks.py", "asyncio/queues.py", "email/charset.py", "email/feedparser.py")
        ],
    }.get(name, ["bisect.py", "shlex.py", "textwrap.py", "fnmatch.py"])
    task = dataclasses.replace(builtin_tasks.BUILTIN_TASKS[name], files=lambda: _stdlib(*few))
    monkeypatch.setitem(builtin_tasks.BUILTIN_TASKS, name, task)
    cfg = _data_config(name, tmp_path)
    assert isinstance(cfg, DataConfig)
    srcs = sources.open_sources(cfg)
    expected = builtin_tasks.build_task(name, 0.3, _stdlib(*few))
    for split in ("train", "validation"):
        assert len(srcs[split]) == len(expected[split]) > 0
    record = srcs["train"][0]
    assert set(record) == set(task.spec)
    # Batches of the task's objective come out of the prepared records.
    opts = builtin_tasks.builtin_task_options(name)
    ds = pipeline.objective_builder(task.objective)(
        srcs["train"], TOK, seq_len=128, batch_size=2, seed=0, shuffle=True, **opts
    )
    batch = next(iter(ds))
    assert batch["inputs"].shape == (2, 128)
    again = sources.open_sources(cfg)  # read back, not rebuilt
    assert len(again["train"]) == len(srcs["train"])


def test_topic_split_holds_out_files_of_every_package():
    root = builtin_tasks.stdlib_dir()
    files = [f for f in builtin_tasks.package_files() if builtin_tasks.package_of(f) in ("json", "email", "asyncio")]
    split = builtin_tasks.split_files(files, 0.1, by_package=True)
    for split_files in split.values():
        assert {os.path.relpath(f, root).split(os.sep)[0] for f in split_files} == {"json", "email", "asyncio"}
    assert sorted(split["train"] + split["validation"]) == sorted(files)
    held = {p: sum(builtin_tasks.package_of(f) == p for f in split["validation"]) for p in ("json", "email", "asyncio")}
    total = {p: sum(builtin_tasks.package_of(f) == p for f in files) for p in held}
    assert held == {p: max(1, round(0.1 * n)) for p, n in total.items()}
    assert builtin_tasks.split_files(list(reversed(files)), 0.1, by_package=True) == split


def test_form_feeds_do_not_shift_lines(tmp_path):
    # str.splitlines() cuts at a form feed, the parser does not: the answer must still be the name.
    path = tmp_path / "ff.py"
    path.write_text(MODULE.replace("\n\ndef second", "\n\x0c\ndef second"))
    records = builtin_tasks.qa_records(str(path))
    assert len(records) == 4
    for r in records:
        (name,), (start,) = r["answers"]["text"], r["answers"]["answer_start"]
        assert r["context"][start : start + len(name)] == name
    assert any(r["source"].startswith("def second(path):") for r in builtin_tasks.summary_records(str(path)))
