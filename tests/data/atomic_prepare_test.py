"""kill -9 in the middle of preparing a dataset (the tfds array_record build) leaves nothing a later
run takes for complete, and the next run rebuilds it; two runs preparing at once both succeed."""

import glob
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from jaxlm.data import sources

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PREPARE = (
    "import glob, sys; from jaxlm.data import sources; "
    "sources.prepare_text_files(sorted(glob.glob(sys.argv[1])), [], 'line', 0.05, sys.argv[2])"
)


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(60):  # ~24k line documents: a few seconds of preparation
        (d / f"{i:02d}.txt").write_text("".join(f"line {i} {j} with a few words of text\n" for j in range(400)))
    return str(d / "*.txt")


def _prepared_dirs(data_dir):
    return [os.path.dirname(p) for p in glob.glob(os.path.join(data_dir, "text_files", "*", "*", "dataset_info.json"))]


def _incomplete(data_dir):
    return glob.glob(os.path.join(data_dir, "text_files", "*", "incomplete*"))


@pytest.mark.slow
def test_kill_9_during_preparation_leaves_nothing_complete_and_the_next_run_rebuilds(corpus, tmp_path):
    data_dir = str(tmp_path / "data")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-c", PREPARE, corpus, data_dir], env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not _incomplete(data_dir):
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    time.sleep(0.3)  # well inside the write: records are being generated into the incomplete directory
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert _incomplete(data_dir)  # the half-written copy stays where nothing reads it
    assert _prepared_dirs(data_dir) == []  # and nothing looks complete
    # The next run rebuilds, and gets what an undisturbed preparation gets.
    splits = sources.prepare_text_files(sorted(glob.glob(corpus)), [], "line", 0.05, data_dir)
    clean = sources.prepare_text_files(sorted(glob.glob(corpus)), [], "line", 0.05, str(tmp_path / "clean"))
    assert len(_prepared_dirs(data_dir)) == 1
    for split in ("train", "validation"):
        assert len(splits[split]) == len(clean[split]) > 0
        assert (
            splits[split][0] == clean[split][0]
            and splits[split][len(clean[split]) - 1] == clean[split][len(clean[split]) - 1]
        )


def test_two_preparations_of_the_same_files_at_once_both_succeed(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(8):
        (d / f"{i}.txt").write_text("".join(f"line {i} {j}\n" for j in range(50)))
    files = sorted(glob.glob(str(d / "*.txt")))
    results, errors = [], []

    def prepare():
        try:
            results.append(sources.prepare_text_files(files, [], "line", 0.1, str(tmp_path / "data")))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=prepare) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert [len(r["train"]) for r in results] == [len(results[0]["train"])] * 2


def test_a_preparation_that_finds_another_runs_copy_already_written_reads_it(tmp_path, monkeypatch):
    # The interleaving behind the two-threads case made deterministic: this run built its writer
    # before the other run's rename and calls download_and_prepare after it, when tfds returns
    # "Reusing dataset" without loading the split metadata into this run's builder.
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(4):
        (d / f"{i}.txt").write_text("".join(f"line {i} {j}\n" for j in range(50)))
    files, data_dir = sorted(glob.glob(str(d / "*.txt"))), str(tmp_path / "data")
    cls = sources.builder_class()
    original = cls.download_and_prepare

    def other_run_finishes_first(self, *args, **kwargs):
        monkeypatch.setattr(cls, "download_and_prepare", original)
        other = cls(
            splits=self._splits,
            spec=self._spec,
            config=self.builder_config,
            data_dir=data_dir,
            file_format="array_record",
        )
        other.download_and_prepare()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "download_and_prepare", other_run_finishes_first)
    splits = sources.prepare_text_files(files, [], "line", 0.1, data_dir)
    clean = sources.prepare_text_files(files, [], "line", 0.1, str(tmp_path / "clean"))
    assert len(_prepared_dirs(data_dir)) == 1
    for split in ("train", "validation"):
        assert len(splits[split]) == len(clean[split]) > 0
        assert splits[split][0] == clean[split][0]
