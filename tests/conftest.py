"""Test setup: 8 simulated CPU devices so every sharding path runs on CPU."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from jaxlm import config_lib  # noqa: E402


@pytest.fixture
def tiny_config(tmp_path):
    """A validated-able tiny GPT ConfigDict whose datasets are prepared under tmp_path."""
    c = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), "..", "configs", "gpt.py") + ":size=tiny")
    c.data.data_dir = str(tmp_path / "datasets")
    c.train.progress = False
    return c


@pytest.fixture
def text_corpus(tmp_path):
    """A small corpus of several text files; returns the glob."""
    d = tmp_path / "corpus"
    d.mkdir()
    words = "the quick brown fox jumps over the lazy dog and runs away into the forest".split()
    for i in range(12):
        lines = [" ".join(words[(i + j) % len(words) :] + words[: (i + j) % len(words)]) for j in range(40)]
        (d / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n")
    return str(d / "*.txt")
