"""The SeqGAN oracle LSTM in JAX: jitted sampling and NLL_oracle for training data and metrics.

The arrays come from ``jaxlm.data.oracle.load_oracle`` (the equations are in its docstring and
in ``../shared/data/README.md``); ``tests/models/gan_oracle_test.py`` checks these functions
against an independent NumPy implementation of the equations.

Shapes: N sequences, T length, V vocab, E embedding, H hidden.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.data.oracle import START_TOKEN

OracleParams = dict[str, jax.Array]


def _step(p: OracleParams, x: jax.Array, h: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``x [N, E], h, c [N, H] -> (logits [N, V], h', c')``."""
    dot = lambda a, b: jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST)  # noqa: E731
    i = jax.nn.sigmoid(dot(x, p["W_i"]) + dot(h, p["U_i"]) + p["b_i"])
    f = jax.nn.sigmoid(dot(x, p["W_f"]) + dot(h, p["U_f"]) + p["b_f"])
    o = jax.nn.sigmoid(dot(x, p["W_o"]) + dot(h, p["U_o"]) + p["b_o"])
    c = f * c + i * jnp.tanh(dot(x, p["W_c"]) + dot(h, p["U_c"]) + p["b_c"])
    h = o * jnp.tanh(c)
    return dot(h, p["W_out"]) + p["b_out"], h, c


def _initial(p: OracleParams, n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    hidden = p["W_i"].shape[1]
    x = jnp.broadcast_to(p["embedding"][START_TOKEN], (n, p["embedding"].shape[1]))
    return x, jnp.zeros((n, hidden), jnp.float32), jnp.zeros((n, hidden), jnp.float32)


def token_nll(p: OracleParams, tokens: jax.Array) -> jax.Array:
    """``[N, T]`` negative log-likelihood (nats) of each token under the oracle, given the tokens before it."""
    n = tokens.shape[0]

    def body(carry: tuple, token: jax.Array) -> tuple[tuple, jax.Array]:
        x, h, c = carry
        logits, h, c = _step(p, x, h, c)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
        return (p["embedding"][token], h, c), nll

    _, nll = jax.lax.scan(body, _initial(p, n), jnp.swapaxes(tokens, 0, 1))
    return jnp.swapaxes(nll, 0, 1)


def nll(p: OracleParams, tokens: jax.Array) -> jax.Array:
    """NLL_oracle: the mean per-token negative log-likelihood of ``tokens [N, T]`` (nats)."""
    return jnp.mean(token_nll(p, tokens))


def sample(p: OracleParams, rng: jax.Array, num: int, length: int) -> jax.Array:
    """``[num, length]`` int32 oracle sequences, by inverse-CDF sampling (one uniform per token)."""
    uniforms = jax.random.uniform(rng, (length, num))

    def body(carry: tuple, u: jax.Array) -> tuple[tuple, jax.Array]:
        x, h, c = carry
        logits, h, c = _step(p, x, h, c)
        cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)
        token = jnp.minimum(jnp.sum(cdf <= (u * cdf[:, -1])[:, None], axis=-1), logits.shape[-1] - 1)
        token = token.astype(jnp.int32)
        return (p["embedding"][token], h, c), token

    _, tokens = jax.lax.scan(body, _initial(p, num), uniforms)
    return jnp.swapaxes(tokens, 0, 1)
