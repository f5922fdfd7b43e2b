"""The fine-tuning recipes of configs/finetune.py: every task's batches, offline.

Catalog datasets come from ``tfds.testing.mock_data`` (records shaped as the real builders
decode them; no network, no TensorFlow); the built-in tasks read a few standard-library files.
"""

import contextlib
import dataclasses
import io
import os
import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxlm import config_lib
from jaxlm.common_types import ConfigError
from jaxlm.data import builtin_tasks, catalog, pipeline, sources, tokenizers

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "finetune.py")
TOK = tokenizers.ByteTokenizer()

_CONTEXT = b"The cat sat on the mat by the door."
# What each catalog builder (by its name) decodes one record to (the tfds feature names).
CATALOG_RECORDS = {
    "glue": [
        {"sentence": b"a dull film", "label": np.int64(0), "idx": np.int32(0)},
        {"sentence": b"a fine, warm film", "label": np.int64(1), "idx": np.int32(1)},
    ],
    "conll2003": [
        {"tokens": [b"EU", b"rejects", b"German", b"call"], "ner": [3, 0, 7, 0], "pos": [1, 2, 3, 4], "chunks": [1] * 4}
    ],
    "squad": [
        {
            "id": b"1",
            "title": b"Cats",
            "context": _CONTEXT,
            "question": b"Where did the cat sit?",
            "answers": {"text": [b"on the mat"], "answer_start": [np.int32(_CONTEXT.index(b"on the mat"))]},
        }
    ],
    "wmt14_translate": [{"de": b"Hallo Welt", "en": b"Hello world"}],
    "cnn_dailymail": [
        {"article": b"A long article about cats.", "highlights": b"Cats.", "id": b"1", "publisher": b"cnn"}
    ],
}
# A few standard-library files per built-in task, so preparing takes a second.
BUILTIN_FILES = {
    "builtin_code_topic": [
        os.path.join(*p.split("/"))
        for p in ("asyncio/locks.py", "asyncio/queues.py", "email/charset.py", "email/feedparser.py")
    ],
}
DEFAULT_FILES = ["bisect.py", "shlex.py", "textwrap.py", "fnmatch.py"]
RECIPES = ["code_topic", "code_tokens", "code_qa", "code_summary", "sst2", "conll2003", "squad", "wmt14_de_en"]
RECIPES += ["cnn_dailymail"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def few_stdlib_files(monkeypatch):
    """Built-in tasks over a few standard-library files (the whole library takes ~10-30 s per task)."""
    root = builtin_tasks.stdlib_dir()
    for name, task in builtin_tasks.BUILTIN_TASKS.items():
        paths = [os.path.join(root, p) for p in BUILTIN_FILES.get(name, DEFAULT_FILES)]
        monkeypatch.setitem(builtin_tasks.BUILTIN_TASKS, name, dataclasses.replace(task, files=lambda p=paths: p))


def recipe(task: str, tmp_path, **overrides) -> config_lib.Config:
    c = config_lib.load_config_file(f"{CONFIG}:task={task},size=tiny")
    c.data.data_dir = str(tmp_path / "datasets")
    c.data.eval_fraction = 0.3
    c.train.progress = False
    for key, value in overrides.items():
        section, field = key.split("__")
        setattr(c[section], field, value)
    return config_lib.validate(c)


def mock_catalog(cfg: config_lib.Config):
    """tfds' mock_data serving :data:`CATALOG_RECORDS` for a catalog recipe (nothing for a built-in task)."""
    if cfg.data.source != "tfds":
        return contextlib.nullcontext()

    def as_data_source(builder, split, **kwargs):
        return CATALOG_RECORDS[builder.name] * 4

    return tfds.testing.mock_data(as_data_source_fn=as_data_source)


def batch_options(cfg: config_lib.Config) -> dict:
    """The objective options of a recipe, from the data layer (the trainer adds the same from config.task)."""
    d, t = cfg.data, cfg.task
    if d.source == "builtin":
        options = builtin_tasks.builtin_task_options(d.name)
    else:
        options = catalog.objective_options(d.name, d.data_dir)
    if d.objective == "seq2seq":
        options |= {"targets_len": t.targets_len, "prefix": t.prefix}
    if d.objective == "qa":
        options |= {"max_question_len": t.max_question_len, "impossible": t.qa_impossible}
    return options


@pytest.mark.parametrize("task", RECIPES)
def test_every_recipe_batches_out_of_the_data_pipeline(task, tmp_path, few_stdlib_files):
    cfg = recipe(task, tmp_path)
    with mock_catalog(cfg):
        srcs = sources.open_sources(cfg.data)
        options = batch_options(cfg)
    assert len(srcs["train"]) > 0 and len(srcs["validation"]) > 0
    ds = pipeline.objective_builder(cfg.data.objective)(
        srcs["validation"], TOK, seq_len=cfg.data.seq_len, batch_size=2, seed=0, shuffle=False, prefetch=0, **options
    )
    batch = next(iter(ds))
    assert batch["inputs"].shape == (2, cfg.data.seq_len)
    if cfg.data.objective == "classification":
        assert batch["label"].shape == (2,) and 0 <= batch["label"].min() and batch["label"].max() < 8
    if cfg.data.objective == "token_classification":
        assert (batch["weights"].sum(axis=1) > 0).all()
    if cfg.data.objective == "qa":
        assert (batch["end_position"] >= batch["start_position"]).all()
    if cfg.data.objective == "seq2seq":
        assert batch["targets"].shape == (2, cfg.task.targets_len)
        if cfg.task.prefix:
            assert TOK.decode(batch["inputs"][0, : len(cfg.task.prefix)].tolist()) == cfg.task.prefix


def test_recipe_defaults_and_bad_arguments(tmp_path):
    assert recipe("code_topic", tmp_path).model.kind == "encoder_only"
    assert recipe("code_summary", tmp_path).model.kind == "encoder_decoder"
    gpt = config_lib.validate(config_lib.load_config_file(f"{CONFIG}:task=sst2,model=gpt,size=small"))
    assert gpt.model.kind == "decoder_only" and gpt.data.seq_len <= gpt.model.max_len
    # The model section is the pretraining config's, so init_from finds the same shapes.
    bert = config_lib.load_config_file(os.path.join(os.path.dirname(CONFIG), "bert.py:size=small"))
    ft = config_lib.load_config_file(f"{CONFIG}:task=squad,model=bert,size=small")
    assert ft.model.to_dict() == bert.model.to_dict()
    with pytest.raises(ConfigError, match=r"task=code_qa \(qa\) trains model=bert\|gpt, not t5"):
        config_lib.load_config_file(f"{CONFIG}:task=code_qa,model=t5")
    with pytest.raises(ConfigError, match="task='mnli' is not one of: code_topic"):
        config_lib.load_config_file(f"{CONFIG}:task=mnli")
    with pytest.raises(ConfigError, match="unknown argument 'steps'"):
        config_lib.load_config_file(f"{CONFIG}:task=sst2,steps=3")


# The metric each objective's evaluation must report (jaxlm/evaluation.py), besides eval_loss.
EVAL_METRIC = {
    "classification": "eval_accuracy",
    "token_classification": "eval_f1",
    "qa": "eval_exact_match",
    "seq2seq": "eval_bleu",
}
TINY_MODEL = dict(
    model__num_layers=1,
    model__embed_dim=32,
    model__mlp_dim=64,
    model__num_heads=2,
    data__seq_len=48,
    task__max_question_len=16,
    train__num_steps=2,
    train__eval_every=0,
    train__eval_steps=1,
)


@pytest.mark.slow
@pytest.mark.parametrize("task", RECIPES)
def test_every_recipe_trains_a_few_steps_and_reports_its_metrics(task, tmp_path, few_stdlib_files):
    from jaxlm.main import train

    # Recipes of the same shapes compile once through the session's compilation cache (conftest.py).
    overrides = dict(TINY_MODEL)
    if config_lib.load_config_file(f"{CONFIG}:task={task},size=tiny").model.kind == "encoder_decoder":
        overrides |= dict(model__num_decoder_layers=1, task__targets_len=16, decode__max_new_tokens=16)
    cfg = recipe(task, tmp_path, **overrides)
    with mock_catalog(cfg):
        out = train.run(cfg, str(tmp_path / "run"), stream=io.StringIO())
    assert np.isfinite(out["loss"]) and np.isfinite(out["eval_loss"])
    assert EVAL_METRIC[cfg.data.objective] in out
