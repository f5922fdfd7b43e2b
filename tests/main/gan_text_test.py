"""``configs/seqgan.py:data=builtin`` on real text: line documents, held-out NLL_test / BLEU / Self-BLEU
logged with their implementation, and ``jaxlm generate --format text`` detokenizes samples.

The text comes from ``config.data.files`` (a generated file), the documented alternative to the
built-in corpus, so the test does not pay for tokenizing the whole standard library."""

import os
import random

import numpy as np

from jaxlm import cli, config_lib
from jaxlm.data import tokenizers
from jaxlm.main import gan
from jaxlm.metric_writer import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQGAN = os.path.join(REPO, "configs", "seqgan.py")
WORDS = "the parser returns a list of names for each file path when given an object".split()


def test_text_gan_trains_on_lines_and_generates_text(tmp_path, capsys):
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(400)]
    text = tmp_path / "lines.txt"
    text.write_text("\n".join(lines) + "\n")
    c = config_lib.load_config_file(f"{SEQGAN}:data=builtin,size=tiny")
    assert c.data.document == "line" and c.data.source == "builtin"
    c.train.progress = False
    config_lib.apply_overrides(c, {"data.source": "files", "data.files": str(text), "data.eval_fraction": "0.2"})
    cfg = config_lib.validate(c)
    workdir = tmp_path / "w"
    last = gan.run(cfg, str(workdir), stream=open(os.devnull, "w"))

    # Real-text metrics: NLL on held-out lines, BLEU-2..5 against them, Self-BLEU, distinct-n.
    assert np.isfinite(last["nll_test"]) and "nll_oracle" not in last
    for n in range(2, 6):
        assert 0.0 <= last[f"bleu{n}"] <= 1.0 and 0.0 <= last[f"self_bleu{n}"] <= 1.0
    assert last["bleu2"] >= last["bleu5"]  # geometric means over longer n-grams can only shrink
    assert "nltk" in last["bleu_impl"] and "method1" in last["bleu_impl"]
    assert any("g_pg_loss" in r for r in read_metrics(str(workdir)))

    capsys.readouterr()
    assert cli.run(["generate", "--workdir", str(workdir), "--format", "text", "--num_samples", "3"]) == 0
    texts = capsys.readouterr().out.rstrip("\n").split("\n")
    assert cli.run(["generate", "--workdir", str(workdir), "--format", "ids", "--num_samples", "3"]) == 0
    ids = [[int(t) for t in line.split()] for line in capsys.readouterr().out.strip().splitlines()]
    # One sample per line (an untrained G may sample a line break: it becomes a space), and the text
    # is the detokenized id sequence up to the first end-of-sequence id (same seed, same samples).
    tokenizer = tokenizers.load(str(workdir))
    assert len(texts) == len(ids) == 3 and all(len(row) == cfg.data.seq_len for row in ids)
    for text, row in zip(texts, ids):
        end = row.index(tokenizer.eos_id) if tokenizer.eos_id in row else len(row)
        assert text.split() == tokenizer.decode(np.asarray(row[:end])).split()
