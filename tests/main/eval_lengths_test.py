"""``jaxlm eval --lengths``: perplexity per evaluation length, and the learned-positions limit."""

import json
import os

import numpy as np
import pytest

from jaxlm import cli, config_lib
from jaxlm.main import evaluate, train


def _train(tmp_path, text_corpus, position):
    c = config_lib.load_config_file("configs/gpt.py:size=tiny")
    c.model.position = position
    c.model.max_len = 32
    c.model.num_layers = 1
    c.data.seq_len = 32
    c.data.batch_size = 8
    c.data.source = "files"
    c.data.files = text_corpus
    c.data.data_dir = str(tmp_path / "d")
    c.train.num_steps = 2
    c.train.eval_steps = 1
    c.train.progress = False
    cfg = config_lib.validate(c)
    workdir = str(tmp_path / position)
    train.run(cfg, workdir)
    return cfg, workdir


def test_perplexity_per_length_and_learned_limit(tmp_path, text_corpus, capsys):
    cfg, workdir = _train(tmp_path, text_corpus, "alibi")
    capsys.readouterr()
    results = evaluate.run_lengths(cfg, workdir, [16, 32, 64], max_steps=2)
    assert sorted(results) == [16, 32, 64]
    for r in results.values():
        # exp of the loss to float64 rounding (math.exp and np.exp may differ in the last bit)
        assert np.isfinite(r["eval_loss"]) and r["eval_perplexity"] == pytest.approx(np.exp(r["eval_loss"]), rel=1e-12)
    # Length 32 is the plain evaluation at the training length.
    plain = evaluate.run(cfg, workdir, max_steps=2)
    np.testing.assert_allclose(results[32]["eval_loss"], plain["eval_loss"], rtol=1e-6)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    assert any("eval_len64_perplexity" in r for r in logged)

    assert cli.execute(["eval", "--workdir", workdir, "--lengths", "16,64", "--config.train.eval_steps=1"]) == 0
    assert "perplexity" in capsys.readouterr().out

    _, learned = _train(tmp_path, text_corpus, "learned")
    capsys.readouterr()
    for lengths, message in [("16,64", "learned positions"), ("a,b", "comma-separated integers"), ("1", ">= 2")]:
        assert cli.execute(["eval", "--workdir", learned, "--lengths", lengths]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
