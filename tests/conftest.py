"""Test setup: 8 simulated CPU devices so every sharding path runs on CPU; one compilation cache per session."""

import atexit
import glob
import os
import shutil
import tempfile

from subprocess_env import TEST_XLA_LEVEL

# XLA:CPU backend optimization level 1 instead of 3: tests check numerics and behaviour on tiny
# shapes, where compiling dominates; level 1 compiles faster (10-30% less CPU per test file,
# 2-core AVX2 EPYC) and the programs compute the same values within every test's tolerance.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count=8 {TEST_XLA_LEVEL}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _remove_orphaned_caches() -> None:
    """Delete the session caches (below) whose owner died: a pytest killed with SIGKILL never runs atexit.

    A cache directory's name carries the pid of the process that made it.
    """
    for path in glob.glob(os.path.join(tempfile.gettempdir(), "jaxlm-tests-xla-*-*")):
        pid = os.path.basename(path).split("-")[3]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:  # no such process: nobody will delete it
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


# JAX's persistent compilation cache in a directory made for this test session, empty at its
# start and deleted at its end, so nothing carries over between runs (a run costs what it costs on
# a fresh machine). Many tests build the same small programs (the tiny configs' train and eval
# steps, eager ops); with the cache each is compiled once per session instead of once per test.
# xdist workers and the `jaxlm` subprocesses tests start inherit the variables and share the
# directory; the process that made it (the first to import this file) deletes it. JAX opens its
# cache at a process's first compilation, in the directory configured then, so a later
# `jax_compilation_cache_dir` update (train.run's config.train.compile_cache_dir) changes nothing.
if "JAXLM_TEST_COMPILE_CACHE" not in os.environ:
    _remove_orphaned_caches()
    os.environ["JAXLM_TEST_COMPILE_CACHE"] = tempfile.mkdtemp(prefix=f"jaxlm-tests-xla-{os.getpid()}-")
    atexit.register(shutil.rmtree, os.environ["JAXLM_TEST_COMPILE_CACHE"], ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["JAXLM_TEST_COMPILE_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import pytest  # noqa: E402
import small_programs  # noqa: E402

from jaxlm import config_lib  # noqa: E402

if os.environ.get("JAXLM_TESTS_CHEAP_SMALL_PROGRAMS", "1") != "0":  # 0: compile them like the rest (A/B)
    small_programs.install()


@pytest.fixture(scope="session", autouse=True)
def _session_compile_cache():
    """Open the session's compilation cache before any test runs.

    JAX opens its cache at the first compilation, in the directory configured then; an in-process
    ``train.run`` points ``jax_compilation_cache_dir`` at its own default first thing, so without
    this a process whose first test trains would cache there instead.
    """
    import jax

    jax.jit(lambda x: x + 1)(0).block_until_ready()
    assert jax.config.jax_compilation_cache_dir == os.environ["JAXLM_TEST_COMPILE_CACHE"]


@pytest.fixture(autouse=True)
def _one_device_unless_the_test_shards(request, monkeypatch):
    """Meshes of the default shape (every axis -1 or 1) use one device, unless the test is marked ``all_devices``.

    The 8 simulated devices exist so that sharding runs on CPU; a tiny model's step split over
    them costs 1.5x the wall time of one device (300 tiny steps: 22.5 vs 14.5 s, 2-core AVX2 EPYC)
    and tests nothing that the sharding tests, which name their meshes or are marked, do not.
    A config that fixes an axis above 1 gets every device as in a real run.
    """
    if request.node.get_closest_marker("all_devices"):
        return
    import jax

    from jaxlm import sharding

    original = sharding.make_mesh

    def make_mesh(cfg, devices=None):
        sizes = [*cfg.shape.values(), *cfg.dcn_shape.values()]
        if devices is None and all(size in (-1, 1) for size in sizes):
            devices = jax.devices()[:1]
        return original(cfg, devices)

    monkeypatch.setattr(sharding, "make_mesh", make_mesh)


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


# The longest test files (seconds per file from `pytest --durations`, 2-core AVX2 EPYC), started
# first: with `--dist loadfile` a worker takes the next file when it is free, so a long file
# collected last would run alone at the end while the other worker idles.
LONGEST_FILES_FIRST = (
    "tests/sharding_test.py",
    "tests/main/gan_train_test.py",
    "tests/main/multihost_test.py",
    "tests/peft_modules_test.py",
    "tests/main/finetune_recipes_test.py",
    "tests/main/crash_test.py",
    "tests/main/finetune_test.py",
    "tests/models/vocab_padding_test.py",
    "tests/models/transformer_test.py",
    "tests/main/train_test.py",
    "tests/nn/long_context_models_test.py",
    "tests/peft_test.py",
    "tests/nn/ring_test.py",
)


def pytest_collection_modifyitems(config, items):
    """Move the longest files to the front, keeping the order of tests within each file."""
    rank = {path: i for i, path in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
