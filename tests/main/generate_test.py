import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import config_lib, decoding
from jaxlm.main import generate, train


def test_encoder_decoder_generation_is_cached_greedy_decoding(tmp_path, text_corpus):
    c = config_lib.load_config_file("configs/t5.py:size=tiny")
    c.data.source = "files"
    c.data.files = text_corpus
    c.data.data_dir = str(tmp_path / "d")
    c.train.num_steps = 2
    c.train.eval_steps = 1
    c.train.progress = False
    cfg = config_lib.validate(c)
    workdir = str(tmp_path / "w")
    train.run(cfg, workdir)
    texts = generate.run(cfg, workdir, "the quick brown fox")
    assert len(texts) == cfg.decode.num_samples

    exp, params, tok, _ = generate.restore.open_trained(cfg, workdir)
    inputs = jnp.asarray(tok.encode("the quick brown fox")[None, :], jnp.int32)
    start = jnp.zeros((1, 1), jnp.int32)

    # Jitted as a whole: op by op, the encoder, cache set-up and parameter scaling compiled ~150
    # one-op programs, the larger part of this test's time.
    @jax.jit
    def both(params):
        params = jax.tree.map(lambda x: x * 3.0, params)  # sharpen, so greedy ties are impossible
        encoded = exp.model.apply({"params": params}, inputs, method="encode")
        cache = generate.init_cache(exp.model, 1, exp.model_cfg.max_len, inputs)
        step = generate.make_seq2seq_step_fn(exp.model, params, encoded, inputs)
        cached = decoding.generate(step, cache, start, jax.random.key(0), max_new_tokens=12, temperature=0.0)
        uncached = decoding.generate_uncached(
            lambda t: exp.model.apply({"params": params}, inputs, t), start, max_new_tokens=12
        )
        return cached, uncached

    cached, uncached = both(params)
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(uncached))
