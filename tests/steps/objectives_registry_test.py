"""The objective registry: one name set across the data, step and metric layers and the config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config_lib, evaluation
from jaxlm.common_types import ConfigError
from jaxlm.data import pipeline
from jaxlm.steps import objectives, tasks


def test_every_objective_has_every_entry_in_every_layer():
    names = set(config_lib.CHOICES["data.objective"])
    assert set(pipeline.OBJECTIVES) == names
    assert set(objectives.OBJECTIVES) == names
    assert set(evaluation.METRICS) == names
    for name, entry in objectives.OBJECTIVES.items():
        assert callable(entry.loss) and callable(entry.evaluate) and callable(entry.example_args), name


def test_unknown_objective_is_one_line_listing_the_valid_names():
    with pytest.raises(ConfigError, match=r"config.data.objective='mlm' is not one of: causal_lm, masked_lm") as e:
        objectives.get("mlm")
    assert "\n" not in str(e.value)
    c = config_lib.base_config()
    c.data.objective = "mlm"
    with pytest.raises(ConfigError, match="is not one of"):
        config_lib.validate(c)


def test_reduce_weights_every_item_equally_however_batched():
    pairs = [{"loss": (6.0, 3.0), "acc": (1.0, 2.0)}, {"loss": (2.0, 1.0), "acc": (0.0, 0.0)}]
    assert evaluation.reduce(pairs) == {"loss": 2.0, "acc": 0.5}


def test_best_span_is_the_exhaustive_argmax_within_the_context():
    rng = np.random.default_rng(0)
    b, t, max_len = 4, 9, 3
    start, end = rng.normal(size=(b, t)).astype(np.float32), rng.normal(size=(b, t)).astype(np.float32)
    allowed = np.zeros((b, t), bool)
    allowed[:, 3:8] = True
    s, e = tasks.best_span(jnp.asarray(start), jnp.asarray(end), jnp.asarray(allowed), max_len)
    for r in range(b):
        cands = [(0, 0)] + [(i, j) for i in range(3, 8) for j in range(i, min(i + max_len, 8))]
        want = max(cands, key=lambda ij: start[r, ij[0]] + end[r, ij[1]])
        assert (int(s[r]), int(e[r])) == want


def test_decoder_only_seq2seq_rows_weight_only_the_target():
    from jaxlm.data.objectives_tasks import Seq2SeqRow
    from jaxlm.data.tokenizers import ByteTokenizer

    tok = ByteTokenizer()
    row = Seq2SeqRow(tok, inputs_length=16, targets_length=6, decoder_only=True).map(
        {"record": {"source": "abc", "target": "xy"}}
    )
    src, tgt = list(tok.encode("abc")), list(tok.encode("xy"))
    full = src + [tok.eos_id] + tgt + [tok.eos_id]
    n = len(full) - 1
    assert list(row["inputs"][:n]) == full[:-1] and list(row["targets"][:n]) == full[1:]
    # Weight 1 exactly where the target is predicted: tokens x, y and the final eos.
    assert list(np.flatnonzero(row["weights"])) == list(range(len(src), n))


def test_classification_loss_ignores_padding_rows():
    from jaxlm import models
    from jaxlm.models.heads import HeadConfig

    c = config_lib.base_config()
    c.model.kind = "encoder_only"
    c.model.num_layers, c.model.embed_dim, c.model.mlp_dim, c.model.num_heads = 1, 16, 32, 2
    c.model.vocab_size = 32
    c.data.objective = "classification"
    cfg = config_lib.validate(c).model
    model = models.build(cfg, head=HeadConfig("classification", 3))
    tokens = jnp.ones((4, 8), jnp.int32)
    params = model.init(jax.random.key(0), tokens)["params"]
    batch = {"inputs": tokens, "label": jnp.asarray([0, 1, 2, 1]), "segment_ids": jnp.ones((4, 8), jnp.int32)}
    full, n_full = tasks.classification_loss(model, params, batch, None, True)
    padded = dict(batch, valid=jnp.asarray([1.0, 1.0, 0.0, 0.0]))
    part, n_part = tasks.classification_loss(model, params, padded, None, True)
    first_two, n_two = tasks.classification_loss(model, params, jax.tree.map(lambda x: x[:2], batch), None, True)
    assert float(n_full) == 4 and float(n_part) == 2 == float(n_two)
    np.testing.assert_allclose(float(part), float(first_two), rtol=1e-6)
